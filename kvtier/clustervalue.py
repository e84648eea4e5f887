"""How the cluster tier lays a block out in Redis, and reads it back in place.

Keys: ``<prefix>:<namespace>:{<key hex>}`` holds a block; ``<that>:<i>`` holds
its part i (i >= 1) when it is split. Only the key's digest is in the hash
tag, so in Cluster mode blocks spread evenly over the 16384 slots (and every
master) whatever their namespace, while a block and its parts share one slot.

Values: a block is one record in the block format (``kvtier.record``, header
unaligned). A record longer than the part size is cut into consecutive slices;
value i is a 36-byte envelope followed by slice i::

    offset size  field (little-endian)
     0     4     magic b"KVTP"
     4     8     write id (random, the same in every part of one write)
    12     4     part index i
    16     4     part count n
    20     8     offset of this slice in the record
    28     8     record length

Part 0 (at the block's key) is written after all the others, and a reader
accepts a part only when it carries part 0's write id: each SET is atomic, so
a read racing an overwrite sees one write or a miss, never two writes mixed.
An unsplit value starts with the record magic b"KVTB" instead.

Reading in place: ``BlockSink`` receives the value at the block's key straight
from the socket (``kvtier.resp`` sinks): it checks the header (names, lengths)
from the first bytes, picks the payload's final buffer (the caller's, e.g. an
arena slot, or a fresh one), and ``PartSink``s then fill that buffer at their
offsets. Nothing is trusted until ``kvtier.cluster`` has verified the checksum
of the whole payload.
"""
from __future__ import annotations

import logging
import os
import struct

from . import record
from .record import CorruptRecord, Meta, UnknownVersion

log = logging.getLogger("kvtier.cluster")

PART_MAGIC = b"KVTP"
ENVELOPE = struct.Struct("<4s8sIIQQ")  # magic, write id, index, count, offset in record, record length
MIN_PART = 64 * 1024    # the smallest cluster.part_bytes the settings allow
MAX_PARTS = 1 << 16     # more parts than any write makes


