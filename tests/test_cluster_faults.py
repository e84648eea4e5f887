"""The cluster tier when its servers misbehave: stopped (up, answering nothing), out of memory,
holding values kvtier cannot read, or moving slots. Real Valkey servers on loopback, started
and stopped by each test (``valkey_servers``)."""
from __future__ import annotations

import asyncio
import time

from kvtier import record
from test_cluster import put_all, run, tier

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, valkey_cluster, make_valkey, make_cluster

NS = "faults"


def test_a_stopped_server_costs_one_timeout_then_misses_at_once_until_it_answers(make_valkey):
    """SIGSTOP: the kernel still completes TCP handshakes, so a reconnection succeeds and only
    the request after it times out. The server stays down (and the tier disconnected) until
    the maintenance task's PING is answered; callers meanwhile miss at once, not after a
    timeout at every backoff step."""
    srv = make_valkey()
    k = b"k" * 16

    async def go():
        async with tier(srv.url, timeout_ms=400, reconnect_max_s=0.2) as t:
            await put_all(t, NS, {k: b"v" * 1000})
            srv.pause()
            try:
                assert await t.get(NS, k) is None  # the one timeout
                slow, connected, calls = 0, 0, 0
                until = time.monotonic() + 2.5
                while time.monotonic() < until:
                    t0 = time.monotonic()
                    assert await t.get(NS, k) is None
                    assert await t.exists_many(NS, [k]) == [False]
                    slow += time.monotonic() - t0 >= 0.35
                    connected += t.snapshot()["connected"]
                    calls += 1
                    await asyncio.sleep(0.02)
                s = t.snapshot()
                # the maintenance task's probes time out (about once per backoff step); callers do not
                assert slow <= 1 and calls > 20, (slow, calls)
                assert connected == 0 and s["timeouts"] >= 2 and s["unavailable"] >= calls
            finally:
                srv.resume()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if t.snapshot()["connected"]:
                    break
            assert t.snapshot()["connected"] and t.snapshot()["reconnects"] == 1
            assert bytes((await t.get(NS, k))[0]) == b"v" * 1000

    run(go())
