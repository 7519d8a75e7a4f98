"""``mq9 bench``: the mailbox workloads of ``make bench`` against any mq9 server.

    mq9 bench [--server URL] [--workload mailboxes,acked,replay,rr] [--messages N]
              [--size B] [--in-flight N] [--mailboxes N] [--samples N] [--json]

It uses the raw load-generating client (``mq9.bench.rawnats``), not nats-py, so the client
costs far less per message than the broker it measures. A progress bar goes to stderr when
it is a terminal; the summary table (or ``--json``) to stdout. Every mailbox it creates is
deleted at the end, also after a failure or Ctrl-C (and has a short TTL in case the run is
killed). A server that does not answer ``$mq9.AI.MAILBOX.CREATE`` is not mq9: one line,
exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from mq9.tools.common import (
    Settings,
    ToolError,
    positive_float,
    positive_int,
    settings,
    status,
    table,
    tls_context,
)

if TYPE_CHECKING:
    import ssl

    from mq9.bench.rawnats import Client
    from mq9.bench.workloads import Meter
    from mq9.tools import P, SubParsers

DEFAULTS: dict[str, Any] = {"messages": 10_000, "size": 256, "in_flight": 1_000, "mailboxes": 10_000,
            "samples": 1_000, "time_limit": 120.0}


def add_parser(commands: SubParsers[P], add: Callable[..., argparse.ArgumentParser]) -> None:
    from mq9.bench.workloads import WORKLOADS

    d = DEFAULTS
    p = add(commands, "bench", "measure a server with the mailbox workloads",
            description="Run the mailbox workloads of `make bench` against a server and print "
                        "a summary table: mailbox create and delete rate, acked sends with "
                        "--in-flight unanswered and one at a time, replay of a stored backlog, "
                        "request/reply round trips. Mailboxes it creates are deleted at the "
                        "end. It loads the server: run it against a deployment you may load.",
            epilog="example: mq9 bench --server nats://mq9.example:4222 --workload acked,replay")
    p.add_argument("-w", "--workload", action="append", metavar="NAME",
                   help=f"workloads to run, comma separated or repeated: {', '.join(WORKLOADS)}"
                        " (default all)")
    p.add_argument("-n", "--messages", type=positive_int, default=d["messages"], metavar="N",
                   help=f"acked sends, and messages stored for replay (default {d['messages']:,}"
                        "; at most the server's max_msgs)")
    p.add_argument("--size", type=_size, default=d["size"], metavar="BYTES",
                   help=f"payload size (default {d['size']})")
    p.add_argument("--in-flight", type=positive_int, default=d["in_flight"], metavar="N",
                   help=f"requests unanswered at a time per connection (default "
                        f"{d['in_flight']:,})")
    p.add_argument("--mailboxes", type=positive_int, default=d["mailboxes"], metavar="N",
                   help=f"mailboxes created then deleted (default {d['mailboxes']:,})")
    p.add_argument("--samples", type=positive_int, default=d["samples"], metavar="N",
                   help=f"one-at-a-time requests for the latency rows (default "
                        f"{d['samples']:,})")
    p.add_argument("--time-limit", type=positive_float, default=d["time_limit"], metavar="SECONDS",
                   help=f"most one workload may take (default {d['time_limit']:g})")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def _size(text: str) -> int:
    from mq9.tools.common import whole_number

    return whole_number(text, 0, "whole number of bytes", "must be 0 or more")


def _workloads(given: list[str] | None) -> list[str]:
    from mq9.bench.workloads import WORKLOADS

    if not given:
        return list(WORKLOADS)
    names = [n.strip() for g in given for n in g.split(",") if n.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad or not names:
        raise ToolError(f"unknown workload {', '.join(bad) or '(none)'}; choose from "
                        f"{', '.join(WORKLOADS)}")
    return [n for n in WORKLOADS if n in names]


# ---- connecting ----------------------------------------------------------------------------

def _endpoint(url: str, cfg: Settings) -> dict[str, Any]:
    """rawnats.connect's arguments for one server URL (credentials in the URL count when no
    flag or variable gives any, as with nats-py)."""
    u = urlsplit(url)
    if u.scheme not in ("nats", "tls"):
        raise ToolError(f"bad server URL {url!r}: the scheme must be nats:// or tls://")
    try:
        port = u.port or 4222
    except ValueError:
        raise ToolError(f"bad server URL {url!r}: bad port") from None
    if not u.hostname:
        raise ToolError(f"bad server URL {url!r}: no host")
    kw: dict[str, Any] = {"host": u.hostname, "port": port}
    if cfg.token:
        kw["token"] = cfg.token
    elif cfg.user:
        kw["user"], kw["password"] = cfg.user, cfg.password or ""
    elif u.username and u.password is not None:
        kw["user"], kw["password"] = unquote(u.username), unquote(u.password)
    elif u.username:
        kw["token"] = unquote(u.username)
    return kw


def _why(e: BaseException) -> str:
    import ssl

    from mq9.bench import rawnats as rn

    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is the broker running?)"
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):
        return "timed out"
    if isinstance(e, ssl.SSLError):
        return f"TLS: {e.reason or e}"
    if isinstance(e, rn.NatsError) and "authorization" in str(e).lower():
        return "authorization violation (check --auth-token / --user / --password)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


async def _first_server(cfg: Settings, tls: ssl.SSLContext | None) -> tuple[dict[str, Any], Client]:
    """The arguments for the first server of the list that accepts a connection, and that
    connection."""
    from mq9.bench import rawnats as rn

    errors: list[str] = []
    for url in cfg.servers:
        kw = _endpoint(url, cfg)
        try:
            nc = await rn.connect(**kw, name="mq9-bench", timeout=cfg.timeout, tls=tls)
            return kw, nc
        except (OSError, TimeoutError, rn.NatsError) as e:
            errors.append(f"{url}: {_why(e)}")
    raise ToolError("cannot connect to " + "; ".join(errors))


# ---- progress and output -------------------------------------------------------------------

class Bar:
    """A progress bar on stderr, redrawn in place from the meter a few times a second; only
    on a terminal (a log gets nothing)."""

    WIDTH = 24

    def __init__(self, meter: Meter):
        self.meter = meter
        self.tty = sys.stderr.isatty()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.tty:
            self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(0.1)

    def draw(self) -> None:
        m = self.meter
        total = max(m.total, 1)
        done = min(m.done, total)
        fill = done * self.WIDTH // total
        rate = done / max(time.monotonic() - m.started, 1e-9)
        sys.stderr.write(f"\r\033[K{m.what[:40]:40} [{'#' * fill}{'.' * (self.WIDTH - fill)}] "
                         f"{done:,}/{m.total:,} {rate:,.0f}/s")
        sys.stderr.flush()

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.1f} µs" if v < 100 else f"{v:,.0f} µs"


def _rows_text(results: list[dict[str, Any]]) -> list[str]:
    rows: list[tuple[str, ...]] = [("WORKLOAD", "TEST", "OPERATIONS", "TIME", "RATE", "P50", "P99")]
    for r in results:
        if r.get("error"):
            rows.append((r["workload"], "FAILED (below)", "", "", "", "", ""))
            continue
        rows.append((r["workload"], r["name"], f"{r['operations']:,}", f"{r['seconds']:.2f}s",
                     f"{r['rate']:,.0f} {r['unit']}", _us(r["p50_us"]), _us(r["p99_us"])))
    lines = table(rows)
    failed = [f"{r['workload']}: {r['error']}" for r in results if r.get("error")]
    return lines + (["", "failed:"] + ["  " + f for f in failed] if failed else [])


# ---- running -------------------------------------------------------------------------------

async def _bench(ns: argparse.Namespace, names: list[str]) -> tuple[dict[str, Any], int]:
    from mq9.bench import rawnats as rn
    from mq9.bench import workloads as wl

    cfg = settings(ns)
    tls = tls_context(cfg)
    kw, probe = await _first_server(cfg, tls)
    scheme = "tls" if tls is not None or probe.info.get("tls_required") else "nats"
    where = f"{scheme}://{kw['host']}:{kw['port']}"
    plan = wl.Plan(messages=ns.messages, size=ns.size, inflight=ns.in_flight,
                   mailboxes=ns.mailboxes, samples=ns.samples, time_limit=ns.time_limit)

    async def connect(name: str) -> rn.Client:
        return await rn.connect(**kw, name=name, timeout=cfg.timeout, tls=tls)

    session = wl.Session(connect, plan)
    info = probe.info
    # the --json document
    report: dict[str, Any] = {"server": where, "server_version": info.get("version", ""),
              "mq9_version": info.get("mq9_version", ""),
              "server_name": info.get("server_name", ""), "max_payload": info.get("max_payload"),
              "plan": {"workloads": names, "messages": plan.messages, "size": plan.size,
                       "in_flight": plan.inflight, "mailboxes": plan.mailboxes,
                       "samples": plan.samples, "time_limit": plan.time_limit},
              "results": []}
    bar = Bar(session.meter)
    interrupted = False
    failed = 0
    try:
        try:
            await session.check_mq9(probe)
        except wl.NotMq9 as e:
            raise ToolError(f"{where} is not an mq9 server: {e} (a plain NATS server?)") from e
        except wl.WorkloadError as e:
            raise ToolError(f"{where}: {e}") from e
        if isinstance(info.get("max_payload"), int) and plan.size > info["max_payload"]:
            raise ToolError(f"--size {plan.size} is more than the server's max_payload "
                            f"({info['max_payload']})")
        bar.start()
        for name in names:
            t = time.monotonic()
            try:
                rows = await asyncio.wait_for(session.run(name), plan.time_limit + 15)
                report["results"] += [r.as_dict() for r in rows]
            except (wl.WorkloadError, rn.NatsError, OSError, TimeoutError) as e:
                failed += 1
                why = (f"over the {plan.time_limit:g}s time limit" if isinstance(e, TimeoutError)
                       and time.monotonic() - t >= plan.time_limit else _why(e))
                report["results"].append({"workload": name, "error": why})
    except asyncio.CancelledError:  # Ctrl-C: still clean up
        interrupted = True
    finally:
        bar.stop()
        await probe.close()
        if session.alive:
            try:
                left = await asyncio.wait_for(session.cleanup(), 40)
            except (OSError, TimeoutError, rn.NatsError):
                left = len(session.alive)
        else:
            left = 0
        report["cleanup"] = {"created": session.created, "deleted": session.deleted,
                             "left": left}
        if left:
            status(f"mq9: {left} mailbox(es) could not be deleted; they expire in "
                   f"{plan.ttl}s at most")
    if interrupted:
        return report, 130
    return report, 1 if failed else 0


def run(ns: argparse.Namespace) -> int:
    from mq9.bench import rawnats as rn

    try:
        names = _workloads(ns.workload)
    except ToolError as e:
        status(f"mq9: {e}")
        return 2
    rn.install_uvloop()

    async def main() -> tuple[dict[str, Any], int]:
        task = asyncio.ensure_future(_bench(ns, names))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await task

    try:
        report, code = asyncio.run(main())
    except ToolError as e:
        status(f"mq9: {e}")
        return 1
    except asyncio.CancelledError:
        return 130
    except Exception as e:  # noqa: BLE001 - anything unforeseen: one line, no traceback
        status(f"mq9: unexpected error: {type(e).__name__}: {e}")
        return 1
    if ns.json:
        sys.stdout.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    else:
        about = [f"mq9 {report['mq9_version'] or '?'}", f"NATS {report['server_version']}",
                 report["server_name"]]
        lines = [f"server:  {report['server']}  ({', '.join(a for a in about if a)})",
                 f"plan:    {', '.join(names)}; {ns.messages:,} messages of {ns.size} B, "
                 f"{ns.in_flight:,} in flight, {ns.mailboxes:,} mailboxes, "
                 f"{ns.samples:,} latency samples", ""]
        lines += _rows_text(report["results"])
        c = report["cleanup"]
        lines += ["", f"cleanup: {c['deleted']:,} of {c['created']:,} mailboxes created "
                      f"were deleted"]
        sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
    return code
