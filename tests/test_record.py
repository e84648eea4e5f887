"""The block record (kvtier.record): encoding, header check, payload checksum, codecs.

Pure functions, no files: each test builds records in memory and damages them on purpose.
"""
from __future__ import annotations

import os
import random
import struct

import numpy as np
import pytest
import xxhash

from kvtier import record as R
from kvtier.record import (CODEC_LZ4, CODEC_RAW, CODEC_SHUFFLE_LZ4, CODECS, FIXED_SIZE, PAGE, CorruptRecord,
                           Meta)

NS = "team-a.prod"
KEY16 = bytes(range(16))
KEY32 = bytes(range(100, 132))
ALL_CODECS = pytest.mark.parametrize("codec", sorted(CODECS))
ALIGNED = pytest.mark.parametrize("aligned", [False, True], ids=["unaligned", "aligned"])


def kv_like(n: int, seed: int = 0) -> bytes:
    """Bytes that look like bf16/fp16 KV: random low bytes, few distinct high bytes.

    lz4 alone gains little on them; byte planes (shuffle2) make the high bytes compress."""
    rng = np.random.default_rng(seed)
    m = (n + 1) // 2
    lo = rng.integers(0, 256, m, dtype=np.uint8)
    hi = np.where(rng.random(m) < 0.9, 0x3C, 0xBC).astype(np.uint8)
    return np.stack([lo, hi], axis=1).tobytes()[:n]


def make_record(raw: bytes, codec_name: str = "none", aligned: bool = False, ns: str = NS, key: bytes = KEY16,
                created: int = 1_700_000_000_123, expires: int = 0, pin: int = 0) -> tuple[Meta, bytes]:
    codec, payload = R.choose_payload(CODECS[codec_name], raw)
    meta = Meta(ns, key, len(raw), len(payload), R.checksum(raw), codec, created, expires, pin)
    return meta, R.encode(meta, payload, aligned=aligned)


def read_aligned(buf) -> tuple[Meta, bytes]:
    """How the NVMe tier reads a record whose header is padded to a page: header, then payload."""
    meta = R.with_header_size(R.decode_header(buf), aligned=True)
    payload = memoryview(buf)[meta.header_size:meta.header_size + meta.stored_len]
    if len(payload) != meta.stored_len:
        raise CorruptRecord("truncated")
    raw = bytes(payload) if meta.codec == CODEC_RAW else R.decompress(meta.codec, payload, meta.raw_len)
    R.verify(meta, raw)
    return meta, raw


def meta_header_size(buf):
    return R.decode_header(buf).header_size


# ---- layout ---------------------------------------------------------------------------------

def test_fixed_header_is_64_bytes_and_fields_sit_where_documented():
    assert FIXED_SIZE == 64
    raw = b"x" * 1000
    meta, buf = make_record(raw, expires=1_800_000_000_000, pin=3)
    assert buf[:4] == b"KVTB" and buf[4] == 1 and buf[5] == CODEC_RAW
    assert buf[6] == len(NS) and buf[7] == len(KEY16)
    assert struct.unpack_from("<QQ", buf, 8) == (1000, 1000)
    assert buf[24:40] == R.checksum(raw)
    assert struct.unpack_from("<QQB", buf, 40) == (1_700_000_000_123, 1_800_000_000_000, 3)
    assert buf[57] == 0
    assert struct.unpack_from("<H", buf, 58)[0] == 64 + len(NS) + 16 == meta_header_size(buf)
    assert buf[64:64 + len(NS)] == NS.encode()
    assert buf[64 + len(NS):64 + len(NS) + 16] == KEY16


@pytest.mark.parametrize("key", [KEY16, KEY32], ids=["key16", "key32"])
def test_header_size_unaligned_is_exact_and_aligned_is_one_page(key):
    assert R.header_size(NS, key, aligned=False) == 64 + len(NS) + len(key)
    assert R.header_size(NS, key, aligned=True) == PAGE
    _, buf = make_record(b"abc", aligned=True, key=key)
    assert len(buf) == PAGE + 3
    assert buf[64 + len(NS) + len(key):PAGE] == bytes(PAGE - 64 - len(NS) - len(key))  # zero padding


