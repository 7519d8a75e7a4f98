"""The client API's bodies and replies: leniency, texts, and the exact JSON bytes."""

from __future__ import annotations

import pytest

from mq9 import api


def test_error_body_bytes():
    assert api.error_body(api.Code.AUTH, api.WRONG_TOKEN) == \
        b'{"error":"wrong or missing token","code":"auth"}'
    # A decoded wire code is a plain str: same bytes.
    assert api.error_body("auth", api.WRONG_TOKEN) == api.error_body(api.Code.AUTH, api.WRONG_TOKEN)
    assert api.error_body("bad_request", "x\udcff") == b'{"error":"x?","code":"bad_request"}'


@pytest.mark.parametrize("mail_id,prio", [("a-1", "normal"), ("m-0.x_y", "urgent")])
def test_send_ack_template_is_the_struct(mail_id, prio):
    head, tail = api.send_ack_template(mail_id, prio)
    assert head + b"12345" + tail == api.encode(api.SendAck(mail_id, 12345, prio))
    assert head + b"0" + tail == b'{"mail_id":"%s","msg_id":0,"priority":"%s"}' % (
        mail_id.encode(), prio.encode())


def test_create_request_leniency_and_texts():
    assert api.create_request(b"", 7) == api.CreateRequest("standard", 7, None)
    assert api.create_request(b'{"type":null,"ttl":null,"x":1}', 7) == api.CreateRequest("standard", 7, None)
    assert api.create_request(b'{"type":"latest","ttl":5,"name":"a.b"}', 7) == \
        api.CreateRequest("latest", 5, "a.b")
    for body, text in [(b"{", api.BAD_JSON), (b"[]", api.NOT_AN_OBJECT),
                       (b'{"type":"x"}', api.BAD_TYPE), (b'{"ttl":true}', "'ttl' must be an integer"),
                       (b'{"ttl":-1}', f"'ttl' must be between 0 and {api.MAX_TTL}"),
                       (b'{"name":"a..b"}', api.BAD_NAME)]:
        with pytest.raises(api.BadRequest) as e:
            api.create_request(body, 0)
        assert str(e.value) == text


def test_query_and_delete_requests():
    assert api.query_request(b'{"token":5}', "box") == api.QueryRequest("", 100, False)
    assert api.query_request(b'{"token":"t","limit":3,"mark_read":true}', "box") == \
        api.QueryRequest("t", 3, True)
    with pytest.raises(api.BadRequest, match="'limit' must be between 1 and 1000"):
        api.query_request(b'{"limit":0}', "box")
    with pytest.raises(api.BadRequest, match="'mark_read' must be true or false"):
        api.query_request(b'{"mark_read":1}', "box")
    with pytest.raises(api.BadRequest, match=api.BAD_MAIL_ID):
        api.delete_request(b"{}", "a..b")
    assert api.delete_request(b'{"token":"t"}', "box") == api.DeleteRequest("t")


def test_reply_shapes():
    assert api.encode(api.Created("b", "standard", 0, 0, "tok")) == \
        b'{"mail_id":"b","type":"standard","ttl":0,"expires_at":0,"token":"tok"}'
    # The shard's part of it has no token (it never sees one).
    assert api.to_builtins(api.Created("b", "standard", 0, 0)) == \
        {"mail_id": "b", "type": "standard", "ttl": 0, "expires_at": 0}
    msgs = [api.message(1, "normal", "s", 5, b"hi"), api.message(2, "urgent", "s", 6, b"\xff")]
    assert api.encode(api.QueryReply("b", 2, msgs)) == (
        b'{"mail_id":"b","unread":2,"messages":['
        b'{"msg_id":1,"priority":"normal","subject":"s","ts":5,"payload":"hi"},'
        b'{"msg_id":2,"priority":"urgent","subject":"s","ts":6,"payload":"/w==","encoding":"base64"}]}')
    assert api.encode(api.Deleted("b")) == b'{"mail_id":"b","deleted":true}'
