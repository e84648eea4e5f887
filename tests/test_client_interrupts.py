"""A call that ends early, by Ctrl-C (KeyboardInterrupt) or by cancelling an AsyncClient
call, still lets go of the leases and reservations it holds, and never touches the caller's
buffers after it has ended."""
from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

from kvtier import client as C
from kvtier.client import AsyncClient, Client

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


async def cancel_then_reuse(t: asyncio.Future, bufs, fill: bytes) -> None:
    """Cancel a call still running, then reuse its buffers as a caller would, and give anything
    still working on them the time to show."""
    assert not t.done()
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    for b in bufs:
        b[:] = fill
    await asyncio.sleep(0.3)


def test_a_cancelled_get_many_stops_writing_into_the_buffers(make_daemon):
    d = make_daemon(ram={"capacity": "256MiB"})
    n, size = 32, 2 * MiB
    items = [(key(("a", i)), b"A" * size) for i in range(n)]

    async def main():
        async with AsyncClient(d.address, attach=False) as c:
            await c.put_many("ns", items)
            assert c.path == "data"
            bufs = [bytearray(size) for _ in range(n)]
            t = asyncio.ensure_future(c.get_many("ns", [k for k, _ in items], into=bufs))
            while not bufs[0][0] and not t.done():  # the blocks are coming in
                await asyncio.sleep(0.0005)
            await cancel_then_reuse(t, bufs, bytes(size))
            assert [i for i, b in enumerate(bufs) if any(b)] == []
            got = await c.get_many("ns", [k for k, _ in items[:4]])  # the next call is in step
            assert got == [v for _, v in items[:4]]
    asyncio.run(main())


def test_a_cancelled_put_many_stores_only_what_it_read_before(make_daemon):
    d = make_daemon(ram={"capacity": "256MiB"})
    n, size = 48, 2 * MiB
    keys = [key(("k", i)) for i in range(n)]

    async def main():
        async with AsyncClient(d.address, attach=False) as c:
            await c.attach()
            bufs = [bytearray(b"A" * size) for _ in range(n)]
            t = asyncio.ensure_future(c.put_many("ns", list(zip(keys, bufs))))
            await asyncio.sleep(0.01)
            await cancel_then_reuse(t, bufs, b"B" * size)
            got = await c.get_many("ns", keys)
            assert all(g is None or g == b"A" * size for g in got)
            st = await c.stats()
            assert st.tiers[0].reserved_bytes == 0
    asyncio.run(main())


def test_a_cancelled_get_many_over_the_arena_releases_its_leases(daemon, monkeypatch):
    items = [(key(i), os.urandom(64 << 10)) for i in range(32)]
    real = C._Ops.control_ready

    def slow(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)

    async def main():
        async with AsyncClient(daemon.address) as c:
            await c.put_many("ns", items)
            assert c.path == "arena" and c.control == "data"
            monkeypatch.setattr(C._Ops, "control_ready", slow)  # Acquires in flight meanwhile
            t = asyncio.ensure_future(c.get_many("ns", [k for k, _ in items]))
            await asyncio.sleep(0.1)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            monkeypatch.undo()
            for _ in range(100):
                if (await c.stats()).tiers[0].leased_blocks == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await c.stats()).tiers[0].leased_blocks == 0
            assert await c.get_many("ns", [k for k, _ in items]) == [v for _, v in items]
    asyncio.run(main())
