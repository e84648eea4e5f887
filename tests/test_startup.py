"""The daemon's start: what it takes first, and a stop asked for while it is still starting.

Locking a large arena in RAM takes minutes (every page is faulted in). It is done in a thread,
a piece (arena.LOCK_CHUNK) at a time: SIGTERM or Ctrl-C meanwhile ends the start at the next
piece, leaves no arena file behind (a re-attached one keeps its blocks) and exits 0 without
ever serving; systemd hears of the progress. So do the steps after it: a re-attached arena's
blocks checked again, the NVMe tier's files indexed. The NVMe directories are taken before the arena
is made, so a daemon given another daemon's directory is refused before it locks any RAM. A
socket some daemon listens on is named before its directory is judged.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from conftest import make_config, wait_until
from kvtier import arena as arena_mod
from kvtier import config, server
from kvtier.arena import Arena, Interrupted, lock_path
from kvtier.errors import ConfigError

MiB = 1 << 20


def can_lock(n: int) -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= n


needs_mlock = pytest.mark.skipif(not can_lock(8 * MiB), reason="RLIMIT_MEMLOCK below 8 MiB")


@pytest.fixture
def shm():
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    d = tempfile.mkdtemp(prefix="kvtier-test-start-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@needs_mlock
def test_the_arena_is_locked_a_piece_at_a_time_and_says_so(shm, monkeypatch):
    monkeypatch.setattr(arena_mod, "LOCK_CHUNK", 1 * MiB)
    seen = []
    a = Arena(os.path.join(shm, "arena"), 6 * MiB, lock=True, progress=lambda done, size: seen.append((done, size)))
    try:
        assert a.locked and a.lock_detail == ""
        assert [d for d, _ in seen] == [i * MiB for i in range(1, 7)] and {s for _, s in seen} == {6 * MiB}
    finally:
        a.close()


@needs_mlock
def test_a_stop_while_the_arena_is_locked_leaves_nothing(shm, monkeypatch):
    monkeypatch.setattr(arena_mod, "LOCK_CHUNK", 1 * MiB)
    path = os.path.join(shm, "arena")
    stop = threading.Event()
    seen = []

    def progress(done, size):
        seen.append(done)
        if done >= 2 * MiB:
            stop.set()

    with pytest.raises(Interrupted):
        Arena(path, 6 * MiB, lock=True, stop=stop, progress=progress)
    assert seen == [1 * MiB, 2 * MiB]  # not a piece more
    assert sorted(os.listdir(shm)) == []  # neither the arena nor its lock
    a = Arena(path, 6 * MiB, lock=True)  # the path is free for the next start
    a.close()


@needs_mlock
def test_a_stop_while_a_re_attached_arena_is_locked_keeps_its_bytes(shm, monkeypatch):
    monkeypatch.setattr(arena_mod, "LOCK_CHUNK", 1 * MiB)
    path = os.path.join(shm, "arena")
    a = Arena(path, 6 * MiB, lock=False)
    a.view[a.data_offset:a.data_offset + 5] = b"kept!"
    a.close(unlink=False)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        Arena(path, 6 * MiB, lock=True, reattach=True, stop=stop)
    assert not os.path.exists(lock_path(path))
    b = Arena(path, 6 * MiB, lock=False, reattach=True)
    try:
        assert b.reattached and bytes(b.view[b.data_offset:b.data_offset + 5]) == b"kept!"
    finally:
        b.close()


def test_an_arena_over_the_lock_limit_is_refused_at_once_and_left_unlocked(shm, monkeypatch):
    """Over RLIMIT_MEMLOCK (and without CAP_IPC_LOCK) the whole range is asked for in one call, which the
    kernel refuses before faulting a page in: the arena runs unlocked, as before pieces."""
    monkeypatch.setattr(arena_mod, "may_lock_past_limit", lambda: False)
    monkeypatch.setattr(arena_mod.resource, "getrlimit", lambda what: (64 << 10, 64 << 10))
    calls = []
    real = Arena._lock_range

    def spy(addr, n, unlock=False):
        calls.append((n, unlock))
        return False if not unlock else real(addr, n, unlock)
    monkeypatch.setattr(Arena, "_lock_range", staticmethod(spy))
    monkeypatch.setattr(arena_mod, "open_own", lambda p, f, what, mode=0o600: os.open(p, f | os.O_NOFOLLOW, mode))
    monkeypatch.setattr(arena_mod, "secure_dir", lambda *a: None)
    a = Arena(os.path.join(shm, "arena"), 6 * MiB, lock=True)
    try:
        assert not a.locked and "RLIMIT_MEMLOCK is 65536 bytes" in a.lock_detail
        assert calls[0] == (a.size, False)  # one call for all of it
    finally:
        a.close()


def test_a_daemon_stopped_while_it_starts_never_serves_and_cleans_up(shm, monkeypatch):
    """In process: stop() while the arena is being locked ends serve() without serving."""
    monkeypatch.setattr(arena_mod, "LOCK_CHUNK", 1 * MiB)
    started = threading.Event()

    def slow(addr, n, unlock=False):  # each piece takes a while; nothing locked for real
        started.set()
        time.sleep(0.02)
        return True
    monkeypatch.setattr(Arena, "_lock_range", staticmethod(slow))
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    try:
        cfg = make_config(sock_dir, shm, ram={"capacity": "512MiB"})
        d = server.DaemonThread(cfg)
        t0 = time.monotonic()
        d._thread.start()
        assert started.wait(10)
        d.stop(timeout=10)
        assert not d._thread.is_alive() and time.monotonic() - t0 < 5  # 512 pieces would take 10 s
        assert isinstance(d._error, RuntimeError) and "stopped before it served" in str(d._error)
        assert d.daemon.server is None  # gRPC never bound
        assert os.listdir(shm) == [] and os.listdir(sock_dir) == []
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


SLOW_SERVE = textwrap.dedent("""
    import sys, time
    from kvtier import arena, cli
    arena.LOCK_CHUNK = 1 << 20
    def slow(addr, n, unlock=False):
        time.sleep(0.02)
        return True
    arena.Arena._lock_range = staticmethod(slow)
    sys.exit(cli.main(["serve", "--config", sys.argv[1]]))
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_kvtier_serve_ends_at_once_on_a_signal_while_it_locks_the_arena(shm, sig):
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    try:
        arena_path = os.path.join(shm, "arena")
        cfg = os.path.join(sock_dir, "kvtier.toml")
        with open(cfg, "w") as f:
            f.write(f'[server]\nsocket = "{sock_dir}/kvtier.sock"\n[metrics]\nlisten = ""\n'
                    f'[ram]\narena_path = "{arena_path}"\ncapacity = "1GiB"\n')
        log = os.path.join(sock_dir, "log")
        with open(log, "wb") as out:
            p = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, cfg], stdout=out, stderr=out)
        try:
            wait_until(lambda: os.path.exists(arena_path) or p.poll() is not None, timeout=30,
                       what="the arena being made")
            time.sleep(0.3)
            t0 = time.monotonic()
            p.send_signal(sig)
            assert p.wait(10) == 0  # 1024 pieces would take 20 s
            took = time.monotonic() - t0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        text = open(log).read()
        assert took < 5, text
        assert "stopped before serving" in text and "serving on" not in text and "Traceback" not in text, text
        assert os.listdir(shm) == [] and not os.path.exists(os.path.join(sock_dir, "kvtier.sock")), text
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_systemd_hears_of_the_arenas_progress(monkeypatch):
    d = server.Daemon(make_config("/tmp", "/tmp"))
    sent = []
    monkeypatch.setattr(d.notify, "send", lambda *fields: sent.append(fields))
    d._arena_progress(1 * MiB, 4 * MiB)
    d._arena_progress(2 * MiB, 4 * MiB)  # within ARENA_STATUS_S of the last: not told
    d._arena_progress(4 * MiB, 4 * MiB)  # the end always is
    assert [f[0] for f in sent] == ["STATUS=locking the arena in RAM: 25% of 4.0 MiB",
                                    "STATUS=locking the arena in RAM: 100% of 4.0 MiB"]
    assert all(f[1] == f"EXTEND_TIMEOUT_USEC={int(server.ARENA_EXTEND_S * 1e6)}" for f in sent)


