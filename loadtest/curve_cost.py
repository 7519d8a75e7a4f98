"""CPU cost of CURVE on the links between nodes, without the rest of the broker around it.

    python -m loadtest.curve_cost [--count N] [--size BYTES]

A DEALER sends ``count`` frames of ``size`` bytes over TCP on 127.0.0.1 to a ROUTER that
echoes them, plain and then with mq9's CURVE setup (``mq9.curve``, ZAP check included),
``inflight`` at a time. Prints the CPU time this process (both ends, ZeroMQ's I/O threads
included) spent per round trip. ``loadtest.cluster_hop`` measures the same hop inside the
broker, where other work on a shared machine drowns a difference this small.
"""

from __future__ import annotations

import argparse
import time

import zmq

from mq9 import curve

SECRET = "curve-cost-bench-secret"


def run(count: int, size: int, inflight: int, secure: bool) -> tuple[float, float]:
    ctx = zmq.Context()
    auth = curve.start_authenticator(ctx, SECRET) if secure else None
    router = ctx.socket(zmq.ROUTER)
    if secure:
        curve.server(router, SECRET)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    if secure:
        curve.client(dealer, SECRET)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    frame = b"x" * size
    dealer.send(frame)  # the handshake, outside the timing
    router.send_multipart(router.recv_multipart())
    dealer.recv()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(dealer, zmq.POLLIN)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sent = done = 0
    while sent < min(inflight, count):
        dealer.send(frame)
        sent += 1
    while done < count:
        for sock, _ in poller.poll():
            if sock is router:
                while router.poll(0):
                    router.send_multipart(router.recv_multipart())
            else:
                while dealer.poll(0):
                    dealer.recv()
                    done += 1
                    if sent < count:
                        dealer.send(frame)
                        sent += 1
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    for s in (router, dealer):
        s.close(linger=0)
    if auth is not None:
        auth.stop()
    ctx.term()
    return cpu / count * 1e6, count / wall


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.curve_cost")
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=300, help="frame bytes (one acked send ~300)")
    ap.add_argument("--inflight", type=int, default=100)
    a = ap.parse_args()
    print(f"{a.count} round trips of {a.size} B frames over TCP on 127.0.0.1, "
          f"{a.inflight} in flight")
    print(f"{'link':8} {'CPU us / round trip':>20} {'round trips/s':>15}")
    for secure in (False, True):
        cpu_us, rate = run(a.count, a.size, a.inflight, secure)
        print(f"{'CURVE' if secure else 'plain':8} {cpu_us:>20.1f} {rate:>15,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
