"""TLS for client connections, the way nats-server does it.

The server sends INFO in clear text with ``"tls_required": true`` (and ``"tls_verify": true``
when it asks for client certificates); the client then starts the TLS handshake and the
NATS protocol goes on inside TLS. With ``tls_handshake_first`` (nats-server's
``handshake_first``) the handshake comes first and INFO is the first thing sent inside TLS.

Measured against nats-server v2.15.1: a client that answers INFO with plain protocol
instead of a ClientHello is closed with nothing more sent (no ``-ERR``, no TLS alert), and
one that sends nothing is closed when the TLS timeout (default 2 s) runs out. A refused
client certificate gets a TLS alert, so the client's handshake (or, with TLS 1.3, its first
read) fails with a TLS error rather than a bare EOF.

``ServerTLS`` does TLS on memory BIOs inside the connection's own protocol object, not with
``loop.start_tls``: uvloop starts reading a new connection right after ``connection_made``,
so a ClientHello could reach the NATS parser before start_tls took the stream over, and a
failed start_tls drops the connection without sending the alert OpenSSL produced.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Protocol


class Settings(Protocol):
    """The tls_* settings of ``mq9.config.Config`` (which imports this module to check them)."""

    @property
    def tls_cert(self) -> str | None: ...
    @property
    def tls_key(self) -> str | None: ...
    @property
    def tls_ca(self) -> str | None: ...
    @property
    def tls_verify(self) -> bool: ...


# The first byte of a TLS record that carries a handshake message (a ClientHello here).
HANDSHAKE_RECORD = 0x16


def server_context(cfg: Settings) -> ssl.SSLContext:
    """The server-side context for ``cfg``'s tls_* settings; ValueError says what is wrong
    with a file, so the node refuses to start instead of failing in every gateway."""
    if cfg.tls_cert is None:
        raise ValueError("--tls-cert and --tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # nats-server's minimum as well
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--tls-cert/--tls-key ({cfg.tls_cert}, {cfg.tls_key}): {_reason(e)}") from None
    if cfg.tls_ca:
        try:
            ctx.load_verify_locations(cafile=cfg.tls_ca)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"--tls-ca ({cfg.tls_ca}): {_reason(e)}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED if cfg.tls_verify else ssl.CERT_NONE
    return ctx


class NotTLS(Exception):
    """The client's first bytes are not a TLS handshake record (plain NATS, most likely)."""


class ServerTLS:
    """The server side of one TLS connection over ``raw`` (an asyncio transport).

    ``feed`` takes bytes from the socket and returns the plaintext they complete;
    ``write`` encrypts and sends. Handshake messages, alerts, session tickets and key
    updates are written to ``raw`` as OpenSSL produces them.
    """

    __slots__ = ("raw", "sslobj", "incoming", "outgoing", "established", "_first")

    def __init__(self, ctx: ssl.SSLContext, raw: asyncio.WriteTransport):
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.established = False
        self._first = True

    def feed(self, data: bytes) -> bytes:
        """Raises NotTLS, ssl.SSLError (handshake failure, after sending the alert) or
        EOFError (the client closed TLS)."""
        if self._first:
            self._first = False
            if data[0] != HANDSHAKE_RECORD:
                raise NotTLS()
        self.incoming.write(data)
        if not self.established:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._push()
                return b""
            except ssl.SSLError:
                self._push()  # the alert that says why
                raise
            self.established = True
            self._push()
        chunks = []
        read = self.sslobj.read
        while True:
            try:
                chunk = read(262144)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise EOFError() from None
            if not chunk:
                raise EOFError()
            chunks.append(chunk)
        if self.outgoing.pending:  # a key update or ticket produced while reading
            self._push()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def write(self, data: bytes) -> None:
        self.sslobj.write(data)
        self.raw.write(self.outgoing.read())

    def close_notify(self) -> None:
        """Say goodbye in TLS (best effort) before the socket is closed."""
        try:
            self.sslobj.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        self._push()

    def describe(self) -> tuple[str, str]:
        """(version, cipher) as nats-server's /connz writes them: "1.3", "TLS_AES_256_GCM_SHA384"."""
        return ((self.sslobj.version() or "").removeprefix("TLSv"), (self.sslobj.cipher() or ("",))[0])

    def _push(self) -> None:
        if self.outgoing.pending:
            self.raw.write(self.outgoing.read())


def info_fields(cfg: Settings) -> dict[str, bool]:
    """What INFO (and /varz) says about TLS."""
    if not cfg.tls_cert:
        return {}
    out = {"tls_required": True}
    if cfg.tls_verify:
        out["tls_verify"] = True
    return out


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
