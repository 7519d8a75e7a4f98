"""Moves slots until they are spread evenly: after a join, while a member is leaving, after
a node restarts with another shard count.

Every member runs a ``Rebalancer``; only the Raft leader's acts, so there is one planner at
a time, and a new leader picks up the moves its predecessor left in the state. A batch of
slots goes through:

    start_moves (state "copying")   the source shard still owns and serves the slots;
    mover.copy(moves)               their mailboxes are copied to the target shard
    set_moves_state "flipping"      the source stops taking writes for these slots
    mover.flip(moves)               the rest is copied
    finish_moves                    ownership flips; routing follows the new owner

If the mover fails the batch is aborted and the source keeps the slots. The mover is
where data moves (``mover.ShardMover``, between the broker's shard processes);
``MetadataOnlyMover`` moves none and is only right when no shard holds data for those
slots (tests, a metadata-only node).
A mover must tolerate being asked again for the same moves: after a leader change the
new leader repeats the step the old one may have been in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol, cast

from mq9 import log
from mq9.cluster import state as st
from mq9.cluster.metadata import ClusterError, MetadataGroup
from mq9.cluster.state import SlotMove, StateError


class Mover(Protocol):
    def copy(self, moves: list[SlotMove]) -> None: ...

    def flip(self, moves: list[SlotMove]) -> None: ...

    # optional: ``finish(moves)`` after ownership flipped (drop the source's copy)


class MetadataOnlyMover:
    def __init__(self, delay: float = 0.0):
        self.delay = delay  # lets tests see moves in progress

    def copy(self, moves: list[SlotMove]) -> None:
        if self.delay:
            time.sleep(self.delay)

    def flip(self, moves: list[SlotMove]) -> None:
        pass


class Rebalancer:
    def __init__(self, group: MetadataGroup, mover: Mover, batch: int = 64,
                 interval: float = 0.5, retry_delay: float = 1.0):
        self.group = group
        self.mover = mover
        self.batch = max(1, min(batch, st.MAX_MOVES_PER_OP))
        self.interval = interval
        self.retry_delay = retry_delay
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log = log.bind(node=group.node_id)
        group.on_change(lambda state, op: self._wake.set())

    def start(self) -> Rebalancer:
        self._thread = threading.Thread(target=self._run, name="mq9-rebalancer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                while not self._stop.is_set() and self.step():
                    pass
            except (ClusterError, StateError) as e:
                # lost leadership, no quorum, a plan made stale by a concurrent change:
                # the next round plans again from the state as it is then
                self.log.info("rebalance_retry", code=e.code, error=str(e))
                self._stop.wait(self.retry_delay)
            except Exception:
                self.log.exception("rebalance_failed")
                self._stop.wait(self.retry_delay)

    def step(self) -> bool:
        """One batch. Returns False when there was nothing to do (or not leader)."""
        g = self.group
        if not g.is_leader() or not g.is_ready():
            return False
        s = g.snapshot()
        batch: list[SlotMove]
        if s.moves:
            # moves left by an earlier round or an earlier leader: carry them on
            batch = [{"slot": slot, **m} for slot, m in sorted(s.moves.items())[:self.batch]]
        else:
            plan = st.plan_rebalance(s)
            if not plan:
                return False
            moves = [{"slot": m["slot"], "from": list(m["from"]), "to": list(m["to"])}
                     for m in plan[:self.batch]]
            # state.start_moves answers [slot, id] per move started or already under way
            started = cast(list[list[int]], g.write("start_moves", {"moves": moves})["started"])
            s = g.snapshot()
            batch = [{"slot": slot, **s.moves[slot]} for slot, _ in started if slot in s.moves]
            self.log.info("rebalance_batch", moves=len(batch), remaining=len(plan) - len(batch))
        refs = [[m["slot"], m["id"]] for m in batch]
        try:
            copying = [m for m in batch if m["state"] == "copying"]
            if copying:
                self.mover.copy(copying)
                self._still_leader()
                g.write("set_moves_state", {"moves": [[m["slot"], m["id"]] for m in copying],
                                            "move_state": "flipping"})
            self.mover.flip(batch)
            self._still_leader()
        except (ClusterError, StateError):
            raise
        except Exception:
            self.log.exception("rebalance_move_failed", moves=len(refs))
            g.write("abort_moves", {"moves": refs})
            self._stop.wait(self.retry_delay)
            return True
        g.write("finish_moves", {"moves": refs})
        finish: Callable[[list[SlotMove]], None] | None = getattr(self.mover, "finish", None)
        if finish is not None:
            try:
                finish(batch)
            except Exception:
                # The source keeps a frozen copy it no longer serves: wasted space, no harm.
                self.log.exception("rebalance_finish_failed", moves=len(refs))
        return True

    def _still_leader(self) -> None:
        # Narrows (cannot close) the window in which a deposed leader and its successor
        # both drive the same moves; the state's move ids keep the metadata consistent.
        if not self.group.is_leader():
            raise ClusterError("not_leader", "leadership moved during a rebalance batch")
