import dataclasses

import pytest

from mq9.tools.bench import _endpoint, _workloads
from mq9.tools.common import Settings, ToolError

NONE = Settings(servers=[], token=None, user=None, password=None, timeout=5.0,
                timeout_given=False, tls_ca=None, tls_cert=None, tls_key=None)


def test_endpoint_takes_host_port_and_credentials_from_the_url():
    assert _endpoint("nats://h:4333", NONE) == {"host": "h", "port": 4333}
    assert _endpoint("tls://h", NONE) == {"host": "h", "port": 4222}
    assert _endpoint("nats://tok@h:1", NONE) == {"host": "h", "port": 1, "token": "tok"}
    assert _endpoint("nats://u:p%40ss@h:1", NONE)["password"] == "p@ss"
    # a flag or variable wins over the URL
    kw = _endpoint("nats://u:p@h:1", dataclasses.replace(NONE, token="t"))
    assert kw["token"] == "t" and "user" not in kw


@pytest.mark.parametrize("url, why", [("http://h:1", "the scheme must be nats:// or tls://"),
                                      ("nats://h:99999", "bad port"), ("nats://:1", "no host")])
def test_bad_urls_are_one_line(url, why):
    with pytest.raises(ToolError, match=why):
        _endpoint(url, NONE)


def test_workloads_keep_their_order_and_refuse_unknown_names():
    assert _workloads(None) == ["mailboxes", "acked", "replay", "rr"]
    assert _workloads(["rr,acked", "mailboxes"]) == ["mailboxes", "acked", "rr"]
    with pytest.raises(ToolError, match="unknown workload x"):
        _workloads(["acked,x"])
