"""TLS and an auth file, end to end with nats-py: a node that requires client certificates
and a user who may only use mailboxes ($mq9.AI.> and _INBOX.>), as README's Security
section sets it up. The byte-level refusals are compared with nats-server in
test_security_diff.py; this checks what a user of a stock client sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl

import certs
import nats
import natsraw
import pytest
from agents import T, create

MAILBOX_ONLY = {"publish": ["$mq9.AI.>"], "subscribe": ["_INBOX.>", "$mq9.AI.INBOX.>"]}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    ca = certs.CA(base / "ca")
    other = certs.CA(base / "other", name="another CA")
    return {"ca": ca, "server": ca.issue("server", server=True), "client": ca.issue("agent", server=False),
            "stranger": other.issue("stranger", server=False)}


@pytest.fixture(scope="module")
def tls_node(tmp_path_factory, pki):
    import bcrypt
    from nodeproc import Node

    base = tmp_path_factory.mktemp("tls-node")
    users = base / "users.toml"
    pw_hash = bcrypt.hashpw(b"agent-pw", bcrypt.gensalt(4)).decode()
    publish, subscribe = json.dumps(MAILBOX_ONLY["publish"]), json.dumps(MAILBOX_ONLY["subscribe"])
    users.write_text(
        f'[[users]]\nuser = "agent"\npassword = "{pw_hash}"\n'
        f'[users.permissions]\npublish = {publish}\nsubscribe = {subscribe}\n'
        '[[users]]\nuser = "admin"\npassword = "admin-pw"\n')
    node = Node(base / "node", tls_cert=pki["server"].cert, tls_key=pki["server"].key,
                tls_ca=pki["ca"].pem, tls_verify=True, tls_timeout=1, auth_file=str(users),
                max_subscriptions=20)
    try:
        node.start()
        yield node
    finally:
        node.close()


def client_ctx(pki, who: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"].pem)
    if who:
        ctx.load_cert_chain(pki[who].cert, pki[who].key)
    return ctx


async def connect(node, ctx, user="agent", password="agent-pw", **kw):
    errors = []

    async def on_error(e):
        errors.append(e)

    nc = await nats.connect(f"tls://127.0.0.1:{node.port}", tls=ctx, user=user, password=password,
                            connect_timeout=T, allow_reconnect=False, error_cb=on_error, **kw)
    nc.errors_seen = errors
    return nc


async def test_mailbox_round_trip_over_tls_with_a_mailbox_only_user(tls_node, pki):
    a = await connect(tls_node, client_ctx(pki))
    b = await connect(tls_node, client_ctx(pki))
    try:
        box_a = await create(a, type="standard", ttl=60)
        box_b = await create(b, type="standard", ttl=60)
        inbox = await b.subscribe(f"$mq9.AI.INBOX.{box_b['mail_id']}.*")
        await a.publish(f"$mq9.AI.INBOX.{box_b['mail_id']}.normal",
                        json.dumps({"from": box_a["mail_id"], "type": "task"}).encode())
        msg = await inbox.next_msg(T)
        assert json.loads(msg.data) == {"from": box_a["mail_id"], "type": "task"}
        # Outside $mq9.AI: the broker says no (nats-py reports the -ERR to error_cb) and
        # the connection stays usable.
        await a.publish("plain.subject", b"x")
        await a.flush(T)
        await asyncio.sleep(0.1)
        assert any("permissions violation for publish" in str(e).lower() for e in a.errors_seen), a.errors_seen
        assert a.is_connected
        assert (await create(a, type="standard", ttl=60))["mail_id"]
    finally:
        await a.close()
        await b.close()


async def test_refused_clients_do_not_disturb_the_gateways(tls_node, pki):
    good = await connect(tls_node, client_ctx(pki), user="admin", password="admin-pw")
    try:
        sub = await good.subscribe("watch.>")
        # no client certificate, a certificate from another CA, a wrong bcrypt password
        for ctx, pw in ((client_ctx(pki, None), "agent-pw"), (client_ctx(pki, "stranger"), "agent-pw"),
                        (client_ctx(pki), "wrong")):
            # nats-py raises whatever its TLS or auth layer met: any failure to connect will do
            with pytest.raises(Exception):  # noqa: B017
                nc = await connect(tls_node, ctx, password=pw)
                await nc.close()
        # plain text instead of a ClientHello: INFO, then the connection is dropped
        with natsraw.RawConn(tls_node.port) as raw:
            assert raw.info["tls_required"] is True and raw.info["tls_verify"] is True
            raw.send(natsraw.connect_line(user="admin", **{"pass": "admin-pw"}) + b"PING\r\n")
            assert raw.read_until_closed(3) == b"" and raw.closed
        # a handshake record header followed by garbage; TLS, then bytes that are not TLS records
        with natsraw.RawConn(tls_node.port) as raw:
            raw.send(b"\x16\x03\x01\x00\x05hello" + bytes(range(256)))
            assert raw.read_until_closed(3).startswith(b"\x15") and raw.closed  # an alert record
        s = socket.create_connection(("127.0.0.1", tls_node.port), timeout=3)
        s.recv(4096)
        t = client_ctx(pki).wrap_socket(s, server_hostname="localhost")
        t.sendall(natsraw.connect_line(user="admin", **{"pass": "admin-pw"}) + b"PING\r\n")
        assert b"PONG" in t.recv(4096)
        os.write(t.fileno(), b"not a TLS record\r\n")  # under the TLS layer
        with pytest.raises((ssl.SSLError, OSError)):
            while t.recv(4096):
                pass
            raise OSError("closed")
        t.close()
        # a client that connects and says nothing is dropped after --tls-timeout
        s = socket.create_connection(("127.0.0.1", tls_node.port), timeout=3)
        s.recv(4096)
        assert s.recv(4096) == b""
        s.close()
        # the first connection never noticed
        await good.publish("watch.it", b"still here")
        assert (await sub.next_msg(T)).data == b"still here"
        # the gateways still take new clients, on every gateway process
        for _ in range(4):
            nc = await connect(tls_node, client_ctx(pki))
            await nc.flush(T)
            await nc.close()
    finally:
        await good.close()


async def test_max_subscriptions_with_nats_py(tls_node, pki):
    nc = await connect(tls_node, client_ctx(pki), user="admin", password="admin-pw")
    try:
        for i in range(20):
            await nc.subscribe(f"s.{i}")
        await nc.flush(T)
        await nc.subscribe("s.over")
        for _ in range(50):
            if nc.last_error is not None:
                break
            await asyncio.sleep(0.05)
        # nats-py closes the connection itself on any -ERR but a permissions violation
        # (it does the same with nats-server, which keeps the connection open)
        assert "maximum subscriptions exceeded" in str(nc.last_error), nc.last_error
    finally:
        await nc.close()


async def test_varz_and_connz_show_tls(tls_node, pki):
    status, body = tls_node.http_get("/varz", timeout=3)
    assert status == 200
    v = json.loads(body)
    assert v["tls_required"] is True and v["tls_verify"] is True and v["tls_timeout"] == 1
    assert v["auth_required"] is True and v["max_subscriptions"] == 20
    nc = await connect(tls_node, client_ctx(pki), name="tls-watcher")
    try:
        conns = []
        for _ in range(60):  # gateways write their connection lists once a second
            conns = [c for c in json.loads(tls_node.http_get("/connz", timeout=3)[1])["connections"]
                     if c.get("name") == "tls-watcher"]
            if conns:
                break
            await asyncio.sleep(0.1)
        assert conns and conns[0]["tls_version"] in ("1.2", "1.3") and conns[0]["tls_cipher_suite"], conns
    finally:
        await nc.close()


async def test_handshake_first(node_factory, pki):
    """--tls-handshake-first (nats-server's handshake_first): nothing in clear text, INFO
    is the first thing inside TLS; a plain client gets nothing at all."""
    node = node_factory(tls_cert=pki["server"].cert, tls_key=pki["server"].key, tls_handshake_first=True,
                        gateways=1, shards=1, tls_timeout=1)
    with natsraw.RawConn(node.port, read_info=False) as raw:
        raw.send(natsraw.connect_line() + b"PING\r\n")
        assert raw.read_until_closed(3) == b"" and raw.closed
    nc = await nats.connect(f"tls://127.0.0.1:{node.port}", tls=client_ctx(pki, None),
                            tls_handshake_first=True, connect_timeout=T, allow_reconnect=False)
    try:
        sub = await nc.subscribe("hf")
        await nc.publish("hf", b"inside")
        assert (await sub.next_msg(T)).data == b"inside"
        assert nc._server_info.get("tls_required") is True
    finally:
        await nc.close()


def test_cli_tools_over_tls(tls_node, pki):
    """`mq9 mailbox create` etc. with a tls:// URL and a client certificate."""
    import subprocess
    import sys

    from nodeproc import REPO, child_env

    def mq9(*extra):
        return subprocess.run([sys.executable, "-m", "mq9", "mailbox", "create", "--json",
                               "--server", f"tls://127.0.0.1:{tls_node.port}", "--timeout", "3",
                               "--user", "agent", "--password", "agent-pw", *extra],
                              env=child_env(), cwd=REPO, capture_output=True, timeout=30)

    p = mq9("--tls-ca", pki["ca"].pem, "--tls-cert", pki["client"].cert, "--tls-key", pki["client"].key)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["mail_id"].startswith("m-")
    p = mq9("--tls-ca", pki["ca"].pem)  # no client certificate: refused
    assert p.returncode == 1 and p.stderr.decode().startswith("mq9: cannot connect to"), p.stderr
    assert b"Traceback" not in p.stderr
