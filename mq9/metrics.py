"""Every mq9 metric, defined once.

Each process of a node writes its own values into files under ``PROMETHEUS_MULTIPROC_DIR``
(set by the supervisor before it spawns children, so this import picks multi-process mode);
the supervisor's /metrics endpoint sums them into one view of the node. Hot paths add counts
in bulk (``inc(n)`` once per batch), never once per message.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Gauges are summed over live processes; a dead process's values are dropped by the
# supervisor (mark_process_dead) when it restarts the child.
CONNECTIONS = Gauge("mq9_connections", "Open client connections", multiprocess_mode="livesum")
SUBSCRIPTIONS = Gauge("mq9_subscriptions", "Active client subscriptions", multiprocess_mode="livesum")
MAILBOXES = Gauge("mq9_mailboxes", "Mailboxes stored on this node", multiprocess_mode="livesum")
STORED_MESSAGES = Gauge("mq9_stored_messages", "Messages stored in mailboxes", multiprocess_mode="livesum")
STORED_BYTES = Gauge("mq9_stored_bytes", "Payload bytes stored in mailboxes", multiprocess_mode="livesum")

MESSAGES_IN = Counter("mq9_messages_in", "Messages published by clients", ["kind"])
MESSAGES_OUT = Counter("mq9_messages_out", "Messages delivered to clients", ["kind"])
BYTES_IN = Counter("mq9_bytes_in", "Payload bytes published by clients", ["kind"])
BYTES_OUT = Counter("mq9_bytes_out", "Payload bytes delivered to clients", ["kind"])
DROPS = Counter("mq9_drops", "Messages dropped, by reason", ["reason"])
MAILBOX_OPS = Counter("mq9_mailbox_ops", "Mailbox operations handled by shards", ["op", "result"])
AUTH_FAILURES = Counter("mq9_auth_failures", "Rejected client credentials and mailbox tokens", ["kind"])
BCRYPT_CHECKS = Counter("mq9_bcrypt_checks", "bcrypt password checks run by gateways (logins with the same "
                        "credentials share one; a remembered success skips it)")
SLOW_CONSUMERS = Counter("mq9_slow_consumers", "Clients cut off for not reading")
PROCESS_RESTARTS = Counter("mq9_process_restarts", "Child processes restarted by the supervisor", ["kind"])

SHARD_BATCH_SECONDS = Histogram(
    "mq9_shard_batch_seconds", "Time a shard spends on one batch of operations, RocksDB write included",
    buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
SHARD_BATCH_SIZE = Histogram(
    "mq9_shard_batch_ops", "Operations per shard batch",
    buckets=(1, 2, 5, 10, 50, 100, 500, 1000, 5000),
)

SEND_ACK_SECONDS = Histogram(
    "mq9_send_ack_seconds", "Gateway time from an acked mailbox send to its ack (shard round trip, write included)",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
)
STORAGE_ERRORS = Counter("mq9_storage_errors", "RocksDB writes that failed (disk full, read-only, I/O error)")
STORAGE_FAILING = Gauge("mq9_storage_failing", "Shards refusing sends because RocksDB writes fail",
                        multiprocess_mode="livesum")
ROCKSDB_BYTES = Gauge("mq9_rocksdb_bytes", "RocksDB files and memtables of the node's shards",
                      multiprocess_mode="livesum")
# Written by the supervisor only (every other process holds 0), so "max" is its value.
RAFT_LEADER = Gauge("mq9_raft_leader", "1 if this node leads the metadata group", multiprocess_mode="max")
RAFT_TERM = Gauge("mq9_raft_term", "Current Raft term of the metadata group", multiprocess_mode="max")
RAFT_COMMIT_INDEX = Gauge("mq9_raft_commit_index", "Raft commit index seen by this node",
                          multiprocess_mode="max")
SLOTS_OWNED = Gauge("mq9_slots_owned", "Slots owned by this node's shards", multiprocess_mode="max")
SLOT_MOVES = Gauge("mq9_slot_moves_in_progress", "Slot moves recorded in the metadata group",
                   multiprocess_mode="max")


# Label values known in advance, set to 0 at start so that a rate() or an alert on them
# works before the first event (a series that appears only at its first increment hides
# that increment from rate()).
KNOWN_LABELS = {
    PROCESS_RESTARTS: (("gateway",), ("shard",)),
    AUTH_FAILURES: (("credentials",), ("no_connect",), ("tls",)),
    DROPS: tuple((r,) for r in ("slow_consumer", "bad_frame", "bad_subject", "ipc_backlog",
                                "unencodable", "gateway_unreachable", "corrupt_record")),
}


def zero_known_labels() -> None:
    from mq9.subjects import KINDS

    for counter in (MESSAGES_IN, MESSAGES_OUT, BYTES_IN, BYTES_OUT):
        for kind in KINDS:
            counter.labels(kind)
    for counter, values in KNOWN_LABELS.items():
        for v in values:
            counter.labels(*v)


class NodeCollector:
    """What the supervisor adds to /metrics at scrape time: the standard process metrics
    summed over every process of the node (``mq9.procfs``), ``mq9_build_info`` and
    ``mq9_slots_unavailable``. Registered in the supervisor's registry only."""

    def __init__(self, started: float, slots_unavailable: Callable[[], int],
                 versions: dict[str, str]) -> None:
        self.started = started
        self.slots_unavailable = slots_unavailable
        self.versions = dict(versions, python=platform.python_version())

    def collect(self) -> Iterator[Metric]:
        from mq9 import procfs

        u = procfs.usage()
        yield GaugeMetricFamily("process_resident_memory_bytes",
                                "Resident memory of the node's processes, summed", value=u.rss_bytes)
        yield CounterMetricFamily("process_cpu_seconds",
                                  "CPU time (user + system) of the node's processes, the restarted "
                                  "ones' included", value=u.cpu_seconds)
        yield GaugeMetricFamily("process_open_fds", "Open file descriptors of the node's processes, "
                                "summed", value=u.open_fds)
        yield GaugeMetricFamily("process_start_time_seconds",
                                "Start of the node's supervisor, seconds since the epoch",
                                value=self.started)
        info = GaugeMetricFamily("mq9_build_info", "Always 1; the labels say what runs",
                                 labels=list(self.versions))
        info.add_metric(list(self.versions.values()), 1)
        yield info
        yield GaugeMetricFamily("mq9_slots_unavailable",
                                "Slots owned by this node whose shard process is not running",
                                value=self.slots_unavailable())


def observe_many(hist: Histogram, amounts: list[float]) -> None:
    """``hist.observe`` for many values at once: one increment per bucket, not per value.

    In multiprocess mode every increment is a locked write to an mmap file (measured at ~9%
    of a gateway's time under acked load when done per value). This leans on the client's
    ``_upper_bounds``/``_buckets``/``_sum``; if a release renames them, it falls back to
    observing one by one.
    """
    if not amounts:
        return
    try:
        bounds, buckets, total = hist._upper_bounds, hist._buckets, hist._sum
    except AttributeError:
        for a in amounts:
            hist.observe(a)
        return
    counts = [0] * len(bounds)
    for a in amounts:
        counts[bisect_left(bounds, a)] += 1  # first bound >= a, as observe() picks
    for i, c in enumerate(counts):
        if c:
            buckets[i].inc(c)
    total.inc(sum(amounts))
