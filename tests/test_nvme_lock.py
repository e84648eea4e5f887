"""One daemon per NVMe directory: the daemon holds a flock on the directory itself while it runs.

A second daemon given the same directory is refused with a message naming it (in process a
ConfigError, from ``kvtier serve`` a config error, no traceback) and the first one's files are
left alone; a daemon whose start fails lets its directories go; no lock file is left (one made
by root would be unreadable to the service user); ``kvtier check`` reads beside a running daemon
and ``--repair`` refuses while a daemon holds the directory.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import wait_until
from kvtier.client import Client
from kvtier.errors import ConfigError

NS = "lock-test"
N = 8


def nvme(d, **more) -> dict:
    return {"dirs": [str(x) for x in d] if isinstance(d, list) else [str(d)], "capacity": "64MiB",
            "write_policy": "commit", **more}


def data() -> list[tuple[bytes, bytes]]:
    return [(hashlib.sha256(b"k%d" % i).digest()[:16], os.urandom(64 << 10)) for i in range(N)]


def on_disk(d) -> dict[str, bytes]:
    """Every file under an NVMe directory -> its digest."""
    out = {}
    for root, _, names in os.walk(d):
        for n in names:
            p = os.path.join(root, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, d)] = hashlib.sha256(f.read()).digest()
    return out


def held(d) -> bool:
    """Does some open file description hold d's lock (tried without waiting, let go at once)?"""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def fill(d, items) -> None:
    with Client(d.address) as c:
        c.put_many(NS, items)
    cold = d.daemon.store.cold
    wait_until(lambda: cold.snapshot()["blocks"] == len(items), what="the blocks on NVMe")


def test_second_daemon_is_refused_and_the_first_keeps_its_files(make_daemon, tmp_path):
    nv = tmp_path / "nv"
    first = make_daemon(nvme=nvme(nv))
    items = data()
    fill(first, items)
    assert held(nv) and not [n for n in os.listdir(nv) if len(n) != 2]  # no lock file: the directory's lock
    # a temp file as a write in flight would leave it: the second daemon's scan must not get to it
    sub = next(p for p in os.listdir(nv) if len(p) == 2)
    inflight = nv / sub / ".in-flight.kvb.1234.tmp"
    inflight.write_bytes(b"partial")
    before = on_disk(nv)

    with pytest.raises(ConfigError) as e:
        make_daemon(nvme=nvme(nv, capacity="1MiB"))  # a smaller capacity would evict most of them
    assert f"another process holds {nv} (a kvtier daemon using it" in str(e.value)

    assert on_disk(nv) == before  # nothing removed, nothing evicted
    assert first.daemon.store.cold.snapshot()["blocks"] == N
    with Client(first.address) as c:  # the first one still serves, and writes
        assert c.get_many(NS, [k for k, _ in items]) == [v for _, v in items]
        more = [(b"m" * 16, os.urandom(4096))]
        c.put_many(NS, more)
    wait_until(lambda: first.daemon.store.cold.snapshot()["blocks"] == N + 1, what="the new block on NVMe")
    inflight.unlink()

    first.stop()
    # a daemon that stopped lets its directory go (once its writes have ended)
    wait_until(lambda: not held(nv), timeout=10, what="the stopped daemon's lock gone")
    after = make_daemon(nvme=nvme(nv))
    assert after.daemon.store.cold.snapshot()["blocks"] == N + 1  # found, not taken for another's
    with Client(after.address) as c:  # its RAM is empty (an arena of its own): these come from NVMe
        assert c.get_many(NS, [k for k, _ in items + more]) == [v for _, v in items + more]


def test_same_directory_twice_in_one_daemon_is_named(make_daemon, tmp_path):
    nv = tmp_path / "nv"
    nv.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(nv)
    with pytest.raises(ConfigError, match="are the same directory"):
        make_daemon(nvme=nvme([nv, alias]))
    assert not held(nv)


