"""The RAM tier survives daemon restarts (ram.persist), and SIGTERM drains NVMe writes."""
import os
import signal

import pytest

from kvtier import config, errors
from kvtier.client import Client
from kvtier.server import DaemonThread
from kvtier.slots import BASE, ENTRY

from conftest import _dirs, make_config, wait_until
from test_hugepages import hugetlbfs  # noqa: F401 (a fixture)

NS = "persist"


def blocks(n, size=50_000):
    return [(bytes([i]) * 16, os.urandom(size + i)) for i in range(n)]


@pytest.fixture
def cfg_pair():
    import shutil
    sock_dir, arena_dir = _dirs()
    yield lambda **sections: make_config(sock_dir, arena_dir, **sections)
    shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(arena_dir, ignore_errors=True)


def test_restart_keeps_ram_and_its_rules(cfg_pair):
    cfg = cfg_pair()
    data = blocks(20)
    with DaemonThread(cfg) as d:
        c = Client(d.address)
        c.put_many(NS, data)
        c.delete(NS, [data[0][0]])
        r = c.reserve(NS, [b"u" * 16], [1000])  # never committed
        r.views[0][:] = b"z" * 1000
        gen = c.info.generation
    with DaemonThread(cfg) as d:
        tiers, _ = c.lookup(NS, [k for k, _ in data] + [b"u" * 16])
        assert tiers == [0] + [1] * 19 + [0]  # deleted stays deleted, uncommitted never appears
        assert c.get_many(NS, [k for k, _ in data[1:]]) == [v for _, v in data[1:]]
        assert c.info.generation != gen  # the same client re-attached to the new generation
        s = c.stats()
        committed = sum(-(-len(v) // 4096) * 4096 for _, v in data[1:])
        # the slot reserved before the restart stays out of use for a reservation lifetime:
        # its writer may have outlived the old daemon
        assert s.tiers[0].blocks == 19 and s.tiers[0].reserved_bytes == 4096
        assert s.tiers[0].used_bytes == committed + 4096
        c.put(NS, b"n" * 16, b"new after restart")  # the restored allocator hands out free space only
        assert c.get_many(NS, [k for k, _ in data[1:]]) == [v for _, v in data[1:]]
    c.close()


def test_an_arena_that_cannot_be_re_attached_is_said_so(cfg_pair, caplog):
    with DaemonThread(cfg_pair(ram={"capacity": "16MiB"})) as d:
        with Client(d.address) as c:
            c.put_many(NS, blocks(3))
    caplog.set_level("WARNING", logger="kvtier")
    with DaemonThread(cfg_pair(ram={"capacity": "32MiB"})) as d:   # resized: its RAM tier cannot be kept
        with Client(d.address) as c:
            assert c.lookup(NS, [k for k, _ in blocks(3)])[0] == [0, 0, 0]
    said = [r.getMessage() for r in caplog.records if "not re-attached" in r.getMessage()]
    assert len(said) == 1 and "16777216 bytes, this arena 33554432" in said[0] and "starts empty" in said[0], said
    caplog.clear()
    with DaemonThread(cfg_pair(ram={"capacity": "32MiB"})):         # the same size again: kept, nothing said
        pass
    assert not [r for r in caplog.records if "not re-attached" in r.getMessage()]


def test_a_slot_table_of_another_arena_is_not_restored(cfg_pair, caplog):
    """ram.capacity changed, and the start stopped (kill -9) after it made and locked the new
    arena but before it rewrote the slot table: the next start re-attached the new, zeroed
    arena and restored the old table's entries into it (with verify_on_restart = false, every
    block was served as zeros). The table names the arena it describes; another's is dropped."""
    from kvtier.slots import SlotTable, table_path
    cfg = cfg_pair(ram={"capacity": "16MiB", "verify_on_restart": False})
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put_many(NS, blocks(4))
    table = table_path(cfg.arena_path, "tmpfs")
    old = open(table, "rb").read()
    cfg2 = cfg_pair(ram={"capacity": "24MiB", "verify_on_restart": False})
    with DaemonThread(cfg2):
        pass  # a new arena (another size) and a new table
    with open(table, "wb") as f:  # as if the start had stopped before its table was written
        f.write(old)
    caplog.set_level("WARNING", logger="kvtier")
    with DaemonThread(cfg2) as d:
        with Client(d.address) as c:
            assert c.lookup(NS, [k for k, _ in blocks(4)])[0] == [0, 0, 0, 0]
            assert c.stats().tiers[0].blocks == 0
    assert "describes another arena" in caplog.text
    # a table of an older version (no arena id) is still restored
    with DaemonThread(cfg2) as d:
        with Client(d.address) as c:
            c.put_many(NS, blocks(2))
    raw = bytearray(open(table, "rb").read())
    raw[24:32] = bytes(8)
    open(table, "wb").write(raw)
    with DaemonThread(cfg2) as d:
        with Client(d.address) as c:
            assert c.lookup(NS, [k for k, _ in blocks(2)])[0] == [1, 1]
    assert SlotTable(table, fresh=False)._arena_id() != 0  # the id is written again


def test_pins_are_kept_across_a_restart(cfg_pair):
    """Pins were lost on every restart (a SIGTERM too): prewarm's pinned contexts became
    evictable until the next nightly run. A pin is recorded in its block's slot entry (its end
    in wall-clock time) and made again at the restore, within ram.max_pinned."""
    import time
    cfg = cfg_pair(ram={"capacity": "16MiB"})
    data = blocks(8)
    keys = [k for k, _ in data]
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put_many(NS, data)
            assert c.pin(NS, keys[:3]) == [True] * 3           # until unpinned
            assert c.pin(NS, keys[3:5], 3600) == [True] * 2    # for an hour
            assert c.pin(NS, keys[5:6], 1) == [True]           # runs out before the restart
            assert c.pin(NS, keys[6:7]) == [True] and c.unpin(NS, keys[6:7]) == 1
    time.sleep(1.2)
    with DaemonThread(cfg) as d:
        hot = d.daemon.hot
        with Client(d.address) as c:
            assert c.stats().tiers[0].pinned_blocks == 5
            assert c.unpin(NS, keys[:5]) == 5 and c.unpin(NS, keys[5:]) == 0
            assert c.pin(NS, keys[:1], 1800) == [True]
        with hot.lock:
            b = hot._blocks(NS)[keys[0]]
            assert 1700 < b.pin_until - hot.clock() <= 1800
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            assert c.stats().tiers[0].pinned_blocks == 1
            for i in range(60):  # 3 MiB through a 16 MiB arena over and over: the pinned block stays
                c.put(NS, bytes([100 + i % 50]) * 16, os.urandom(1 << 20))
            assert c.lookup(NS, keys[:1])[0] == [1]


def _four_blocks_two_pinned(cfg) -> tuple[list[bytes], str]:
    """A run that stores 4 blocks and pins the first 2 until unpinned: their keys, the arena's path."""
    data = blocks(4)
    keys = [k for k, _ in data]
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put_many(NS, data)
            assert c.pin(NS, keys[:2]) == [True, True]
        return keys, d.daemon.arena.path


def _run_of_a_version_without_pins(arena_path):
    """What a start of a version that keeps no pins leaves behind (a rollback): a new generation
    in the arena's header, and the slot table as it was, pins included."""
    import secrets
    import struct
    with open(arena_path, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("<Q", secrets.randbits(63) | 1))


def test_pins_left_by_a_run_before_a_rollback_are_not_restored(cfg_pair, caplog):
    """A rollback to a version that keeps no pins, then forward again: the pins recorded before
    the rollback came back, on blocks unpinned meanwhile, or on a block that took over a deleted
    one's entry (pinned for ever, unasked). A start trusts the recorded pins only when the run
    before it recorded them."""
    cfg = cfg_pair(ram={"capacity": "16MiB"})
    keys, arena_path = _four_blocks_two_pinned(cfg)
    _run_of_a_version_without_pins(arena_path)
    caplog.set_level("WARNING", logger="kvtier")
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            assert c.lookup(NS, keys)[0] == [1, 1, 1, 1]      # the blocks are kept
            assert c.stats().tiers[0].pinned_blocks == 0      # their pins are not
            assert c.pin(NS, keys[2:3]) == [True]            # pins of this run ...
    assert "2 recorded pins are not trusted and dropped" in caplog.text
    with DaemonThread(cfg) as d:                             # ... are kept by the next start
        with Client(d.address) as c:
            assert c.stats().tiers[0].pinned_blocks == 1
            assert c.unpin(NS, keys[2:3]) == 1 and c.unpin(NS, keys[:2]) == 0


def test_pins_survive_a_start_stopped_during_the_restore(cfg_pair, monkeypatch):
    """A start stopped while it restored the RAM tier (SIGTERM during a long restore, or a kill)
    had written its generation into the arena's header but not into the slot table: the next
    start took the pins for a rollback's and dropped them all."""
    from kvtier import hot as H
    cfg = cfg_pair(ram={"capacity": "16MiB"})
    keys, _ = _four_blocks_two_pinned(cfg)
    real = H.HotTier.restore

    def stopped(self, *a, **k):
        raise KeyboardInterrupt("stopped during the restore")
    monkeypatch.setattr(H.HotTier, "restore", stopped)
    with pytest.raises(BaseException):
        DaemonThread(cfg).start()
    monkeypatch.setattr(H.HotTier, "restore", real)
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            assert c.lookup(NS, keys)[0] == [1, 1, 1, 1]
            assert c.stats().tiers[0].pinned_blocks == 2


def test_an_arena_an_older_version_made_gets_an_id(cfg_pair):
    """An arena made before arenas had an id kept id 0 through every re-attach: the check that a
    slot table describes this arena never applied on a node upgraded in place."""
    from kvtier.slots import SlotTable, table_path
    cfg = cfg_pair(ram={"capacity": "16MiB"})
    with DaemonThread(cfg) as d:
        arena_path = d.daemon.arena.path
        with Client(d.address) as c:
            c.put_many(NS, blocks(2))
    with open(arena_path, "r+b") as f:
        f.seek(40)
        f.write(bytes(8))
    table = table_path(cfg.arena_path, "tmpfs")
    raw = bytearray(open(table, "rb").read())
    raw[24:32] = bytes(8)
    open(table, "wb").write(raw)
    with DaemonThread(cfg) as d:
        arena_id = d.daemon.arena.arena_id
        with Client(d.address) as c:
            assert c.lookup(NS, [k for k, _ in blocks(2)])[0] == [1, 1]
    assert arena_id != 0
    with open(arena_path, "rb") as f:
        f.seek(40)
        assert int.from_bytes(f.read(8), "little") == arena_id
    assert SlotTable(table, fresh=False)._arena_id() == arena_id


def test_slots_reserved_at_a_crash_are_not_reused_at_once(cfg_pair):
    cfg = cfg_pair(ram={"reservation_ms": 1000, "capacity": "8MiB"})
    with DaemonThread(cfg) as d:
        c = Client(d.address)
        r = c.reserve(NS, [b"w" * 16], [1 << 20])
        stale_view, stale_off = r.views[0], r.offsets[0]
    with DaemonThread(cfg) as d:  # the old client's reservation (and view) outlived the daemon
        fresh = []
        for i in range(3):
            r2 = c.reserve(NS, [bytes([i]) * 16], [1 << 20])
            fresh.append(r2.offsets[0])
            r2.views[0][:] = bytes([i]) * (1 << 20)
            c.commit(r2)
        assert stale_off not in fresh
        stale_view[:] = b"!" * (1 << 20)  # the late writer lands only in its own old slot
        assert c.get_many(NS, [bytes([i]) * 16 for i in range(3)]) == [bytes([i]) * (1 << 20) for i in range(3)]
        import time
        time.sleep(1.3)  # one reservation lifetime later the slot is free again
        s = c.stats()
        assert s.tiers[0].reserved_bytes == 0
    c.close()


def test_quarantine_counts_from_the_first_restart_that_found_the_slot(cfg_pair):
    """A daemon that restarts faster than a reservation lifetime (a crash loop) must not keep
    every old reservation's slots out of use for ever: the lifetime runs from the first restart."""
    import time
    cfg = cfg_pair(ram={"reservation_ms": 2000, "capacity": "8MiB"})
    with DaemonThread(cfg) as d:
        c = Client(d.address)
        c.reserve(NS, [b"q" * 16], [1 << 20])  # never committed: the daemon goes first
    t0 = time.monotonic()
    with DaemonThread(cfg):
        assert c.stats().tiers[0].reserved_bytes == 1 << 20
    time.sleep(max(0.0, 2.3 - (time.monotonic() - t0)))
    with DaemonThread(cfg):  # its second restart, past one lifetime since the first: free at once
        s = c.stats()
        assert s.tiers[0].reserved_bytes == 0 and s.tiers[0].used_bytes == 0
    c.close()


def test_doubtful_blocks_are_dropped(cfg_pair):
    cfg = cfg_pair()
    data = blocks(6)
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put_many(NS, data)
            lease = c.acquire(NS, [data[2][0], data[4][0]])
            off2, off4 = lease.offsets
            c.release(lease)
    path = cfg.arena_path
    with open(path, "r+b") as f:  # a flipped bit in block 2's bytes
        f.seek(off2 + 100)
        b = f.read(1)
        f.seek(off2 + 100)
        f.write(bytes([b[0] ^ 1]))
    with open(path + ".slots", "r+b") as f:  # a torn entry: find block 4's and damage its namespace
        raw = f.read()
        for i in range((len(raw) - BASE) // ENTRY):
            p = BASE + i * ENTRY
            if raw[p:p + 4] == b"EVTS" and int.from_bytes(raw[p + 8:p + 16], "little") == off4:
                f.seek(p + 50)
                f.write(b"#")
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            tiers, _ = c.lookup(NS, [k for k, _ in data])
            assert tiers == [1, 1, 0, 1, 0, 1]
            got = c.get_many(NS, [k for k, _ in data])
            assert [g for i, g in enumerate(got) if i not in (2, 4)] == [v for i, (_, v) in enumerate(data) if i not in (2, 4)]
            assert got[2] is None and got[4] is None and c.checksum_failures == 0


def test_persist_off_starts_empty_and_cleans_up(cfg_pair):
    cfg = cfg_pair(ram={"persist": False})
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put_many(NS, blocks(3))
    assert not os.path.exists(cfg.arena_path) and not os.path.exists(cfg.arena_path + ".slots")
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            assert c.lookup(NS, [k for k, _ in blocks(3)])[0] == [0, 0, 0]


def test_kill_9_keeps_ram_and_clients_reconnect(daemon_process):
    d = daemon_process()
    data = blocks(10)
    c = Client(d.address, timeout=5)
    c.put_many(NS, data)
    d.kill()
    d.start()
    assert c.lookup(NS, [k for k, _ in data])[0] == [1] * 10
    assert c.get_many(NS, [k for k, _ in data]) == [v for _, v in data]
    c.close()


def test_sigterm_drains_nvme_writes(daemon_process, tmp_path):
    nvme = tmp_path / "nvme"
    d = daemon_process(f'[nvme]\ndirs = ["{nvme}"]\ncapacity = "256MiB"\nwrite_policy = "commit"\n'
                       f'durability = "data"\n', capacity="256MiB")
    data = blocks(60, size=1 << 20)
    with Client(d.address, timeout=10) as c:
        c.put_many(NS, data)
    assert d.terminate(timeout=60) == 0
    from kvtier.cold import check_dir
    rep = check_dir(str(nvme))
    assert rep.ok == 60 and not rep.corrupt and not rep.orphans  # every committed block reached NVMe


def test_an_overwrite_and_a_delete_answered_stay_done_after_kill_9(daemon_process, tmp_path):
    """put v1 (written to NVMe), overwrite with v2, delete: both answered, then kill -9 while the
    NVMe writer is busy. The overwrite only queued the old file's unlink behind the writes, the
    delete found nothing left to wait for, and the restart's scan served v1 again: a deleted key
    came back with its old bytes."""
    nvme = tmp_path / "nvme"
    d = daemon_process(f'[nvme]\ndirs = ["{nvme}"]\ncapacity = "256MiB"\nwrite_policy = "commit"\n'
                       f'io_threads = 1\n', capacity="32MiB")
    k, v1, v2 = b"K" * 16, os.urandom(256 << 10), os.urandom(256 << 10)
    with Client(d.address, timeout=10) as c:
        assert c.put(NS, k, v1)
        wait_until(lambda: next(t for t in c.stats().tiers if t.name == "nvme").blocks >= 1, what="v1 on NVMe")
        c.put_many(NS, blocks(12, size=1 << 20))  # a backlog for the NVMe writer
        assert c.put(NS, k, v2, overwrite=True)
        assert c.delete(NS, [k]) == 1
    d.kill()
    d.start()
    with Client(d.address, timeout=10) as c:
        assert c.get(NS, k) is None


# Run first in a daemon started with it on PYTHONPATH: the write of KEY to NVMe waits before it
# begins until GATE/go exists (GATE/held says it is waiting), and the daemon is killed (-9) as
# the write ends, before anything after it runs (the unlink of a cancelled write's file).
_CRASH_AT_WRITE_END = """
import os, signal, time
from kvtier import cold, store

KEY, GATE = bytes.fromhex({key!r}), {gate!r}
_write_file, _written = cold.ColdTier._write_file, store.Store._written


def held(self, d, path, *a, **kw):
    if KEY.hex() in path:
        open(os.path.join(GATE, "held"), "w").close()
        while not os.path.exists(os.path.join(GATE, "go")):
            time.sleep(0.01)
    return _write_file(self, d, path, *a, **kw)


def crash(self, k, length):
    if k[1] == KEY:
        os.kill(os.getpid(), signal.SIGKILL)
    return _written(self, k, length)


cold.ColdTier._write_file, store.Store._written = held, crash
"""


@pytest.mark.parametrize("then", ["delete", "overwrite"])
def test_a_write_cancelled_in_flight_stays_cancelled_after_kill_9(daemon_process, tmp_path, monkeypatch, then):
    """A Delete or an overwrite answered while the key's NVMe write was in flight: the write
    renamed its file into place anyway and unlinked it only as it ended. A kill -9 in between
    left the file, which the restart indexed: the deleted key was served again, and the
    overwritten key served its old bytes once RAM evicted the new ones."""
    import kvtier
    k, v1, v2 = b"C" * 16, os.urandom(256 << 10), os.urandom(256 << 10)
    nvme, gate, hook = tmp_path / "nvme", tmp_path / "gate", tmp_path / "hook"
    gate.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CRASH_AT_WRITE_END.format(key=k.hex(), gate=str(gate)))
    here = os.path.dirname(os.path.dirname(kvtier.__file__))  # the daemon runs the kvtier under test
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), here]))
    # the first line goes to [ram] (the fixture's [metrics] comes after it): LRU, so the puts
    # after the restart surely evict v2
    d = daemon_process(f'policy = "lru"\n[metrics]\nlisten = ""\n[nvme]\ndirs = ["{nvme}"]\n'
                       f'capacity = "256MiB"\nwrite_policy = "commit"\n', capacity="32MiB")
    with Client(d.address, timeout=10) as c:
        assert c.put(NS, k, v1)
        wait_until((gate / "held").exists, what="the write of v1 to begin")
        if then == "delete":
            assert c.delete(NS, [k]) == 1
        else:
            assert c.put(NS, k, v2, overwrite=True)
        (gate / "go").touch()
        assert d.proc.wait(10) == -signal.SIGKILL  # as the write ended
    monkeypatch.setenv("PYTHONPATH", here)
    d.start()
    with Client(d.address, timeout=10) as c:
        if then == "delete":
            assert c.get(NS, k) is None
            return
        assert c.get(NS, k) == v2  # restored with the RAM tier
        for i in range(48):  # 48 MiB through a 32 MiB arena: v2 leaves RAM
            c.put(NS, bytes([i]) * 16, os.urandom(1 << 20))
        assert c.lookup(NS, [k])[0] != [1]
        assert c.get(NS, k) in (v2, None)  # on NVMe, or lost; never the old bytes



