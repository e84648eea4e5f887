"""Threads sharing one Client: the first calls (each attaching) and attaches made while other
threads copy through the arena never break one another's calls."""
from __future__ import annotations

import hashlib
import threading
import time

import xxhash

from kvtier.client import Client


def key(i) -> bytes:
    return hashlib.sha256(repr(i).encode()).digest()[:16]


ITEMS = [(key(i), bytes([i]) * 65536) for i in range(32)]


def get_all(c: Client, failures: list) -> None:
    """One get_many of ITEMS; wrong bytes or an error go into failures."""
    try:
        if c.get_many("ns", [k for k, _ in ITEMS]) != [v for _, v in ITEMS]:
            failures.append("wrong bytes")
    except Exception as e:
        failures.append(f"{type(e).__name__}: {e}")


def test_first_calls_from_many_threads_attach_once(daemon):
    with Client(daemon.address) as c0:
        c0.put_many("ns", ITEMS)
    failures: list = []
    for _ in range(10):
        with Client(daemon.address) as c:  # nobody attaches first: every thread's call does
            go = threading.Barrier(4)

            def work():
                go.wait()
                get_all(c, failures)
            ts = [threading.Thread(target=work) for _ in range(4)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
    assert not failures, sorted(set(failures))


def test_attach_while_other_threads_get(daemon):
    with Client(daemon.address) as c:
        c.put_many("ns", ITEMS)
        arena = c._ops.arena
        stop, failures = threading.Event(), []

        def getter():
            while not stop.is_set():
                get_all(c, failures)
        ts = [threading.Thread(target=getter) for _ in range(2)]
        for t in ts:
            t.start()
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            c.attach()
        stop.set()
        for t in ts:
            t.join()
        assert not failures, sorted(set(failures))
        assert c._ops.arena is arena  # the same daemon: its mapping is kept


# ---- an answer that arrives after another thread re-attached or closed the client -------------

def test_a_reservation_answered_by_the_old_daemon_is_made_again_on_the_new_one():
    """A Reserve answered by a daemon that then restarted (ram.persist = false: a new arena
    file), its answer read after another thread re-attached: the views were cut from the new
    mapping at the old daemon's offsets, so the caller wrote over a block another client had
    stored in the new daemon. The reservation is now made again on the new arena."""
    import shutil
    from conftest import _dirs, make_config
    from kvtier.server import DaemonThread
    sock_dir, arena_dir = _dirs()
    cfg = make_config(sock_dir, arena_dir, ram={"persist": False, "capacity": "64MiB"})
    d1 = DaemonThread(cfg).start()
    d2 = None
    try:
        c = Client(d1.address)
        c.put("ns", key("a"), b"A" * 4096)
        gen1 = c._ops.arena.generation
        op = c._ops.op_reserve("ns", [key("b")], [4096])  # the operation, driven step by step
        req = next(op)
        answer = c._call(req)                               # answered by the first daemon
        d1.stop()
        d2 = DaemonThread(cfg).start()
        with Client(d2.address) as other:
            theirs = [(key(("v", i)), bytes([97 + i]) * 4096) for i in range(4)]
            other.put_many("ns", theirs)
            c.attach()                                      # another thread of c re-attaches
            assert c._ops.arena.generation != gen1
            req = op.send(answer)                           # made again, on the new arena
            assert req[:2] == ("unary", "Reserve") and req[2].generation == c._ops.arena.generation
            try:
                op.send(c._call(req))
            except StopIteration as done:
                res = done.value
            res.views[0][:] = b"X" * 4096
            assert other.get_many("ns", [k for k, _ in theirs]) == [v for _, v in theirs]
            c.commit(res, [xxhash.xxh3_128_digest(b"X" * 4096)])
            assert other.get("ns", key("b")) == b"X" * 4096
        c.close()
    finally:
        (d2 or d1).stop()
        shutil.rmtree(sock_dir, True)
        shutil.rmtree(arena_dir, True)


def test_a_client_closed_during_a_call_says_so(daemon):
    """close() from another thread (a vLLM worker's link drops a failed client its copy threads
    use) while a call waits for its answer: the call ends with Unavailable, a kvtier error its
    caller handles, not an AttributeError, once it has let go of what the answer held; later
    calls too, on every path, opening nothing."""
    import os
    from kvtier import errors
    with Client(daemon.address) as watcher:
        watcher.put("ns", key("k"), b"x" * 4096)
    for start in (lambda c: c._ops.op_reserve("ns", [key("n")], [4096]),
                  lambda c: c._ops.op_acquire("ns", [key("k")])):
        c = Client(daemon.address)
        c.attach()
        op = start(c)
        answer = c._call(next(op))
        c.close()
        try:
            req = op.send(answer)
            while True:  # the Abort or Release it makes, on a connection opened for it
                req = op.send(c._call(req))
        except errors.Unavailable as e:
            assert "closed" in str(e)
        with Client(daemon.address) as watcher:
            st = watcher.stats()
        assert (st.reservations, st.leases) == (0, 0)
    for kw in ({}, {"attach": False}, {"attach": False, "data_channel": False}):
        c = Client(daemon.address, **kw)
        assert c.get("ns", key("k")) == b"x" * 4096
        c.close()
        fds = len(os.listdir("/proc/self/fd"))
        for call in (lambda: c.get("ns", key("k")), lambda: c.put("ns", key("z"), b"z"),
                     lambda: c.lookup("ns", [key("k")])):
            try:
                call()
                raise AssertionError(f"{kw}: a call after close() worked")
            except errors.Unavailable as e:
                assert "closed" in str(e)
        assert len(os.listdir("/proc/self/fd")) <= fds  # none opened (others may close meanwhile)