def test_a_failed_start_leaves_no_directory_locked(make_daemon, tmp_path):
    free, taken = tmp_path / "free", tmp_path / "taken"
    holder = make_daemon(nvme=nvme(taken))
    # refused at its second directory: the first one, locked already, goes with the failure
    with pytest.raises(ConfigError, match="another process holds"):
        make_daemon(nvme=nvme([free, taken]))
    assert not held(free) and held(taken)
    holder.stop()

    # fails late, with the NVMe tier up and serving gRPC: a directory where its data socket goes
    work = tempfile.mkdtemp(prefix="kvt-lock-")  # short: AF_UNIX paths are limited
    try:
        sock = os.path.join(work, "s.sock")
        os.mkdir(sock + ".data")
        with pytest.raises((OSError, ConfigError)):
            make_daemon(nvme=nvme([free, taken]), server={"socket": sock})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wait_until(lambda: not held(free) and not held(taken), timeout=10, what="the failed start's locks gone")
    d = make_daemon(nvme=nvme([free, taken]))  # and a daemon can have them now
    assert held(free) and held(taken)
    d.stop()


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", *args], capture_output=True, text=True, timeout=60)


def test_serve_refuses_with_a_config_error(make_daemon, tmp_path):
    nv = tmp_path / "nv"
    make_daemon(nvme=nvme(nv))
    work = tempfile.mkdtemp(prefix="kvt-lock-")  # short: AF_UNIX paths are limited
    try:
        cfg = os.path.join(work, "k.toml")
        with open(cfg, "w") as f:
            f.write(f'[server]\nsocket = "{work}/s.sock"\n[ram]\narena_path = "{work}/arena/arena"\n'
                    f'capacity = "16MiB"\n[metrics]\nlisten = ""\n[nvme]\ndirs = ["{nv}"]\n')
        r = _cli("serve", "--config", cfg)
        assert r.returncode == 2, r.stderr
        errors = [line for line in r.stderr.splitlines() if not line.startswith("ts=")]  # its log goes there too
        assert errors and errors[0].startswith("config error: nvme.dirs: another process holds "
                                               f"{nv} "), r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert held(nv)


def test_check_ignores_the_lock_file_and_repair_waits_for_the_daemon(make_daemon, tmp_path):
    nv = tmp_path / "nv"
    d = make_daemon(nvme=nvme(nv))
    fill(d, data())
    sub = next(p for p in os.listdir(nv) if len(p) == 2)
    inflight = nv / sub / ".in-flight.kvb.1234.tmp"
    inflight.write_bytes(b"partial")

    r = _cli("check", "--dir", str(nv))  # beside the running daemon: reads only
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{N} block files, {N} ok" in r.stdout and "0 corrupt, 0 orphan" in r.stdout, r.stdout
    assert held(nv)  # the daemon's lock is still its own

    r = _cli("check", "--dir", str(nv), "--repair")  # would remove the daemon's write in flight
    assert r.returncode == 2 and f"another process holds {nv}" in r.stderr, r.stdout + r.stderr
    assert inflight.exists()

    d.stop()
    r = _cli("check", "--dir", str(nv))  # no daemon: the temp file is an orphan now
    assert r.returncode == 1 and "0 corrupt, 1 orphan" in r.stdout, r.stdout
    r = _cli("check", "--dir", str(nv), "--repair")
    assert r.returncode == 0 and "1 removed" in r.stdout, r.stdout + r.stderr
    assert not inflight.exists()
    assert not held(nv)  # the repair let it go
    r = _cli("check", "--dir", str(nv))
    assert r.returncode == 0 and f"{N} block files, {N} ok" in r.stdout, r.stdout


def test_a_refused_daemon_makes_no_arena(make_daemon, tmp_path, monkeypatch):
    """The directories are taken before the arena is made: a second daemon given one is refused
    before it locks (minutes, for a large arena) and gives back any RAM."""
    from kvtier import server
    nv = tmp_path / "nv"
    make_daemon(nvme=nvme(nv))
    made = []

    def arena(*a, **k):
        made.append(a)
        raise RuntimeError("an arena was made")
    monkeypatch.setattr(server, "Arena", arena)
    with pytest.raises(ConfigError, match="another process holds"):
        make_daemon(nvme=nvme(nv))
    assert made == []
