"""A shard's RocksDB: key layout, record encoding, group-committed writes, startup scan.

Key layout (raw bytes; a mail_id never contains NUL, so ``{mail_id}\\0`` ends it exactly and
one mailbox's keys are a contiguous range):

    M\\0{mail_id}                                   -> Meta (msgpack array)
    m\\0{mail_id}\\0{msg_id: 8 bytes big-endian}       -> message record (see below)
    u\\0{mail_id}\\0{prio index: 1 byte}\\0{msg_id}     -> b"" : the message is undelivered
    F\\0                                              -> frozen slots (msgpack list of ints)

Big-endian ids make RocksDB's byte order the msg_id order, and the priority byte in ``u``
keys makes a scan of a mailbox's ``u`` range come out in delivery order (urgent, normal,
notify; oldest first).

Message record: 4-byte big-endian length N, then a msgpack array
``[prio index, ts_ms, subject, headers]`` of N bytes, then the raw payload. The payload stays
outside msgpack so the loader learns a message's payload size from the header length alone.

msg_ids are never reused within a mailbox without persisting a counter: every operation
that deletes a message (eviction, ``latest`` replacement) writes a message with a higher id
in the same WriteBatch, so the highest stored id is always the last one assigned. Only the
deletion of the whole mailbox forgets it, and then the mailbox is gone too.

Everything a loop iteration changes goes into one WriteBatch, written once by ``commit``
(``fsync=batch`` syncs the WAL there: group commit).
"""

from __future__ import annotations

import os
import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import cast

import msgspec
from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from mq9 import log

_BE8 = struct.Struct(">Q")
_BE4 = struct.Struct(">I")

_PRIO_BYTES = (b"\0\0", b"\1\0", b"\2\0")  # prio index byte + the NUL after it

META = b"M\0"
MSG = b"m\0"
UNDELIVERED = b"u\0"
FROZEN = b"F\0"
PROBE = b"P\0"  # written and deleted to test whether the disk takes writes again
FAMILIES = (META, MSG, UNDELIVERED)  # key order, which is also export order

# rocksdict's stubs type a key as any kind of key; in raw mode, the only one used here, keys
# and values are bytes. A scan is cast once, not per record.
_Pairs = Iterator[tuple[bytes, bytes]]


class Meta(msgspec.Struct, array_like=True):
    type: str  # "standard" | "latest"
    ttl: int  # seconds, 0 = never
    created: float  # unix seconds
    expires_at: float  # unix seconds, 0 = never
    token_hash: bytes


_meta_enc = msgspec.msgpack.Encoder()
_meta_dec = msgspec.msgpack.Decoder(Meta)
_hdr_enc = msgspec.msgpack.Encoder()
_hdr_dec = msgspec.msgpack.Decoder(tuple[int, int, str, bytes | None])


def meta_key(mail_id: str) -> bytes:
    return META + mail_id.encode()


def msg_prefix(mail_id: str) -> bytes:
    return MSG + mail_id.encode() + b"\0"


def msg_key(mail_id: str, msg_id: int) -> bytes:
    return MSG + mail_id.encode() + b"\0" + _BE8.pack(msg_id)


def undelivered_prefix(mail_id: str) -> bytes:
    return UNDELIVERED + mail_id.encode() + b"\0"


def undelivered_key(mail_id: str, prio: int, msg_id: int) -> bytes:
    return UNDELIVERED + mail_id.encode() + b"\0" + bytes((prio,)) + b"\0" + _BE8.pack(msg_id)


def mail_id_of(key: bytes) -> str | None:
    """The mail_id a mailbox record's key belongs to, or None if ``key`` is no such key
    (wrong family, or a message/mark key whose tail is malformed)."""
    fam = key[:2]
    if fam == META:
        raw, ok = key[2:], True
    elif fam == MSG:
        raw, tail = key[2:-9], key[-9:]
        ok = len(key) > 11 and tail[:1] == b"\0"
    elif fam == UNDELIVERED:
        raw, tail = key[2:-11], key[-11:]
        ok = len(key) > 13 and tail[:1] == b"\0" and tail[1] < 3 and tail[2:3] == b"\0"
    else:
        return None
    if not ok or not raw or b"\0" in raw:
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _end_of(prefix: bytes) -> bytes:
    # Every prefix here ends in NUL, so bumping that byte to 1 bounds the range.
    return prefix[:-1] + b"\1"


def encode_record(prio: int, ts_ms: int, subject: str, headers: bytes | None,
                  payload: bytes) -> bytes:
    hdr = _hdr_enc.encode((prio, ts_ms, subject, headers))
    return b"".join((_BE4.pack(len(hdr)), hdr, payload))


