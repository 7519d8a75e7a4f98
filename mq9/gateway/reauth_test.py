"""When a reload must check connections again (the checks themselves run against real
nodes and nats-server in tests/test_reload.py)."""

from __future__ import annotations

import dataclasses

from mq9.config import Config
from mq9.gateway import auth, reauth


def users(**passwords) -> auth.Users:
    return auth.parse({"users": [{"user": u, "password": p} for u, p in passwords.items()]}, "t")


def test_auth_changed():
    cfg = Config()
    assert not reauth.auth_changed(cfg, None, dataclasses.replace(cfg, log_level="debug"), None)
    for change in ({"auth_token": "t"}, {"user": "u", "password": "p"}):
        assert reauth.auth_changed(cfg, None, dataclasses.replace(cfg, **change), None)
    token = dataclasses.replace(cfg, auth_token="t")
    assert reauth.auth_changed(token, None, dataclasses.replace(cfg, auth_token="t2"), None)
    old = users(a="1", b="2")
    assert reauth.auth_changed(cfg, None, cfg, old) and reauth.auth_changed(cfg, old, cfg, None)
    assert not reauth.auth_changed(cfg, old, cfg, auth.carry_over(old, users(a="1", b="2")))
    assert reauth.auth_changed(cfg, old, cfg, auth.carry_over(old, users(a="1", b="3")))
    assert reauth.auth_changed(cfg, old, cfg, auth.carry_over(old, users(a="1")))
    assert reauth.auth_changed(cfg, old, cfg, auth.carry_over(old, users(a="1", b="2", c="3")))