# ---- round trips ----------------------------------------------------------------------------

SIZES = [1, 2, 3, 4095, 4096, 4097, 65536 + 1, 300_001]


@ALL_CODECS
@pytest.mark.parametrize("n", SIZES)
def test_unaligned_round_trip_every_codec(codec, n):
    for raw in (kv_like(n, n), bytes(n), random.Random(n).randbytes(n)):
        meta, buf = make_record(raw, codec, aligned=False, expires=123, pin=2)
        got_meta, got = R.decode(buf)
        assert got == raw
        assert got_meta.ns == NS and got_meta.key == KEY16 and got_meta.raw_len == n
        assert got_meta.codec == meta.codec and got_meta.stored_len == meta.stored_len
        assert got_meta.checksum == R.checksum(raw)
        assert (got_meta.created_ms, got_meta.expires_ms, got_meta.pin_class) == (1_700_000_000_123, 123, 2)
        assert got_meta.header_size == 64 + len(NS) + 16
        assert len(buf) == got_meta.total_len


@ALL_CODECS
@pytest.mark.parametrize("n", SIZES)
def test_aligned_round_trip_every_codec_as_the_nvme_tier_reads_it(codec, n):
    for raw in (kv_like(n, n), bytes(n), random.Random(n).randbytes(n)):
        meta, buf = make_record(raw, codec, aligned=True)
        assert len(buf) == PAGE + meta.stored_len
        got_meta, got = read_aligned(buf)
        assert got == raw
        assert got_meta.header_size == PAGE and got_meta.codec == meta.codec


@ALL_CODECS
def test_decode_reads_a_record_encoded_with_an_aligned_header(codec):
    raw = kv_like(10_000, 7)
    _, buf = make_record(raw, codec, aligned=True)
    _, got = R.decode(buf)
    assert got == raw


@pytest.mark.parametrize("codec", ["lz4", "shuffle-lz4"])
def test_compressible_data_is_stored_compressed(codec):
    raw = bytes(100_000)
    meta, buf = make_record(raw, codec)
    assert meta.codec == CODECS[codec]
    assert meta.stored_len < len(raw) // 10
    assert R.decode(buf)[1] == raw


def test_shuffle_lz4_beats_plain_lz4_on_kv_like_data():
    raw = kv_like(256 * 1024, 3)
    m_lz4, _ = make_record(raw, "lz4")
    m_sh, buf = make_record(raw, "shuffle-lz4")
    assert m_lz4.codec == CODEC_RAW  # lz4 alone finds no 4-byte matches in interleaved words
    assert m_sh.codec == CODEC_SHUFFLE_LZ4
    assert m_sh.stored_len < 0.9 * len(raw)
    assert R.decode(buf)[1] == raw


# ---- choose_payload -------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [CODEC_LZ4, CODEC_SHUFFLE_LZ4])
def test_choose_payload_keeps_random_bytes_raw(codec):
    raw = os.urandom(64 * 1024)
    used, payload = R.choose_payload(codec, raw)
    assert used == CODEC_RAW
    assert bytes(payload) == raw


@pytest.mark.parametrize("codec", [CODEC_LZ4, CODEC_SHUFFLE_LZ4])
def test_choose_payload_compresses_zeros(codec):
    raw = bytes(64 * 1024)
    used, payload = R.choose_payload(codec, raw)
    assert used == codec
    assert len(payload) < len(raw) // 10
    assert R.decompress(codec, payload, len(raw)) == raw


def test_choose_payload_raw_codec_never_compresses():
    raw = bytes(64 * 1024)
    used, payload = R.choose_payload(CODEC_RAW, raw)
    assert used == CODEC_RAW and bytes(payload) == raw


