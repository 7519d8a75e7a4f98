"""What a reload may change, and the file that carries it to the children."""

from __future__ import annotations

import dataclasses
import signal

import pytest

from mq9 import reload
from mq9.config import Config
from mq9.wire import Reloaded


def test_every_reloadable_setting_is_a_setting():
    names = {f.name for f in dataclasses.fields(Config)}
    assert set(reload.RELOADABLE) <= names
    assert {"auth_file", "tls_cert", "tls_key", "log_level"} <= set(reload.RELOADABLE)


def test_changes_split_into_applied_and_needing_a_restart():
    running = Config()
    new = dataclasses.replace(running, log_level="debug", auth_file="u.toml", port=4333,
                              shards=3, config="other.toml")
    assert reload.changed(running, new) == ["log_level", "auth_file"]
    assert reload.needs_restart(running, new) == ["port", "shards"]
    assert reload.apply(running, Reloaded(generation=1, **reload.settings(new))) == \
        dataclasses.replace(running, log_level="debug", auth_file="u.toml")


def test_file_round_trip(tmp_path):
    assert reload.read(str(tmp_path)) is None
    doc = Reloaded(generation=3, **reload.settings(Config(tls_cert="c.pem", tls_key="k.pem")))
    reload.write(str(tmp_path), doc)
    assert reload.read(str(tmp_path)) == doc
    assert [p.name for p in tmp_path.iterdir()] == [reload.FILE]


def test_signals_blocked_restores_the_mask():
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with reload.signals_blocked():
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert signal.SIGHUP in blocked and signal.SIGUSR2 in blocked
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_load_reads_the_config_file_again_and_says_what_is_wrong(tmp_path):
    from mq9 import cli

    conf = tmp_path / "mq9.toml"
    conf.write_text('log_level = "info"\n')
    ns = cli._parser().parse_args(["node", "--config", str(conf), "--max-msgs", "7"])
    running = reload.load(ns, {}, Config())
    conf.write_text('log_level = "debug"\nmax_msgs = 9\n')
    new = reload.load(ns, {"MQ9_LOG_LEVEL": "warning"}, running)
    # the flag still wins over the file, the environment given over the file
    assert (new.log_level, new.max_msgs) == ("warning", 7)
    conf.write_text('log_level = "loud"\n')
    with pytest.raises(ValueError, match="log_level must be one of"):
        reload.load(ns, {}, running)
    conf.unlink()
    with pytest.raises(ValueError, match=f"^{conf}: No such file or directory$"):
        reload.load(ns, {}, running)
    users = tmp_path / "users.toml"
    users.write_text("[[users]]\nuser = \n")
    with pytest.raises(ValueError, match="--auth-file"):
        reload.load(None, {}, Config(auth_file=str(users)))
