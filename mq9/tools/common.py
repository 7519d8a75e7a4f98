"""What every client command shares: the connection flags, connecting with a one-line
error, turning broker error replies into ``ToolError``, and output helpers.

A command is ``async def run(nc, ns) -> int``; ``execute`` connects, runs it and turns every
expected failure into ``mq9: <message>`` on stderr and exit status 1 (130 on Ctrl-C), never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import inspect
import json
import os
import sys
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # nats-py is imported only when a command runs (``mq9 node`` starts faster)
    import ssl

    from nats.aio.client import Client
    from nats.aio.msg import Msg

DEFAULT_SERVER = "nats://127.0.0.1:4222"
DEFAULT_TIMEOUT = 5.0
PRIORITIES = ("urgent", "normal", "notify")


class ToolError(Exception):
    """An expected failure: printed as ``mq9: <message>``, exit status 1."""


# Connections the command is closing on purpose: their disconnect is not news.
_closing: weakref.WeakSet[Client] = weakref.WeakSet()


# ---- flags ---------------------------------------------------------------------------------

def add_connection_flags(p: argparse.ArgumentParser) -> None:
    """The flags every client command takes (after the command: ``mq9 send --server X``).
    Left out, they are absent from the namespace; ``settings`` fills in the variables and
    defaults."""
    g = p.add_argument_group("connection")
    g.add_argument("-s", "--server", default=argparse.SUPPRESS, metavar="URL",
                   help=f"NATS URL(s) of the broker, comma separated; --server wins over "
                        f"MQ9_SERVER, MQ9_SERVER over NATS_URL (as the nats CLI reads it), "
                        f"default {DEFAULT_SERVER}")
    g.add_argument("--auth-token", default=argparse.SUPPRESS, metavar="TOKEN",
                   help="server auth token, as given to `mq9 node --auth-token` "
                        "(env MQ9_AUTH_TOKEN)")
    g.add_argument("--user", default=argparse.SUPPRESS, help="server user (env MQ9_USER)")
    g.add_argument("--password", "--pass", dest="password", default=argparse.SUPPRESS,
                   help="server password (env MQ9_PASS)")
    g.add_argument("--tls-ca", default=argparse.SUPPRESS, metavar="FILE",
                   help="CA that signed the broker's certificate, for a broker started with "
                        "--tls-cert (env MQ9_CLIENT_TLS_CA; a tls:// URL alone uses the system CAs)")
    g.add_argument("--tls-cert", default=argparse.SUPPRESS, metavar="FILE",
                   help="client certificate, for a broker started with --tls-verify "
                        "(env MQ9_CLIENT_TLS_CERT)")
    g.add_argument("--tls-key", default=argparse.SUPPRESS, metavar="FILE",
                   help="key of --tls-cert (env MQ9_CLIENT_TLS_KEY)")
    g.add_argument("--timeout", type=positive_float, default=argparse.SUPPRESS,
                   metavar="SECONDS",
                   help=f"connect and reply timeout (default {DEFAULT_TIMEOUT:g}; for sub: "
                        "stop waiting after this long)")


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return v


def whole_number(text: str, minimum: int, what: str = "whole number", rule: str = "") -> int:
    """An argparse value: an integer of at least ``minimum``, with one-line errors."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a {what}: {text!r}") from None
    if v < minimum:
        raise argparse.ArgumentTypeError(f"{rule or f'must be at least {minimum}'}: {text!r}")
    return v


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def server_urls(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> list[str]:
    """--server > MQ9_SERVER > NATS_URL > the default; each may list several URLs with
    commas, like the nats CLI's NATS_URL ("nats://a:4222,nats://b:4222")."""
    env = os.environ if env is None else env
    if getattr(ns, "server", None) is not None:
        return normalize_servers(ns.server)  # given, so a value without a URL is an error
    for text in (env.get("MQ9_SERVER"), env.get("NATS_URL")):
        if text and text.strip(" ,"):  # an empty variable (unset in compose) is no choice
            return normalize_servers(text)
    return [DEFAULT_SERVER]


@dataclass(frozen=True, slots=True)
class Settings:
    """A client command's connection settings: flags, else variables, else defaults."""

    servers: list[str]
    token: str | None
    user: str | None
    password: str | None
    timeout: float
    timeout_given: bool
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None


def settings(ns: argparse.Namespace) -> Settings:
    env = os.environ
    timeout: float | None = getattr(ns, "timeout", None)
    return Settings(
        servers=server_urls(ns, env),
        token=getattr(ns, "auth_token", None) or env.get("MQ9_AUTH_TOKEN") or None,
        user=getattr(ns, "user", None) or env.get("MQ9_USER") or None,
        password=getattr(ns, "password", None) or env.get("MQ9_PASS") or None,
        timeout=timeout if timeout is not None else DEFAULT_TIMEOUT,
        timeout_given=timeout is not None,
        # MQ9_CLIENT_*: MQ9_TLS_CERT etc. are the node's own (server) files
        tls_ca=getattr(ns, "tls_ca", None) or env.get("MQ9_CLIENT_TLS_CA") or None,
        tls_cert=getattr(ns, "tls_cert", None) or env.get("MQ9_CLIENT_TLS_CERT") or None,
        tls_key=getattr(ns, "tls_key", None) or env.get("MQ9_CLIENT_TLS_KEY") or None,
    )


def tls_context(cfg: Settings) -> ssl.SSLContext | None:
    """An SSLContext when TLS is asked for (a tls:// URL or any --tls-* file), else None."""
    import ssl

    if not (cfg.tls_ca or cfg.tls_cert
            or any(s.startswith("tls://") for s in cfg.servers)):
        return None
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca)
        if cfg.tls_cert:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ToolError(f"TLS files: {getattr(e, 'strerror', None) or e}") from None
    return ctx


