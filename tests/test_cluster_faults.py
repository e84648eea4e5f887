"""The cluster tier when its servers misbehave: stopped (up, answering nothing), out of memory,
holding values kvtier cannot read, or moving slots. Real Valkey servers on loopback, started
and stopped by each test (``valkey_servers``)."""
from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest

from kvtier import record
from kvtier.clustervalue import ENVELOPE
from kvtier.resp import Connection
from test_cluster import name as block_name, put_all, run, tier

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, valkey_cluster, make_valkey, make_cluster

NS = "faults"
MiB = 1 << 20


def name(key: bytes) -> bytes:
    return block_name(NS, key)


def test_a_stopped_server_costs_one_timeout_then_misses_at_once_until_it_answers(make_valkey):
    """SIGSTOP: the kernel still completes TCP handshakes, so a reconnection succeeds and only
    the request after it times out. The server stays down (and the tier disconnected) until
    the maintenance task's PING is answered; callers meanwhile miss at once, not after a
    timeout at every backoff step."""
    srv = make_valkey()
    k = b"k" * 16

    async def go():
        async with tier(srv.url, timeout_ms=400, reconnect_max_s=0.2) as t:
            await put_all(t, NS, {k: b"v" * 1000})
            srv.pause()
            try:
                assert await t.get(NS, k) is None  # the one timeout
                slow, connected, calls = 0, 0, 0
                until = time.monotonic() + 2.5
                while time.monotonic() < until:
                    t0 = time.monotonic()
                    assert await t.get(NS, k) is None
                    assert await t.exists_many(NS, [k]) == [False]
                    slow += time.monotonic() - t0 >= 0.35
                    connected += t.snapshot()["connected"]
                    calls += 1
                    await asyncio.sleep(0.02)
                s = t.snapshot()
                # the maintenance task's probes time out (about once per backoff step); callers do not
                assert slow <= 1 and calls > 20, (slow, calls)
                assert connected == 0 and s["timeouts"] >= 2 and s["unavailable"] >= calls
            finally:
                srv.resume()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if t.snapshot()["connected"]:
                    break
            assert t.snapshot()["connected"] and t.snapshot()["reconnects"] == 1
            assert bytes((await t.get(NS, k))[0]) == b"v" * 1000

    run(go())


def test_a_stopped_server_does_not_delay_the_recovery_of_another(make_valkey):
    """The maintenance task probes every down server at once: a stopped one (whose PING waits
    the whole timeout_ms) does not hold back the reconnection of one that answers."""
    stopped, other = make_valkey(), make_valkey()

    async def go():
        async with tier(stopped.url, timeout_ms=8000, reconnect_max_s=0.2) as t:
            await put_all(t, NS, {b"k" * 16: b"v" * 100})
            s = t.servers
            back = s.node("127.0.0.1", other.port)  # a second server, as a redirect adds one
            stopped.pause()
            try:
                s.failed(s.single, ConnectionError("test"))
                await asyncio.sleep(0.5)  # its probe is now waiting for an answer
                s.failed(back, ConnectionError("test"))
                t0 = time.monotonic()
                while not back.up and time.monotonic() - t0 < 6:
                    await asyncio.sleep(0.05)
                assert back.up and time.monotonic() - t0 < 4, time.monotonic() - t0
                assert not s.single.up
            finally:
                stopped.resume()

    run(go())


# ---- values kvtier cannot read --------------------------------------------------------------

def _count_commands(monkeypatch) -> dict:
    """Count the commands every Connection sends, by name, and the arguments of each UNLINK."""
    from kvtier import resp
    sent = {"GET": 0, "SET": 0, "UNLINK args": 0}
    real = resp.Connection.request

    def request(self, cmds, sinks=None, weight=0):
        for c in cmds:
            sent["GET"] += c[0] == b"GET"
            sent["SET"] += c[0] == b"SET"
            sent["UNLINK args"] += len(c) - 1 if c[0] == b"UNLINK" else 0
        return real(self, cmds, sinks, weight)

    monkeypatch.setattr(resp.Connection, "request", request)
    return sent


