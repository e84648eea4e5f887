"""The client's ``timeout`` bounds every wait for the daemon, on each path: a daemon that is
alive but stalled (SIGSTOP) makes a call raise DeadlineExceeded after about ``timeout``
seconds, not after a connection's own default, and a timed-out call is not tried again."""
from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time

import pytest

from kvtier import errors
from kvtier.client import Client
from kvtier.v1 import kvtier_pb2 as pb

TIMEOUT = 0.5
PATHS = {"arena": {}, "data": {"attach": False}}


def key(i) -> bytes:
    return hashlib.sha256(repr(i).encode()).digest()[:16]


@contextlib.contextmanager
def stopped(d):
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        while _state(d.proc.pid) != "T":  # the signal is delivered after kill() returns
            time.sleep(0.005)
        yield
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def timed(fn) -> float:
    t = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        fn()
    return time.monotonic() - t


@pytest.mark.parametrize("path", list(PATHS))
def test_a_stalled_daemon_is_deadline_exceeded_within_the_timeout(daemon_process, path):
    d = daemon_process()
    with Client(d.address, timeout=TIMEOUT, **PATHS[path]) as c:
        c.put_many("ns", [(key(1), b"x" * 4096)])
        assert c.get_many("ns", [key(1)]) == [b"x" * 4096]
        assert c.path == path
        with stopped(d):
            took = timed(lambda: c.get_many("ns", [key(1)]))
            took_put = timed(lambda: c.put_many("ns", [(key(2), b"y" * 4096)]))
        assert took < 4 * TIMEOUT and took_put < 4 * TIMEOUT, (took, took_put)
        assert c.get_many("ns", [key(1)]) == [b"x" * 4096]  # the daemon back: calls work again


def test_an_answer_owed_to_a_posted_call_is_awaited_no_longer_than_the_timeout(daemon_process):
    d = daemon_process()
    with Client(d.address, timeout=TIMEOUT) as c:
        c.lookup("ns", [key(1)])
        assert c.control == "data"
        with stopped(d):
            assert c._ops.control_post("Stats", pb.StatsRequest())  # sent; its answer never comes
            took = timed(lambda: c.lookup("ns", [key(1)]))
        assert took < 4 * TIMEOUT, took
        assert c.lookup("ns", [key(1)]) == ([0], 0)
