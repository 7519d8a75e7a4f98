"""Which broker URLs a client command uses."""

from __future__ import annotations

import argparse

import pytest

from mq9.tools.common import DEFAULT_SERVER, ToolError, server_urls


@pytest.mark.parametrize("flag, env, expected", [
    (None, {}, [DEFAULT_SERVER]),
    (None, {"NATS_URL": "nats://n:4222"}, ["nats://n:4222"]),
    # the nats CLI's list form, with spaces, a bare host:port and a tls:// URL
    (None, {"NATS_URL": "nats://a:4222, b:4223 ,tls://c:4224,"},
     ["nats://a:4222", "nats://b:4223", "tls://c:4224"]),
    (None, {"NATS_URL": "nats://u:p@a:4222"}, ["nats://u:p@a:4222"]),
    (None, {"MQ9_SERVER": "m:1", "NATS_URL": "n:2"}, ["nats://m:1"]),
    ("f:3", {"MQ9_SERVER": "m:1", "NATS_URL": "n:2"}, ["nats://f:3"]),
    # empty values (an unset compose variable) fall through to the next source
    (None, {"MQ9_SERVER": "", "NATS_URL": " , "}, [DEFAULT_SERVER]),
    (None, {"MQ9_SERVER": "", "NATS_URL": "n:2"}, ["nats://n:2"]),
])
def test_server_precedence(flag, env, expected):
    ns = argparse.Namespace(**({"server": flag} if flag else {}))
    assert server_urls(ns, env) == expected


def test_a_flag_without_a_url_is_an_error():
    with pytest.raises(ToolError, match="no server"):
        server_urls(argparse.Namespace(server=","), {})