def test_a_damaged_part_count_is_corruption_not_a_million_requests(valkey, monkeypatch):
    """One flipped bit in the part count of a split value's envelope: a get is a counted miss that
    asks for no more parts than the value's size allows, and removing the record (after that get,
    or by a delete) unlinks its real parts, not 65536 names."""
    read, deleted, fine = b"r" * 16, b"d" * 16, b"f" * 16
    blocks = {k: bytes([i]) * 300_000 for i, k in enumerate((read, deleted, fine))}
    r = valkey.client()

    async def go():
        async with tier(valkey.url, part_bytes=64 * 1024) as t:
            await put_all(t, NS, blocks)
            for k in (read, deleted):
                head = bytearray(r.getrange(name(k), 0, ENVELOPE.size - 1))
                struct.pack_into("<I", head, 16, struct.unpack_from("<I", head, 16)[0] | 1 << 16)
                r.setrange(name(k), 0, bytes(head))
            sent = _count_commands(monkeypatch)
            assert await t.get(NS, read) is None
            assert sent["GET"] <= 10 and sent["UNLINK args"] <= 10, sent
            assert await t.delete_many(NS, [deleted]) == 1
            assert sent["UNLINK args"] <= 20, sent
            s = t.snapshot()
            assert (s["checksum_failures"], s["torn_reads"], s["errors"], s["connected"]) == (1, 0, 0, True)
            assert bytes((await t.get(NS, fine))[0]) == blocks[fine]
        assert r.keys(name(read) + b"*") == [] and r.keys(name(deleted) + b"*") == []

    run(go())


def test_a_record_whose_lengths_disagree_is_a_miss_into_a_callers_buffer(valkey):
    """A record with an intact header check whose raw length is shorter than its stored payload
    (another writer's bug): a get into the caller's buffer (an arena slot) is a counted miss; the
    buffer is not overrun and the connection stays in step (the server is not marked down)."""
    bad, fine = b"b" * 16, b"f" * 16
    r = valkey.client()
    meta = record.Meta(NS, bad, 100_000, 300_000, record.checksum(b"x" * 100_000))
    r.set(name(bad), record.encode(meta, b"x" * 300_000))

    async def go():
        async with tier(valkey.url) as t:
            await put_all(t, NS, {fine: b"y" * 300_000})
            assert await t.get(NS, bad, into=bytearray) is None
            got = await t.get_many(NS, [bad, fine], into=lambda i, n: bytearray(n))
            assert got[0] is None and bytes(got[1][0]) == b"y" * 300_000
            s = t.snapshot()
            assert (s["checksum_failures"], s["errors"], s["connected"]) == (1, 0, True), s
            assert not r.exists(name(bad))

    run(go())


def test_a_sink_with_too_little_room_drops_the_connection_rather_than_read_out_of_step(valkey):
    """The tail of a value that did not fit must not be read as the replies after it: here it
    would answer the PING with "FAKE"."""
    valkey.client().set(b"kvt:faults:long", b"z" * (4096 + MiB) + b"\r\n+FAKE")

    class Short:
        def begin(self, n, head):
            return bytearray(MiB)  # 7 bytes short

    async def go():
        c = await Connection.open("127.0.0.1", valkey.port)
        f = c.request([(b"GET", b"kvt:faults:long"), (b"PING",)], [Short(), None])
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(f, 5)
        assert c.closed

    run(go())


