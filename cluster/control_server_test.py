"""The control server's table, through the real channel of a one-member group."""

from __future__ import annotations

import socket

import pytest

from mq9.cluster.control import ControlError, call
from mq9.cluster.control_server import ControlServer
from mq9.cluster.metadata import MetadataGroup, RaftTiming


@pytest.fixture
def group(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    g = MetadataGroup("n1", f"127.0.0.1:{port}", data_dir=str(tmp_path),
                      timing=RaftTiming.fast()).open(timeout=10)
    yield g
    g.close()


def _code(address: str, op: str, args=None) -> str:
    with pytest.raises(ControlError) as e:
        call(address, op, args)
    return e.value.code


def test_the_table_names_every_operation():
    assert sorted(ControlServer._handlers) == ["add_node", "remove_node", "snapshot", "status",
                                               "transfer", "write"]


def test_answers_and_refusals(group):
    a = group.address
    assert call(a, "status")["node_id"] == "n1"
    assert call(a, "snapshot")["state"]["members"].keys() == {"n1"}
    res = call(a, "write", {"op": "queue_group_add",
                            "args": {"node_id": "n1", "subject": "s", "queue": "q"}})
    assert res["ok"] and group.snapshot().queue_groups == {"n1": (("s", "q"),)}
    assert call(a, "add_node", {"address": a}) == {"ok": True, "changed": False}
    assert _code(a, "write", {"op": "noop", "args": {"x": "y" * 70_000}}) == "too_large"
    assert _code(a, "add_node", {"address": "no-port"}) == "bad_request"
    assert _code(a, "no_such_thing") == "bad_request"
    assert _code(a, "status", ["not", "an", "object"]) == "bad_request"
    # no caught-up follower to hand the leadership to
    assert _code(a, "transfer") not in ("bad_request", "not_leader")
