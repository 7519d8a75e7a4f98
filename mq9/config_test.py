"""The security and limit settings: switches, their environment and TOML forms, and the
start-up checks that turn a bad file into a one-line error."""

from __future__ import annotations

import argparse

import pytest

from mq9 import config


def cfg(argv=(), env=None):
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return config.from_args(p.parse_args(list(argv)), environ=env or {})


@pytest.fixture(scope="module")
def pems(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import certs

    ca = certs.CA(tmp_path_factory.mktemp("pki"))
    return ca, ca.issue("server", server=True)


def test_switch_from_flag_env_and_toml(tmp_path, pems):
    ca, srv = pems
    base = ["--tls-cert", srv.cert, "--tls-key", srv.key, "--tls-ca", ca.pem]
    assert cfg(base).tls_verify is False
    assert cfg(base + ["--tls-verify"]).tls_verify is True
    assert cfg(base, {"MQ9_TLS_VERIFY": "1"}).tls_verify is True
    assert cfg(base, {"MQ9_TLS_VERIFY": "false"}).tls_verify is False
    f = tmp_path / "mq9.toml"
    f.write_text(f'tls_cert = "{srv.cert}"\ntls_key = "{srv.key}"\ntls_ca = "{ca.pem}"\n'
                 "tls_verify = true\nmax_subscriptions = 5\n")
    c = cfg(["--config", str(f)])
    assert c.tls_verify is True and c.max_subscriptions == 5
    with pytest.raises(ValueError, match="MQ9_TLS_VERIFY: not a valid bool"):
        cfg(base, {"MQ9_TLS_VERIFY": "maybe"})


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "x.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-verify"], "need --tls-cert"),
    (["--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "--tls-cert/--tls-key"),
    (["--auth-file", "/nonexistent.toml"], "--auth-file /nonexistent.toml"),
    (["--max-subscriptions", "-1"], "--max-subscriptions must be at least 0"),
    (["--lame-duck-duration", "5", "--lame-duck-grace-period", "5"],
     "--lame-duck-grace-period must be less than --lame-duck-duration"),
    (["--lame-duck-duration", "0"], "--lame-duck-duration must be at least"),
])
def test_bad_settings(argv, message):
    with pytest.raises(ValueError, match=message):
        cfg(argv)


def test_verify_needs_a_ca_and_auth_file_excludes_other_auth(tmp_path, pems):
    _, srv = pems
    with pytest.raises(ValueError, match="--tls-verify needs --tls-ca"):
        cfg(["--tls-cert", srv.cert, "--tls-key", srv.key, "--tls-verify"])
    users = tmp_path / "u.toml"
    users.write_text('[[users]]\nuser = "a"\npassword = "b"\n')
    assert cfg(["--auth-file", str(users)]).auth_file == str(users)
    with pytest.raises(ValueError, match="replaces --auth-token"):
        cfg(["--auth-file", str(users), "--auth-token", "t"])


@pytest.mark.parametrize("name", ["MQ9_PORT", "MQ9_METRICS_PORT", "MQ9_HOST"])
def test_kubernetes_service_link_is_named(name):
    with pytest.raises(ValueError) as e:
        cfg(env={name: "tcp://10.0.0.1:4222"})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}=tcp://10.0.0.1:4222 ")
    assert "Kubernetes service link" in msg and "enableServiceLinks: false" in msg


def test_a_flag_wins_over_a_service_link():
    assert cfg(["--port", "4333"], {"MQ9_PORT": "tcp://10.0.0.1:4222"}).port == 4333


def test_lame_duck_and_rejoin_settings():
    c = cfg()
    assert (c.lame_duck_duration, c.lame_duck_grace_period, c.rejoin) == (120.0, 10.0, False)
    c = cfg(["--lame-duck-duration", "30"], {"MQ9_LAME_DUCK_GRACE_PERIOD": "2.5",
                                            "MQ9_REJOIN": "1"})
    assert (c.lame_duck_duration, c.lame_duck_grace_period, c.rejoin) == (30.0, 2.5, True)
