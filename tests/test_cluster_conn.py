"""The cluster tier's connections under load and trouble (``kvtier.clusterconn``, ``kvtier.resp``):
a cancelled read into a caller's memory stops only its own requests, one outage seen by many
calls steps the backoff once, a long batch that keeps receiving is not a timeout, and a server
that answers no lookups is marked down. Real Valkey servers on loopback (``valkey_servers``)."""
from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

from kvtier import resp
from kvtier.resp import Connection
from kvtier.store import Store
from test_cluster import put_all, run, tier

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, valkey_cluster, make_valkey, make_cluster

NS = "conn"
MiB = 1 << 20


async def _until(cond, limit: float = 5.0, step: float = 0.01) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < limit, "condition not reached"
        await asyncio.sleep(step)


# ---- 1. a cancelled lent call disowns its own requests, nothing more ----------------------------

def test_a_disowned_reply_being_received_is_read_aside_and_the_connection_stays_in_step(valkey):
    """The payload of a bulk reply lands in the caller's buffer as it arrives. Disowned halfway
    (the caller gave up), the rest of it is read into scratch memory and dropped: the caller's
    buffer never changes again and the replies after it are read as themselves."""
    big = os.urandom(32 * MiB)
    valkey.client().set(b"kvt:conn:big", big)

    async def go():
        c = await Connection.open("127.0.0.1", valkey.port)
        try:
            buf = bytearray(len(big))
            began = asyncio.Event()

            class Sink:
                def begin(self, n, head):
                    began.set()
                    return buf

            with resp.Lending():
                f = c.request([(b"GET", b"kvt:conn:big")], [Sink()])
                await began.wait()
                assert c._body is not None          # halfway through the payload: the case under test
            seen = bytes(buf)
            assert f.cancelled()
            assert (await c.request([(b"PING",), (b"GET", b"kvt:conn:big")]))[0] == "PONG"
            assert (await c.request([(b"GET", b"kvt:conn:big")]))[0] == big
            assert buf == seen and not c.closed
            with resp.Lending() as lent:                 # nothing new is written once the lending ended
                pass
            assert lent.closed
        finally:
            c.abort()

    run(go())


def test_cancelling_a_read_into_a_callers_buffer_leaves_other_callers_and_the_server_alone(valkey):
    """An Acquire whose client gave up cancels a get_many reading into its arena slots: only that
    call's replies are dropped. Another caller's reads on the same connections all complete, the
    server stays up, no error is counted, and the arena is not written after the cancel."""
    blocks = {os.urandom(16): os.urandom(2 * MiB) for _ in range(24)}
    keys = list(blocks)

    async def go():
        async with tier(valkey.url, connections=2) as t:
            await put_all(t, NS, blocks)
            arena = bytearray(2 * MiB * 12)
            began = asyncio.Event()

            def into(i, n):
                began.set()
                return memoryview(arena)[i * 2 * MiB:i * 2 * MiB + n]

            a = asyncio.ensure_future(t.get_many(NS, keys[:12], into))
            b = asyncio.ensure_future(t.get_many(NS, keys[12:]))
            await began.wait()
            a.cancel()
            await asyncio.gather(a, return_exceptions=True)
            assert a.cancelled()
            seen = bytes(arena)
            got = await b
            assert [bytes(g[0]) for g in got] == [blocks[k] for k in keys[12:]]
            s = t.snapshot()
            assert s["connected"] and s["errors"] == 0 and s["unavailable"] == 0, s
            got = await t.get_many(NS, keys[:12])   # the connections are in step: every block reads back
            assert [bytes(g[0]) for g in got] == [blocks[k] for k in keys[:12]]
            assert arena == seen

    run(go())


# ---- 2. one outage, one backoff step ------------------------------------------------------------

