from mq9.bench.workloads import Meter, failure, is_created, is_sent, pct


def test_pct_is_nearest_rank_in_microseconds():
    ns = [i * 1000 for i in range(1, 101)]      # 1..100 µs
    assert pct(ns, 0.50) == 50.0
    assert 99.0 <= pct(ns, 0.99) <= 100.0   # make bench's rounding, kept as it was
    assert pct([7000], 0.99) == 7.0
    assert pct([], 0.5) != pct([], 0.5)         # nan: nothing measured


def test_answers_are_told_apart():
    assert is_sent(b'{"msg_id": 3}') and not is_sent(b'{"error": "full", "code": "full"}')
    assert is_created(b'{"mail_id": "m", "token": "t"}')
    assert not is_created(b'{"error": "x", "code": "bad_request"}') and not is_created(b"")


def test_a_full_mailbox_names_max_msgs():
    st = {"ok": 10, "err": 2, "first_err": b'{"error": "mailbox full", "code": "full"}'}
    why = failure("acked sends", st, 12)
    assert why.startswith("acked sends: 10/12 answered, 2 errors, the first: mailbox full")
    assert why.endswith("(the server's max_msgs is lower than --messages)")


def test_meter_reads_a_probe_when_given_one():
    m = Meter()
    m.stage("a", 10)
    m.count += 3
    assert (m.what, m.total, m.done) == ("a", 10, 3)
    m.stage("b", 5, lambda: 4)
    assert m.done == 4
