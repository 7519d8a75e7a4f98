"""One bcrypt check per (user, password) in flight, whatever the number of logins waiting
(the same against a real node: tests/test_auth_logins.py)."""

from __future__ import annotations

import asyncio

import bcrypt
from prometheus_client import REGISTRY

from mq9.gateway import auth, bcryptchecks


def user(name: str, pw: str) -> auth.User:
    return auth.User(name, bcrypt.hashpw(pw.encode(), bcrypt.gensalt(4)).decode(), None)


def checks_run() -> float:
    return REGISTRY.get_sample_value("mq9_bcrypt_checks_total") or 0.0


async def verdicts(checks: bcryptchecks.BcryptChecks, asks: list[tuple[auth.User, str]]) -> list[bool]:
    loop = asyncio.get_running_loop()
    futs = [loop.create_future() for _ in asks]
    for (u, pw), fut in zip(asks, futs):
        checks.wait(u, pw, fut.set_result)
    return list(await asyncio.gather(*futs))


async def test_logins_with_the_same_password_share_one_check():
    checks = bcryptchecks.BcryptChecks(asyncio.get_running_loop())
    u = user("u", "pw")
    before = checks_run()
    n = bcryptchecks.BATCH * 3 + 7  # verdicts handed out over several loop turns
    assert await verdicts(checks, [(u, "pw")] * n) == [True] * n
    assert checks_run() - before == 1
    assert u.check_fast("pw") is True  # remembered: the next login needs no check


async def test_a_refusal_is_shared_only_by_logins_waiting_for_it():
    checks = bcryptchecks.BcryptChecks(asyncio.get_running_loop())
    u = user("u", "pw")
    before = checks_run()
    assert await verdicts(checks, [(u, "bad")] * 5 + [(u, "pw")] * 5 + [(u, "worse")] * 5) == (
        [False] * 5 + [True] * 5 + [False] * 5)
    assert checks_run() - before == 3  # one per distinct password
    assert u.check_fast("bad") is None
    assert await verdicts(checks, [(u, "bad")]) == [False]
    assert checks_run() - before == 4  # a refusal is not remembered: a new attempt, a new check


async def test_users_do_not_share_checks():
    checks = bcryptchecks.BcryptChecks(asyncio.get_running_loop())
    a, b = user("a", "pw"), user("b", "other")
    before = checks_run()
    assert await verdicts(checks, [(a, "pw"), (b, "pw"), (a, "pw"), (b, "pw")]) == [True, False, True, False]
    assert checks_run() - before == 2
