"""Another local user cannot get at the daemon's files: the per-user default directories must be
the daemon's own and writable by no one else; an arena, lock or slot table that is not a regular
file of the daemon's user is refused at start, never re-attached, never removed.

The suite runs as root: "another user" is uid 65534 (nobody), given files and directories made
here with os.chown."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid

import pytest

from kvtier import config, errors
from kvtier.cli import start_problems
from kvtier.client import Client
from kvtier.server import DaemonThread
from kvtier.slots import SlotTable

from conftest import make_config

NS = "sec"
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def scratch():
    """A fresh directory (0700, ours) in /dev/shm and one in /tmp (short, for sockets), removed
    at the end."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    made = [os.path.join(shm, f"kvt-sec-{uuid.uuid4().hex[:10]}"), tempfile.mkdtemp(prefix="kvt-sec-")]
    os.mkdir(made[0], 0o700)
    yield made
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def default_paths(monkeypatch, scratch) -> tuple[config.Config, dict[str, str]]:
    """A config that names no arena and no socket, with the per-user default directories moved
    into the scratch directories (the real ones may belong to a daemon of this node); and those
    directories, by what they hold ("arena", "socket"), not made yet."""
    shm, tmp = scratch
    dirs = {"arena": os.path.join(shm, "kvtier-uid"), "socket": os.path.join(tmp, "kvtier-uid")}
    monkeypatch.setattr(config, "default_arena_path", lambda: os.path.join(dirs["arena"], "arena"))
    monkeypatch.setattr(config, "default_socket", lambda: os.path.join(dirs["socket"], "kvtier.sock"))
    cfg = make_config(tmp, shm, server={"socket": ""}, ram={"arena_path": "", "capacity": "8MiB"})
    assert not cfg.ram.arena_path and cfg.arena_path == os.path.join(dirs["arena"], "arena")
    assert not cfg.server.socket and cfg.socket_path == os.path.join(dirs["socket"], "kvtier.sock")
    return cfg, dirs


def stored_once(cfg: config.Config, key: bytes, value: bytes) -> None:
    """Start a daemon on cfg, store one block, stop it."""
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put(NS, key, value)


def refused(cfg: config.Config, match: str, checked: bool = True) -> str:
    """The daemon's start on cfg fails with a ConfigError matching ``match``; with ``checked``,
    `kvtier config check` says so beforehand (its start_problems; who should own a file depends on
    the user that will run serve, which the check does not know)."""
    if checked:
        said = [p for p in start_problems(cfg) if re.search(match, p)]
        assert said, f"config check did not say {match!r}: {start_problems(cfg)}"
    t = DaemonThread(cfg)
    try:
        with pytest.raises(errors.ConfigError, match=match) as e:
            t.start()
    finally:
        t.stop()
    return str(e.value)


def test_a_restart_with_the_default_directories_re_attaches_the_arena(monkeypatch, scratch, caplog):
    cfg, dirs = default_paths(monkeypatch, scratch)
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put(NS, b"k" * 16, b"kept across the restart")
    for made in dirs.values():  # made by the daemon: ours, writable by us alone
        st = os.lstat(made)
        assert st.st_uid == os.geteuid() and not st.st_mode & 0o022
    caplog.set_level("INFO", logger="kvtier")
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            assert c.get(NS, b"k" * 16) == b"kept across the restart"
    assert "arena re-attached" in caplog.text


@pytest.mark.parametrize("which", ["arena", "socket"])
@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777, 0o1777])
def test_a_default_directory_writable_by_group_or_others_is_refused(monkeypatch, scratch, which, mode):
    cfg, dirs = default_paths(monkeypatch, scratch)
    bad = dirs[which]
    os.mkdir(bad)
    os.chmod(bad, mode)
    msg = refused(cfg, "writable by")
    assert bad in msg and "chmod go-w" in msg
    assert os.listdir(bad) == []  # nothing of the daemon's went into it


@needs_root
@pytest.mark.parametrize("which", ["arena", "socket"])
def test_a_default_directory_of_another_user_is_refused(monkeypatch, scratch, which):
    cfg, dirs = default_paths(monkeypatch, scratch)
    bad = dirs[which]
    os.mkdir(bad, 0o755)
    os.chown(bad, NOBODY, NOBODY)
    msg = refused(cfg, f"owned by uid {NOBODY}")
    assert bad in msg and "rm -r" in msg
    assert os.listdir(bad) == []


@pytest.mark.parametrize("which", ["arena", "socket"])
def test_a_symlinked_default_directory_is_refused(monkeypatch, scratch, which):
    cfg, dirs = default_paths(monkeypatch, scratch)
    bad = dirs[which]
    target = os.path.join(os.path.dirname(bad), "elsewhere")
    os.mkdir(target, 0o700)  # ours and private: the link alone is the fault
    os.symlink(target, bad)
    assert bad in refused(cfg, "symbolic link")
    assert os.listdir(target) == []