@pytest.mark.parametrize("part_bytes", [0, 64 * 1024])
def test_a_record_of_another_format_version_is_a_miss_and_stays(valkey, monkeypatch, part_bytes):
    """A rolling upgrade: daemons of two record format versions share one server. Each reads the
    other's records as misses (counted as version skips, not corruption) and never removes
    them, so both go on serving their own blocks; a record that is truly damaged is still
    removed."""
    newer, damaged, fine = b"n" * 16, b"d" * 16, b"f" * 16
    blocks = {k: bytes([i + 1]) * 300_000 for i, k in enumerate((newer, damaged, fine))}
    r = valkey.client()

    async def go():
        async with tier(valkey.url, part_bytes=part_bytes) as t:
            monkeypatch.setattr(record, "VERSION", record.VERSION + 1)  # a newer daemon writes
            await put_all(t, NS, {newer: blocks[newer]})
            monkeypatch.undo()
            await put_all(t, NS, {damaged: blocks[damaged], fine: blocks[fine]})
            key, at = (name(damaged) + b":1", 1000) if part_bytes else (name(damaged), 250_000)  # payload
            r.setrange(key, at, bytes([r.getrange(key, at, at)[0] ^ 1]))
            got = await t.get_many(NS, [newer, damaged, fine])
            assert got[0] is None and got[1] is None and bytes(got[2][0]) == blocks[fine]
            assert await t.get(NS, newer) is None
            s = t.snapshot()
            assert (s["version_skips"], s["checksum_failures"], s["errors"]) == (2, 1, 0), s
            assert r.exists(name(newer)) and not r.keys(name(damaged) + b"*")
            if part_bytes:
                assert len(r.keys(name(newer) + b"*")) == 5  # every part of it stays
            monkeypatch.setattr(record, "VERSION", record.VERSION + 1)  # the newer daemon still reads it
            assert bytes((await t.get(NS, newer))[0]) == blocks[newer]

    run(go())


def test_a_value_of_another_type_under_a_block_name_is_a_miss_for_lookup_and_get_and_removed(valkey):
    """A hash, a list or a string that is no record at a block's name (kvtier's namespace, under
    its prefix): Lookup and get agree that the block is absent; each is counted as corrupt and
    removed, and the server is not counted as failing. Lookup also skips (and keeps) a record
    of another format version, as get does."""
    h, lst, junk, got_h, fine = (bytes([c]) * 16 for c in b"hljgf")
    r = valkey.client()
    r.hset(name(h), "a", "1")
    r.rpush(name(lst), "x")
    r.set(name(junk), b"not a record" * 10)
    r.hset(name(got_h), "a", "1")

    async def go():
        async with tier(valkey.url) as t:
            await put_all(t, NS, {fine: b"y" * 5000})
            assert await t.exists_many(NS, [h, lst, junk, fine]) == [False, False, False, True]
            assert await t.get(NS, got_h) is None
            s = t.snapshot()
            assert (s["checksum_failures"], s["errors"], s["version_skips"], s["connected"]) == (4, 0, 0, True), s
            assert not any(r.exists(name(k)) for k in (h, lst, junk, got_h))
            assert bytes((await t.get(NS, fine))[0]) == b"y" * 5000
            newer = record.Meta(NS, h, 10, 10, record.checksum(b"z" * 10))
            value = bytearray(record.encode(newer, b"z" * 10))
            value[4] = record.VERSION + 1
            r.set(name(h), bytes(value))
            assert await t.exists_many(NS, [h]) == [False]
            assert t.snapshot()["version_skips"] == 1 and r.exists(name(h))

    run(go())


def test_a_damaged_split_value_found_by_lookup_is_removed_with_its_parts(valkey):
    """Lookup reads the envelope and the record magic behind it: a split value whose record
    magic is damaged is absent, and removing it removes every part of it."""
    k = b"s" * 16
    r = valkey.client()

    async def go():
        async with tier(valkey.url, part_bytes=64 * 1024) as t:
            await put_all(t, NS, {k: os.urandom(300_000)})
            r.setrange(name(k), ENVELOPE.size, b"XXXX")
            assert await t.exists_many(NS, [k]) == [False]
            assert t.snapshot()["checksum_failures"] == 1 and r.keys(name(k) + b"*") == []

    run(go())


# ---- a full server ---------------------------------------------------------------------------

