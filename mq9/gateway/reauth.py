"""After a config reload that changed authorization, every connection is checked again
against the new settings, as nats-server's ``reloadAuthorization`` does (measured against
v2.15.1 in tests/test_reload.py):

- a client that logged in with a user name the new settings no longer have is closed
  without a word: a user taken out of the auth file, and, as nats-server keeps no list
  for a single ``--user``/``--pass``, any user-name login when that single user's name or
  password changed, or when auth changed to a token or to none;
- one whose credentials, as its CONNECT gave them, no longer pass (a changed password or
  token, auth turned on) gets ``-ERR 'Authorization Violation'`` and is closed;
- the others get the permissions their user has now; each subscription those no longer
  allow is removed with ``-ERR 'Permissions Violation for Subscription to "s" (sid "N")'``
  and the connection stays.

A connection whose user the reload left as it was (the same ``auth.User`` object, see
``auth.carry_over``) costs a dict lookup. ``BATCH`` connections are handled per loop turn,
so thousands of them do not stall the loop; bcrypt checks go through the gateway's
``BcryptChecks``, as at CONNECT: one per distinct (user, password), whose verdict reaches
every connection that gave that password, a batch per loop turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from mq9.config import Config
from mq9.gateway.auth import User, Users
from mq9.gateway.bcryptchecks import BcryptChecks
from mq9.gateway.client import Client
from mq9.log import Logger
from mq9.protocol import errors

BATCH = 100  # connections checked per event-loop turn


class Host(Protocol):
    """What a pass needs of its gateway (``mq9.gateway.server.Gateway``, which imports this
    module), read after the reload took effect."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def cfg(self) -> Config: ...
    @property
    def users(self) -> Users | None: ...
    @property
    def auth_required(self) -> bool: ...
    @property
    def clients(self) -> dict[int, Client]: ...
    @property
    def bcrypt(self) -> BcryptChecks: ...
    @property
    def log(self) -> Logger: ...

    def check_auth(self, opts: Mapping[str, object], client: Client) -> bool | None: ...
    def auth_failed(self, kind: str) -> None: ...


def auth_changed(old_cfg: Config, old_users: Users | None, new_cfg: Config, new_users: Users | None) -> bool:
    """Whether a reload changed anything a connected client authenticated with."""
    if (old_cfg.auth_token, old_cfg.user, old_cfg.password) != (new_cfg.auth_token, new_cfg.user,
                                                                 new_cfg.password):
        return True
    if old_users is None or new_users is None:
        return (old_users is None) != (new_users is None)
    return old_users.keys() != new_users.keys() or any(new_users[n] is not u for n, u in old_users.items())


class Recheck:
    """One pass over the gateway's connections for reload ``generation``; ``stop`` ends it
    when a newer reload starts its own."""

    def __init__(self, gateway: Host, generation: int):
        self.gw = gateway
        self.generation = generation
        self.users = gateway.users
        self.cfg = gateway.cfg
        # Connections made from now on authenticate against the new settings already.
        self.clients = [c for c in gateway.clients.values() if c.connected]
        self.next = 0
        self.waiting = 0  # connections waiting for a bcrypt verdict
        self.stopped = False
        self.removed = self.refused = self.subs_removed = self.bcrypt_checks = 0

    def start(self) -> None:
        self.gw.loop.call_soon(self._step)

    def stop(self) -> None:
        self.stopped = True

    def _step(self) -> None:
        if self.stopped:
            return
        end = min(self.next + BATCH, len(self.clients))
        for c in self.clients[self.next:end]:
            if not c.closed:
                self._check(c)
        self.next = end
        if end < len(self.clients):
            self.gw.loop.call_soon(self._step)
        else:
            self._finish()

    def _check(self, c: Client) -> None:
        creds = c.creds or {}
        name = creds.get("user") or None
        users = self.users
        if name is not None and (users is None or name not in users):
            # nats-server's test: the user is gone unless the users list has it, and a
            # single --user/--pass is no list (the pass runs only when something changed)
            self._close(c, "user_removed")
            return
        if users is None:  # a token, or no auth at all: a compare, no bcrypt
            if not self.gw.auth_required or self.gw.check_auth(creds, c):
                self._keep(c, None)
            else:
                self._refuse(c)
            return
        user = users.get(name) if name is not None else None
        if user is None:  # logged in with a token, or before auth was required
            self._refuse(c)
            return
        if user is c.user:
            return
        if c.user is not None and c.user.password == user.password:
            self._keep(c, user)  # only the permissions changed
            return
        password = creds.get("pass")
        ok = user.check_fast(password) if password is not None else False
        if ok is None and password is not None:
            self.waiting += 1
            if self.gw.bcrypt.wait(user, password, lambda ok: self._checked(c, user, ok)):
                self.bcrypt_checks += 1
        elif ok:
            self._keep(c, user)
        else:
            self._refuse(c)

    def _checked(self, c: Client, user: User, ok: bool) -> None:
        self.waiting -= 1
        if self.stopped:
            return  # a newer pass checks this connection against newer settings
        if not c.closed:
            if ok:
                self._keep(c, user)
            else:
                self._refuse(c)
        self._finish()

    def _keep(self, c: Client, user: User | None) -> None:
        self.subs_removed += c.reauthorised(user, user.conn_perms() if user is not None else None)

    def _refuse(self, c: Client) -> None:
        self.refused += 1
        self.gw.auth_failed("credentials")
        self.gw.log.debug("reload_client_refused", cid=c.cid, user=(c.creds or {}).get("user", ""))
        c.close_with_error(errors.AUTHORIZATION_VIOLATION)

    def _close(self, c: Client, why: str) -> None:
        self.removed += 1
        self.gw.log.debug("reload_client_closed", cid=c.cid, reason=why, user=(c.creds or {}).get("user", ""))
        c.close()

    def _finish(self) -> None:
        if self.next < len(self.clients) or self.waiting:
            return
        self.gw.log.info("auth_rechecked", generation=self.generation, clients=len(self.clients),
                         closed_user_removed=self.removed, closed_auth_violation=self.refused,
                         subscriptions_removed=self.subs_removed, bcrypt_checks=self.bcrypt_checks)
