"""The cluster tier's write path when writes fail partway or race quota evictions: a split
write cut short leaves no parts behind, an overwrite that could not be made is never served
as the old content once the server is back, and a tenant's bytes in Redis stay within its
quota and exactly accounted however its puts are batched. Real Valkey servers on loopback
(``valkey_servers``)."""
from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from kvtier import cluster as cluster_mod
from kvtier.clusterquota import Accounts, tenant_keys
from test_cluster import name as block_name, put_all, run, tier

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, make_valkey

NS = "writes"
KiB, MiB = 1 << 10, 1 << 20


def name(key: bytes, prefix: str = "kvt") -> bytes:
    return block_name(NS, key).replace(b"kvt:", prefix.encode() + b":", 1)


async def put(t, blocks: dict, replaces: bool = False, ns: str = NS) -> None:
    """Queue every block at once (the writers batch small ones) and wait for every on_done."""
    await put_all(t, ns, blocks, replaces)


async def until(cond, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ---- a split write that fails partway ------------------------------------------------------------

def test_a_split_write_refused_for_memory_leaves_no_parts_behind(make_valkey):
    """noeviction: a 3 MiB block in 64 KiB parts fills a 4 MB server, and its later parts (and
    part 0) are refused. The parts that landed are unreachable (a delete finds parts through
    part 0): they must be removed at once, else the server stays full and every later put fails."""
    srv = make_valkey("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    r = srv.client()
    big, small = os.urandom(16), os.urandom(16)

    async def go():
        async with tier(srv.url, part_bytes=64 * KiB) as t:
            await put(t, {big: os.urandom(3 * MiB)})
            s = t.snapshot()
            assert (s["puts"], s["put_failures"]) == (0, 1), s
            assert r.keys(b"kvt:*") == []
            assert await t.get(NS, big) is None and await t.exists_many(NS, [big]) == [False]
            await put(t, {small: b"s" * 100 * KiB})  # the memory is free again
            assert t.snapshot()["puts"] == 1
            assert bytes((await t.get(NS, small))[0]) == b"s" * 100 * KiB

    run(go())


def test_a_split_overwrite_that_fails_is_not_left_torn(make_valkey):
    """An overwrite whose parts land and whose part 0 (or a later part) is refused would leave
    the old part 0 over the new write's parts: Lookup present, get a torn miss, forever (no
    TTL). The torn block is removed with every part either write made."""
    srv = make_valkey()
    r = srv.client()
    k = os.urandom(16)
    base = name(k)

    async def go():
        async with tier(srv.url, part_bytes=64 * KiB) as t:
            await put(t, {k: os.urandom(300 * KiB)})  # 5 parts
            assert len(r.keys(base + b"*")) == 5
            r.config_set("maxmemory", r.info("memory")["used_memory"] + 100 * KiB)
            r.config_set("maxmemory-policy", "noeviction")
            await put(t, {k: os.urandom(800 * KiB)})  # 13 parts: some land, then OOM
            assert t.snapshot()["put_failures"] == 1
            assert await t.exists_many(NS, [k]) == [False]
            assert await t.get(NS, k) is None
            assert r.keys(base + b"*") == []

    run(go())


def test_a_split_write_cut_off_before_part_0_is_removed_once_the_server_answers(make_valkey, monkeypatch):
    """The connection is reset as part 0 goes out: the parts already written cannot be removed
    now (the server is marked down); their unlink waits, and is made once the server answers."""
    from kvtier import resp
    srv = make_valkey()
    r = srv.client()
    k = os.urandom(16)
    base = name(k)
    real = resp.Connection.request
    cut = {"armed": True}

    def request(self, cmds, sinks=None, weight=0):
        if cut["armed"] and any(c[0] == b"SET" and c[1] == base for c in cmds):
            cut["armed"] = False  # as if the server reset the connection: part 0 never arrives
            f = asyncio.get_running_loop().create_future()
            f.set_exception(ConnectionResetError("reset by the test"))
            return f
        return real(self, cmds, sinks, weight)

    async def go():
        async with tier(srv.url, part_bytes=64 * KiB, reconnect_max_s=0.2) as t:
            monkeypatch.setattr(resp.Connection, "request", request)
            await put(t, {k: os.urandom(300 * KiB)})
            assert t.snapshot()["put_failures"] == 1 and not cut["armed"]
            assert len(r.keys(base + b":*")) == 4  # the parts that landed, for now
            await until(lambda: not r.keys(base + b"*"), timeout=20, what="the parts to be unlinked")
            assert t.snapshot()["connected"] and await t.get(NS, k) is None
            assert t.snapshot()["unlinks_pending"] == 0

    run(go())


# ---- quotas and batches --------------------------------------------------------------------------

def _stored(r, prefix: str) -> tuple[int, int]:
    """(bytes, blocks) a namespace really holds, parts included."""
    names = r.keys(f"{prefix}:{NS}:*".encode())
    return sum(r.strlen(n) for n in names), len([n for n in names if n.endswith(b"}")])


def _accounted(r, prefix: str, tenant: str) -> tuple[int, int]:
    _, size, _, used = tenant_keys(prefix.encode(), tenant)
    return int(r.get(used) or 0), sum(int(v) for v in r.hgetall(size).values())


def test_a_batch_of_small_puts_keeps_within_the_quota_and_is_accounted_exactly(valkey):
    """64 small puts queued at once go out as one batch: each reservation ran before any block
    of the batch was written, so later reservations 'evicted' earlier blocks of the batch
    (unlinking nothing) which were then written unaccounted, 2.6x over the quota."""
    prefix = "w" + uuid.uuid4().hex[:8]
    quota = 100 * KiB
    r = valkey.client()
    blocks = {os.urandom(16): os.urandom(4 * KiB) for _ in range(64)}

    async def go():
        async with tier(valkey.url, prefix=prefix) as t:
            t.set_tenants(lambda ns: "t1", {"t1": quota})
            await put(t, blocks)
            stored, n = _stored(r, prefix)
            used, hashed = _accounted(r, prefix, "t1")
            assert stored <= quota and stored == used == hashed and n >= 20, (stored, used, hashed, n)
            got = await t.get_many(NS, list(blocks))
            assert sum(g is not None for g in got) == n
            assert all(bytes(g[0]) == v for g, v in zip(got, blocks.values()) if g is not None)
            assert all(g is not None for g in got[-n:])  # the newest are the ones kept
            assert t.snapshot()["tenants"]["used"]["t1"] == used

    run(go())


def test_concurrent_writers_keep_within_the_quota_and_are_accounted_exactly(valkey):
    """Blocks too large to batch go out on several writers at once: one writer's reservation
    evicts a block another writer is about to write (or writing). That block must not stay in
    Redis unaccounted."""
    prefix = "w" + uuid.uuid4().hex[:8]
    quota = 1 * MiB
    r = valkey.client()
    blocks = {os.urandom(16): os.urandom(300 * KiB) for _ in range(16)}

    async def go():
        async with tier(valkey.url, prefix=prefix, connections=4) as t:
            t.set_tenants(lambda ns: "t1", {"t1": quota})
            for _ in range(2):
                await put(t, blocks)
                stored, n = _stored(r, prefix)
                used, hashed = _accounted(r, prefix, "t1")
                assert stored <= quota and stored == used == hashed and n >= 1, (stored, used, hashed, n)
                got = await t.get_many(NS, list(blocks))
                assert sum(g is not None for g in got) == n

    run(go())


def test_a_block_given_up_by_a_reservation_answered_before_its_own_is_not_written(valkey, monkeypatch):
    """Reservations sent on two connections answer in the order their scripts ran, but the
    replies may reach their writer tasks in the other order. Here X's script runs first, then
    Y's, which gives X up (the quota holds one block), and Y's writer acts on its reply first.
    X must not be written: it was, unaccounted (4 blocks of 300 KiB in a 1 MiB quota)."""
    prefix = "w" + uuid.uuid4().hex[:8]
    r = valkey.client()
    x, y = os.urandom(16), os.urandom(16)
    nx, ny = name(x, prefix), name(y, prefix)
    real = Accounts.reserve
    ev: dict = {}

    async def reserve(self, tenant, nm, size, expires_ms):
        if nm == ny:
            await ev["x ran"].wait()
        res = await real(self, tenant, nm, size, expires_ms)
        if nm == nx:
            ev["x ran"].set()
            await ev["y answered"].wait()  # X's reply reaches its writer after Y's, even after Y's write
            await until(lambda: ev["t"].snapshot()["puts"] == 1, what="Y to be written")
        elif nm == ny:
            ev["y answered"].set()
        return res

    async def go():
        ev.update({"x ran": asyncio.Event(), "y answered": asyncio.Event()})
        async with tier(valkey.url, prefix=prefix) as t:
            ev["t"] = t
            t.set_tenants(lambda ns: "t1", {"t1": 400 * KiB})
            monkeypatch.setattr(Accounts, "reserve", reserve)
            await put(t, {x: os.urandom(300 * KiB), y: os.urandom(300 * KiB)})
            stored, n = _stored(r, prefix)
            used, hashed = _accounted(r, prefix, "t1")
            assert stored == used == hashed and n == 1 and r.exists(ny), (stored, used, hashed, n)
            s = t.snapshot()
            assert (s["puts"], s["evictions"], s["put_failures"]) == (1, 1, 0), s
            assert await t.get(NS, x) is None and await t.get(NS, y) is not None

    run(go())


@pytest.mark.parametrize("answered", ["while X is written", "after X was written"])
def test_a_reservation_answered_late_does_not_unlink_the_block_written_since(valkey, monkeypatch, answered):
    """The other order: Y's script runs first and gives up X's old value; then X's new value is
    reserved, and X's writer acts on its reply first. When Y's reply reaches Y's writer, X
    holds the new value, accounted: it must stay (it was unlinked: accounted, not stored)."""
    prefix = "w" + uuid.uuid4().hex[:8]
    r = valkey.client()
    x, y, z = os.urandom(16), os.urandom(16), os.urandom(16)
    nx, ny = name(x, prefix), name(y, prefix)
    new = os.urandom(300 * KiB)
    real = Accounts.reserve
    ev: dict = {}

    async def reserve(self, tenant, nm, size, expires_ms):
        if nm == nx:
            await ev["y ran"].wait()
        res = await real(self, tenant, nm, size, expires_ms)
        if nm == ny:
            ev["y ran"].set()
            if answered == "while X is written":
                await ev["x answered"].wait()
            else:
                await until(lambda: ev["t"].snapshot()["puts"] == 3, what="X to be written")
        elif nm == nx:
            ev["x answered"].set()
        return res

    async def go():
        ev.update({"y ran": asyncio.Event(), "x answered": asyncio.Event()})
        async with tier(valkey.url, prefix=prefix) as t:
            ev["t"] = t
            t.set_tenants(lambda ns: "t1", {"t1": 700 * KiB})  # two blocks
            await put(t, {x: os.urandom(300 * KiB)})
            await put(t, {z: os.urandom(300 * KiB)})
            monkeypatch.setattr(Accounts, "reserve", reserve)
            await put(t, {x: new, y: os.urandom(300 * KiB)})  # Y gives up X's old value, X gives up Z
            stored, n = _stored(r, prefix)
            used, hashed = _accounted(r, prefix, "t1")
            assert stored == used == hashed and n == 2 and r.exists(ny), (stored, used, hashed, n)
            assert bytes((await t.get(NS, x))[0]) == new

    run(go())


# ---- overwrites and deletes while the server is down -----------------------------------------------

async def _down(t, srv, k) -> None:
    """Pause the server until a get times out (marks it down)."""
    srv.pause()
    assert await t.get(NS, k) is None
    assert not t.snapshot()["connected"]


async def _back(t, srv) -> None:
    srv.resume()
    await until(lambda: t.snapshot()["connected"], what="the server to be back")


def test_an_overwrite_failed_while_the_server_is_down_never_serves_the_old_content(make_valkey):
    """The overwrite fails at once (server marked down) and so would the unlink it promises: it
    waits, and is made once the server answers. No node reads the old content meanwhile."""
    srv = make_valkey()
    r = srv.client()
    k, gone = os.urandom(16), os.urandom(16)

    async def go():
        async with tier(srv.url, timeout_ms=300, reconnect_max_s=0.2) as t:
            await put(t, {k: b"1" * 5000, gone: b"g" * 5000})
            await _down(t, srv, k)
            try:
                await put(t, {k: b"2" * 6000}, replaces=True)  # fails: Unavailable
                assert await t.delete_many(NS, [gone]) == 0      # so does the delete
                await asyncio.sleep(0.1)
            finally:
                await _back(t, srv)
            assert await t.get(NS, k) is None and await t.get(NS, gone) is None
            await until(lambda: not r.exists(name(k)) and not r.exists(name(gone)), what="the unlinks")
            assert t.snapshot()["unlinks_pending"] == 0
            assert await t.get(NS, k) is None and await t.exists_many(NS, [k, gone]) == [False, False]

    run(go())


def test_a_pending_unlink_is_a_miss_for_reads_and_is_made_before_the_keys_next_write(make_valkey, monkeypatch):
    """Before the pending unlinks are made (here: never, in the background), a get of such a key
    is a miss, and the next write of the key makes the unlink first (a split value's old parts
    do not survive it); its new content is then served."""
    monkeypatch.setattr(cluster_mod, "PENDING_RETRY_S", 3600.0, raising=False)
    srv = make_valkey()
    r = srv.client()
    k = os.urandom(16)
    old, new = os.urandom(700 * KiB), os.urandom(100 * KiB)

    async def go():
        async with tier(srv.url, timeout_ms=300, reconnect_max_s=0.2, part_bytes=64 * KiB) as t:
            await put(t, {k: old})
            await _down(t, srv, k)
            try:
                await put(t, {k: b"x" * 300 * KiB}, replaces=True)
                await asyncio.sleep(0.1)
            finally:
                await _back(t, srv)
            assert await t.get(NS, k) is None and await t.get_many(NS, [k]) == [None]
            assert await t.exists_many(NS, [k]) == [False]  # Lookup agrees
            assert r.exists(name(k)) and t.snapshot()["unlinks_pending"] == 1
            await put(t, {k: new})
            assert bytes((await t.get(NS, k))[0]) == new
            assert sorted(r.keys(name(k) + b"*")) == [name(k), name(k) + b":1"]
            assert t.snapshot()["unlinks_pending"] == 0

    run(go())


def test_pending_unlinks_are_bounded(make_valkey, monkeypatch, caplog):
    monkeypatch.setattr(cluster_mod, "PENDING_MAX", 3)
    srv = make_valkey()
    keys = [os.urandom(16) for _ in range(5)]

    async def go():
        async with tier(srv.url, timeout_ms=300, reconnect_max_s=0.2) as t:
            await put(t, {k: b"v" * 100 for k in keys})
            await _down(t, srv, keys[0])
            try:
                assert await t.delete_many(NS, keys) == 0
                s = t.snapshot()
                assert (s["unlinks_pending"], s["unlinks_lost"]) == (3, 2), s
            finally:
                await _back(t, srv)
            await until(lambda: t.snapshot()["unlinks_pending"] == 0, what="the unlinks")

    with caplog.at_level("WARNING", logger="kvtier.cluster"):
        run(go())
    assert any("not made" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_a_put_queued_while_its_key_is_deleted_goes_after_the_delete_and_stays_accounted(valkey, monkeypatch):
    """A delete holds its keys while it unlinks them and releases their accounting: a put of
    one of them made meanwhile is written after it, stored and accounted (it could land after
    the unlink and be forgotten by the release: stored, unaccounted)."""
    prefix = "w" + uuid.uuid4().hex[:8]
    r = valkey.client()
    k = os.urandom(16)

    async def go():
        async with tier(valkey.url, prefix=prefix) as t:
            t.set_tenants(lambda ns: "t1", {"t1": 10 * MiB})
            await put(t, {k: b"1" * 100 * KiB})
            gate, unlinking = asyncio.Event(), asyncio.Event()
            real = t._unlink_names

            async def slow(names, least=None):
                unlinking.set()
                await gate.wait()
                return await real(names, least)
            monkeypatch.setattr(t, "_unlink_names", slow)
            deleting = asyncio.ensure_future(t.delete_many(NS, [k]))
            await unlinking.wait()
            putting = asyncio.ensure_future(put(t, {k: b"2" * 200 * KiB}))
            await asyncio.sleep(0.2)  # the put's write would be made by now if nothing held it
            gate.set()
            assert await deleting == 1
            await putting
            monkeypatch.setattr(t, "_unlink_names", real)
            got = await t.get(NS, k)
            assert got is not None and bytes(got[0]) == b"2" * 200 * KiB
            stored, n = _stored(r, prefix)
            used, hashed = _accounted(r, prefix, "t1")
            assert n == 1 and stored == used == hashed, (stored, used, hashed, n)

    run(go())


# ---- the accounting after a reset, a reload, a slot migration --------------------------------------

def _used(r, prefix: str, tenant: str) -> int:
    return int(r.get(tenant_keys(prefix.encode(), tenant)[3]) or 0)


def _held(r, prefix: str, ns: str) -> dict:
    return {n: r.strlen(n) for n in r.scan_iter(match=f"{prefix}:{ns}:*")}


def test_a_counter_reset_by_flushall_does_not_keep_blocks_the_quota_gave_up(make_valkey):
    """FLUSHALL (or a restart without persistence) reset the tenant's order of reservations; a
    daemon still remembered places from before, took a later eviction for one made before its
    own write, and kept the block: in Valkey, unaccounted, over the quota for good."""
    srv = make_valkey()
    r = srv.client()
    prefix, block = "reset", 10_000
    quota = 3 * (block + 200)

    async def go():
        async with tier(srv.url, prefix=prefix) as d1, tier(srv.url, prefix=prefix) as d2:
            for d in (d1, d2):
                d.set_tenants(lambda ns: "a", {"a": quota})
            for i in range(10):
                await put(d1, {bytes([i % 2]) * 16: os.urandom(block)})
            r.flushall()
            await put(d2, {bytes([0]) * 16: os.urandom(block)})
            for i in range(3):  # the block above is the oldest: given up, and d1 must unlink it
                await put(d1, {bytes([7, i]) * 8: os.urandom(block)})
            held = _held(r, prefix, NS)
            assert sum(held.values()) <= quota and _used(r, prefix, "a") == sum(held.values()), held
    run(go())


def test_a_namespace_moved_to_another_tenant_is_not_evicted_by_the_old_ones_quota(valkey):
    """A reload moved a namespace from tenant a to tenant b: its blocks stayed in a's accounting,
    and a's next evictions unlinked them, b's blocks ("never another tenant's")."""
    r = valkey.client()
    prefix, block = "moved" + uuid.uuid4().hex[:6], 10_000
    owner = {"shared": "a", "a-own": "a"}

    async def go():
        async with tier(valkey.url, prefix=prefix) as t:
            t.set_tenants(lambda ns: owner[ns], {"a": 3 * (block + 200)})
            await put(t, {bytes([i]) * 16: os.urandom(block) for i in range(3)}, ns="shared")
            owner["shared"] = "b"  # the tenants file, reloaded
            t.set_tenants(lambda ns: owner[ns], {"a": 3 * (block + 200)})
            await t.enforce_quotas()
            for i in range(3):  # a fills its quota with its own namespace
                await put(t, {bytes([9, i]) * 8: os.urandom(block)}, ns="a-own")
            assert len(_held(r, prefix, "shared")) == 3
            assert all(g is not None for g in await t.get_many("shared", [bytes([i]) * 16 for i in range(3)]))
            assert len(_held(r, prefix, "a-own")) == 3
    run(go())


def test_a_delete_refused_while_its_slot_migrates_is_made_later(make_cluster):
    """A split block's slot migrating, some parts moved: the old master answers the UNLINK of the
    block and its parts with TRYAGAIN. That reply counted as done, and once the slot had moved
    the deleted block was served again."""
    from redis.crc import key_slot

    from kvtier.clustervalue import block_name as value_name, part_name
    cl = make_cluster(masters=3, replicas=0)
    prefix, k, v = "migr", os.urandom(16), os.urandom(200_000)

    async def go():
        async with tier(cl.url, prefix=prefix, cluster=True, part_bytes=64 * KiB, timeout_ms=5000) as t:
            await put(t, {k: v})
            base = value_name(prefix.encode(), NS, k)
            slot = key_slot(base)
            src, dst = cl.begin_migration(slot)
            src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, part_name(base, 1), 0, 5000)
            await t.delete_many(NS, [k])
            assert await t.get(NS, k) is None  # a pending unlink is a miss
            cl.end_migration(slot, src, dst)
            await until(lambda: not t._pending, timeout=20, what="the unlink made once the slot moved")
            assert await t.get(NS, k) is None
            assert dst.client().exists(base, *(part_name(base, i) for i in range(1, 4))) == 0
    run(go(), timeout=120)


def _cluster_held(cl, prefix: str) -> int:
    """Bytes of a namespace's blocks (parts included) over every master."""
    return sum(m.client().strlen(n) for m in cl.masters() for n in m.client().scan_iter(match=f"{prefix}:{NS}:*"))


def test_the_quota_accounting_follows_its_slot_while_it_migrates(make_cluster, monkeypatch):
    """A tenant's accounting slot migrates to another master while its daemon writes over its
    quota. The reservation script was sent to the slot's old master only: refused with TRYAGAIN
    from the start (its :exp, a set of blocks with a TTL, does not exist without one: the script's
    keys counted as split), then ASK once the keys had moved and MOVED once the slot had: every
    write failed until the slot map was reloaded, and deletes stayed accounted (over-counted).
    The script follows MOVED and ASK like the data paths, and is sent again while TRYAGAIN says
    its keys are on both sides, for a bounded time."""
    from redis.crc import key_slot

    from kvtier import resp
    from kvtier.clusterquota import seq_key
    cl = make_cluster(masters=3, replicas=0)
    prefix, block = "mq", 10_000
    quota = 3 * (block + 200)
    acct = tenant_keys(prefix.encode(), "acme") + (seq_key(prefix.encode(), "acme"),)
    slot = key_slot(acct[0])
    real = resp.Connection.request
    tryagain = asyncio.Event()   # a script refused with TRYAGAIN

    def seen(f: asyncio.Future) -> None:
        if not f.cancelled() and f.exception() is None and any(
                isinstance(r, resp.ReplyError) and r.code == "TRYAGAIN" for r in f.result()):
            tryagain.set()

    def request(self, cmds, sinks=None, weight=0):
        f = real(self, cmds, sinks, weight)
        if any(c[0] == b"EVAL" for c in cmds):
            f.add_done_callback(seen)
        return f

    async def go():
        async with tier(cl.url, prefix=prefix, cluster=True, timeout_ms=5000) as t:
            t.set_tenants(lambda ns: "acme", {"acme": quota})
            held: list[bytes] = []

            async def write(what: str) -> None:
                k = os.urandom(16)
                await put(t, {k: os.urandom(block)})
                held.append(k)
                s = t.snapshot()
                assert s["put_failures"] == 0 and s["puts"] == len(held), (what, s)

            for _ in range(4):   # the fourth write evicts: from here on every write is over the quota
                await write("before")
            monkeypatch.setattr(resp.Connection, "request", request)
            src, dst = cl.begin_migration(slot)
            await write("migrating, no key moved yet")
            src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, acct[0], 0, 5000)
            w = asyncio.ensure_future(write("migrating, the keys on both sides"))
            await asyncio.wait_for(tryagain.wait(), 10)
            for k in acct[1:]:   # the rest moves while the script waits to be sent again
                src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, k, 0, 5000)
            await w
            await write("migrating, every key moved")
            c = dst.client(single_connection_client=True)

            def on_dst(*cmd):  # the importing master answers for the slot after ASKING (one command)
                c.execute_command("ASKING")
                return c.execute_command(*cmd)
            read = name(held[-2], prefix)
            before = on_dst("ZSCORE", acct[0], read)
            assert (await t.get(NS, held[-2])) is not None
            await asyncio.gather(*t.accounts._tasks)  # a read refreshes the block's recency there
            assert on_dst("ZSCORE", acct[0], read) > before
            assert await t.delete_many(NS, [held[-1]]) == 1
            assert int(on_dst("GET", acct[3])) == _cluster_held(cl, prefix)  # the delete left the accounting
            cl.end_migration(slot, src, dst)
            await write("moved")
            used, hashed = int(dst.client().get(acct[3])), sum(int(v) for v in dst.client().hgetall(acct[1]).values())
            stored = _cluster_held(cl, prefix)
            assert stored <= quota and stored == used == hashed, (stored, used, hashed)
            assert t.snapshot()["evictions"] >= 4

    run(go(), timeout=120)


