"""Per-tenant Redis quotas against real Valkey (one server, and a 3-master cluster).

A tenant over its ``redis_quota`` loses its own least recently used blocks, never another
tenant's; daemons sharing the server enforce one quota; a reload changes it; blocks that
expired or vanished count as freed. Each test uses its own key prefix on the shared server.
"""
import hashlib
import os
import time
import urllib.request
import uuid


from kvtier.client import Client
from kvtier.clusterquota import tenant_keys
from conftest import wait_until

pytest_plugins = ["valkey_servers"]  # fixtures: valkey, valkey_cluster

TOKEN_A, TOKEN_B = "token-of-a-" + "q" * 20, "token-of-b-" + "r" * 20
BLOCK = 200_000


def _sha(t):
    return hashlib.sha256(t.encode()).hexdigest()


def _write_tenants(path, quota_a):
    path.write_text(f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN_A)}"]\nnamespaces = ["a-*"]\n'
                    f'redis_quota = {quota_a}\n'
                    f'[tenants.b]\ntoken_sha256 = ["{_sha(TOKEN_B)}"]\nnamespaces = ["b-*"]\n')
    return str(path)


def _daemon(make_daemon, tenants, url, prefix, cluster=False, metrics=False, **cluster_kw):
    return make_daemon(auth={"tenants_file": tenants}, metrics={"listen": "127.0.0.1:0" if metrics else ""},
                       cluster={"url": url, "cluster": cluster, "prefix": prefix, "timeout_ms": 3000,
                                "reconnect_max_s": 0.5, **cluster_kw})


def _cluster_tier(c):
    return next(t for t in c.stats().tiers if t.name == "cluster")


def _put_drained(st, c, ns, key, value):
    """Put one block and wait until its write to Valkey finished (so LRU order is write order).
    The write-through is queued on the daemon's loop after the put returns: wait for the record
    itself, not only for an empty queue."""
    c.put(ns, key, value)
    wait_until(lambda: key in st.blocks(ns), what="the record in Valkey")
    wait_until(lambda: _cluster_tier(c).queued_bytes == 0, what="write-through")


class Store:
    """What Valkey really holds: the blocks of a namespace and a tenant's accounting."""

    def __init__(self, clients, prefix):
        self.clients, self.prefix = clients, prefix

    def blocks(self, ns) -> dict:
        """block key -> value bytes (all parts) for every block of ns, over every master."""
        out = {}
        for r in self.clients:
            for name in r.scan_iter(match=f"{self.prefix}:{ns}:*", count=1000):
                key = bytes.fromhex(name.split(b"{")[1].split(b"}")[0].decode())
                out[key] = out.get(key, 0) + r.strlen(name)
        return out

    def used(self, tenant) -> int:
        k = tenant_keys(self.prefix.encode(), tenant)[3]
        return sum(int(r.get(k) or 0) for r in self.holding(k))

    def holding(self, key) -> list:
        """The servers that hold key (in a cluster, only its slot's master answers for it)."""
        return [r for r in self.clients if any(r.scan_iter(match=key, count=1000))]


def _sample(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}")


def _key(i, tag=0):
    return bytes([tag, i]) * 8


def test_quota_evicts_the_tenants_own_lru_blocks_only(make_daemon, valkey, tmp_path):
    prefix = "q" + uuid.uuid4().hex[:8]
    quota = 1 << 20
    d = _daemon(make_daemon, _write_tenants(tmp_path / "t.toml", quota), valkey.url, prefix, metrics=True)
    st = Store([valkey.client()], prefix)
    with Client(d.address, token=TOKEN_A) as a, Client(d.address, token=TOKEN_B) as b:
        b_blocks = {_key(i, 9): os.urandom(BLOCK) for i in range(6)}  # b has no quota: 1.2 MB
        for k, v in b_blocks.items():
            _put_drained(st, b, "b-x", k, v)
        for i in range(10):
            _put_drained(st, a, "a-x", _key(i), os.urandom(BLOCK))
        held = st.blocks("a-x")
        one = max(held.values())
        fit = quota // one
        assert 0 < fit < 10
        assert sorted(held) == sorted(_key(i) for i in range(10 - fit, 10))  # the newest that fit
        assert sum(held.values()) <= quota and st.used("a") == sum(held.values())
        assert sorted(st.blocks("b-x")) == sorted(b_blocks)  # b lost nothing
        assert b.get_many("b-x", list(b_blocks)) == list(b_blocks.values())
        assert _cluster_tier(a).evictions == 10 - fit
        a.put("a-x", b"L" * 16, os.urandom(quota + 1))  # larger than the whole quota: never written
        wait_until(lambda: _cluster_tier(a).queued_bytes == 0, what="refused write")
        assert b"L" * 16 not in st.blocks("a-x") and len(st.blocks("a-x")) == fit
        assert _cluster_tier(a).dropped_writes == 1  # the refused write, counted once
        assert a.get("a-x", b"L" * 16) is not None  # still served from this node's RAM
    text = urllib.request.urlopen(f"http://{d.daemon.metrics.address}/metrics", timeout=5).read().decode()
    assert _sample(text, "kvtier_cluster_quota_refused_total") == 1
    assert _sample(text, 'kvtier_tier_evictions_total{tier="cluster"}') == 10 - fit
    assert _sample(text, 'kvtier_cluster_tenant_quota_bytes{tenant="a"}') == quota
    assert _sample(text, 'kvtier_cluster_tenant_bytes{tenant="a"}') == st.used("a")


