"""Threads sharing one Client: the first calls (each attaching) and attaches made while other
threads copy through the arena never break one another's calls."""
from __future__ import annotations

import hashlib
import threading
import time

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
