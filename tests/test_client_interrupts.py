"""A call that ends early, by Ctrl-C (KeyboardInterrupt) or by cancelling an AsyncClient
call, still lets go of the leases and reservations it holds, and never touches the caller's
buffers after it has ended."""
from __future__ import annotations

import asyncio
import hashlib
import os
import threading
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


@pytest.mark.parametrize("op", ["get_many", "acquire", "put_many"])
def test_a_call_cancelled_while_the_daemon_answers_lets_go_of_the_answer(daemon, monkeypatch, op):
    """An AsyncClient call cancelled while its Acquire or Reserve is answered (the daemon reading
    from NVMe, say): the answer came after the caller stopped waiting and was dropped, so its
    lease or reservation held blocks or arena bytes until the daemon's TTL (30 s)."""
    from kvtier import service
    items = [(key(("c", i)), os.urandom(MiB)) for i in range(4)]
    rpc = "Reserve" if op == "put_many" else "Acquire"
    real = getattr(service.KVTierService, rpc)

    def slow(self, request, context):  # the answer comes 0.4 s after the call
        async def run():
            time.sleep(0.4)
            return await real(self, request, context)
        return run()

    async def main():
        async with AsyncClient(daemon.address) as c:
            await c.put_many("ns", items if op != "put_many" else items[:1])
            assert c.path == "arena" and c.control == "data"
            monkeypatch.setattr(service.KVTierService, rpc, slow)
            call = {"get_many": lambda: c.get_many("ns", [k for k, _ in items]),
                    "acquire": lambda: c.acquire("ns", [k for k, _ in items]),
                    "put_many": lambda: c.put_many("ns", items[1:])}[op]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(call(), 0.1)
            monkeypatch.undo()
            for _ in range(60):
                t = (await c.stats()).tiers[0]
                if t.leased_blocks == t.reserved_bytes == 0:
                    break
                await asyncio.sleep(0.05)
            assert (t.leased_blocks, t.reserved_bytes) == (0, 0)
    asyncio.run(main())


def test_cancelling_a_call_to_a_stalled_daemon_is_prompt(daemon_process):
    """A unary call on the data channel to a daemon that answers nothing (stopped, swapping),
    cancelled by asyncio.wait_for: the caller waited for the worker thread, up to the client's
    whole timeout (for ever with timeout=None)."""
    import signal
    d = daemon_process()

    def state(pid) -> str:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    async def main():
        async with AsyncClient(d.address, timeout=8.0) as c:
            await c.lookup("ns", [b"k" * 16])
            assert c.control == "data"
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                wait_until(lambda: state(d.proc.pid) == "T", what="the daemon stopped")
                t0 = time.monotonic()
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.lookup("ns", [b"k" * 16]), 0.5)
                took = time.monotonic() - t0
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            assert took < 2.0
            assert (await c.lookup("ns", [b"k" * 16]))[1] == 0  # and the client goes on
    asyncio.run(main())


def test_an_async_clients_large_arena_copies_leave_its_event_loop_free(daemon, monkeypatch):
    """An AsyncClient copied blocks into and out of the arena on its event loop's thread: a large
    put_many or get_many stalled every other task of the loop for the whole copy. A batch of at
    least ASYNC_COPY_MIN bytes is copied in a worker thread now; a small one stays on the loop."""
    items = [(key(("loop", i)), os.urandom(MiB)) for i in range(4)]
    small = [(key(("small", i)), b"s" * 4096) for i in range(4)]
    seen: list = []
    real = C._copy_all

    def spy(jobs):
        seen.append(threading.current_thread() is threading.main_thread())
        return real(jobs)
    monkeypatch.setattr(C, "_copy_all", spy)

    async def main():
        async with AsyncClient(daemon.address) as c:
            await c.put_many("ns", items)
            assert await c.get_many("ns", [k for k, _ in items], into=[bytearray(MiB) for _ in items]) \
                == [v for _, v in items]
            assert seen == [False, False]  # neither on the loop's thread
            seen.clear()
            await c.put_many("ns", small)
            assert await c.get_many("ns", [k for k, _ in small]) == [v for _, v in small]
            assert seen == [True]  # the small put's copy on the loop; a get without into copies itself
    asyncio.run(main())


def test_a_cancelled_grpc_get_ends_its_stream_on_the_daemon(make_daemon):
    """An AsyncClient's get_many over gRPC cancelled mid-stream (asyncio.wait_for) left the
    daemon's Get stream open, blocked on flow control, holding its lease until lease_ms and its
    memory until the client closed: a long-lived engine client piled them up."""
    d = make_daemon(ram={"lease_ms": 60_000})
    keys = [key(("g", i)) for i in range(4)]

    async def main():
        async with AsyncClient(d.address) as w:
            await w.put_many("ns", [(k, os.urandom(4 * MiB)) for k in keys])
        c = AsyncClient(d.address, attach=False, data_channel=False)
        try:
            await c.lookup("ns", keys)
            assert c.path == "grpc"
            cancelled = 0
            for i in range(40):
                try:
                    await asyncio.wait_for(c.get_many("ns", keys), 0.002 + 0.001 * (i % 20))
                except asyncio.TimeoutError:
                    cancelled += 1
            assert cancelled
            for _ in range(100):  # the daemon sees the cancels: no stream keeps its lease
                if (await c.stats()).leases == 0:
                    break
                await asyncio.sleep(0.05)
            assert (await c.stats()).leases == 0
        finally:
            await c.close()
    asyncio.run(main())


def test_closing_an_async_client_fails_its_grpc_calls_in_flight_as_unavailable(daemon_process):
    """close() with gRPC calls in flight on other tasks: they raised asyncio.CancelledError (their
    tasks were never cancelled: a TaskGroup or gather took it for a cancel of its own) or grpc's
    UsageError. They fail with Unavailable, as on the other paths."""
    import signal
    from kvtier import errors
    d = daemon_process()

    async def main():
        c = AsyncClient(d.address, attach=False, data_channel=False)
        await c.lookup("ns", [b"k" * 16])
        os.kill(d.proc.pid, signal.SIGSTOP)  # the calls stay in flight until close()
        try:
            calls = [asyncio.ensure_future(c.lookup("ns", [b"k" * 16])) for _ in range(3)]
            calls.append(asyncio.ensure_future(c.get_many("ns", [b"k" * 16])))
            await asyncio.sleep(0.2)
            await c.close()
            got = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert all(isinstance(g, errors.Unavailable) for g in got), got
    asyncio.run(main())
