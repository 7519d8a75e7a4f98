"""bcrypt checks off the event loop, for CONNECT and for the re-check after a reload.

A bcrypt check costs about 0.1 s of CPU at cost 10; that is what makes guessing slow. When
a fleet of clients logs in at once as one user, every CONNECT that arrives before the
first verdict would start a check of its own, and at a few thousand the later ones outlast
the auth timeout. So there is one check in flight per (user, password): a login with the
same credentials while it runs waits for its verdict, which is handed to the waiters
``BATCH`` per loop turn so that thousands of them do not hold the loop.

A positive verdict is then remembered by the user for a while (``auth.User.remember``). A
negative one is not: the next attempt pays a full check again, as every attempt does on
nats-server, so guessing stays as slow as bcrypt makes it. Attempts that share a running
check all gave the very same password: together they are one guess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mq9 import metrics
from mq9.gateway.auth import User

BATCH = 100  # waiters given a verdict per event-loop turn


class BcryptChecks:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._waiting: dict[tuple[User, str], list[Callable[[bool], None]]] = {}

    def wait(self, user: User, password: str, then: Callable[[bool], None]) -> bool:
        """``then(ok)`` is called in the loop with bcrypt's verdict on ``password`` for
        ``user``. True when this started a check, False when it joined a running one."""
        key = (user, password)
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(then)
            return False
        self._waiting[key] = [then]
        metrics.BCRYPT_CHECKS.inc()
        self.loop.run_in_executor(None, user.check_slow, password).add_done_callback(
            lambda fut: self._checked(key, fut))
        return True

    def _checked(self, key: tuple[User, str], fut: asyncio.Future[bool]) -> None:
        ok = not fut.cancelled() and fut.exception() is None and fut.result()
        if ok:
            key[0].remember(key[1])
        # From here a new login with this password is decided by the remembered verdict,
        # or, after a refusal, by a check of its own.
        self._hand_out(self._waiting.pop(key), ok, 0)

    def _hand_out(self, waiters: list[Callable[[bool], None]], ok: bool, start: int) -> None:
        end = start + BATCH
        for then in waiters[start:end]:
            then(ok)
        if end < len(waiters):
            self.loop.call_soon(self._hand_out, waiters, ok, end)
