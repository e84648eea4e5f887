"""Bounds on what one tenant can make the daemon hold: leases, per-namespace counters, pins.

Each test runs a daemon with two tenants and drives it as a client would (with a bound lowered
where reaching the real one would take minutes)."""
import hashlib
import os
import urllib.request

import pytest

from kvtier import errors
from kvtier import hot as H
from kvtier.client import Client

TOKEN_A, TOKEN_B = "token-of-a-" + "x" * 20, "token-of-b-" + "y" * 20
MiB = 1 << 20


def _sha(t):
    return hashlib.sha256(t.encode()).hexdigest()


def _tenants(tmp_path, quota: str = "") -> dict:
    q = f'ram_quota = "{quota}"\n' if quota else ""
    p = tmp_path / "tenants.toml"
    p.write_text(f'[tenants.a]\ntoken_sha256 = ["{_sha(TOKEN_A)}"]\nnamespaces = ["a", "a-*"]\n{q}'
                 f'[tenants.b]\ntoken_sha256 = ["{_sha(TOKEN_B)}"]\nnamespaces = ["b", "b-*"]\n{q}')
    return {"tenants_file": str(p)}


def _held(hot) -> int:
    """Block references the daemon's live leases hold."""
    with hot.lock:
        return sum(len(lease.blocks) for lease in hot._leases.values())


def test_a_key_repeated_in_one_acquire_is_leased_once(make_daemon, tmp_path):
    d = make_daemon(auth=_tenants(tmp_path))
    k = os.urandom(16)
    with Client(d.address, token=TOKEN_A) as a:
        a.put("a", k, b"x" * 4096)
        lease = a.acquire("a", [k] * 4096, lease_ms=600_000)
        assert list(lease.tiers) == [1] * 4096  # answered at every position
        assert _held(d.daemon.hot) == 1
        a.release(lease)
        assert a.stats().tiers[0].leased_blocks == 0


def test_live_leases_per_tenant_are_bounded(make_daemon, tmp_path, monkeypatch):
    monkeypatch.setattr(H, "TENANT_LEASES", 8, raising=False)
    d = make_daemon(auth=_tenants(tmp_path))
    ka, kb = os.urandom(16), os.urandom(16)
    with Client(d.address, token=TOKEN_A) as a, Client(d.address, token=TOKEN_B) as b:
        a.put("a", ka, b"x" * 4096)
        b.put("b", kb, b"y" * 4096)
        leases = [a.acquire("a", [ka], lease_ms=600_000) for _ in range(8)]
        with pytest.raises(errors.ResourceExhausted, match="tenant a: 8 live leases"):
            a.acquire("a", [ka], lease_ms=600_000)
        assert a.stats().leases == 8  # the refused one holds nothing
        other = b.acquire("b", [kb])  # another tenant's leases are its own
        assert list(other.tiers) == [1]
        a.release(leases.pop())
        a.release(a.acquire("a", [ka]))  # room again after a release
        for lease in leases + [other]:
            (a if lease in leases else b).release(lease)


def test_blocks_held_by_a_tenants_leases_are_bounded(make_daemon, tmp_path, monkeypatch):
    monkeypatch.setattr(H, "TENANT_LEASED", 100, raising=False)
    d = make_daemon(auth=_tenants(tmp_path))
    keys = [os.urandom(16) for _ in range(60)]
    with Client(d.address, token=TOKEN_A) as a:
        a.put_many("a-x", [(k, b"x" * 4096) for k in keys])
        first = a.acquire("a-x", keys, lease_ms=600_000)
        with pytest.raises(errors.ResourceExhausted, match="tenant a: leases hold 60 blocks"):
            a.acquire("a-x", keys, lease_ms=600_000)
        assert _held(d.daemon.hot) == 60
        a.release(first)
        a.release(a.acquire("a-x", keys))


def _scrape(d) -> str:
    with urllib.request.urlopen(f"http://{d.daemon.metrics.address}/metrics", timeout=5) as r:
        return r.read().decode()