# Run first in a daemon started with it on PYTHONPATH: as an overwrite of KEY commits (its old
# NVMe file just unlinked), RAM evicts the old content, and a re-write of it that this queues
# renames its file into place before the commit finishes, then never ends (the daemon is killed
# as it would have ended: the cancel made at the commit cannot remove the file in time).
_EVICTED_WHILE_OVERWRITING = """
import os, time
from kvtier import cold, store

NS, KEY, GATE = {ns!r}, bytes.fromhex({key!r}), {gate!r}
_drop_replaced, _write_file = store.Store.drop_replaced, cold.ColdTier._write_file


def drop_replaced(self, rid):
    _drop_replaced(self, rid)
    if (NS, KEY) not in self.hot.overwritten(rid):
        return
    with self.hot.lock:
        while KEY in self.hot._blocks(NS) and self.hot._evict_one():
            pass
    while (NS, KEY) in self._queued and not os.path.exists(os.path.join(GATE, "renamed")):
        time.sleep(0.01)


def write_file(self, d, path, *a, **kw):
    _write_file(self, d, path, *a, **kw)
    if KEY.hex() in path:
        open(os.path.join(GATE, "renamed"), "w").close()
        while True:
            time.sleep(1)


store.Store.drop_replaced, cold.ColdTier._write_file = drop_replaced, write_file
"""


