"""The gateway mesh right after a gateway starts, with real nodes and clients.

What nats-server promises and mq9 keeps: once a subscriber's "subscribe, flush" has
returned, a message published afterwards by any connection reaches it, whichever gateway
each connection landed on, from the first client a gateway accepts. A gateway's new process
(at start, or after ``kill -9``) used to accept clients before the other gateways had
answered its hello with their interest: a publisher there could be faster than that answer
and its message was dropped. Gateways now accept clients once the node's other gateways
have acked their hello (``Peers.wait_acked``).

- a fresh node, clients connected as soon as the port accepts (before /readyz): a
  subscriber on the first gateway that accepts and a raw publisher (CONNECT and PUB in one
  write) on each other gateway as soon as that one accepts; then, for every ordered pair of
  gateways, subscribe + flush on one, publish on the other; over several fresh starts;
- one gateway killed with ``kill -9`` while the others have subscribers: a raw publisher on
  its new process, as soon as it accepts, reaches them; so does a publish after the
  survivors (whose barriers had given up on the dead process) subscribe again.

nats-py writes flush()'s PING ahead of a SUB still in its buffer, so each subscribe yields
to its flusher before flush() (see ``_check_pairs``). A connection's gateway is its INFO
``client_id >> 40`` (ids are ``index << 40`` + n).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import nats
import pytest
from natsraw import RawConn, connect_line

pytestmark = pytest.mark.timeout(240)

GATEWAYS = 3
STARTS = 4
WAIT = 10.0  # seconds a message may take under a loaded machine; a lost one never comes


async def _connect(url: str):
    return await nats.connect(url, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0)


async def _one_per_gateway(url: str, wanted: set[int], deadline: float) -> dict[int, object]:
    """Connections until one sits on each gateway of ``wanted``, connecting as soon as the
    port accepts."""
    got: dict[int, object] = {}
    spare = []
    try:
        while set(got) != wanted:
            if time.monotonic() > deadline:
                raise AssertionError(f"no connection on gateways {sorted(wanted - set(got))}")
            try:
                nc = await _connect(url)
            except Exception:
                await asyncio.sleep(0.01)  # the port does not accept yet
                continue
            g = nc.client_id >> 40
            if g in wanted and g not in got:
                got[g] = nc
            else:
                spare.append(nc)
    except BaseException:
        for nc in got.values():
            await nc.close()
        raise
    finally:
        for nc in spare:
            await nc.close()
    return got


async def _check_pairs(conns: dict[int, object], tag: str, pairs) -> list[str]:
    """For each (sub_gw, pub_gw): subscribe + flush on one, publish on the other; returns
    the pairs whose message did not arrive."""
    lost = []
    for a, b in pairs:
        subject = f"mesh.{tag}.{a}.{b}"
        sub = await conns[a].subscribe(subject)
        # nats-py (2.16) writes flush()'s PING straight to the socket, ahead of the SUB still
        # in its buffer: without a yield to its flusher the gateway sees PING before SUB and
        # nobody can promise anything (a single nats-server hides it; two gateways do not).
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await conns[a].flush()
        await conns[b].publish(subject, b"first")
        await conns[b].flush()
        try:
            msg = await sub.next_msg(timeout=WAIT)
            assert msg.data == b"first"
        except nats.errors.TimeoutError:
            lost.append(f"sub on gateway {a}, pub on gateway {b}")
        await sub.unsubscribe()
    return lost


async def test_first_message_between_gateways_right_after_start(node_factory):
    """Over several fresh starts: a subscriber on the first gateway that accepts, then a
    publisher (CONNECT and PUB in one write) on each other gateway as soon as it accepts;
    then every ordered pair of gateways with nats-py clients."""
    everything = {(a, b) for a in range(GATEWAYS) for b in range(GATEWAYS) if a != b}
    problems = []
    for i in range(STARTS):
        node = node_factory(start=False, gateways=GATEWAYS)
        node.start(wait=False)
        deadline = time.monotonic() + 60
        while True:
            try:
                first = await _connect(node.url)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.01)  # the port does not accept yet
        try:
            a = first.client_id >> 40
            sub = await first.subscribe(f"start.{i}")
            await asyncio.sleep(0)  # SUB on the wire before flush()'s PING (see _check_pairs)
            await asyncio.sleep(0)
            await first.flush()
            for b in sorted(set(range(GATEWAYS)) - {a}):
                with _raw_on_gateway(node.port, b, deadline) as conn:
                    conn.send(connect_line() + b"PUB start.%d 1\r\n%d\r\nPING\r\n" % (i, b))
                    conn.read_until(b"PONG\r\n", WAIT)
                    try:
                        msg = await sub.next_msg(timeout=WAIT)
                        assert msg.data == b"%d" % b
                    except nats.errors.TimeoutError:
                        problems.append(f"start {i}: sub on gateway {a} (first to accept), "
                                        f"raw pub on gateway {b}")
        finally:
            await first.close()
        conns = await _one_per_gateway(node.url, set(range(GATEWAYS)), deadline)
        try:
            lost = await _check_pairs(conns, f"s{i}", sorted(everything))
            problems += [f"start {i}: {x}" for x in lost]
        finally:
            for nc in conns.values():
                await nc.close()
        node.wait_ready()
        node.stop()
    assert not problems, problems


def _raw_on_gateway(port: int, gw: int, deadline: float) -> RawConn:
    """A raw connection served by gateway ``gw``, as soon as that gateway accepts."""
    while True:
        if time.monotonic() > deadline:
            raise AssertionError(f"no connection on gateway {gw}")
        try:
            conn = RawConn(port, timeout=2)
        except (OSError, AssertionError):
            time.sleep(0.01)
            continue
        if conn.info["client_id"] >> 40 == gw:
            return conn
        conn.close()


async def _expect(inbox: dict, data: bytes, problems: list, what: str) -> None:
    for g, sub in inbox.items():
        try:
            msg = await sub.next_msg(timeout=WAIT)
            assert msg.data == data
        except nats.errors.TimeoutError:
            problems.append(f"{what} subscriber on gateway {g}")


async def test_restarted_gateway_knows_interest_before_its_first_client(node_factory):
    """A gateway's new process must know the other gateways' interest before it takes a
    client: a publisher whose CONNECT and PUB arrive in one write (no PING first) on the
    restarted gateway reaches a subscriber of a surviving gateway."""
    node = node_factory(gateways=GATEWAYS)
    problems = []
    for round_ in range(3):
        victim = round_ % GATEWAYS
        subs = await _one_per_gateway(node.url, set(range(GATEWAYS)) - {victim},
                                      time.monotonic() + 30)
        try:
            inbox = {}
            for g, nc in subs.items():
                inbox[g] = await nc.subscribe(f"restart.{round_}.{g}")
                await asyncio.sleep(0)  # SUB on the wire before flush()'s PING (see _check_pairs)
                await asyncio.sleep(0)
                await nc.flush()
            old = node.pid_of("gateway", victim)
            os.kill(old, signal.SIGKILL)
            # Interest sent to the dead process: the survivors' barriers give up on it
            # (250 ms) and mark it stalled.
            for g, nc in subs.items():
                await nc.subscribe(f"dead.{round_}.{g}")
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                await nc.flush(timeout=WAIT)
            conn = _raw_on_gateway(node.port, victim, time.monotonic() + 60)
            with conn:
                assert node.pid_of("gateway", victim) != old
                data = connect_line() + b"".join(
                    b"PUB restart.%d.%d 5\r\nfirst\r\n" % (round_, g) for g in subs)
                conn.send(data + b"PING\r\n")
                conn.read_until(b"PONG\r\n", WAIT)
                await _expect(inbox, b"first", problems,
                              f"round {round_}: restarted gateway {victim} ->")
                # A survivor's "subscribe, flush" now waits for the new process in full
                # (its hello cleared the stall), not just STALLED_WAIT.
                again = {}
                for g, nc in subs.items():
                    again[g] = await nc.subscribe(f"again.{round_}.{g}")
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
                    await nc.flush()
                conn.send(b"".join(b"PUB again.%d.%d 5\r\nagain\r\n" % (round_, g)
                                   for g in subs) + b"PING\r\n")
                conn.read_until(b"PONG\r\n", WAIT)
                await _expect(again, b"again", problems,
                              f"round {round_}: after subscribing again, restarted gateway {victim} ->")
        finally:
            for nc in subs.values():
                await nc.close()
        node.wait_ready()
    assert not problems, problems