def test_out_of_memory_writes_fail_once_each_are_counted_and_logged_clearly(make_valkey, monkeypatch, caplog):
    """maxmemory with noeviction: SETs are refused with -OOM. Each put is tried once (no retry),
    counted as a failed write and an error (what Stats and metrics show), the server is not
    marked down (reads go on), and the log says why, once."""
    srv = make_valkey("--maxmemory", "3mb", "--maxmemory-policy", "noeviction")
    blocks = {bytes([i]) * 16: bytes([i]) * 500_000 for i in range(12)}
    sent = _count_commands(monkeypatch)

    async def go():
        async with tier(srv.url) as t:
            for k, v in blocks.items():  # one at a time: each put is its own SET
                await put_all(t, NS, {k: v})
            s = t.snapshot()
            assert s["put_failures"] >= 6 and s["puts"] + s["put_failures"] == len(blocks), s
            assert sent["SET"] == len(blocks)  # tried once each
            assert s["errors"] >= s["put_failures"] and s["connected"] and s["timeouts"] == 0
            stored = [k for k in blocks if await t.get(NS, k) is not None]
            assert len(stored) == s["puts"]
            await asyncio.sleep(0.5)
            assert sent["SET"] == len(blocks)  # and never again

    with caplog.at_level("WARNING", logger="kvtier.cluster"):
        run(go())
    oom = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(oom) == 1 and "maxmemory" in oom[0], [r.getMessage() for r in caplog.records]


# ---- slots that move --------------------------------------------------------------------------

def _keys_in_one_slot(n: int) -> list[bytes]:
    from redis.crc import key_slot
    keys = [os.urandom(16)]
    while len(keys) < n:
        k = os.urandom(16)
        if key_slot(name(k)) == key_slot(name(keys[0])):
            keys.append(k)
    return keys


def test_reads_writes_and_deletes_during_a_slot_migration_follow_ask_to_the_new_master(make_cluster):
    """While a slot migrates (MIGRATING / IMPORTING, MIGRATE key by key), the old master answers
    ASK for the keys already moved. Reads and lookups of such a key are served by the new master
    (not a miss for the whole migration), a new key and an overwrite are written there, and a
    delete removes the block there: once the slot has moved, no node reads deleted or old
    content."""
    from redis.crc import key_slot
    cl = make_cluster(masters=3, replicas=0)
    gone, overwritten, stays, new_key = _keys_in_one_slot(4)
    blocks = {k: os.urandom(100_000) for k in (gone, overwritten, stays)}
    slot = key_slot(name(gone))

    async def go():
        async with tier(cl.url, cluster=True, timeout_ms=5000) as t:
            await put_all(t, NS, blocks)
            src, dst = cl.begin_migration(slot)

            def on_dst(k: bytes) -> bytes | None:  # the importing master answers a key only after ASKING
                c = dst.client(single_connection_client=True)
                c.execute_command("ASKING")
                return c.get(name(k))
            for k in (gone, overwritten):
                src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, name(k), 0, 5000)
            refreshes = t.snapshot()["topology_refreshes"]
            for _ in range(5):
                assert bytes((await t.get(NS, gone))[0]) == blocks[gone]  # ASK: read on the new master
                assert await t.exists_many(NS, [gone, stays, new_key]) == [True, True, False]
            got = await t.get_many(NS, [gone, stays], into=lambda i, n: bytearray(n))
            assert [bytes(g[0]) for g in got] == [blocks[gone], blocks[stays]]
            await asyncio.sleep(0.3)
            # the slot map says the same until the migration ends: ASK does not reload it
            assert t.snapshot()["topology_refreshes"] == refreshes
            assert await t.delete_many(NS, [gone]) == 1
            assert on_dst(gone) is None
            new, fresh = os.urandom(100_000), os.urandom(50_000)
            done = asyncio.Event()
            t.enqueue_put(NS, overwritten, new, record.checksum(new), done.set, replaces=True)
            await asyncio.wait_for(done.wait(), 10)
            await put_all(t, NS, {new_key: fresh})  # not on the old master: written on the new one
            assert record.decode(on_dst(overwritten))[1] == new and record.decode(on_dst(new_key))[1] == fresh
            assert bytes((await t.get(NS, new_key))[0]) == fresh
            cl.end_migration(slot, src, dst)  # moves stays
            assert await t.get(NS, gone) is None
            assert bytes((await t.get(NS, overwritten))[0]) == new  # never the old content
            assert bytes((await t.get(NS, stays))[0]) == blocks[stays]  # MOVED: followed, and the map reloads
            s = t.snapshot()
            assert s["moved"] >= 10 and s["put_failures"] == 0 and s["errors"] == 0, s
            assert s["misses"] == 1  # the deleted block, and nothing else

    run(go())