@pytest.mark.parametrize("persist", [True, False])
def test_old_content_evicted_while_its_overwrite_commits_stays_replaced_after_kill_9(
        daemon_process, tmp_path, monkeypatch, persist):
    """RAM evicted the old content while its overwrite committed (after the old NVMe file was
    unlinked): the demotion wrote it to NVMe again, and the cancel made as the commit finished
    removed that file only once its write ended. A kill -9 in between left the old bytes on
    NVMe, which the restart indexed: served at once without the RAM tier's copy, and with it
    once RAM evicted the new content (its demotion found the key "on NVMe" already)."""
    import kvtier
    k, v1, v2 = b"E" * 16, os.urandom(256 << 10), os.urandom(256 << 10)
    nvme, gate, hook = tmp_path / "nvme", tmp_path / "gate", tmp_path / "hook"
    gate.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_EVICTED_WHILE_OVERWRITING.format(ns=NS, key=k.hex(), gate=str(gate)))
    here = os.path.dirname(os.path.dirname(kvtier.__file__))  # the daemon runs the kvtier under test
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), here]))
    # the first lines go to [ram]; "evict": only a demotion writes the key to NVMe
    d = daemon_process(f'policy = "lru"\npersist = {str(persist).lower()}\n[metrics]\nlisten = ""\n'
                       f'[nvme]\ndirs = ["{nvme}"]\ncapacity = "256MiB"\nwrite_policy = "evict"\n',
                       capacity="32MiB")
    with Client(d.address, timeout=10) as c:
        assert c.put(NS, k, v1)
        assert c.put(NS, k, v2, overwrite=True)
    d.kill()
    monkeypatch.setenv("PYTHONPATH", here)
    d.start()
    with Client(d.address, timeout=10) as c:
        if persist:
            assert c.get(NS, k) == v2  # restored with the RAM tier
            for i in range(48):  # 48 MiB through a 32 MiB arena: v2 leaves RAM
                c.put(NS, bytes([i]) * 16, os.urandom(1 << 20))
            assert c.lookup(NS, [k])[0] != [1]
        assert c.get(NS, k) in (v2, None)  # on NVMe, or lost; never the old bytes


