"""The permission model and auth-file parsing (the wire behaviour is compared with
nats-server in tests/test_security_diff.py)."""

from __future__ import annotations

import json

import pytest

from mq9.gateway import auth


def perms(**doc) -> auth.Permissions:
    return auth.Permissions(doc, "test")


def test_publish_allow_deny_and_wildcards():
    p = perms(publish={"allow": ["a.>", "b.*", "c"], "deny": ["a.secret", "a.x.>"]})
    allowed = {"a.b", "a.b.c", "b.x", "c", "b.*", "a.>"}  # wildcards in a subject are literal tokens
    denied = {"a", "b", "b.x.y", "c.d", "a.secret", "a.x.y", "d", "a..b", "", "."}
    for s in allowed:
        assert p.publish_allowed(s), s
    for s in denied:
        assert not p.publish_allowed(s), s


def test_subscribe_literal_matching_of_wildcard_subjects():
    p = perms(subscribe={"allow": ["ok.>"], "deny": ["ok.secret"]})
    assert p.subscribe_allowed("ok.*", None)
    assert p.subscribe_allowed("ok.>", None)
    assert not p.subscribe_allowed(">", None)      # broader than the allow pattern
    assert not p.subscribe_allowed("*.x", None)
    assert not p.subscribe_allowed("ok", None)
    assert not p.subscribe_allowed("ok.secret", None)
    assert p.delivery_denied("ok.secret") and not p.delivery_denied("ok.other")


def test_queue_entries():
    p = perms(subscribe={"allow": ["jobs.* workers", "ev.>"], "deny": ["ev.q grp.*"]})
    assert p.subscribe_allowed("jobs.a", "workers")
    assert not p.subscribe_allowed("jobs.a", "others")
    assert not p.subscribe_allowed("jobs.a", None)
    assert p.subscribe_allowed("ev.q", None)
    assert p.subscribe_allowed("ev.q", "grp")      # "grp.*" is a pattern: one more token
    assert not p.subscribe_allowed("ev.q", "grp.1")
    assert not p.delivery_denied("ev.q")           # queue deny entries do not filter messages


def test_allow_responses_once_and_expiring(monkeypatch):
    p = perms(subscribe=["svc.>"], allow_responses={"max": 2, "expires": "1s"})
    c = auth.ConnPerms(p)
    assert not c.may_publish("reply.1")            # responses only: no publish allow list
    assert c.deliverable("svc.a", "reply.1")
    assert c.may_publish("reply.1") and c.may_publish("reply.1")
    assert not c.may_publish("reply.1")            # max 2
    now = [1000.0]
    monkeypatch.setattr(auth.time, "monotonic", lambda: now[0])
    c.deliverable("svc.a", "reply.2")
    now[0] += 1.5
    assert not c.may_publish("reply.2")            # expired


def test_replies_and_caches_stay_bounded(monkeypatch):
    monkeypatch.setattr(auth, "MAX_REPLIES", 10)
    monkeypatch.setattr(auth, "MAX_CACHE", 10)
    p = perms(publish=["a.>"], allow_responses=True)
    c = auth.ConnPerms(p)
    for i in range(100):
        c.deliverable("x", f"r.{i}")
        p.publish_allowed(f"a.{i}")
    assert len(c.replies) <= 10 and len(p.pub_cache) <= 10
    assert c.may_publish("r.99")


def test_parse_file_forms(tmp_path):
    toml = tmp_path / "users.toml"
    toml.write_text('[authorization]\n[[authorization.users]]\nuser = "a"\npassword = "p"\n'
                    '[authorization.default_permissions]\npublish = "x.>"\n')
    users = auth.load(str(toml))
    assert users["a"].check_fast("p") is True and users["a"].check_fast("q") is False
    assert users["a"].perms.publish_allowed("x.y") and not users["a"].perms.publish_allowed("y")
    js = tmp_path / "users.json"
    js.write_text(json.dumps({"users": [{"user": "b", "password": "p",
                                         "permissions": {"subscribe": {"deny": ["z"]}}}]}))
    users = auth.load(str(js))
    assert users["b"].perms.pub_allow is None and users["b"].conn_perms().replies is None