def test_parts_an_overwrite_leaves_behind_are_unlinked_where_the_migration_moved_them(make_cluster):
    """A split block's slot migrating with its parts already moved and its part 0 not: an overwrite
    with an unsplit value is written on the old master, and the UNLINK of the parts it leaves
    unreachable is answered ASK there. It was counted and not followed: the parts stayed on the
    new master for good (no TTL), unreachable."""
    from redis.crc import key_slot

    from kvtier.clustervalue import part_name
    cl = make_cluster(masters=3, replicas=0)
    k = os.urandom(16)
    base = name(k)
    slot = key_slot(base)

    async def go():
        async with tier(cl.url, cluster=True, part_bytes=64 * 1024, timeout_ms=5000) as t:
            await put_all(t, NS, {k: os.urandom(300_000)})    # 5 parts
            parts = [part_name(base, i) for i in range(1, 5)]
            src, dst = cl.begin_migration(slot)
            for p in parts:
                src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, p, 0, 5000)
            new = os.urandom(50_000)
            await put_all(t, NS, {k: new}, replaces=True)       # unsplit, on the old master
            cl.end_migration(slot, src, dst)
            assert bytes((await t.get(NS, k))[0]) == new
            assert dst.client().exists(*parts) == 0
            s = t.snapshot()
            assert s["put_failures"] == 0 and s["errors"] == 0, s

    run(go())


def test_a_redirect_to_a_stopped_master_marks_that_master_down_not_the_one_that_redirected(make_cluster):
    """A key whose slot is migrating is followed (ASK) to the importing master. If that master
    answers nothing, the time runs out while following: it is the one marked down. The master
    that sent the ASK answered, and keeps serving its other keys."""
    from redis.crc import key_slot
    cl = make_cluster(masters=3, replicas=0)
    gone, stays = _keys_in_one_slot(2)
    blocks = {k: os.urandom(50_000) for k in (gone, stays)}
    slot = key_slot(name(gone))

    async def go():
        async with tier(cl.url, cluster=True, timeout_ms=500, reconnect_max_s=0.5) as t:
            await put_all(t, NS, blocks)
            src, dst = cl.begin_migration(slot)
            src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, name(gone), 0, 5000)
            dst.pause()
            try:
                assert await t.get(NS, gone) is None          # followed to a master that answers nothing
                nodes = {n.port: n for n in t.servers.nodes.values()}
                assert nodes[dst.port].reason and not nodes[src.port].reason
                assert bytes((await t.get(NS, stays))[0]) == blocks[stays]  # the redirecting master serves on
            finally:
                dst.resume()

    run(go())


def test_blocks_waiting_for_a_stopped_server_leave_room_for_new_puts(make_daemon, make_valkey):
    """Blocks queued for the cluster hold their RAM slots until written: with the server stopped
    the queue (cluster.queue_bytes, 256 MiB by default) filled a 16 MiB arena and every put
    after it was refused. The queue is bounded by a quarter of the arena."""
    from kvtier.client import Client
    v = make_valkey()
    d = make_daemon(ram={"capacity": "16MiB"}, cluster={"url": v.url, "timeout_ms": 20000})
    cl, cap = d.daemon.store.cluster, d.daemon.hot.alloc.capacity
    assert cl.queue_limit == cap // 4
    with Client(d.address, timeout=30) as c:
        assert c.put_many(NS, [(os.urandom(16), os.urandom(1000))]) == [True]
        # A put is acknowledged once in RAM; the tier connects (and writes it) in the background.
        # Stop the server only once the tier is connected: if its first connection failed (on a
        # loaded machine the daemon's loop can stall past connect_timeout_ms while it connects),
        # the server is marked down, puts fail at once instead of waiting, and no queue forms.
        deadline = time.monotonic() + 10
        while not cl.snapshot()["connected"]:
            assert time.monotonic() < deadline, cl.snapshot()
            time.sleep(0.02)
        v.pause()
        try:
            for i in range(40):  # 20 MiB through a 16 MiB arena: older blocks are evicted
                assert c.put_many(NS, [(os.urandom(16), os.urandom(MiB // 2))]) == [True], i
            s = cl.snapshot()
            assert s["queued_bytes"] <= cap // 4 and s["dropped"] > 0, s
        finally:
            v.resume()
