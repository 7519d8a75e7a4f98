"""``python -m mq9.localcluster`` (``make cluster``): its layout, flags and secret. The
three real nodes are started in tests/test_localcluster.py."""

from __future__ import annotations

import stat

import pytest

from mq9 import localcluster as lc


def test_default_layout_is_the_readmes():
    cfg, extra = lc.parse([])
    assert extra == []
    nodes = lc.layout(cfg)
    assert [n.name for n in nodes] == ["n1", "n2", "n3"]
    assert [n.port for n in nodes] == [4222, 4223, 4224]
    assert [n.metrics_port for n in nodes] == [9090, 9091, 9092]
    assert [n.cluster_port for n in nodes] == [6222, 6232, 6242]
    assert [str(n.data_dir) for n in nodes] == ["mq9-cluster/n1", "mq9-cluster/n2",
                                                "mq9-cluster/n3"]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_first_node_founds_the_others_join_it(tmp_path):
    cfg, extra = lc.parse(["--dir", str(tmp_path), "--log-level", "warning"])
    n1, n2, n3 = lc.layout(cfg)
    secret = tmp_path / "cluster-secret"
    first = n1.argv(cfg, secret, None, extra)
    assert first[1:4] == ["-m", "mq9", "node"]
    assert "--join" not in first
    for n in (n2, n3):
        argv = n.argv(cfg, secret, n1, extra)
        assert flag(argv, "--join") == "127.0.0.1:6222"
        assert flag(argv, "--node-id") == n.name
        assert flag(argv, "--host") == flag(argv, "--advertise") == "127.0.0.1"
        assert flag(argv, "--cluster-secret-file") == str(secret)
        assert flag(argv, "--data-dir") == str(tmp_path / n.name)
        assert argv[-2:] == ["--log-level", "warning"]  # pass-through flags come last


@pytest.mark.parametrize("argv, says", [
    (["--data-dir", "x"], "--data-dir is set per node"),
    (["--join=127.0.0.1:1"], "--join is set per node"),
    (["--cluster-secret", "s" * 20], "--cluster-secret is set per node"),
    (["--shards", "5", "--gateways", "5"], "must stay below 10"),
    (["--nodes", "0"], "between 1 and 9"),
    (["--metrics-port", "4223"], "overlap"),
    (["--cluster-port", "4200"], "overlap"),
    (["--port", "65534"], "out of range"),
])
def test_bad_flags_are_refused(argv, says):
    with pytest.raises(lc.UsageError, match=says):
        lc.parse(argv)


def test_bad_flags_give_one_line(capsys):
    assert lc.main(["--gateways", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "mq9.localcluster: error: --shards and --gateways must be at least 1\n"


def test_secret_is_made_once_and_kept(tmp_path):
    path = lc.secret_file(tmp_path / "c")
    secret = path.read_text()
    assert len(secret.strip()) == 64 and int(secret, 16)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert lc.secret_file(tmp_path / "c") == path and path.read_text() == secret