def test_bcrypt_success_remembered_for_a_while_refusal_never(monkeypatch):
    import bcrypt

    u = auth.User("h", bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode(), None)
    assert u.bcrypt and u.check_fast("pw") is None
    assert u.check_slow("pw") is True
    assert u.check_fast("pw") is None              # the check itself remembers nothing
    u.remember("pw")
    assert u.check_fast("pw") is True
    assert u.check_fast("pw2") is None and u.check_fast("other") is None
    assert u.check_slow("other") is False and u.check_fast("other") is None
    later = auth.time.monotonic() + auth.VERIFIED_FOR + 1
    monkeypatch.setattr(auth.time, "monotonic", lambda: later)
    assert u.check_fast("pw") is None              # expired: bcrypt decides again


def test_remembered_success_is_for_that_user_and_hash_only():
    import bcrypt

    h = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()
    a, b = auth.User("a", h, None), auth.User("b", h, None)
    a.remember("pw")
    assert a.check_fast("pw") is True and b.check_fast("pw") is None
    # a reload that changes the user gives a new object, which remembers nothing; one that
    # leaves it as it was keeps the object and what it remembers
    changed = auth.User("a", bcrypt.hashpw(b"pw2", bcrypt.gensalt(4)).decode(), None)
    new = auth.carry_over(auth.Users(a=a), auth.Users(a=changed))
    assert new["a"] is not a and new["a"].check_fast("pw") is None
    same = auth.carry_over(auth.Users(a=a), auth.Users(a=auth.User("a", h, None)))
    assert same["a"] is a and same["a"].check_fast("pw") is True


def test_remembered_successes_are_bounded():
    u = auth.User("h", "$2b$04$" + "x" * 53, None)
    for i in range(auth.MAX_VERIFIED * 3):
        u.remember(f"p{i}")
    assert u.check_fast(f"p{auth.MAX_VERIFIED * 3 - 1}") is True
    assert sum(u.check_fast(f"p{i}") is True for i in range(auth.MAX_VERIFIED * 3)) <= auth.MAX_VERIFIED


@pytest.mark.parametrize("doc, message", [
    ({}, "'users' must be a non-empty list"),
    ({"users": [{"user": "a"}]}, "needs 'user' and 'password'"),
    ({"users": [{"user": "a", "password": "p"}, {"user": "a", "password": "q"}]}, "duplicate user"),
    ({"users": [{"user": "a", "password": "p", "permissions": {"publish": ["a..b"]}}]}, "not a valid subject"),
    ({"users": [{"user": "a", "password": "p", "permissions": {"publish": ["a b"]}}]}, "not a subject"),
    ({"users": [{"user": "a", "password": "p", "permissions": {"pub": ["a"]}}]}, "unknown permission keys"),
    ({"users": [{"user": "a", "password": "p", "permissions": {"allow_responses": {"expires": "soon"}}}]},
     "duration"),
    ({"users": [], "token": "x"}, "unknown keys: token"),
])
def test_bad_files_say_what_is_wrong(doc, message):
    with pytest.raises(ValueError, match=message):
        auth.parse(doc, "f")


def test_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="No such file"):
        auth.load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("users = [")
    with pytest.raises(ValueError, match="bad.toml"):
        auth.load(str(bad))


def test_carry_over_keeps_the_objects_of_users_a_reload_left_as_they_were():
    def users(*entries) -> auth.Users:
        return auth.parse({"users": [dict(zip(("user", "password", "permissions"), e)) for e in entries]}, "t")

    old = users(("same", "pw", {"publish": ["a"]}), ("pw", "old"), ("perms", "p", {"publish": ["a"]}),
                ("gone", "g"))
    new = auth.carry_over(old, users(("same", "pw", {"publish": ["a"]}), ("pw", "new"),
                                     ("perms", "p", {"publish": ["b"]}), ("added", "a")))
    assert new["same"] is old["same"]
    assert new["pw"] is not old["pw"] and new["perms"] is not old["perms"]
    assert set(new) == {"same", "pw", "perms", "added"}
    assert auth.carry_over(None, new) is new
