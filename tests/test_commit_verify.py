"""ram.verify_on_commit: "sync", "background" (default) and "off", on both commit paths (Commit over
gRPC or a CALL frame, and the data channel's PUT), with the background checker's counters."""
from __future__ import annotations

import os
import time
import urllib.request

import pytest
import xxhash

from kvtier import config, errors
from kvtier.client import Client
from kvtier.commitcheck import CommitChecker
from kvtier.datachannel import DataConnection
from kvtier.errors import ConfigError
from kvtier.hot import DOOMED, HotTier, checksum

from conftest import wait_until

NS = "commit-verify"
N = 100_000


def key(tag: str) -> bytes:
    return xxhash.xxh3_128_digest(tag.encode() + os.urandom(8))


def blob(tag: str, n: int = N) -> bytes:
    return (tag.encode() * (n // len(tag) + 1))[:n]


def digest(b: bytes) -> bytes:
    return xxhash.xxh3_128_digest(b)


def checks(d) -> dict | None:
    return d.daemon.store.snapshot()["commit_checks"]


def reserve_written(c: Client, keys: list[bytes], datas: list[bytes]):
    res = c.reserve(NS, keys, [len(x) for x in datas])
    assert list(res.status) == [0] * len(keys)
    for v, x in zip(res.views, datas):
        v[:] = x
    return res


def present(c: Client, k: bytes) -> bool:
    return c.lookup(NS, [k])[0] == [1]


# ---- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value,mode", [(True, "sync"), (False, "off"), ("sync", "sync"),
                                         ("background", "background"), ("off", "off")])
def test_config_values(value, mode):
    assert config.from_dict({"ram": {"verify_on_commit": value}}).ram.verify_on_commit == mode


def test_config_default_and_bad_values():
    assert config.Config().ram.verify_on_commit == "background"
    with pytest.raises(ConfigError, match=r"ram\.verify_on_commit: 'bogus' is not one of sync, background, off"):
        config.from_dict({"ram": {"verify_on_commit": "bogus"}})
    with pytest.raises(ConfigError, match=r"ram\.verify_on_commit"):
        config.from_dict({"ram": {"verify_on_commit": 1}})