def test_two_daemons_share_one_quota_and_reads_refresh_recency(make_daemon, valkey, tmp_path):
    prefix = "q" + uuid.uuid4().hex[:8]
    quota = 1 << 20
    tenants = _write_tenants(tmp_path / "t.toml", quota)
    d1 = _daemon(make_daemon, tenants, valkey.url, prefix)
    d2 = _daemon(make_daemon, tenants, valkey.url, prefix)
    st = Store([valkey.client()], prefix)
    with Client(d1.address, token=TOKEN_A) as a1, Client(d2.address, token=TOKEN_A) as a2:
        for i in range(10):
            _put_drained(st, a1 if i % 2 else a2, "a-x", _key(i), os.urandom(BLOCK))
        held = st.blocks("a-x")
        fit = quota // max(held.values())
        assert sorted(held) == sorted(_key(i) for i in range(10 - fit, 10))  # one quota over both writers
        assert sum(held.values()) <= quota and st.used("a") == sum(held.values())
        assert _cluster_tier(a1).evictions + _cluster_tier(a2).evictions == 10 - fit

        oldest = _key(10 - fit)
        via = a1 if (10 - fit) % 2 == 0 else a2  # the daemon that did not write it reads it from Valkey
        assert via.get("a-x", oldest) is not None and _cluster_tier(via).hits == 1
        lru = tenant_keys(prefix.encode(), "a")[0]
        r = valkey.client()
        name = f"{prefix}:a-x:{{{oldest.hex()}}}".encode()
        wait_until(lambda: r.zrank(lru, name) == fit - 1, what="the read to refresh the block's recency")
        _put_drained(st, a1, "a-x", _key(20), os.urandom(BLOCK))
        held = st.blocks("a-x")
        assert oldest in held and _key(10 - fit + 1) not in held  # the next oldest went instead


def test_reload_lowers_the_quota_and_evicts_at_once(make_daemon, valkey, tmp_path):
    prefix = "q" + uuid.uuid4().hex[:8]
    path = tmp_path / "t.toml"
    d = _daemon(make_daemon, _write_tenants(path, 1 << 20), valkey.url, prefix)
    st = Store([valkey.client()], prefix)
    with Client(d.address, token=TOKEN_A) as a, Client(d.address, token=TOKEN_B) as b:
        for i in range(4):
            _put_drained(st, a, "a-x", _key(i), os.urandom(BLOCK))
            _put_drained(st, b, "b-x", _key(i, 9), os.urandom(BLOCK))
        assert len(st.blocks("a-x")) == 4
        one = max(st.blocks("a-x").values())
        low = 2 * one + 10
        _write_tenants(path, low)
        d.daemon.request_reload()  # what SIGHUP does
        wait_until(lambda: len(st.blocks("a-x")) == 2, what="the lowered quota to evict")
        assert sorted(st.blocks("a-x")) == sorted([_key(2), _key(3)])
        assert st.used("a") == sum(st.blocks("a-x").values()) <= low
        assert len(st.blocks("b-x")) == 4
        _put_drained(st, a, "a-x", _key(4), os.urandom(BLOCK))  # writes keep to the new quota
        assert sorted(st.blocks("a-x")) == sorted([_key(3), _key(4)])