def test_choose_payload_threshold_is_ten_percent():
    # half zeros, half random: lz4 saves about 50%; demand more and it must stay raw
    raw = bytes(32 * 1024) + os.urandom(32 * 1024)
    used, payload = R.choose_payload(CODEC_LZ4, raw)
    assert used == CODEC_LZ4 and len(payload) < 0.9 * len(raw)
    used, payload = R.choose_payload(CODEC_LZ4, raw, min_saving=0.6)
    assert used == CODEC_RAW and bytes(payload) == raw
    # a saving of only ~5% (a short zero run in random bytes) is not worth it
    raw = bytes(3 * 1024) + os.urandom(61 * 1024)
    used, _ = R.choose_payload(CODEC_LZ4, raw)
    assert used == CODEC_RAW


# ---- shuffle2 -------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 4095, 4096, 4097, 100_000, 100_001])
def test_shuffle2_round_trip_even_and_odd(n):
    raw = random.Random(n).randbytes(n)
    sh = R.shuffle2(raw)
    assert len(sh) == n
    assert R.unshuffle2(sh, n) == raw


def test_shuffle2_puts_low_bytes_first_then_high_then_tail():
    assert R.shuffle2(bytes([1, 2, 3, 4, 5, 6, 7])) == bytes([1, 3, 5, 2, 4, 6, 7])
    assert R.unshuffle2(bytes([1, 3, 5, 2, 4, 6, 7]), 7) == bytes([1, 2, 3, 4, 5, 6, 7])


# ---- header check ---------------------------------------------------------------------------

@ALIGNED
@pytest.mark.parametrize("codec", ["none", "lz4"])
def test_every_single_bit_flip_in_the_header_is_caught(aligned, codec):
    raw = bytes(8192) if codec == "lz4" else b"payload!" * 100
    meta, buf = make_record(raw, codec, aligned=aligned, expires=99, pin=1)
    assert meta.codec == CODECS[codec]
    checked = FIXED_SIZE + len(NS) + len(KEY16)
    for bit in range(checked * 8):
        bad = bytearray(buf)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptRecord):
            R.decode_header(bad)
        with pytest.raises(CorruptRecord):
            R.decode(bad) if not aligned else read_aligned(bad)
    assert R.decode_header(buf).raw_len == len(raw)  # the untouched buffer still parses


def test_bad_magic_and_version_are_refused():
    _, buf = make_record(b"abc")
    bad = bytearray(buf)
    bad[0] = ord("X")
    with pytest.raises(CorruptRecord, match="bad magic") as e:
        R.decode_header(bad)
    assert not isinstance(e.value, R.UnknownVersion)
    other = bytearray(buf)
    other[4] = 2  # another kvtier's format: refused as such, a CorruptRecord to readers that do not care
    with pytest.raises(R.UnknownVersion, match="format version 2"):
        R.decode_header(other)


def test_header_check_covers_namespace_and_key_but_not_padding():
    meta, buf = make_record(b"abc" * 10, aligned=True)
    bad = bytearray(buf)
    bad[64 + len(NS) + 3] ^= 0x10  # a key byte
    with pytest.raises(CorruptRecord, match="header check"):
        R.decode_header(bad)
    pad = bytearray(buf)
    pad[PAGE - 1] ^= 0xFF  # padding carries nothing
    assert R.decode_header(pad).key == KEY16


def test_non_utf8_namespace_with_a_valid_check_is_corrupt():
    meta = Meta("ab", KEY16, 3, 3, R.checksum(b"abc"))
    buf = bytearray(R.encode(meta, b"abc"))
    buf[64:66] = b"\xff\xfe"
    fixed_and_names = bytes(buf[:60]) + bytes(buf[64:64 + 2 + 16])
    buf[60:64] = struct.pack("<I", xxhash.xxh32_intdigest(fixed_and_names))
    with pytest.raises(CorruptRecord, match="UTF-8"):
        R.decode_header(buf)


# ---- payload checksum -----------------------------------------------------------------------

