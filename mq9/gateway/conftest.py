"""Gateways inside the test's process, for the gateway's unit tests.

``gateways(n, **settings)`` starts ``n`` real ``Gateway`` objects of one node in the test's
event loop: their clients, router, mesh (real ZeroMQ over ipc in a temporary run dir) and
shard links, as a gateway process runs them. Each listens on a port of its own, so a test
chooses which gateway a client reaches. No shard runs: mailbox requests would time out.
``Raw`` is a client that speaks the protocol as bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from mq9.config import Config
from mq9.gateway.server import Gateway
from tests.nodeproc import free_ports

WAIT = 10.0  # seconds a test waits for bytes it expects; generous, the machine may be busy


class Raw:
    """One client connection: bytes out, bytes in, nothing interpreted."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, info: bytes):
        self.reader, self.writer, self.info = reader, writer, info
        self.buf = b""

    @classmethod
    async def connect(cls, gw: Gateway, hello: bytes | None = b'CONNECT {"verbose":false}\r\n') -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.cfg.port)
        info = await asyncio.wait_for(reader.readline(), WAIT)
        assert info.startswith(b"INFO "), info
        raw = cls(reader, writer, info)
        if hello:
            raw.send(hello)
        return raw

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def until(self, marker: bytes, timeout: float = WAIT) -> bytes:
        """Everything up to and including the first ``marker`` still unread."""
        async def read():
            while marker not in self.buf:
                chunk = await self.reader.read(65536)
                if not chunk:
                    raise EOFError(f"closed before {marker!r}; got {self.buf[-500:]!r}")
                self.buf += chunk
        await asyncio.wait_for(read(), timeout)
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    async def flush(self) -> bytes:
        """PING, and everything up to its PONG (what the server sent before it)."""
        self.send(b"PING\r\n")
        return (await self.until(b"PONG\r\n"))[:-len(b"PONG\r\n")]

    async def rest(self, timeout: float = WAIT) -> bytes:
        """Everything until the server closes the connection."""
        async def read():
            while chunk := await self.reader.read(65536):
                self.buf += chunk
        await asyncio.wait_for(read(), timeout)
        out, self.buf = self.buf, b""
        return out

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def gateways(tmp_path):
    made: list[Gateway] = []

    async def start(n: int = 1, **settings) -> list[Gateway]:
        loop = asyncio.get_running_loop()
        base = Config(host="127.0.0.1", data_dir=str(tmp_path / "data"), gateways=n, shards=1,
                      cluster_port=0, metrics_port=0, **settings)
        out = []
        for i, port in enumerate(free_ports(n)):
            gw = Gateway(dataclasses.replace(base, port=port), i, loop)
            made.append(gw)
            await gw.start()
            out.append(gw)
        return out

    yield start
    for gw in made:
        await gw.stop()