def test_expired_and_vanished_blocks_count_as_freed(make_daemon, valkey, tmp_path):
    prefix = "q" + uuid.uuid4().hex[:8]
    quota = 1 << 20
    d = _daemon(make_daemon, _write_tenants(tmp_path / "t.toml", quota), valkey.url, prefix,
                namespace_ttl_s={"a-tmp": 1}, timeout_ms=1000)
    st = Store([valkey.client()], prefix)
    r = valkey.client()
    with Client(d.address, token=TOKEN_A) as a:
        for i in range(3):
            _put_drained(st, a, "a-tmp", _key(i, 5), os.urandom(BLOCK))
        assert st.used("a") == sum(st.blocks("a-tmp").values()) > 0
        wait_until(lambda: not st.blocks("a-tmp"), timeout=10, what="Redis to expire the blocks")
        time.sleep(1.2)  # past the accounted expiry (the record's, plus the write timeout)
        _put_drained(st, a, "a-x", _key(0), os.urandom(BLOCK))
        assert st.used("a") == sum(st.blocks("a-x").values())  # expired blocks no longer count
        assert _cluster_tier(a).evictions == 0

        r.unlink(f"{prefix}:a-x:{{{_key(0).hex()}}}".encode())  # gone behind the tier's back
        for i in range(1, 8):
            _put_drained(st, a, "a-x", _key(i), os.urandom(BLOCK))
        held = st.blocks("a-x")
        fit = quota // max(held.values())
        assert sorted(held) == sorted(_key(i) for i in range(8 - fit, 8))
        assert st.used("a") == sum(held.values()) <= quota
        t = _cluster_tier(a)
        assert t.io_errors == 0 and t.dropped_writes == 0


def test_quota_in_a_valkey_cluster(make_daemon, valkey_cluster, tmp_path):
    prefix = "q" + uuid.uuid4().hex[:8]
    quota = 1 << 20
    d = _daemon(make_daemon, _write_tenants(tmp_path / "t.toml", quota), valkey_cluster.url, prefix,
                cluster=True)
    masters = [m.client() for m in valkey_cluster.masters()]
    st = Store(masters, prefix)
    with Client(d.address, token=TOKEN_A) as a, Client(d.address, token=TOKEN_B) as b:
        b_keys = [_key(i, 9) for i in range(6)]
        for k in b_keys:
            _put_drained(st, b, "b-x", k, os.urandom(BLOCK))
        for i in range(12):
            _put_drained(st, a, "a-x", _key(i), os.urandom(BLOCK))
        held = st.blocks("a-x")
        fit = quota // max(held.values())
        assert sorted(held) == sorted(_key(i) for i in range(12 - fit, 12))
        assert sum(held.values()) <= quota and st.used("a") == sum(held.values())
        assert sorted(st.blocks("b-x")) == sorted(b_keys)
        spread = [m for m in masters if any(m.scan_iter(match=f"{prefix}:a-x:*"))]
        assert len(spread) >= 2  # a's blocks live on several masters; its accounting on one
        acct = tenant_keys(prefix.encode(), "a")
        assert len(st.holding(acct[1])) == 1 and st.holding(acct[1]) == st.holding(acct[0])
        assert _cluster_tier(a).evictions == 12 - fit


def test_tier_accounts_only_tenants_and_escapes_odd_names(valkey):
    """No tenants: no accounting keys at all. A tenant name that would break the hash tag is
    hex-encoded, and its quota still holds."""
    import asyncio

    from kvtier import config, record
    from kvtier.cluster import ClusterTier

    prefix = "q" + uuid.uuid4().hex[:8]
    r = valkey.client()

    async def put(t, ns, k, v):
        done = asyncio.Event()
        assert t.enqueue_put(ns, k, v, record.checksum(v), done.set)
        await asyncio.wait_for(done.wait(), 20)

    async def go():
        t = ClusterTier(config.from_dict({"cluster": {"url": valkey.url, "prefix": prefix}}).cluster)
        await t.start()
        try:
            await put(t, "x1", _key(0), os.urandom(1000))
            assert not list(r.scan_iter(match=f"{prefix}:tenant:*"))
            quota = 3 * r.strlen(f"{prefix}:x1:{{{_key(0).hex()}}}") + 10  # three blocks of the same size
            odd = "we}ird{"
            t.set_tenants(lambda ns: odd if ns.startswith("w") else "", {odd: quota})
            for i in range(5):
                await put(t, "w1", _key(i), os.urandom(1000))
            assert await t.exists_many("w1", [_key(i) for i in range(5)]) == [False] * 2 + [True] * 3
            keys = tenant_keys(prefix.encode(), odd)
            assert b"we}ird{" not in keys[0] and int(r.get(keys[3])) <= quota
            assert t.snapshot()["evictions"] == 2
            assert await t.delete_many("w1", [_key(4)]) == 1
            assert int(r.get(keys[3])) == sum(r.strlen(f"{prefix}:w1:{{{_key(i).hex()}}}") for i in (2, 3))
        finally:
            await t.close(2)

    asyncio.run(asyncio.wait_for(go(), 60))