def test_namespaces_named_without_writing_do_not_pile_up(make_daemon, tmp_path, monkeypatch):
    monkeypatch.setattr(H, "IDLE_NAMESPACES", 32, raising=False)
    d = make_daemon(auth=_tenants(tmp_path), metrics={"listen": "127.0.0.1:0"})
    k = os.urandom(16)
    with Client(d.address, token=TOKEN_A) as a:
        a.put("a-kept", k, b"x" * 4096)
        assert list(a.acquire("a-kept", [k], counted=True).tiers) == [1]
        before = len(_scrape(d))
        for i in range(400):
            a.lookup(f"a-{i:08d}", [k])
            assert list(a.acquire(f"a-m{i:08d}", [k]).tiers) == [0]
        st = a.stats()
    names = [n.name for n in st.namespaces]
    assert "a-kept" in names and len(names) <= 2 + 32 + 1
    kept = next(n for n in st.namespaces if n.name == "a-kept")
    assert (kept.puts, kept.hits) == (1, 1)  # a namespace holding blocks keeps its counters
    assert st.tiers[0].misses == 400  # every miss still in the daemon's total
    text = _scrape(d)
    assert len(text) < before + 40 * 1000 and 'namespace="a-kept"' in text


def test_a_tenant_pins_at_most_its_share_of_its_quota(make_daemon, tmp_path):
    # pinned blocks may hold 16 MiB (half the arena); each tenant half of its 12 MiB quota
    d = make_daemon(auth=_tenants(tmp_path, "12MiB"), ram={"capacity": "32MiB", "max_pinned": 0.5})
    with Client(d.address, token=TOKEN_A) as a, Client(d.address, token=TOKEN_B) as b:
        ak = [os.urandom(16) for _ in range(11)]
        a.put_many("a-pin", [(k, b"a" * MiB) for k in ak])
        assert sum(a.pin("a-pin", ak)) == 6  # pinned for ever, as far as its share goes
        bk = [os.urandom(16) for _ in range(8)]
        b.put_many("b-pin", [(k, b"b" * MiB) for k in bk])
        assert sum(b.pin("b-pin", bk)) == 6  # a took none of b's share


def test_at_the_lease_bound_a_read_from_nvme_is_refused_before_it_reads(make_daemon, tmp_path, monkeypatch,
                                                                        caplog):
    """A tenant at its bound on live leases asked for blocks that were only on NVMe: they were read
    up from disk, each lease then refused inside the promotion, logged as a failed promotion with
    a traceback, and answered as misses. The Acquire is refused before any read, as one for blocks
    in RAM is."""
    monkeypatch.setattr(H, "TENANT_LEASES", 1, raising=False)
    d = make_daemon(auth=_tenants(tmp_path), ram={"capacity": "8MiB"},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "commit"})
    store = d.daemon.store
    keep = os.urandom(16)
    cold = [os.urandom(16) for _ in range(2)]
    with Client(d.address, token=TOKEN_A) as a:
        a.put_many("a", [(k, os.urandom(MiB)) for k in cold])
        a.put("a", keep, b"x" * 4096)
        for i in range(12):  # 12 MiB through 8 MiB of RAM: the cold ones leave it, kept on NVMe
            a.put("a-fill", bytes([i]) * 16, os.urandom(MiB))
        assert a.lookup("a", cold)[0] == [2, 2]
        held = a.acquire("a", [keep], lease_ms=600_000)  # the one lease tenant a may hold
        promotions = store.promotions
        caplog.set_level("ERROR", logger="kvtier")
        with pytest.raises(errors.ResourceExhausted, match="tenant a: 1 live leases"):
            a.acquire("a", cold)
        assert store.promotions == promotions and not caplog.records  # nothing read, nothing logged
        a.release(held)
        lease = a.acquire("a", cold)  # under the bound again: read up as before
        assert list(lease.tiers) == [2, 2]
        a.release(lease)