def test_a_socket_in_use_is_named_before_its_directory_is_judged(monkeypatch, tmp_path):
    """A root `kvtier serve` beside the unit's daemon: the socket directory is the kvtier user's,
    and the refusal says a daemon listens there (not "remove the directory")."""
    import socket
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path = os.path.join(sock_dir, "kvtier.sock")
        listener.bind(path)
        listener.listen(1)
        cfg = make_config(sock_dir, str(tmp_path))
        cfg = config.replace(cfg, server={"socket": ""})
        monkeypatch.setattr(config, "default_socket", lambda: path)
        monkeypatch.setattr(server, "secure_dir", lambda *a: pytest.fail("directory judged first"))
        with pytest.raises(ConfigError, match="another daemon is listening on"):
            server.DaemonThread(cfg).start()
    finally:
        listener.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_the_runtime_directory_of_another_user_is_not_taken(tmp_path, monkeypatch):
    base = tmp_path / "run"
    (base / "kvtier").mkdir(parents=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    assert config.runtime_dir() == base / "kvtier"
    owner = os.stat(base / "kvtier").st_uid
    monkeypatch.setattr(config.os, "geteuid", lambda: owner + 1)  # root beside the unit's /run/kvtier
    assert config.runtime_dir() == config.pathlib.Path(f"/tmp/kvtier-{os.getuid()}")
    shutil.rmtree(base / "kvtier")
    assert config.runtime_dir() == base / "kvtier"  # none there yet: made as ours


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_locking_past_the_limit_follows_cap_ipc_lock_not_the_uid(tmp_path):
    """A service user given AmbientCapabilities=CAP_IPC_LOCK may lock past RLIMIT_MEMLOCK (so the
    arena is locked a piece at a time, a stop heard between pieces); root without it may not
    (the whole range is asked for at once, refused at once). Judged from the status file of a
    process started with those capabilities."""
    def says(*setpriv) -> bool:
        status = tmp_path / "status"
        status.write_text(subprocess.run(["setpriv", *setpriv, "cat", "/proc/self/status"], capture_output=True,
                                         text=True, check=True).stdout)
        return arena_mod.may_lock_past_limit(str(status))
    nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    assert says(*nobody, "--inh-caps=+ipc_lock", "--ambient-caps=+ipc_lock")
    assert not says(*nobody)
    assert not says("--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock")  # root, uid 0


# ---- the steps after the arena: the RAM tier's restore, the NVMe scan, the listeners -------------

def _stopped_at(d: server.DaemonThread, step: str, sent: list) -> None:
    """Run d's start, stopping it at the second progress of ``step`` (a _step_progress title);
    systemd's notifications go to ``sent``."""
    real = server.Daemon._step_progress

    def step_progress(self, what, unit):
        inner, calls = real(self, what, unit), []

        def progress(*a):
            calls.append(a)
            if what == step and len(calls) == 2:
                self.stop()
            inner(*a)
        return progress
    d.daemon._step_progress = step_progress.__get__(d.daemon)
    d.daemon.notify.send = lambda *fields: sent.append(fields) or True
    with pytest.raises(RuntimeError, match="stopped before it served"):
        d.start()
    d._thread.join(10)
    assert not any("READY=1" in f for f in sent), sent


def test_a_stop_during_the_nvme_scan_ends_the_start_and_systemd_hears_of_it(shm, tmp_path):
    """Indexing millions of NVMe files after the arena was locked: systemd is told (with more
    time) as the scan goes, and a stop meanwhile ends the start; a new arena does not stay."""
    nvme = tmp_path / "nvme"
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    try:
        cfg = make_config(sock_dir, shm, nvme={"dirs": [str(nvme)], "capacity": "64MiB"})
        for i in range(4):  # the tier's subdirectories, as its writes make them
            (nvme / f"{i:02x}").mkdir(parents=True)
        sent: list = []
        _stopped_at(server.DaemonThread(cfg), "indexing the NVMe tier", sent)
        scan = [f for f in sent if f[0].startswith("STATUS=indexing the NVMe tier: ")]
        assert scan and scan[0][1] == f"EXTEND_TIMEOUT_USEC={int(server.ARENA_EXTEND_S * 1e6)}", sent
        assert os.listdir(shm) == [] and os.listdir(sock_dir) == []
        with server.DaemonThread(cfg):  # the directory lock was given back
            pass
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_stop_while_the_ram_tier_is_re_attached_keeps_it_for_the_next_start(shm, monkeypatch):
    """Re-checking every block of a large re-attached arena takes minutes: a stop meanwhile ends
    the start, and the arena and its slot table stay as they were, for the next start."""
    from kvtier import hot
    from kvtier.client import Client
    monkeypatch.setattr(hot, "RESTORE_TICK", 1)
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    try:
        cfg = make_config(sock_dir, shm)
        with server.DaemonThread(cfg) as d, Client(d.address) as c:
            c.put_many("ns", [(bytes([i]) * 16, b"block %d" % i) for i in range(3)])
        sent: list = []
        _stopped_at(server.DaemonThread(cfg), "re-attaching the RAM tier", sent)
        assert any(f[0].startswith("STATUS=re-attaching the RAM tier: 0 blocks checked") for f in sent), sent
        with server.DaemonThread(cfg) as d, Client(d.address) as c:
            assert c.get_many("ns", [bytes([i]) * 16 for i in range(3)]) == [b"block %d" % i for i in range(3)]
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_stop_while_the_listeners_are_set_up_never_says_ready(shm, monkeypatch):
    from kvtier import service
    real = service.KVTierService.__init__
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    try:
        d = server.DaemonThread(make_config(sock_dir, shm))

        def init(self, daemon):
            daemon.stop()  # SIGTERM as the gRPC server is made
            real(self, daemon)
        monkeypatch.setattr(server.KVTierService, "__init__", init)
        sent: list = []
        d.daemon.notify.send = lambda *fields: sent.append(fields) or True
        with pytest.raises(RuntimeError, match="stopped before it served"):
            d.start()
        d._thread.join(10)
        assert not any("READY=1" in f for f in sent), sent
        assert os.listdir(shm) == [] and os.listdir(sock_dir) == []
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_stop_in_the_arenas_last_piece_leaves_no_arena(shm, monkeypatch):
    """The arena's lock hears a stop only between pieces: one during the last piece is seen after
    it, and the new arena (never served) is removed all the same."""
    monkeypatch.setattr(arena_mod, "LOCK_CHUNK", 1 * MiB)
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    try:
        d = server.DaemonThread(make_config(sock_dir, shm, ram={"capacity": "8MiB"}))
        pieces = []

        def piece(addr, n, unlock=False):
            if not unlock:
                pieces.append(n)
                if sum(pieces) >= d.daemon.arena_size_hint:
                    d.daemon.stop()
            return True
        d.daemon.arena_size_hint = 8 * MiB - 4096  # the arena is the capacity, page-aligned
        monkeypatch.setattr(Arena, "_lock_range", staticmethod(piece))
        with pytest.raises(RuntimeError, match="stopped before it served"):
            d.start()
        d._thread.join(10)
        assert os.listdir(shm) == [] and os.listdir(sock_dir) == []
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_second_daemon_beside_the_units_says_so(shm, tmp_path, monkeypatch, caplog):
    """`kvtier serve` with the default socket (root's, or a user's) on a node whose unit already
    serves on /run/kvtier/kvtier.sock starts a daemon of its own, and says so."""
    import socket
    unit = tempfile.mkdtemp(prefix="kvt-unit-")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_dir = tempfile.mkdtemp(prefix="kvt-start-")
    try:
        system = os.path.join(unit, "kvtier.sock")
        listener.bind(system)
        listener.listen(1)
        monkeypatch.setattr(config, "SYSTEM_SOCKET", system)
        monkeypatch.setattr(config, "default_socket", lambda: os.path.join(sock_dir, "kvtier.sock"))
        cfg = config.replace(make_config(sock_dir, shm), server={"socket": ""})
        caplog.set_level("WARNING", logger="kvtier")
        with server.DaemonThread(cfg):
            pass
        assert f"the node's daemon (kvtier.service) serves on {system}; this is another daemon" in caplog.text
        listener.close()
        caplog.clear()
        with server.DaemonThread(cfg):  # none there: nothing said
            pass
        assert "kvtier.service" not in caplog.text
    finally:
        listener.close()
        shutil.rmtree(unit, ignore_errors=True)
        shutil.rmtree(sock_dir, ignore_errors=True)