# (prio index, ts_ms, subject, headers, payload): a plain tuple, not a NamedTuple, since the
# pump decodes one per pushed message and unpacks it at once.
Record = tuple[int, int, str, bytes | None, bytes]


def decode_record(value: bytes) -> Record:
    n: int = _BE4.unpack_from(value)[0]
    prio, ts, subject, headers = _hdr_dec.decode(memoryview(value)[4:4 + n])
    return prio, ts, subject, headers, value[4 + n:]


def record_payload_size(value: bytes) -> int:
    n: int = _BE4.unpack_from(value)[0]
    return len(value) - 4 - n


# (message key prefix, undelivered key prefix) of a mailbox (``Store.prefixes``), built
# once per mailbox for the writes made per message. A plain pair read by index: a
# NamedTuple's attribute costs ~150 more instructions per read than an index on 3.11, and
# a send or a Delivered report reads it once or twice per message (measured: +0.7% per
# message for send, push and Delivered together).
KeyPrefixes = tuple[bytes, bytes]


class LoadedMailbox(msgspec.Struct):
    mail_id: str
    meta: Meta
    sizes: dict[int, int]  # msg_id -> payload bytes, every stored message, ascending ids
    undelivered: list[list[int]]  # per priority index, ascending msg_ids


class Store:
    def __init__(self, path: str, fsync: bool = False):
        os.makedirs(path, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_background_jobs(2)
        # Undelivered marks are written and deleted constantly; compact ranges full of
        # tombstones early so the startup scan does not wade through them.
        opts.add_compact_on_deletion_collector_factory(4096, 2048, 0.5)
        self.path = path
        self._opts = opts
        self.db = Rdict(path, opts)
        self._wopts = WriteOptions()
        self._wopts.sync = fsync
        self.batch = WriteBatch(raw_mode=True)
        self._dirty = False

    # ---- writes (buffered in the current batch) ----------------------------------------

    def put_meta(self, mail_id: str, meta: Meta) -> None:
        self.batch.put(meta_key(mail_id), _meta_enc.encode(meta))
        self._dirty = True

    @staticmethod
    def prefixes(mail_id: str) -> KeyPrefixes:
        return msg_prefix(mail_id), undelivered_prefix(mail_id)

    def put_message_at(self, prefixes: KeyPrefixes, msg_id: int, prio: int,
                       record: bytes) -> None:
        idb = _BE8.pack(msg_id)
        put = self.batch.put
        put(prefixes[0] + idb, record)
        put(prefixes[1] + _PRIO_BYTES[prio] + idb, b"")
        self._dirty = True

    def mark_delivered(self, mail_id: str, prio: int, msg_id: int) -> None:
        self.batch.delete(undelivered_key(mail_id, prio, msg_id))
        self._dirty = True

    def mark_delivered_at(self, prefixes: KeyPrefixes, prio: int, msg_id: int) -> None:
        """``mark_delivered`` with the mailbox's prefixes (see ``prefixes``) already built."""
        self.batch.delete(prefixes[1] + _PRIO_BYTES[prio] + _BE8.pack(msg_id))
        self._dirty = True

    def delete_message(self, mail_id: str, msg_id: int, prio: int | None) -> None:
        """``prio`` is the priority of an undelivered message (its mark goes too), else None."""
        self.batch.delete(msg_key(mail_id, msg_id))
        if prio is not None:
            self.batch.delete(undelivered_key(mail_id, prio, msg_id))
        self._dirty = True

    def delete_mailbox(self, mail_id: str) -> None:
        self._delete_mailbox(self.batch, mail_id)
        self._dirty = True

    @staticmethod
    def _delete_mailbox(batch: WriteBatch, mail_id: str) -> None:
        batch.delete(meta_key(mail_id))
        p = msg_prefix(mail_id)
        batch.delete_range(p, _end_of(p))
        p = undelivered_prefix(mail_id)
        batch.delete_range(p, _end_of(p))

    def commit(self) -> bool:
        """Write the batch (one WAL append, synced if fsync=batch). True if anything was written."""
        if not self._dirty:
            return False
        batch = self.batch
        self.batch = WriteBatch(raw_mode=True)
        self._dirty = False
        self.db.write(batch, self._wopts)
        return True

    def writable(self) -> bool:
        """After a failed write: can RocksDB write again? A failed WAL append leaves RocksDB
        refusing every later write (its "background error"), and rocksdict has no
        ``Resume``, so the DB is closed and reopened (which replays the WAL up to the last
        whole record). Then one small synced write proves the disk takes data again. On
        False the store is still open and readable, or, if the reopen itself failed,
        ``self.db`` is the closed handle and the next call tries again."""
        probe = WriteBatch(raw_mode=True)
        probe.put(PROBE, b"")
        probe.delete(PROBE)
        sync = WriteOptions()
        sync.sync = True
        try:
            self.db.write(probe, sync)
            return True
        except Exception:  # noqa: BLE001 - rocksdict raises plain Exception for I/O errors
            pass
        try:
            self.db.close()
        except Exception:  # noqa: BLE001 - close reports the same error; the handle is closed
            pass
        try:
            self.db = Rdict(self.path, self._opts)
            self.db.write(probe, sync)
            return True
        except Exception as e:  # noqa: BLE001
            log.warning("shard_storage_still_failing", path=self.path, error=str(e))
            return False

    def discard(self) -> None:
        self.batch = WriteBatch(raw_mode=True)
        self._dirty = False

    # ---- reads ---------------------------------------------------------------------------

    def get_record(self, mail_id: str, msg_id: int) -> bytes | None:
        return self.db.get(msg_key(mail_id, msg_id))

    def get_records(self, prefix: bytes, msg_ids: list[int]) -> list[bytes | None]:
        """Records of one mailbox (``prefix``: its message key prefix) for ascending
        ``msg_ids``. Ids close together (a backlog being replayed) are read with one scan:
        a RocksDB iterator step costs about a quarter of a point read from Python."""
        n = len(msg_ids)
        if n < 8 or msg_ids[-1] - msg_ids[0] > 2 * n:
            return cast("list[bytes | None]", self.db.get([prefix + _BE8.pack(m) for m in msg_ids]))
        out: list[bytes | None] = []
        i = 0
        plen = len(prefix)
        klen = plen + 8
        unpack = _BE8.unpack_from
        for k, v in cast(_Pairs, self.db.items(from_key=prefix + _BE8.pack(msg_ids[0]))):
            if len(k) != klen or not k.startswith(prefix):
                break
            mid: int = unpack(k, plen)[0]
            while msg_ids[i] < mid:
                out.append(None)
                i += 1
                if i == n:
                    return out
            if msg_ids[i] == mid:
                out.append(v)
                i += 1
                if i == n:
                    return out
        out.extend([None] * (n - i))
        return out

    def mail_ids_from(self, start: str) -> Iterator[str]:
        """mail_ids of the stored mailboxes from ``start`` on, in mail_id order (RocksDB's
        key order: mail_ids are ASCII). Committed writes only."""
        for k in cast("Iterator[bytes]", self.db.keys(from_key=META + start.encode())):
            if not k.startswith(META):
                return
            yield k[2:].decode(errors="replace")

    def _range(self, lo: bytes, hi: bytes) -> _Pairs:
        # Bounded by hand: rocksdict 0.3.29's iterate_upper_bound cut scans short in testing.
        for k, v in cast(_Pairs, self.db.items(from_key=lo)):
            if k >= hi:
                return
            yield k, v

    def _family(self, family: bytes, ids: list[bytes] | None) -> Iterator[tuple[bytes, bytes]]:
        if ids is None:
            yield from self._range(family, _end_of(family))
        elif family == META:
            get = self.db.get
            for i in ids:
                v = get(META + i)
                if v is not None:
                    yield META + i, v
        else:
            for i in ids:
                lo = family + i + b"\0"
                yield from self._range(lo, _end_of(lo))

    def load(self, now: float, mail_ids: Iterable[str] | None = None) -> list[LoadedMailbox]:
        """Scan everything (or only the mailboxes ``mail_ids``: an imported slot) into
        LoadedMailbox records, in one pass per key family.

        Mailboxes whose TTL passed while the shard was down are deleted here (committed before
        this returns), as are messages and marks left without a mailbox.
        """
        ids = None if mail_ids is None else sorted({m.encode() for m in mail_ids})
        boxes: dict[str, LoadedMailbox] = {}
        dead: set[str] = set()
        unreadable: set[str] = set()  # left alone on disk: never destroy what we cannot parse
        for k, v in self._family(META, ids):
            mail_id = k[2:].decode(errors="replace")
            try:
                meta = _meta_dec.decode(v)
            except msgspec.DecodeError:
                log.error("shard_meta_unreadable", mail_id=mail_id, path=self.path)
                unreadable.add(mail_id)
                continue
            if meta.expires_at and meta.expires_at <= now:
                dead.add(mail_id)
                continue
            boxes[mail_id] = LoadedMailbox(mail_id, meta, {}, [[], [], []])

        orphans: set[str] = set()
        for k, v in self._family(MSG, ids):
            mail_id = k[2:-9].decode(errors="replace")
            box = boxes.get(mail_id)
            if box is None:
                orphans.add(mail_id)
                continue
            box.sizes[_BE8.unpack_from(k, len(k) - 8)[0]] = record_payload_size(v)

        for k, _ in self._family(UNDELIVERED, ids):
            mail_id = k[2:-11].decode(errors="replace")
            box = boxes.get(mail_id)
            if box is None:
                orphans.add(mail_id)
                continue
            msg_id = _BE8.unpack_from(k, len(k) - 8)[0]
            prio = k[-10]
            if msg_id in box.sizes and prio < 3:
                box.undelivered[prio].append(msg_id)

        orphans -= unreadable
        if dead or orphans:
            batch = WriteBatch(raw_mode=True)
            for mail_id in dead | orphans:
                self._delete_mailbox(batch, mail_id)
            try:
                self.db.write(batch, self._wopts)
            except Exception as e:  # noqa: BLE001 - a full disk must not stop the start
                # They are skipped in memory anyway and deleted at the next load.
                log.error("shard_cleanup_write_failed", path=self.path, error=str(e))
        return list(boxes.values())

    # ---- slot moves ----------------------------------------------------------------------

    def export(self, mail_ids: Iterable[str], after: bytes | None,
               max_bytes: int) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """One page of the raw records of ``mail_ids``, in key order (all metas, then all
        messages, then all marks), strictly after ``after``. -> (pairs, last key) or
        (pairs, None) when nothing is left. A page holds at least one pair (a record may be
        bigger than ``max_bytes``) and otherwise stays within ``max_bytes``.

        Reads what is committed: the caller commits the pending batch first. Raises
        ValueError for an ``after`` that is no mailbox record key.
        """
        ids = sorted({m.encode() for m in mail_ids})
        fi, start, resume = 0, 0, None
        if after is not None:
            mid = mail_id_of(after)
            if mid is None:
                raise ValueError("'after' is not a mailbox record key")
            fi = FAMILIES.index(after[:2])
            raw = mid.encode()
            if fi == 0:
                start = bisect_right(ids, raw)
            else:
                start = bisect_left(ids, raw)
                if start < len(ids) and ids[start] == raw:
                    resume = after
        pairs: list[tuple[bytes, bytes]] = []
        size = 0
        get = self.db.get
        # One iterator, re-seeked per mailbox: a fresh iterator per range costs far more.
        it = self.db.iter()
        for f in range(fi, 3):
            family = FAMILIES[f]
            for j in range(start if f == fi else 0, len(ids)):
                if family == META:
                    k = META + ids[j]
                    v = get(k)
                    if v is None:
                        continue
                    n = len(k) + len(v)
                    if pairs and size + n > max_bytes:
                        return pairs, pairs[-1][0]
                    pairs.append((k, v))
                    size += n
                    continue
                lo = family + ids[j] + b"\0"
                hi = _end_of(lo)  # by hand: iterate_upper_bound is unreliable (see _range)
                if resume is not None:
                    it.seek(resume)
                    if it.valid() and it.key() == resume:
                        it.next()
                    resume = None
                else:
                    it.seek(lo)
                while it.valid():
                    k = it.key()
                    if k >= hi:
                        break
                    v = it.value()
                    n = len(k) + len(v)
                    if pairs and size + n > max_bytes:
                        return pairs, pairs[-1][0]
                    pairs.append((k, v))
                    size += n
                    it.next()
        return pairs, None

    def put_raw(self, key: bytes, value: bytes) -> None:
        self.batch.put(key, value)
        self._dirty = True

    def get_frozen(self) -> set[int]:
        raw = self.db.get(FROZEN)
        if raw is None:
            return set()
        return set(msgspec.msgpack.decode(raw, type=list[int]))

    def put_frozen(self, slots: set[int]) -> None:
        self.batch.put(FROZEN, msgspec.msgpack.encode(sorted(slots)))
        self._dirty = True

    def disk_bytes(self) -> int:
        """SST files plus memtables, as RocksDB counts them."""
        total = 0
        for prop in ("rocksdb.total-sst-files-size", "rocksdb.cur-size-all-mem-tables"):
            try:
                total += int(self.db.property_int_value(prop) or 0)
            except Exception:  # noqa: BLE001 - a size gauge must never fail a batch
                pass
        return total

    def close(self) -> None:
        self.commit()
        try:
            self.db.flush_wal(True)
        finally:
            self.db.close()