def test_an_outage_seen_by_many_calls_steps_the_backoff_once(valkey):
    """Sixteen reads in flight when the connections reset all fail: the server is down for the
    first backoff step (0.1 s), not reconnect_max_s, and is back within a second. Only the
    maintenance task's failed probes double the backoff."""
    blocks = {os.urandom(16): os.urandom(1000) for _ in range(16)}
    keys = list(blocks)

    async def go():
        async with tier(valkey.url, connections=2, reconnect_max_s=5) as t:
            await put_all(t, NS, blocks)
            s, node = t.servers, t.servers.single
            valkey.pause()                          # the reads wait for answers...
            try:
                calls = [asyncio.ensure_future(t.get_many(NS, [k])) for k in keys]
                await _until(lambda: sum(len(c._pending) for c in node.conns) == 16)
                t0 = time.monotonic()
                for c in node.conns:                # ...when the connections reset under them
                    c.transport.abort()
                got = await asyncio.gather(*calls)
            finally:
                valkey.resume()
            assert got == [[None]] * 16 and t.snapshot()["errors"] == 16
            assert node.backoff == 0.1 and node.down_until - t0 < 0.15
            await _until(lambda: s.connected(), limit=1.0)
            assert node.backoff == 0.0
            # directly: callers failing while it is down change nothing; each failed probe doubles
            s.failed(node, ConnectionError("test"))
            until = node.down_until
            for _ in range(5):
                s.failed(node, ConnectionError("test"))
            assert node.backoff == 0.1 and node.down_until == until
            s.failed(node, ConnectionError("test"), probe=True)
            s.failed(node, ConnectionError("test"), probe=True)
            assert node.backoff == 0.4

    run(go())


# ---- 3. timeout_ms is time without progress ------------------------------------------------------

def test_a_batch_longer_than_timeout_ms_that_keeps_receiving_is_not_a_timeout(valkey):
    """timeout_ms bounds a call's time without any bytes from its server, not the whole call: a
    get_many that takes twice timeout_ms (its consumer is slow here) but keeps receiving reads
    every block, and the server stays up. A stopped server still times out (test_cluster_faults)."""
    blocks = {os.urandom(16): os.urandom(2 * MiB) for _ in range(10)}
    keys = list(blocks)

    async def go():
        async with tier(valkey.url, timeout_ms=300) as t:
            await put_all(t, NS, blocks)
            slots = [bytearray(2 * MiB) for _ in keys]

            def into(i, n):
                time.sleep(0.06)                    # a loop busy elsewhere: ~0.6 s for the batch
                return memoryview(slots[i])[:n]

            t0 = time.monotonic()
            got = await t.get_many(NS, keys, into)
            took = time.monotonic() - t0
            assert [g is not None for g in got] == [True] * len(keys)
            assert [bytes(g[0]) for g in got] == [blocks[k] for k in keys]
            assert took > 0.5
            s = t.snapshot()
            assert s["connected"] and s["timeouts"] == 0 and s["errors"] == 0, s

    run(go())


# ---- 4. lookups against a server that answers nothing -------------------------------------------

def _exists_within(t, keys):
    """Store._exists_within, the lookup path of Lookup and of a background Acquire."""
    return Store._exists_within(SimpleNamespace(cluster=t), NS, keys)


def test_a_server_that_answers_no_lookups_is_marked_down_after_three_cut_lookups(make_valkey):
    """Lookups are cut at lookup_timeout_ms, long before timeout_ms: three in a row that got no
    answer mark the server down (later lookups miss at once); an answer in between resets the
    count. Every cut lookup is a miss, counted in lookups_cut."""
    srv = make_valkey()
    k = os.urandom(16)

    async def go():
        async with tier(srv.url, timeout_ms=5000, lookup_timeout_ms=100, reconnect_max_s=5) as t:
            await put_all(t, NS, {k: b"v" * 1000})
            node = t.servers.single
            srv.pause()
            try:
                for _ in range(2):
                    assert await _exists_within(t, [k]) == [False]
            finally:
                srv.resume()
            assert await _exists_within(t, [k]) == [True]   # an answer: the count starts again
            assert t.stats.lookups_cut == 2 and node.up
            srv.pause()
            try:
                for _ in range(2):
                    assert await _exists_within(t, [k]) == [False]
                assert node.up                       # two in a row so far
                t0 = time.monotonic()
                assert await _exists_within(t, [k]) == [False]
                assert 0.09 < time.monotonic() - t0 < 0.5
                assert not node.up and "lookup_timeout_ms" in node.reason, node.reason
                t0 = time.monotonic()
                for _ in range(5):                   # down: later lookups miss at once
                    assert await _exists_within(t, [k]) == [False]
                assert time.monotonic() - t0 < 0.05
                s = t.snapshot()
                assert s["lookups_cut"] == 5 and s["timeouts"] == 1, s
            finally:
                srv.resume()
            await _until(lambda: node.up, limit=3.0)
            assert await _exists_within(t, [k]) == [True]

    run(go())