def normalize_servers(text: str) -> list[str]:
    out: list[str] = []
    for s in text.split(","):
        s = s.strip()
        if not s:
            continue
        if "://" not in s:
            s = "nats://" + s
        out.append(s)
    if not out:
        raise ToolError(f"no server in {text!r}")
    return out


def parse_headers(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    headers: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition(":")
        key = key.strip()
        if not sep or not key or any(c in key for c in " \t\r\n"):
            raise ToolError(f"bad header {item!r}: expected KEY:VALUE")
        if "\r" in value or "\n" in value:
            raise ToolError(f"bad header {item!r}: the value has a line break")
        headers[key] = value.strip()
    return headers


def check_subject(subject: str, what: str = "subject") -> str:
    if not subject or any(c in subject for c in " \t\r\n"):
        raise ToolError(f"bad {what} {subject!r}: it must be non-empty, without spaces")
    return subject


def read_body(body: str | None) -> bytes:
    if body is None:
        return b""
    if body == "-":
        return sys.stdin.buffer.read()
    return body.encode()


# ---- connecting ----------------------------------------------------------------------------

def _connect_supports(name: str) -> bool:
    from nats.aio.client import Client

    try:
        return name in inspect.signature(Client.connect).parameters
    except (TypeError, ValueError):
        return False


async def connect(cfg: Settings, *, subject_checks: bool = True,
                  quiet_reconnects: bool = True) -> Client:
    """A connected nats-py client, or ToolError("cannot connect to ...") as soon as every
    server has failed once (nats-py alone would keep retrying)."""
    import nats

    servers = cfg.servers
    errors: list[BaseException] = []
    nc_box: list[Client | None] = [None]
    failed = asyncio.Event()
    connected = False

    async def error_cb(e: BaseException) -> None:
        if not connected:
            errors.append(e)
            if len(errors) >= len(servers):
                failed.set()
        elif not quiet_reconnects:
            status(f"connection error: {describe(e)}")

    async def disconnected_cb() -> None:
        nc = nc_box[0]
        if connected and not quiet_reconnects and nc is not None and not nc.is_closed \
                and nc not in _closing:
            status("disconnected, reconnecting ...")

    async def reconnected_cb() -> None:
        if not quiet_reconnects:
            status("reconnected")

    opts: dict[str, Any] = {"servers": servers, "error_cb": error_cb, "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb, "connect_timeout": cfg.timeout,
            "name": "mq9-cli", "max_reconnect_attempts": -1 if not quiet_reconnects else 3,
            "reconnect_time_wait": 1}
    if cfg.token:
        opts["token"] = cfg.token
    if cfg.user:
        opts["user"] = cfg.user
        opts["password"] = cfg.password or ""
    ctx = tls_context(cfg)
    if ctx is not None:
        opts["tls"] = ctx
    if not subject_checks and _connect_supports("skip_subject_validation"):
        opts["skip_subject_validation"] = True

    task = asyncio.ensure_future(nats.connect(**opts))
    failed_wait = asyncio.ensure_future(failed.wait())
    try:
        done, _ = await asyncio.wait({task, failed_wait}, timeout=cfg.timeout * len(servers) + 1,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        failed_wait.cancel()
    where = ", ".join(servers)
    if task in done and not task.cancelled() and task.exception() is None:
        connected = True
        nc = nc_box[0] = task.result()
        return nc
    err = task.exception() if task in done and not task.cancelled() else None
    if err is not None:
        errors.append(err)
    task.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await task
    reason = describe(errors[0]) if errors else f"no answer within {cfg.timeout:g}s"
    raise ToolError(f"cannot connect to {where}: {reason}")


def describe(e: BaseException) -> str:
    """A short readable text for a connection-level exception."""
    import nats.errors as ne

    if isinstance(e, ConnectionRefusedError):
        return "connection refused (is the broker running?)"
    if isinstance(e, (asyncio.TimeoutError, ne.TimeoutError)):
        return "timed out"
    if isinstance(e, ne.AuthorizationError) or "authorization" in str(e).lower():
        return "authorization violation (check --auth-token / --user / --password)"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip()
    text = text.removeprefix("nats: ")
    return text or type(e).__name__


# ---- replies -------------------------------------------------------------------------------

async def request(nc: Client, subject: str, payload: bytes, timeout: float,
                  headers: dict[str, str] | None = None) -> Msg:
    import nats.errors as ne

    try:
        return await nc.request(subject, payload, timeout=timeout, headers=headers)
    except ne.NoRespondersError:
        hint = " (is this an mq9 broker?)" if subject.startswith("$mq9.AI.MAILBOX.") else ""
        raise ToolError(f"no responders for {subject}{hint}") from None
    except (TimeoutError, ne.TimeoutError):
        raise ToolError(f"timeout: no reply on {subject} within {timeout:g}s") from None
    except ne.MaxPayloadError:
        raise ToolError(f"message too large: {len(payload)} bytes is more than the server's "
                        f"max_payload ({nc.max_payload})") from None


def broker_reply(msg: Msg) -> dict[str, Any]:
    """The JSON object of an mq9 reply; an error reply raises ToolError("code: error")."""
    try:
        data = json.loads(msg.data)
    except (ValueError, UnicodeDecodeError):
        raise ToolError(f"unexpected reply (not JSON): {preview(msg.data, 200)}") from None
    if not isinstance(data, dict):
        raise ToolError(f"unexpected reply: {preview(msg.data, 200)}")
    check_error(data)
    return data


def check_error(data: object) -> None:
    if isinstance(data, dict) and "error" in data and "code" in data:
        raise ToolError(f"{data.get('code')}: {data.get('error')}")


# ---- output --------------------------------------------------------------------------------

def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def status(text: str) -> None:
    """A side note for people (progress, hints) on stderr, so stdout stays parseable."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def print_json(data: object) -> None:
    out(json.dumps(data, indent=2, ensure_ascii=False))


def body_text(data: bytes) -> str:
    """A message body for reading: JSON pretty-printed, text as is, binary described."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return f"(binary, {len(data)} bytes) base64: {base64.b64encode(data).decode()}"
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            return json.dumps(json.loads(stripped), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    return text


def preview(data: object, width: int) -> str:
    """One line of at most ``width`` characters."""
    if isinstance(data, bytes):
        try:
            data = data.decode()
        except UnicodeDecodeError:
            data = f"(binary, {len(data)} bytes)"
    text = " ".join(str(data).split())
    if len(text) > width:
        text = text[:max(width - 1, 1)] + "…"
    return text


def fmt_time(ts: float, date: bool = True) -> str:
    lt = time.localtime(ts)
    ms = int((ts % 1) * 1000)
    return (time.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S", lt) + f".{ms:03d}")


def table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


class Progress:
    """``done/total`` on stderr while a long operation runs: rewritten in place on a
    terminal, a line every few seconds otherwise (so logs are not flooded)."""

    def __init__(self, what: str, total: int):
        self.what = what
        self.total = total
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.total < 2 or (now - self.last < (0.1 if self.tty else 2.0) and done < self.total):
            return
        if done >= self.total and not self.shown and now - self.start < 2.0:
            return  # quick: the command's summary line is enough
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        line = f"{self.what} {done}/{self.total} ({done * 100 // self.total}%, {rate:,.0f}/s)"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> float:
        if self.shown and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
        return time.monotonic() - self.start


# ---- running -------------------------------------------------------------------------------

Command = Callable[["Client", argparse.Namespace, Settings], Awaitable[int]]


def execute(command: Command, ns: argparse.Namespace, *, subject_checks: bool = True,
            quiet_reconnects: bool = True) -> int:
    """Connect, run ``command(nc, ns, cfg)``, close; expected failures become one line."""

    async def main() -> int:
        cfg = settings(ns)
        nc = await connect(cfg, subject_checks=subject_checks,
                           quiet_reconnects=quiet_reconnects)
        try:
            return await command(nc, ns, cfg)
        finally:
            _closing.add(nc)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(nc.close(), 2)

    try:
        return asyncio.run(main())
    except ToolError as e:
        status(f"mq9: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mq9 sub ... | head`: quiet, also at interpreter exit
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:  # noqa: BLE001 - anything unforeseen: one line, no traceback
        import nats.errors as ne

        if isinstance(e, (ne.Error, OSError)):
            status(f"mq9: {describe(e)}")
        else:
            status(f"mq9: unexpected error: {type(e).__name__}: {e}")
        return 1