def _most_parts(total: int) -> int:
    """The most parts a write of a record of total bytes makes (one per MIN_PART bytes): a
    flipped bit in an envelope's count must not make a reader ask for, or a delete unlink,
    millions of parts."""
    return min(MAX_PARTS, -(-total // MIN_PART))


def block_name(prefix: bytes, ns: str, key: bytes) -> bytes:
    return b"%s:%s:{%s}" % (prefix, ns.encode(), key.hex().encode())


def part_name(base: bytes, i: int) -> bytes:
    return b"%s:%d" % (base, i)


def part_count(head: object) -> int:
    """Parts of the write whose first bytes (GETRANGE 0..35 of the block's key) are head; 1 if unsplit."""
    if isinstance(head, bytes) and len(head) == ENVELOPE.size and head[:4] == PART_MAGIC:
        _, _, idx, count, off, total = ENVELOPE.unpack(head)
        if idx == 0 and off == 0:
            return max(1, min(count, _most_parts(total)))  # a damaged count: every part the record could have
    return 1


PEEK = ENVELOPE.size + 5  # the first bytes of a value that tell a record, and its format version, apart


def peek_state(head: object) -> tuple[str, int]:
    """What the first PEEK bytes of the value at a block's key (GETRANGE 0..PEEK-1, or its error
    reply) say, and the record's format version: "" (no value), "record", "version" (a record
    of a format version this kvtier does not read) or "corrupt" (not a record: damaged, or a
    value of another type)."""
    if not isinstance(head, bytes):
        return ("corrupt" if getattr(head, "code", "") == "WRONGTYPE" else ""), 0
    if not head:
        return "", 0
    rec = head[ENVELOPE.size:] if head[:4] == PART_MAGIC else head
    if rec[:4] != record.MAGIC or len(rec) < 5:
        return "corrupt", 0
    return ("record" if rec[4] == record.VERSION else "version"), rec[4]


def split(header: bytes, payload: memoryview, part_bytes: int) -> list[tuple]:
    """The values of a record: [(pieces of value 0), (pieces of value 1), ...], each a tuple of
    buffers sent back to back. One value (the record itself) when it fits in part_bytes."""
    hs, total = len(header), len(header) + len(payload)
    if not part_bytes or total <= part_bytes:
        return [(header, payload)]
    count = -(-total // part_bytes)
    wid = os.urandom(8)
    values = [(ENVELOPE.pack(PART_MAGIC, wid, 0, count, 0, total), header, payload[:part_bytes - hs])]
    for i in range(1, count):
        off, end = i * part_bytes, min(total, (i + 1) * part_bytes)
        values.append((ENVELOPE.pack(PART_MAGIC, wid, i, count, off, total), payload[off - hs:end - hs]))
    return values


class BlockSink:
    """One block being read. As the sink of the value at the block's key it parses the record
    header and picks the payload's buffer; the PartSinks of its other parts fill the rest.

    into(index, n), when given, returns the caller's buffer for a raw payload of n bytes, or
    None to decline (the block is then a miss and nothing is written to it)."""
    __slots__ = ("ns", "key", "index", "into", "meta", "buf", "dest", "got", "wid", "count", "total",
                 "bad", "torn", "refused", "present", "version")

    def __init__(self, ns: str, key: bytes, index: int, into=None):
        self.ns, self.key, self.index, self.into = ns, key, index, into
        self.meta: Meta | None = None
        self.buf: bytearray | None = None   # a buffer of our own, when not the caller's
        self.dest: memoryview | None = None  # where the payload goes
        self.got = 0                         # payload bytes announced by the values seen so far
        self.wid = b""
        self.count = 1
        self.total = 0
        self.bad = ""                        # corrupt: why
        self.torn = False                    # a part of another write, or a part missing
        self.refused = False                 # into() declined
        self.present = False
        self.version = 0                     # a record of this format version, unknown here: a miss, kept

    def caller_buffer(self, n: int) -> memoryview | None:
        try:
            b = self.into(self.index, n)
        except Exception:
            log.exception("cluster: into() failed; the block is a miss")
            return None
        if b is not None and memoryview(b).nbytes < n:
            log.error("cluster: into() gave %d bytes for a block of %d; the block is a miss", memoryview(b).nbytes, n)
            return None
        return None if b is None else memoryview(b).cast("B")[:n]

    def begin(self, n: int, head: bytes):
        self.present = True
        try:
            start = 0
            if head[:4] == PART_MAGIC:
                if len(head) < ENVELOPE.size:
                    raise CorruptRecord("truncated part envelope")
                _, self.wid, idx, count, off, total = ENVELOPE.unpack_from(head)
                self.count = max(1, min(count, _most_parts(total)))  # what unlinking the record removes
                # part 0 is one part long: a write of that part size made this many parts
                made = -(-total // (n - ENVELOPE.size)) if n > ENVELOPE.size else 0
                if idx != 0 or off != 0 or count < 2 or count != made or count > _most_parts(total):
                    raise CorruptRecord("first part has a bad envelope")
                start, self.total = ENVELOPE.size, total
            else:
                self.total = n
            meta = record.decode_header(head[start:])
            if (meta.ns, meta.key) != (self.ns, self.key):
                raise CorruptRecord("record names another block")
            if meta.header_size + meta.stored_len != self.total:
                raise CorruptRecord("record length disagrees with the value")
            pay0 = start + meta.header_size          # where the payload starts in this value
            seg = n - pay0                           # payload bytes this value carries
            if seg < 0 or seg > meta.stored_len or (self.count == 1 and seg != meta.stored_len):
                raise CorruptRecord("truncated record")
            if meta.codec == record.CODEC_RAW and meta.raw_len != meta.stored_len:
                raise CorruptRecord("raw payload length disagrees with the stored length")
            self.meta = meta
            dest = None
            if meta.codec == record.CODEC_RAW and self.into is not None:
                dest = self.caller_buffer(meta.raw_len)
                if dest is None:
                    self.refused = True
                    return bytearray(n - len(head))
            if dest is None:
                self.buf = bytearray(meta.stored_len)
                dest = memoryview(self.buf)
            self.dest = dest
            have = len(head) - pay0
            dest[:have] = head[pay0:]
            self.got = seg
            return dest[have:seg]
        except UnknownVersion as e:
            self.version = e.version
            return bytearray(n - len(head))
        except Exception as e:  # CorruptRecord, or anything odd in a value: never break the stream
            self.bad = str(e) or type(e).__name__
            return bytearray(n - len(head))

    def wants_parts(self) -> bool:
        return self.present and self.count > 1 and not (self.bad or self.refused or self.version)


class PartSink:
    __slots__ = ("blk", "idx", "present")

    def __init__(self, blk: BlockSink, idx: int):
        self.blk, self.idx, self.present = blk, idx, False

    def begin(self, n: int, head: bytes):
        b = self.blk
        self.present = True
        if len(head) >= ENVELOPE.size:
            magic, wid, idx, count, off, total = ENVELOPE.unpack_from(head)
            if magic == PART_MAGIC and wid != b.wid:
                b.torn = True                        # another write's part: the block was overwritten
                return bytearray(n - len(head))
            p0 = off - b.meta.header_size
            seg = n - ENVELOPE.size
            if (magic == PART_MAGIC and idx == self.idx and count == b.count and total == b.total
                    and p0 >= 0 and p0 + seg <= b.meta.stored_len):
                have = len(head) - ENVELOPE.size
                b.dest[p0:p0 + have] = head[ENVELOPE.size:]
                b.got += seg
                return b.dest[p0 + have:p0 + seg]
        b.bad = b.bad or f"part {self.idx} has a bad envelope"
        return bytearray(n - len(head))
