"""Prometheus exposition: the families operators need, moving with traffic, accepted by promtool."""
import os
import shutil
import subprocess
import urllib.request

import pytest

from kvtier.client import Client


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