def test_a_quota_script_refused_while_its_keys_stay_split_fails_in_bounded_time(make_cluster, monkeypatch):
    """A migration stuck with the tenant's accounting keys on both sides: the script is sent again
    after each of TRYAGAIN_WAITS, then the write fails (counted once); nothing was accounted."""
    from redis.crc import key_slot

    from kvtier import clusterconn, resp
    cl = make_cluster(masters=3, replicas=0)
    prefix = "mb"
    acct = tenant_keys(prefix.encode(), "acme")
    slot = key_slot(acct[0])
    real = resp.Connection.request
    evals = [0]

    def request(self, cmds, sinks=None, weight=0):
        evals[0] += sum(c[0] == b"EVAL" for c in cmds)
        return real(self, cmds, sinks, weight)

    async def go():
        async with tier(cl.url, prefix=prefix, cluster=True, timeout_ms=5000) as t:
            t.set_tenants(lambda ns: "acme", {"acme": 1 * MiB})
            await put(t, {os.urandom(16): os.urandom(1000)})
            src, dst = cl.begin_migration(slot)
            src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, acct[0], 0, 5000)
            monkeypatch.setattr(resp.Connection, "request", request)
            errors = t.snapshot()["errors"]
            t0 = time.monotonic()
            await put(t, {os.urandom(16): os.urandom(1000)})
            took = time.monotonic() - t0
            s = t.snapshot()
            assert (s["puts"], s["put_failures"], s["errors"] - errors) == (1, 1, 1), s
            assert evals[0] == len(clusterconn.TRYAGAIN_WAITS) + 1
            assert sum(clusterconn.TRYAGAIN_WAITS) <= took < sum(clusterconn.TRYAGAIN_WAITS) + 2, took
            cl.end_migration(slot, src, dst)
            await put(t, {os.urandom(16): os.urandom(1000)})
            assert t.snapshot()["puts"] == 2
            assert len(dst.client().zrange(acct[0], 0, -1)) == 3   # the two blocks written, and ''

    run(go(), timeout=120)


