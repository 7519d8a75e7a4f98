"""TLS for client connections, the way nats-server does it.

The server sends INFO in clear text with ``"tls_required": true`` (and ``"tls_verify": true``
when it asks for client certificates); the client then starts the TLS handshake and the
NATS protocol goes on inside TLS. With ``tls_handshake_first`` (nats-server's
``handshake_first``) the handshake comes first and INFO is the first thing sent inside TLS.

Measured against nats-server v2.15.1: a client that answers INFO with plain protocol
instead of a ClientHello is closed with nothing more sent (no ``-ERR``, no TLS alert), and
one that sends nothing is closed when the TLS timeout (default 2 s) runs out. mq9 does the
same: the handshake fails, the connection is dropped, the gateway carries on.
"""

from __future__ import annotations

import ssl

# The first byte of a TLS record that carries a handshake message (a ClientHello here).
HANDSHAKE_RECORD = 0x16


def server_context(cfg) -> ssl.SSLContext:
    """The server-side context for ``cfg``'s tls_* settings; ValueError says what is wrong
    with a file, so the node refuses to start instead of failing in every gateway."""
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


def info_fields(cfg) -> dict:
    """What INFO (and /varz) says about TLS."""
    if not cfg.tls_cert:
        return {}
    out = {"tls_required": True}
    if cfg.tls_verify:
        out["tls_verify"] = True
    return out


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e)
