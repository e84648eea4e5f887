"""Prometheus exposition: the families operators need, moving with traffic, accepted by promtool,
and charted by configs/grafana-kvtier.json."""
import os
import shutil
import subprocess
import urllib.request

import pytest

from kvtier.client import Client

pytest_plugins = ["valkey_servers"]  # fixture: valkey (the dashboard test exports the cluster tier's metrics)


def _scrape(d) -> str:
    addr = d.daemon.metrics.address
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def _value(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {line_prefix!r}")


@pytest.fixture
def metered(make_daemon, tmp_path):
    return make_daemon(metrics={"listen": "127.0.0.1:0"}, ram={"capacity": "8MiB"},
                       nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "evict"})


def test_metrics_move_with_traffic(metered):
    keys = [os.urandom(16) for _ in range(12)]
    with Client(metered.address) as c:
        c.put_many("team-a", [(k, os.urandom(1 << 20)) for k in keys])   # 12 MiB into 8 MiB: evictions
        c.get_many("team-a", keys[-2:])                                     # RAM hits
        c.get_many("team-a", [os.urandom(16)])                              # a miss
        c.get_many("team-a", keys[:1])                                      # from NVMe
    text = _scrape(metered)
    assert _value(text, 'kvtier_put_blocks_total{namespace="team-a"}') == 12
    assert _value(text, 'kvtier_misses_total{namespace="team-a"}') == 1
    assert _value(text, 'kvtier_hits_total{namespace="team-a",tier="ram"}') == 2
    assert _value(text, 'kvtier_hits_total{namespace="team-a",tier="nvme"}') == 1
    assert _value(text, 'kvtier_tier_evictions_total{tier="ram"}') >= 4
    assert _value(text, "kvtier_nvme_demotions_total") >= 4
    assert _value(text, "kvtier_nvme_promotions_total") == 1
    assert _value(text, 'kvtier_tier_capacity_bytes{tier="ram"}') > 7 << 20
    assert _value(text, 'kvtier_rpc_duration_seconds_count{code="OK",method="Acquire"}') == 3
    assert "kvtier_arena_locked" in text and "kvtier_hit_ratio" in text and "kvtier_nvme_queue_bytes" in text


def test_data_channel_reads_and_writes_are_timed_as_rpcs(metered):
    """Clients on the data channel (every remote client, and local ones without the arena) made
    no entry in kvtier_rpc_duration_seconds: the RPC panels showed nothing of their traffic."""
    with Client(metered.address, attach=False) as c:
        assert c.path in ("", "data")
        c.put_many("dc", [(bytes([i]) * 16, b"x" * 4096) for i in range(3)])
        assert c.path == "data"
        c.get_many("dc", [bytes([i]) * 16 for i in range(3)])
        from kvtier.datachannel import DataConnection
        one = DataConnection(c.info.data_address)
        one.version = 1  # a client of the first version: a frame per block
        try:
            one.put_many("dc", [(b"k" * 16, b"y" * 100)])
            assert bytes(one.get_many("dc", [b"k" * 16])[0][0]) == b"y" * 100
        finally:
            one.close()
    text = _scrape(metered)
    assert _value(text, 'kvtier_rpc_duration_seconds_count{code="OK",method="data.PUT_MANY"}') >= 1
    assert _value(text, 'kvtier_rpc_duration_seconds_count{code="OK",method="data.GET_MANY"}') >= 1
    assert _value(text, 'kvtier_rpc_duration_seconds_count{code="OK",method="data.PUT"}') == 1
    assert _value(text, 'kvtier_rpc_duration_seconds_count{code="OK",method="data.GET"}') == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_exposition(metered):
    with Client(metered.address) as c:
        c.put("team-a", os.urandom(16), b"x" * 5000)
        try:
            c.reserve("team-a", [b"short"], [1])
        except Exception:
            pass
    text = _scrape(metered)
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_metrics_off_and_port_in_use(make_daemon):
    off = make_daemon()
    assert off.daemon.metrics.address == ""
    on = make_daemon(metrics={"listen": "127.0.0.1:0"})
    port = on.daemon.metrics.address.rsplit(":", 1)[1]
    clash = make_daemon(metrics={"listen": f"127.0.0.1:{port}"})  # runs anyway, without metrics
    assert clash.daemon.metrics.address == ""
    with Client(clash.address) as c:
        c.put("x", os.urandom(16), b"ok")


