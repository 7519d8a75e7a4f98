"""ZeroMQ CURVE on the TCP links between nodes (shard ROUTERs, gateway mesh PULLs, and the
DEALER/PUSH sockets that dial them).

Every member derives the same CURVE keypair from the cluster secret, so there is nothing to
distribute: a binding socket is the CURVE server with that secret key, a dialling socket a
CURVE client that expects that server key and presents the same keypair. CURVE alone would
let any client that knows the server's public key in, so each process also runs a ZAP
handler that admits only the cluster's public key: a peer gets a frame accepted only if it
holds the cluster's secret key (CURVE's INITIATE proves possession).

Only TCP endpoints are secured. A socket's options are copied into a listener or connecter
when it binds or connects, so a socket binds its ipc:// endpoint (inside the node's 0700
run directory) before ``server`` turns CURVE on for its TCP bind.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from typing import TYPE_CHECKING

import zmq
from zmq.utils import z85

if TYPE_CHECKING:  # imported when first used: it costs a start-up without a cluster 25 ms
    from zmq.auth.thread import ThreadAuthenticator

# Any socket or context, blocking or asyncio (their type parameter is what recv returns).
Socket = zmq.Socket[object]
Context = zmq.Context[Socket]

# Fixed and public: the salt only separates this use of the secret from pysyncobj's (which
# derives its Fernet key from the same secret with a different salt).
_SALT = b"mq9 zmq curve keypair v1"
_ITERATIONS = 100_000  # a captured handshake costs an attacker this much per guessed secret
ZAP_DOMAIN = "mq9-cluster"


@functools.lru_cache(maxsize=4)
def keypair(secret: str) -> tuple[bytes, bytes]:
    """(public, secret) keys, z85-encoded, the same on every member with this secret."""
    seed = hashlib.pbkdf2_hmac("sha256", secret.encode(), _SALT, _ITERATIONS, dklen=32)
    secret_key = z85.encode(seed)
    return zmq.curve_public(secret_key), secret_key


def server(sock: Socket, secret: str) -> None:
    """Make ``sock``'s next binds CURVE servers (call after its ipc bind, before TCP)."""
    _public, secret_key = keypair(secret)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
    # Names the ZAP domain, so the authenticator is asked about every handshake here.
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def client(sock: Socket, secret: str) -> None:
    """Make ``sock``'s next connects CURVE clients of a cluster member."""
    public, secret_key = keypair(secret)
    sock.setsockopt(zmq.CURVE_SERVERKEY, public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)


def connect(sock: Socket, endpoint: str, secret: str | None) -> None:
    """``sock.connect(endpoint)``, as a CURVE client when it goes over TCP."""
    if endpoint.startswith("tcp://"):
        if not secret:
            raise ValueError("a TCP link between nodes needs the cluster secret")
        client(sock, secret)
    sock.connect(endpoint)


class _ClusterKeyOnly:
    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        # Everyone shares the keypair, so the "public" key is as secret as the secret.
        return hmac.compare_digest(key, self.public)


def start_authenticator(ctx: Context, secret: str) -> ThreadAuthenticator:
    """A ZAP handler thread in ``ctx`` that lets only cluster members' CURVE clients in.
    Start it before binding. Returns it, for ``stop()``."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(domain=ZAP_DOMAIN,
                                  credentials_provider=_ClusterKeyOnly(keypair(secret)[0]))
    return auth