def test_config_file_takes_booleans(tmp_path):
    f = tmp_path / "kvtier.toml"
    f.write_text("[ram]\nverify_on_commit = true\n")
    assert config.load(f).ram.verify_on_commit == "sync"
    f.write_text('[ram]\nverify_on_commit = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"kvtier\.toml:2: ram\.verify_on_commit"):
        config.load(f)


# ---- background (the default) ----------------------------------------------------------------

def test_background_drops_a_block_whose_checksum_lies(make_daemon):
    d = make_daemon(metrics={"listen": "127.0.0.1:0"})
    assert d.cfg.ram.verify_on_commit == "background"
    good, bad = key("good"), key("bad")
    gdata, bdata = blob("good"), blob("bad")
    with Client(d.address) as c:
        c.attach()
        assert c.path == "arena"
        used0 = c.stats().tiers[0].used_bytes
        res = reserve_written(c, [good, bad], [gdata, bdata])
        wrong = digest(b"not these bytes")
        # trusted at commit: it returns the client's checksums and commits both
        assert c.commit(res, checksums=[digest(gdata), wrong]) == [digest(gdata), wrong]
        wait_until(lambda: not present(c, bad), timeout=5, what="the bad block to be dropped")
        wait_until(lambda: checks(d)["checked"] == 2, timeout=5, what="both blocks checked")
        assert checks(d) == {"checked": 2, "failures": 1, "unchecked": 0}
        assert present(c, good)
        assert c.get_many(NS, [good, bad]) == [gdata, None]
        s = c.stats()
        ram = s.tiers[0]
        assert ram.checksum_failures == 1
        assert ram.blocks == 1 and ram.leased_blocks == 0 and s.leases == 0
        assert ram.used_bytes - used0 == d.daemon.hot.alloc.round(N)  # the bad block's slot is free again
        ns = next(n for n in s.namespaces if n.name == NS)
        assert ns.blocks == 1 and ns.bytes == N
        # the key can be put again, correctly this time
        res = reserve_written(c, [bad], [bdata])
        c.commit(res, checksums=[digest(bdata)])
        wait_until(lambda: checks(d)["checked"] == 3, timeout=5, what="the new block checked")
        assert c.get_many(NS, [bad]) == [bdata] and checks(d)["failures"] == 1
        # no client checksums: the daemon hashes at commit, nothing to check afterwards
        k = key("none")
        res = reserve_written(c, [k], [gdata])
        assert c.commit(res) == [digest(gdata)]
    time.sleep(0.2)
    assert checks(d) == {"checked": 3, "failures": 1, "unchecked": 0}
    with urllib.request.urlopen(f"http://{d.daemon.metrics.address}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "kvtier_commit_checks_total 3.0" in text
    assert "kvtier_commit_checksum_failures_total 1.0" in text
    assert "kvtier_commit_checks_skipped_total 0.0" in text


def test_background_on_the_data_channel(make_daemon):
    d = make_daemon()
    good, bad = key("dc-good"), key("dc-bad")
    gdata, bdata = blob("dc-good"), blob("dc-bad")
    with Client(d.address, attach=False) as c:
        c.attach()
        assert c.path == "data"
        # the client's own put (it sends no checksums: the daemon hashes at commit)
        plain = key("dc-plain")
        assert c.put(NS, plain, gdata)
        assert c.get(NS, plain) == gdata
        conn = DataConnection(c.info.data_address)
        try:
            out = conn.put_many(NS, [(good, gdata), (bad, bdata)], checksums=[digest(gdata), digest(b"nope")])
        finally:
            conn.close()
        assert [(r.status, r.checksum) for r in out] == [(0, digest(gdata)), (0, digest(b"nope"))]
        wait_until(lambda: not present(c, bad), timeout=5, what="the bad block to be dropped")
        wait_until(lambda: checks(d)["checked"] == 2, timeout=5, what="both blocks checked")
        assert checks(d) == {"checked": 2, "failures": 1, "unchecked": 0}
        assert c.get_many(NS, [good, bad, plain]) == [gdata, None, gdata]
        assert c.checksum_failures == 0


def test_background_check_of_a_leased_block_waits_for_the_reader(make_daemon):
    """A block being read when its check fails leaves the index at once but keeps its slot (DOOMED)
    until the reader releases it."""
    d = make_daemon()
    store, hot = d.daemon.store, d.daemon.hot
    caught: list = []
    hot.on_trusted = caught.extend  # hold the check back: run it below, while the block is leased
    k = key("leased")
    data = blob("leased")
    with Client(d.address) as c:
        used0 = c.stats().tiers[0].used_bytes
        c.commit(reserve_written(c, [k], [data]), checksums=[digest(b"wrong")])
        assert len(caught) == 1
        lease = c.acquire(NS, [k])
        assert lease.tiers[0] == 1
        assert store.checker.check(caught[0]) is False
        b = caught[0]
        assert b.state == DOOMED and b.leases == 1
        assert not present(c, k)
        assert bytes(lease.views[0]) == data  # the slot was not freed under the reader
        assert c.stats().tiers[0].used_bytes - used0 == hot.alloc.round(N)
        c.release(lease)
        assert b.leases == 0
        assert c.stats().tiers[0].used_bytes == used0
        # a block deleted before its turn is not checked at all
        k2 = key("gone")
        c.commit(reserve_written(c, [k2], [data]), checksums=[digest(data)])
        c.delete(NS, [k2])
        assert store.checker.check(caught[1]) is None
    assert store.checker.snapshot() == {"checked": 1, "failures": 1, "unchecked": 0}


def test_full_queue_skips_and_counts():
    hot = HotTier(start=4096, end=4096 + 8 * 65536, max_block_bytes=65536)
    view = memoryview(bytearray(4096 + 8 * 65536))
    checker = CommitChecker(hot, view, max_queued=1)
    checker.close()  # the worker is gone: what is queued stays queued
    hot.on_trusted = checker.submit
    r = hot.reserve(NS, [key("a"), key("b"), key("c")], [10, 10, 10])
    hot.begin_commit(r.reservation_id)
    hot.finish_commit(r.reservation_id, None, checksum(b"x") * 3)
    assert checker.snapshot() == {"checked": 0, "failures": 0, "unchecked": 2}


def test_a_block_is_checked_after_the_delay_and_not_if_gone_by_then():
    hot = HotTier(start=4096, end=4096 + 8 * 65536, max_block_bytes=65536)
    view = memoryview(bytearray(4096 + 8 * 65536))
    checker = CommitChecker(hot, view, delay_s=2.0)
    try:
        hot.on_trusted = checker.submit
        kept, deleted = key("kept"), key("deleted")
        r = hot.reserve(NS, [kept, deleted], [10, 10])
        hot.begin_commit(r.reservation_id)
        t0 = time.monotonic()
        hot.finish_commit(r.reservation_id, None, checksum(bytes(10)) * 2)  # the slots hold zeros: right
        assert hot.delete(NS, [deleted]) == 1
        assert checker.snapshot()["checked"] == 0  # not at once
        wait_until(lambda: checker.snapshot()["checked"] == 1, timeout=15, what="the delayed check")
        assert time.monotonic() - t0 >= 1.9
        assert checker.snapshot() == {"checked": 1, "failures": 0, "unchecked": 0}
    finally:
        checker.close()


def test_the_checker_stops_with_the_daemon(make_daemon):
    d = make_daemon()
    thread = d.daemon.store.checker._thread
    assert thread.is_alive()
    t0 = time.monotonic()
    d.stop()
    assert not thread.is_alive() and time.monotonic() - t0 < 10


# ---- sync and off ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["sync", True])
def test_sync_refuses_a_wrong_checksum(make_daemon, value):
    d = make_daemon(ram={"verify_on_commit": value})
    assert d.daemon.store.checker is None
    k, data = key("sync"), blob("sync")
    with Client(d.address) as c:
        res = reserve_written(c, [k], [data])
        with pytest.raises(errors.DataLoss):
            c.commit(res, checksums=[digest(b"wrong")])
        assert not present(c, k)
        conn = DataConnection(c.info.data_address)
        try:
            out = conn.put_many(NS, [(k, data)], checksums=[digest(b"wrong")])
            assert isinstance(out[0], errors.DataLoss)
            assert conn.put_many(NS, [(k, data)], checksums=[digest(data)])[0].status == 0
        finally:
            conn.close()
        assert c.get(NS, k) == data
        s = c.stats()
        assert s.reservations == 0 and s.tiers[0].checksum_failures == 0


@pytest.mark.parametrize("value", ["off", False])
def test_off_trusts_a_wrong_checksum(make_daemon, value):
    d = make_daemon(ram={"verify_on_commit": value})
    assert d.daemon.store.checker is None and checks(d) is None
    k, data = key("off"), blob("off")
    with Client(d.address) as c:
        c.commit(reserve_written(c, [k], [data]), checksums=[digest(b"wrong")])
        time.sleep(0.3)
        assert present(c, k)  # nobody re-hashes it
        assert c.get_many(NS, [k]) == [None]  # but the reader verifies
        assert c.checksum_failures == 1