def test_unlinks_refused_by_a_slot_left_migrating_are_retried_less_and_less_often(make_cluster, monkeypatch):
    """A reshard left a slot migrating with a split block's parts on both sides (an interrupted
    valkey-cli --cluster reshard leaves it so until --cluster fix): the block's pending unlink is
    refused with TRYAGAIN at every try. It was tried again every 50 ms for as long as the slot
    stayed open, each try with a reload of the slot map; the tries back off to reconnect_max_s,
    and the unlink is made once the slot has moved."""
    from redis.crc import key_slot

    from kvtier import resp
    from kvtier.clustervalue import block_name as value_name, part_name
    cl = make_cluster(masters=3, replicas=0)
    prefix, k = "stuck", os.urandom(16)
    real = resp.Connection.request
    unlinks = [0]

    def request(self, cmds, sinks=None, weight=0):
        unlinks[0] += sum(c[0] == b"UNLINK" for c in cmds)
        return real(self, cmds, sinks, weight)

    async def go():
        async with tier(cl.url, prefix=prefix, cluster=True, part_bytes=64 * KiB, timeout_ms=5000,
                        reconnect_max_s=1.0) as t:
            await put(t, {k: os.urandom(200_000)})
            base = value_name(prefix.encode(), NS, k)
            slot = key_slot(base)
            src, dst = cl.begin_migration(slot)
            src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, part_name(base, 1), 0, 5000)
            monkeypatch.setattr(resp.Connection, "request", request)
            await t.delete_many(NS, [k])
            refreshes = t.snapshot()["topology_refreshes"]
            await asyncio.sleep(3)   # the window the retries are counted over
            s = t.snapshot()
            assert s["unlinks_pending"] == 1
            # 0.05, 0.1, 0.2, 0.4, 0.8 s, then every second: 7 tries in 3 s (60 every 50 ms)
            assert unlinks[0] <= 10 and s["topology_refreshes"] - refreshes <= 10, (unlinks[0], s)
            cl.end_migration(slot, src, dst)
            await until(lambda: not t._pending, timeout=10, what="the unlink made once the slot moved")
            assert dst.client().exists(base, part_name(base, 1)) == 0

    run(go(), timeout=120)
