"""The block record: one self-describing format for NVMe files and Redis values.

    offset size  field (little-endian)
     0     4     magic b"KVTB"
     4     1     format version (1)
     5     1     codec: 0 raw, 1 lz4, 2 shuffle2+lz4 (byte planes of 16-bit words, then lz4)
     6     1     namespace length N
     7     1     key length K
     8     8     raw length (bytes of the block)
    16     8     stored length (bytes of payload that follow)
    24    16     xxh3-128 of the RAW block (canonical form)
    40     8     created, unix milliseconds
    48     8     expires, unix milliseconds (0: never)
    56     1     pin class (0: none)
    57     1     reserved (0)
    58     2     header size: bytes before the payload, padding included
    60     4     xxh32 of bytes 0..59 and the namespace and key (header check)
    64     N     namespace (UTF-8)
    64+N   K     key
    ...          zero padding up to ``header_size`` (NVMe: 4096, so the payload
                 is page-aligned for O_DIRECT; Redis: no padding)
    hs     S     payload (raw or compressed)

A reader trusts nothing: the header check catches a torn or flipped header,
the payload checksum (over the decompressed bytes) catches the rest. Either
failure is ``CorruptRecord``, which the tiers turn into a counted miss.

A record with the right magic and another format version is ``UnknownVersion``
(a ``CorruptRecord`` too, for readers that make no difference): written by a
kvtier that reads a format this one does not, e.g. a newer daemon sharing one
Redis during a rolling upgrade. The cluster tier serves it as a miss and leaves
it in place for the daemons that read it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import lz4.block
import numpy as np
import xxhash

MAGIC = b"KVTB"
VERSION = 1
FIXED = struct.Struct("<4sBBBBQQ16sQQBxH")
HEADER_CHECK = struct.Struct("<I")
FIXED_SIZE = FIXED.size + HEADER_CHECK.size  # 64
CODEC_RAW, CODEC_LZ4, CODEC_SHUFFLE_LZ4 = 0, 1, 2
CODECS = {"none": CODEC_RAW, "lz4": CODEC_LZ4, "shuffle-lz4": CODEC_SHUFFLE_LZ4}
PAGE = 4096


class CorruptRecord(Exception):
    """The record's header or payload does not check out."""


class UnknownVersion(CorruptRecord):
    """A record of a format version this reader does not know: not damaged, another kvtier's."""

    def __init__(self, version: int):
        super().__init__(f"format version {version}, this kvtier reads {VERSION}")
        self.version = version


@dataclass(frozen=True, slots=True)
class Meta:
    ns: str
    key: bytes
    raw_len: int
    stored_len: int
    checksum: bytes
    codec: int = CODEC_RAW
    created_ms: int = 0
    expires_ms: int = 0
    pin_class: int = 0
    header_size: int = 0  # bytes before the payload

    @property
    def total_len(self) -> int:
        return self.header_size + self.stored_len


