"""A call that ends early, by Ctrl-C (KeyboardInterrupt) or by cancelling an AsyncClient
call, still lets go of the leases and reservations it holds, and never touches the caller's
buffers after it has ended."""
from __future__ import annotations

import hashlib
import os

import pytest

from kvtier import client as C
from kvtier.client import Client

from conftest import wait_until

MiB = 1 << 20


def key(i) -> bytes:
    return hashlib.sha256(repr(i).encode()).digest()[:16]


def held(c) -> tuple[int, int]:
    t = c.stats().tiers[0]
    return t.leased_blocks, t.reserved_bytes


def test_ctrl_c_while_waiting_for_an_answer_releases_the_leases(daemon, monkeypatch):
    items = [(key(i), os.urandom(64 << 10)) for i in range(32)]
    with Client(daemon.address) as c:
        c.put_many("ns", items)
        assert c.control == "data"

        def interrupted(*a, **k):
            raise KeyboardInterrupt
        monkeypatch.setattr(C._Ops, "control_ready", interrupted)  # Acquires in flight, answers unread
        with pytest.raises(KeyboardInterrupt):
            c.get_many("ns", [k for k, _ in items], into=[bytearray(64 << 10) for _ in items])
        monkeypatch.undo()
        wait_until(lambda: held(c) == (0, 0), 5, "the leases let go")
        assert c.get_many("ns", [k for k, _ in items]) == [v for _, v in items]