def test_a_configured_directory_writable_by_everyone_needs_the_sticky_bit(scratch):
    shm, tmp = scratch
    cfg = make_config(tmp, shm, ram={"capacity": "8MiB"})
    os.chmod(shm, 0o777)
    assert shm in refused(cfg, "writable by every user without the sticky bit")
    os.chmod(shm, 0o1777)  # as /dev/shm itself: each file's owner is checked instead
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            c.put(NS, b"s" * 16, b"sticky")
    os.chmod(shm, 0o770)  # shared with a group (a hugetlbfs mounted mode=0770): the deployment's choice
    with DaemonThread(cfg) as d:
        with Client(d.address) as c:
            assert c.get(NS, b"s" * 16) == b"sticky"


@needs_root
def test_an_arena_swapped_for_another_users_file_is_not_re_attached(scratch):
    shm, tmp = scratch
    cfg = make_config(tmp, shm, ram={"capacity": "8MiB"})
    stored_once(cfg, b"t" * 16, b"a tenant's block")
    # another user puts its own file, a copy with a valid header, where the arena was
    path = cfg.arena_path
    with open(path, "rb") as f:
        theirs = f.read()
    with open(path + ".new", "wb") as f:
        f.write(theirs)
    os.chown(path + ".new", NOBODY, NOBODY)
    os.chmod(path + ".new", 0o666)
    os.rename(path + ".new", path)
    msg = refused(cfg, f"arena {path} is owned by uid {NOBODY}", checked=False)
    assert "rm " in msg
    st = os.stat(path)  # left as it was: neither used nor removed
    assert st.st_uid == NOBODY
    with open(path, "rb") as f:
        assert f.read() == theirs


@pytest.mark.parametrize("persist", [True, False])
def test_a_symlink_at_the_arena_path_is_refused(scratch, persist):
    shm, tmp = scratch
    cfg = make_config(tmp, shm, ram={"capacity": "8MiB", "persist": persist})
    stored_once(cfg, b"l" * 16, b"block")
    path, target = cfg.arena_path, os.path.join(shm, "elsewhere")
    if persist:  # the arena itself, header and all, moved behind a link
        os.rename(path, target)
    else:
        with open(target, "wb") as f:
            f.write(b"not the daemon's")
    os.symlink(target, path)
    assert path in refused(cfg, "symbolic link")
    assert os.path.islink(path)


@needs_root
def test_a_lock_file_of_another_user_is_refused(scratch):
    shm, tmp = scratch
    cfg = make_config(tmp, shm, ram={"capacity": "8MiB"})
    lock = cfg.arena_path + ".lock"
    with open(lock, "w"):
        pass
    os.chown(lock, NOBODY, NOBODY)
    assert lock in refused(cfg, f"owned by uid {NOBODY}", checked=False)
    assert not os.path.exists(cfg.arena_path)


@needs_root
@pytest.mark.parametrize("fresh", [True, False])
def test_a_slot_table_of_another_user_is_refused_and_left_alone(scratch, fresh):
    shm, _ = scratch
    path = os.path.join(shm, "kvtier-slots.dev_hugepages_kvtier_arena")  # as table_path names it
    with open(path, "wb") as f:
        f.write(b"theirs" * 100)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(errors.ConfigError, match=f"slot table {path} is owned by uid {NOBODY}"):
        SlotTable(path, fresh=fresh)
    with open(path, "rb") as f:
        assert f.read() == b"theirs" * 100  # not emptied


def test_a_symlink_at_the_slot_table_path_is_refused(scratch):
    shm, _ = scratch
    target, path = os.path.join(shm, "target"), os.path.join(shm, "kvtier-slots.x")
    with open(target, "wb") as f:
        f.write(b"precious")
    os.symlink(target, path)
    with pytest.raises(errors.ConfigError, match="symbolic link"):
        SlotTable(path, fresh=True)
    with open(target, "rb") as f:
        assert f.read() == b"precious"


@needs_root
def test_a_slot_table_of_another_user_beside_the_arena_stops_the_start(scratch):
    shm, tmp = scratch
    cfg = make_config(tmp, shm, ram={"capacity": "8MiB"})
    stored_once(cfg, b"x" * 16, b"block")
    os.chown(cfg.arena_path + ".slots", NOBODY, NOBODY)
    assert cfg.arena_path + ".slots" in refused(cfg, f"owned by uid {NOBODY}", checked=False)
    assert os.path.exists(cfg.arena_path + ".slots")


def test_a_file_with_a_second_name_is_refused(tmp_path):
    """A hard link at the arena's or slot table's name to another file of the daemon's would have
    the daemon write (format, truncate) that other file."""
    from kvtier.arena import open_own
    other = tmp_path / "other-file-of-ours"
    other.write_bytes(b"precious")
    os.link(other, tmp_path / "arena.slots")
    with pytest.raises(errors.ConfigError, match=r"has 2 names \(hard links\)"):
        open_own(str(tmp_path / "arena.slots"), os.O_RDWR | os.O_CREAT, "slot table")
    assert other.read_bytes() == b"precious"
    (tmp_path / "arena.slots").unlink()
    os.close(open_own(str(tmp_path / "arena.slots"), os.O_RDWR | os.O_CREAT, "slot table"))  # a name of its own: fine