def header_size(ns: str, key: bytes, aligned: bool) -> int:
    n = FIXED_SIZE + len(ns.encode()) + len(key)
    return -(-n // PAGE) * PAGE if aligned else n


def encode_header(meta: Meta, aligned: bool) -> bytes:
    nsb = meta.ns.encode()
    size = header_size(meta.ns, meta.key, aligned)
    fixed = FIXED.pack(MAGIC, VERSION, meta.codec, len(nsb), len(meta.key), meta.raw_len, meta.stored_len,
                       meta.checksum, meta.created_ms, meta.expires_ms, meta.pin_class, size)
    check = xxhash.xxh32_intdigest(fixed + nsb + meta.key)
    head = fixed + HEADER_CHECK.pack(check) + nsb + meta.key
    return head + bytes(size - len(head))


def decode_header(buf) -> Meta:
    """Parse and check a header from the start of buf (at least FIXED_SIZE + N + K bytes)."""
    mv = memoryview(buf)
    if len(mv) < FIXED_SIZE:
        raise CorruptRecord("truncated header")
    magic, version, codec, n, k, raw_len, stored_len, digest, created, expires, pin, hs = FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CorruptRecord("bad magic")
    if version != VERSION:
        raise UnknownVersion(version)
    if len(mv) < FIXED_SIZE + n + k:
        raise CorruptRecord("truncated header")
    names = bytes(mv[FIXED_SIZE:FIXED_SIZE + n + k])
    (check,) = HEADER_CHECK.unpack_from(mv, FIXED.size)
    if xxhash.xxh32_intdigest(bytes(mv[:FIXED.size]) + names) != check:
        raise CorruptRecord("header check failed")
    if codec not in CODECS.values():
        raise CorruptRecord(f"unknown codec {codec}")
    try:
        ns = names[:n].decode()
    except UnicodeDecodeError:
        raise CorruptRecord("namespace is not UTF-8") from None
    if hs < FIXED_SIZE + n + k:
        raise CorruptRecord(f"header size {hs} is too small")
    return Meta(ns, names[n:], raw_len, stored_len, digest, codec, created, expires, pin, hs)


def with_header_size(meta: Meta, aligned: bool) -> Meta:
    return Meta(meta.ns, meta.key, meta.raw_len, meta.stored_len, meta.checksum, meta.codec, meta.created_ms,
                meta.expires_ms, meta.pin_class, header_size(meta.ns, meta.key, aligned))


# ---- codecs ---------------------------------------------------------------------------------

def shuffle2(buf) -> bytes:
    """Byte planes of 16-bit words: all low bytes, then all high bytes (then the odd tail)."""
    a = np.frombuffer(buf, dtype=np.uint8)
    even = len(a) // 2 * 2
    planes = a[:even].reshape(-1, 2).T
    return planes.tobytes() + a[even:].tobytes()


def unshuffle2(buf, n: int) -> bytes:
    a = np.frombuffer(buf, dtype=np.uint8)
    even = n // 2 * 2
    out = np.empty(n, dtype=np.uint8)
    out[:even].reshape(-1, 2)[:] = a[:even].reshape(2, -1).T
    out[even:] = a[even:n]
    return out.tobytes()


def compress(codec: int, data) -> bytes:
    if codec == CODEC_LZ4:
        return lz4.block.compress(data, store_size=False)
    if codec == CODEC_SHUFFLE_LZ4:
        return lz4.block.compress(shuffle2(data), store_size=False)
    raise ValueError(f"codec {codec} does not compress")


def decompress(codec: int, payload, raw_len: int) -> bytes:
    if codec not in (CODEC_LZ4, CODEC_SHUFFLE_LZ4):
        raise CorruptRecord(f"codec {codec} does not decompress")
    try:
        out = lz4.block.decompress(payload, uncompressed_size=raw_len)
    except Exception as e:  # a damaged stream may fail in many ways: all are corruption
        raise CorruptRecord(f"payload does not decompress: {e}") from None
    if len(out) != raw_len:
        raise CorruptRecord(f"payload decompresses to {len(out)} bytes, header says {raw_len}")
    return unshuffle2(out, raw_len) if codec == CODEC_SHUFFLE_LZ4 else out


def choose_payload(codec: int, data, min_saving: float = 0.1) -> tuple[int, object]:
    """(codec actually used, payload). Keeps raw bytes when compression saves under min_saving."""
    if codec == CODEC_RAW:
        return CODEC_RAW, data
    packed = compress(codec, data)
    if len(packed) > len(data) * (1 - min_saving):
        return CODEC_RAW, data
    return codec, packed


def checksum(buf) -> bytes:
    return xxhash.xxh3_128_digest(buf)


def verify(meta: Meta, raw) -> None:
    if len(raw) != meta.raw_len:
        raise CorruptRecord(f"length {len(raw)} != {meta.raw_len}")
    verify_digest(meta, checksum(raw))


def verify_digest(meta: Meta, digest: bytes) -> None:
    """The payload's xxh3-128, computed by the caller (e.g. while copying it), against the header's."""
    if digest != meta.checksum:
        raise CorruptRecord("payload checksum mismatch")


def encode(meta: Meta, payload, aligned: bool = False) -> bytes:
    """A whole record in one buffer (Redis values; small files)."""
    return encode_header(meta, aligned) + bytes(payload)


def decode(buf) -> tuple[Meta, bytes]:
    """Parse, decompress and verify a whole record; returns (meta, raw bytes)."""
    meta = decode_header(buf)
    hs = meta.header_size
    mv = memoryview(buf)
    if len(mv) < hs + meta.stored_len:
        raise CorruptRecord(f"truncated payload: {len(mv) - hs} of {meta.stored_len} bytes")
    payload = mv[hs:hs + meta.stored_len]
    raw = bytes(payload) if meta.codec == CODEC_RAW else decompress(meta.codec, payload, meta.raw_len)
    verify(meta, raw)
    return meta, raw
