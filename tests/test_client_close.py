"""close() while calls are in flight on other threads or tasks: a reservation or lease the daemon
answers after it is aborted or released before the call raises, so the daemon holds nothing
until a TTL runs out; a call over gRPC is not cut off by close() before its answer comes."""
from __future__ import annotations

import asyncio
import hashlib
import threading

import pytest

from kvtier import errors, service
from kvtier.client import AsyncClient, Client

from conftest import wait_until


def key(i) -> bytes:
    return hashlib.sha256(repr(i).encode()).digest()[:16]


STORED = [(key(("s", i)), bytes([i]) * 65536) for i in range(4)]
NEW = [(key(("n", i)), bytes([i]) * 65536) for i in range(4)]
CALLS = {  # op -> (the daemon's RPC that is held back, the call)
    "reserve": ("Reserve", lambda c: c.reserve("ns", [k for k, _ in NEW], [len(v) for _, v in NEW])),
    "acquire": ("Acquire", lambda c: c.acquire("ns", [k for k, _ in STORED])),
    "put_many": ("Reserve", lambda c: c.put_many("ns", NEW)),
    "get_many": ("Acquire", lambda c: c.get_many("ns", [k for k, _ in STORED])),
}


class Gate:
    """Holds the daemon's handler of one RPC until opened: ``entered`` is set once a call is held."""

    def __init__(self, monkeypatch, rpc: str):
        self.entered, self.open = threading.Event(), threading.Event()
        real = getattr(service.KVTierService, rpc)
        gate = self

        async def held(self, request, context):
            gate.entered.set()
            if isinstance(context, service.ChannelContext):  # a CALL frame, on its connection's thread
                gate.open.wait(10)
            else:  # gRPC, on the daemon's event loop
                await asyncio.to_thread(gate.open.wait, 10)
            return await real(self, request, context)
        monkeypatch.setattr(service.KVTierService, rpc, held)


def nothing_held(d) -> None:
    """The daemon holds no reservation and no lease: at once, not after a TTL."""
    with Client(d.address, attach=False) as c:
        st = c.stats()
    assert (st.reservations, st.leases, st.tiers[0].reserved_bytes, st.tiers[0].leased_blocks) == (0, 0, 0, 0)


def close_during(c, call, gate: Gate):
    """Run call(c) on a thread, close c from another once the daemon holds the call, let the daemon
    answer after close() has begun; what the call returned or raised."""
    out: list = []

    def work():
        try:
            out.append(call(c))
        except Exception as e:
            out.append(e)
    t = threading.Thread(target=work)
    t.start()
    assert gate.entered.wait(10)
    closer = threading.Thread(target=c.close)
    closer.start()
    wait_until(lambda: c._ops.closed, 5, "close() begun")
    gate.open.set()
    t.join(10)
    closer.join(10)
    assert not t.is_alive() and not closer.is_alive()
    return out[0]


@pytest.mark.parametrize("op", sorted(CALLS))
@pytest.mark.parametrize("control", ["auto", "grpc"])
def test_what_a_call_gets_after_close_is_let_go(make_daemon, monkeypatch, op, control):
    rpc, call = CALLS[op]
    gate = Gate(monkeypatch, rpc)  # before the daemon starts: its gRPC server takes the handlers then
    d = make_daemon()
    c = Client(d.address, control=control)
    gate.open.set()
    c.put_many("ns", STORED)
    assert c.path == "arena" and c.control == ("data" if control == "auto" else "grpc")
    gate.open.clear()
    gate.entered.clear()
    got = close_during(c, call, gate)
    assert isinstance(got, errors.Unavailable) and "closed" in str(got), got
    nothing_held(d)


@pytest.mark.parametrize("op", ["acquire", "put_many"])
def test_what_an_async_call_gets_after_close_is_let_go(daemon, monkeypatch, op):
    rpc, call = CALLS[op]

    async def main():
        c = AsyncClient(daemon.address)
        await c.put_many("ns", STORED)
        assert c.path == "arena" and c.control == "data"
        gate = Gate(monkeypatch, rpc)
        t = asyncio.ensure_future(call(c))
        assert await asyncio.to_thread(gate.entered.wait, 10)
        closing = asyncio.ensure_future(c.close())
        while not c._ops.closed:
            await asyncio.sleep(0.001)
        gate.open.set()
        with pytest.raises(errors.Unavailable, match="closed"):
            await t
        await closing
    asyncio.run(main())
    nothing_held(daemon)