@ALIGNED
def test_payload_bit_flip_is_caught_raw(aligned):
    raw = kv_like(5000, 11)
    meta, buf = make_record(raw, "none", aligned=aligned)
    hs = len(buf) - meta.stored_len
    for bit in range(0, meta.stored_len * 8, 5):
        bad = bytearray(buf)
        bad[hs + bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CorruptRecord, match="checksum"):
            R.decode(bad) if not aligned else read_aligned(bad)


def _compressible(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(2000) + bytes(rng.randrange(4) for _ in range(n - 3001)) + bytes(1001)


@pytest.mark.parametrize("codec", [
    "lz4",
    "shuffle-lz4",
])
def test_every_payload_bit_flip_of_a_compressed_record_is_corrupt_or_harmless(codec):
    """A flip in a compressed payload must raise CorruptRecord, or (when lz4 happens to produce the
    same bytes) decode to exactly the original: never another exception, never other bytes."""
    raw = _compressible(6000, 1)
    meta, buf = make_record(raw, codec)
    assert meta.codec == CODECS[codec]
    hs = len(buf) - meta.stored_len
    for bit in range(meta.stored_len * 8):
        bad = bytearray(buf)
        bad[hs + bit // 8] ^= 1 << (bit % 8)
        try:
            _, got = R.decode(bad)
        except CorruptRecord:
            continue
        assert got == raw


def test_checksum_mismatch_with_a_valid_header_is_corrupt():
    raw = b"A" * 100
    meta = Meta(NS, KEY16, 100, 100, R.checksum(b"B" * 100))
    with pytest.raises(CorruptRecord, match="checksum"):
        R.decode(R.encode(meta, raw))


def test_verify_checks_length_and_digest():
    raw = b"0123456789"
    meta = Meta(NS, KEY16, 10, 10, R.checksum(raw))
    R.verify(meta, raw)
    R.verify(meta, memoryview(bytearray(raw)))
    with pytest.raises(CorruptRecord, match="length"):
        R.verify(meta, raw[:9])
    with pytest.raises(CorruptRecord, match="checksum"):
        R.verify(meta, b"0123456780")


# ---- truncation -----------------------------------------------------------------------------

@ALL_CODECS
def test_truncated_record_is_corrupt(codec):
    raw = bytes(50_000) if codec != "none" else kv_like(50_000, 5)
    meta, buf = make_record(raw, codec)
    hs = len(buf) - meta.stored_len
    for cut in (0, 1, 10, 63, 64, hs - 1, hs, hs + 1, len(buf) - 1):
        with pytest.raises(CorruptRecord, match="truncated"):
            R.decode(buf[:cut])
    assert R.decode(buf)[1] == raw


def test_decompress_to_the_wrong_size_is_corrupt():
    raw = bytes(10_000)
    _, payload = R.choose_payload(CODEC_LZ4, raw)
    with pytest.raises(CorruptRecord):
        R.decompress(CODEC_LZ4, payload, 5_000)  # output does not fit


def test_garbage_payload_does_not_decompress():
    with pytest.raises(CorruptRecord):
        R.decompress(CODEC_LZ4, b"\xff" * 64, 10_000)


# ---- unknown codec --------------------------------------------------------------------------

@pytest.mark.parametrize("codec", [3, 7, 255])
def test_unknown_codec_in_a_well_formed_header_is_corrupt(codec):
    raw = b"abc" * 100
    meta = Meta(NS, KEY16, len(raw), len(raw), R.checksum(raw), codec)
    buf = R.encode(meta, raw)  # the header check is valid: only the codec is unknown
    with pytest.raises(CorruptRecord, match="unknown codec"):
        R.decode_header(buf)
    with pytest.raises(CorruptRecord):
        R.decode(buf)


def test_unknown_codec_does_not_compress_or_decompress():
    with pytest.raises(ValueError):
        R.compress(9, b"abc")
    with pytest.raises(CorruptRecord):
        R.decompress(9, b"abc", 3)
    with pytest.raises(CorruptRecord):
        R.decompress(CODEC_RAW, b"abc", 3)