@pytest.mark.parametrize("path", ["arena", "data", "grpc"])
def test_a_get_many_counts_as_its_caller_says(metered, path):
    """A worker that cannot map the arena reads what its scheduler looked up with get_many: the
    read counts its tokens, and no hit, miss or byte a second time, on every path."""
    keys = [os.urandom(16) for _ in range(4)]
    with Client(metered.address, attach=path == "arena", data_channel=path != "grpc") as c:
        c.put_many("team-g", [(k, os.urandom(4096)) for k in keys[:3]])
        assert c._ops.path == path
        before = {n.name: n for n in c.stats().namespaces}["team-g"]
        got = c.get_many("team-g", keys, counted=False, tokens_per_key=16)   # 3 of 4 found
        assert [g is not None for g in got] == [True, True, True, False]
        after = {n.name: n for n in c.stats().namespaces}["team-g"]
        assert (after.hits, after.misses, after.get_bytes) == (before.hits, before.misses, before.get_bytes)
        assert after.prefill_tokens_saved == before.prefill_tokens_saved + 3 * 16
        c.get_many("team-g", keys)                                           # counted as before
        last = {n.name: n for n in c.stats().namespaces}["team-g"]
        assert (last.hits, last.misses) == (after.hits + 3, after.misses + 1)
        assert last.prefill_tokens_saved == after.prefill_tokens_saved


def test_prefill_tokens_saved_per_namespace(metered):
    keys = [os.urandom(16) for _ in range(4)]
    with Client(metered.address) as c:
        c.put_many("team-a", [(k, os.urandom(4096)) for k in keys[:3]])
        lease = c.acquire("team-a", keys, tokens_per_key=64)   # 3 of 4 found
        c.release(lease)
        c.release(c.acquire("team-a", keys[:2]))               # the client did not say: counts nothing
        hits = {n.name: n for n in c.stats().namespaces}["team-a"].hits
        # a read an earlier Acquire counted (an engine's worker): its tokens count, its hits do not
        c.release(c.acquire("team-a", keys[:2], tokens_per_key=10, counted=False))
        assert {n.name: n for n in c.stats().namespaces}["team-a"].hits == hits
        lease = c.acquire("team-b", keys, tokens_per_key=64)   # nothing found: nothing saved
        c.release(lease)
        stats = {n.name: n for n in c.stats().namespaces}
    text = _scrape(metered)
    assert _value(text, 'kvtier_prefill_tokens_saved_total{namespace="team-a"}') == 3 * 64 + 2 * 10
    assert _value(text, 'kvtier_prefill_tokens_saved_total{namespace="team-b"}') == 0
    assert stats["team-a"].prefill_tokens_saved == 3 * 64 + 2 * 10 and stats["team-b"].prefill_tokens_saved == 0
    from kvtier import cli
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["stats", "--address", metered.address]) == 0
    row = next(line.split() for line in out.getvalue().splitlines() if line.startswith("team-a "))
    assert row[-1] == str(3 * 64 + 2 * 10)


# ---- the Grafana dashboard ------------------------------------------------------------------------

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "configs", "grafana-kvtier.json")
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus at scrape time