def test_restored_blocks_count_against_their_tenants_ram_quota(cfg_pair, tmp_path):
    import hashlib
    token = "token-of-acme-" + "a" * 20
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\ntoken_sha256 = ["{hashlib.sha256(token.encode()).hexdigest()}"]\n'
                       f'namespaces = ["acme"]\nram_quota = "1MiB"\n')
    cfg = cfg_pair(ram={"capacity": "16MiB"}, auth={"tenants_file": str(tenants)})
    blk = 256 << 10
    with DaemonThread(cfg) as d:
        with Client(d.address, token=token) as c:
            c.put_many("acme", [(bytes([i]) * 16, os.urandom(blk)) for i in range(4)])
    with DaemonThread(cfg) as d:
        hot = d.daemon.hot
        assert hot.group_used.get("acme") == 4 * blk and not hot.group_used.get("")  # filed under acme
        with Client(d.address, token=token) as c:
            c.put_many("acme", [(bytes([100 + i]) * 16, os.urandom(blk)) for i in range(4)])
            assert sum(c.lookup("acme", [bytes([i]) * 16 for i in range(4)])[0]) == 0  # the quota evicted them
        assert hot.group_used.get("acme") <= 1 << 20 and not hot.group_used.get("")


@pytest.mark.parametrize("persist", [True, False])
def test_a_second_daemon_on_the_same_arena_refuses_to_start(cfg_pair, persist):
    import shutil
    cfg = cfg_pair(ram={"persist": persist})
    other_sock, _ = _dirs()
    other = make_config(other_sock, os.path.dirname(cfg.arena_path), ram={"persist": persist})
    assert other.arena_path == cfg.arena_path and other.socket_path != cfg.socket_path
    data = blocks(5)
    try:
        with DaemonThread(cfg) as d:
            with Client(d.address) as c:
                c.put_many(NS, data)
                second = DaemonThread(other)
                try:
                    with pytest.raises(errors.ConfigError, match="another daemon") as e:
                        second.start()
                finally:
                    second.stop()
                assert cfg.arena_path in str(e.value)
                assert not os.path.exists(other.socket_path)
                # the first daemon's arena and blocks are untouched, for old and new clients alike
                assert c.get_many(NS, [k for k, _ in data]) == [v for _, v in data]
            with Client(d.address) as c2:
                assert c2.get_many(NS, [k for k, _ in data]) == [v for _, v in data]
        with DaemonThread(other) as d:  # once the first is gone, the arena is free
            with Client(d.address) as c:
                assert c.lookup(NS, [data[0][0]])[0] == [1 if persist else 0]
    finally:
        shutil.rmtree(other_sock, ignore_errors=True)


def test_a_second_daemon_on_an_arena_on_hugetlbfs_refuses_to_start(hugetlbfs):
    import shutil
    from kvtier.slots import table_path
    dirs = [_dirs()[0] for _ in range(2)]
    first, second = (make_config(s, hugetlbfs, ram={"capacity": "8MiB"}) for s in dirs)
    try:
        with DaemonThread(first) as d:
            with Client(d.address) as c:
                c.put(NS, b"h" * 16, b"on huge pages")
                t = DaemonThread(second)
                try:
                    with pytest.raises(errors.ConfigError, match="another daemon"):
                        t.start()
                finally:
                    t.stop()
                assert c.get(NS, b"h" * 16) == b"on huge pages"
        with DaemonThread(second) as d:  # the lock went with the first daemon
            with Client(d.address) as c:
                assert c.get(NS, b"h" * 16) == b"on huge pages"
    finally:
        for s in dirs:
            shutil.rmtree(s, ignore_errors=True)
        slots = table_path(first.arena_path, "hugetlbfs")
        if os.path.exists(slots):
            os.unlink(slots)