def _queries(node):
    """Every PromQL string in the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("expr", "definition", "query") and isinstance(v, str):
                yield v
            else:
                yield from _queries(v)
    elif isinstance(node, list):
        for v in node:
            yield from _queries(v)


def _exposition_labels(text):
    """sample name -> label names seen on it."""
    import re
    out: dict[str, set] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?", line)
            out.setdefault(m.group(1), set()).update(re.findall(r'([a-zA-Z_]\w*)="', m.group(2) or ""))
    return out


def test_grafana_dashboard_queries_only_exported_metrics(make_daemon, valkey, tmp_path):
    """Every metric and label the dashboard asks for is in the exposition of a daemon that served
    traffic on every tier, so the dashboard cannot go stale when metrics are renamed."""
    import hashlib
    import json
    import re
    import time
    token = "dashboard-token-" + "d" * 16
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.t]\ntoken_sha256 = ["{hashlib.sha256(token.encode()).hexdigest()}"]\n'
                       f'namespaces = ["*"]\nredis_quota = "3MiB"\n')
    d = make_daemon(metrics={"listen": "127.0.0.1:0"}, ram={"capacity": "8MiB"}, auth={"tenants_file": str(tenants)},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB", "write_policy": "evict"},
                    cluster={"url": valkey.url, "prefix": "dash" + os.urandom(4).hex(), "timeout_ms": 2000,
                             "write_policy": "evict"})
    keys = [os.urandom(16) for _ in range(12)]
    with Client(d.address, token=token) as c:
        c.put_many("team-a", [(k, os.urandom(1 << 20)) for k in keys])  # RAM evicts, NVMe and Redis fill
        c.lookup("team-a", keys)
        c.release(c.acquire("team-a", keys[:2] + [os.urandom(16)], tokens_per_key=32))
        c.get_many("team-a", keys[:1])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _value(_scrape(d), "kvtier_cluster_puts_total"):
            time.sleep(0.05)
    text = _scrape(d)
    have = _exposition_labels(text)
    dash = json.load(open(DASHBOARD))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = list(_queries(dash))
    used = {m for q in queries for m in re.findall(r"\bkvtier_\w+", q)}
    assert len(used) >= 30 and queries
    assert not sorted(used - set(have)), f"the dashboard queries metrics the daemon does not export: " \
                                         f"{sorted(used - set(have))}"
    for q in queries:
        for name, sel in re.findall(r"\b(kvtier_\w+)\{([^}]*)\}", q):
            labels = set(re.findall(r"(\w+)\s*=~?", sel)) - SCRAPE_LABELS
            assert labels <= have[name], f"{name} has no label(s) {labels - have[name]} (in {q!r})"
        on_metrics = set().union(*(have[m] for m in re.findall(r"\bkvtier_\w+", q))) | SCRAPE_LABELS
        for grouping in re.findall(r"\bby \(([^)]*)\)", q):
            by = {x.strip() for x in grouping.split(",")}
            assert by <= on_metrics, f"grouping by {by - on_metrics}, which no metric of {q!r} has"


def test_failed_cluster_puts_are_in_stats_and_metrics(make_daemon, make_valkey):
    """Writes the server refuses (out of memory) are counted where operators look: the cluster
    tier's dropped_writes in Stats and kvtier_cluster_put_failures_total."""
    import time
    v = make_valkey("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")
    d = make_daemon(metrics={"listen": "127.0.0.1:0"}, ram={"capacity": "16MiB"},
                    cluster={"url": v.url, "timeout_ms": 5000})
    cl = d.daemon.store.cluster
    with Client(d.address, timeout=30) as c:
        c.put_many("team-a", [(os.urandom(16), os.urandom(400_000)) for _ in range(6)])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and cl.snapshot()["puts"] + cl.snapshot()["put_failures"] < 6:
            time.sleep(0.05)
        failed = cl.snapshot()["put_failures"]
        assert failed >= 2, cl.snapshot()
        tier = next(t for t in c.stats().tiers if t.name == "cluster")
        assert tier.dropped_writes == failed
    assert _value(_scrape(d), "kvtier_cluster_put_failures_total") == failed


def test_pins_past_max_pinned_are_refused_logged_and_counted(make_daemon, caplog):
    d = make_daemon(metrics={"listen": "127.0.0.1:0"}, ram={"capacity": "8MiB", "max_pinned": 0.3})
    keys = [os.urandom(16) for _ in range(5)]
    with Client(d.address) as c:
        c.put_many("pins", [(k, os.urandom(1 << 20)) for k in keys])
        with caplog.at_level("WARNING", logger="kvtier.service"):
            assert c.pin("pins", keys) == [True, True, False, False, False]  # 2 MiB of at most 2.4
            assert c.pin("pins", keys[:2]) == [True, True]  # pinned already: extended
        c.put_many("pins", [(os.urandom(16), os.urandom(1 << 20)) for _ in range(12)])  # evicts the unpinned
        assert None not in c.get_many("pins", keys[:2])  # the pinned ones stayed
    text = _scrape(d)
    assert _value(text, "kvtier_pins_refused_total") == 3
    assert _value(text, "kvtier_pinned_bytes") == 2 << 20
    assert [r for r in caplog.records if "ram.max_pinned" in r.getMessage()], "no warning"
