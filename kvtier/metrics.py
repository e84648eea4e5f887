"""Prometheus metrics on a loopback HTTP port (``[metrics] listen``).

Counters are not kept twice: a collector reads the store's own counters at
scrape time (``Store.snapshot()``), so a scrape costs one snapshot and the
request path pays nothing for metrics except the RPC latency histogram. With
no listen address the daemon uses ``NullMetrics`` (observe is a no-op).

Exposed families (all prefixed ``kvtier_``): tier capacity/used/blocks and
evictions per tier (ram, nvme, cluster: the cluster's are quota evictions);
per namespace blocks, bytes, hits by tier, misses, hit ratio, lookups, puts
and bytes moved, evictions, and prefill tokens saved (found keys x the
client's ``tokens_per_key`` on Acquire; a namespace holding nothing in RAM may
lose its series, back when it is used again, RAM's from 0: ``kvtier.hot``,
IDLE_NAMESPACES); NVMe promotions, demotions, queue
depth, dropped writes, checksum failures, I/O errors, degraded directories;
background checks of trusted commits (``kvtier_commit_checks_total``, failures, skipped);
Redis bytes and quota per tenant; open leases and reservations; arena lock
state; cyclic GC collections, pause seconds and frozen objects (``kvtier.gcfreeze``); the
index's memory on huge pages (``kvtier.hugepages``); and the
RPC latency histogram ``kvtier_rpc_duration_seconds{method,code}``.
``configs/grafana-kvtier.json`` charts them (``tests/test_metrics.py`` keeps it
in step with this exposition).
"""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__
from .config import split_host_port
from .hugepages import huge_bytes

log = logging.getLogger("kvtier.metrics")
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class NullMetrics:
    address = ""

    def observe(self, method: str, code: str, seconds: float) -> None:
        pass

    def close(self) -> None:
        pass


class _StoreCollector:
    def __init__(self, daemon):
        self.d = daemon

    def collect(self):
        s = self.d.store.snapshot()
        a = self.d.arena

        def gauge(name, doc, labels=()):
            return GaugeMetricFamily(f"kvtier_{name}", doc, labels=list(labels))

        def counter(name, doc, labels=()):
            return CounterMetricFamily(f"kvtier_{name}", doc, labels=list(labels))

        def counters(values: dict, table):
            """One unlabelled counter per (name, key in values, doc)."""
            for name, key, doc in table:
                c = counter(name, doc)
                c.add_metric([], values[key])
                yield c

        gcs = self.d.gc_pauses.snapshot()
        runs = counter("gc_collections", "Cyclic garbage collections, per generation.", ["generation"])
        paused = counter("gc_pause_seconds", "Seconds the daemon stood still in cyclic garbage collections, "
                         "per generation.", ["generation"])
        for g in range(3):
            runs.add_metric([str(g)], gcs["collections"][g])
            paused.add_metric([str(g)], gcs["seconds"][g])
        longest = gauge("gc_longest_pause_seconds", "Longest cyclic garbage collection since the start.")
        longest.add_metric([], gcs["longest_s"])
        frozen = gauge("gc_frozen_objects", "Objects moved out of the collector's reach (server.gc_freeze_s) "
                       "and still alive.")
        frozen.add_metric([], gcs["frozen"])
        yield from (runs, paused, longest, frozen)
        hp = self.d.huge_pages
        huge = gauge("huge_page_bytes", "Private memory of the daemon (the block index) on 2 MiB pages "
                     "(AnonHugePages; server.huge_pages_s).")
        huge.add_metric([], huge_bytes())
        collapsed = counter("huge_page_collapsed_bytes", "Bytes the daemon asked the kernel to collapse into "
                            "2 MiB pages (MADV_COLLAPSE).")
        collapsed.add_metric([], hp.collapsed_bytes)
        yield from (huge, collapsed)
        if self.d.data is not None:
            dc = self.d.data
            conns = gauge("data_connections", "Data-channel connections open (server.data_max_connections at most).")
            conns.add_metric([], dc.open_connections)
            refused = counter("data_connections_refused", "Data-channel connections closed at accept "
                              "(server.data_max_connections were open), or cut off while waiting to "
                              "authenticate to make room for a new one at a full table.")
            refused.add_metric([], dc.refused_connections)
            yield from (conns, refused)

        info = gauge("info", "Daemon version.", ["version"])
        info.add_metric([__version__], 1)
        yield info
        locked = gauge("arena_locked", "1 if the arena is locked in RAM (mlock).")
        locked.add_metric([], 1 if a.locked else 0)
        yield locked

        cap, used, blocks = (gauge("tier_capacity_bytes", "Capacity per tier.", ["tier"]),
                             gauge("tier_used_bytes", "Bytes used per tier.", ["tier"]),
                             gauge("tier_blocks", "Blocks per tier.", ["tier"]))
        ev = counter("tier_evictions", "Blocks evicted per tier.", ["tier"])
        cap.add_metric(["ram"], s["capacity_bytes"])
        used.add_metric(["ram"], s["used_bytes"])
        blocks.add_metric(["ram"], s["blocks"])
        ev.add_metric(["ram"], s["evictions"])
        n = s["nvme"]
        if n is not None:
            cap.add_metric(["nvme"], n["capacity_bytes"])
            used.add_metric(["nvme"], n["used_bytes"])
            blocks.add_metric(["nvme"], n["blocks"])
            ev.add_metric(["nvme"], n["evictions"])
        cl = s.get("cluster")
        if cl is not None:
            ev.add_metric(["cluster"], cl["evictions"])
        yield from (cap, used, blocks, ev)

        for name, key, doc in (("leases", "leases", "Open leases."),
                               ("reservations", "reservations", "Open reservations."),
                               ("reserved_bytes", "reserved_bytes", "Bytes in open reservations, and in slots of expired ones kept out of use (up to 5 s)."),
                               ("pinned_blocks", "pinned_blocks", "Pinned blocks in RAM."),
                               ("pinned_bytes", "pinned_bytes", "Slot bytes of the pinned blocks (at most "
                                "ram.max_pinned of the arena)."),
                               ("leased_blocks", "leased_blocks", "Leased blocks in RAM.")):
            g = gauge(name, doc)
            g.add_metric([], s[key])
            yield g
        yield from counters(s, (("pins_refused", "pins_refused",
                                 "Blocks a Pin left unpinned: pinned blocks would have passed ram.max_pinned (of the "
                                 "arena, or of their tenant's RAM quota)."),
                                ("expired_leases", "expired_leases", "Leases that expired before release."),
                                ("expired_reservations", "expired_reservations",
                                 "Reservations that expired before commit.")))

        cc = s.get("commit_checks")
        if cc is not None:  # ram.verify_on_commit = "background"
            yield from counters(cc, (
                ("commit_checks", "checked",
                 "Blocks committed on their client's checksums, re-hashed in the background."),
                ("commit_checksum_failures", "failures",
                 "Of those, blocks whose bytes did not match (dropped from RAM)."),
                ("commit_checks_skipped", "unchecked",
                 "Blocks committed on their client's checksums not re-hashed: queue full.")))

        nvme_hits = s.get("nvme_hits_by_namespace", {})
        cluster_hits = s.get("cluster_hits_by_namespace", {})
        fam = {
            "blocks": gauge("namespace_blocks", "Blocks in RAM per namespace.", ["namespace"]),
            "bytes": gauge("namespace_bytes", "Payload bytes in RAM per namespace.", ["namespace"]),
            "hits": counter("hits", "Blocks found by reads, per namespace and tier.", ["namespace", "tier"]),
            "misses": counter("misses", "Blocks not found by reads, per namespace (a prefix read: every key "
                              "from its first gap on).", ["namespace"]),
            "ratio": gauge("hit_ratio", "hits / (hits + misses) per namespace.", ["namespace"]),
            "lookups": counter("lookups", "Keys asked by Lookup, per namespace.", ["namespace"]),
            "puts": counter("put_blocks", "Blocks committed, per namespace.", ["namespace"]),
            "put_bytes": counter("put_bytes", "Bytes committed, per namespace.", ["namespace"]),
            "get_bytes": counter("get_bytes", "Bytes read, per namespace.", ["namespace"]),
            "evictions": counter("namespace_evictions", "Blocks evicted from RAM, per namespace.", ["namespace"]),
            "saved": counter("prefill_tokens_saved", "Prefill tokens spared by hits (keys found by Acquire x "
                             "the client's tokens_per_key), per namespace.", ["namespace"]),
        }
        saved = s.get("prefill_tokens_saved_by_namespace", {})
        for ns, st in sorted(s["namespaces"].items()):
            nh, ch = nvme_hits.get(ns, 0), cluster_hits.get(ns, 0)
            fam["blocks"].add_metric([ns], st.blocks)
            fam["bytes"].add_metric([ns], st.bytes)
            fam["hits"].add_metric([ns, "ram"], st.hits - st.lower_hits)  # both counted at once: never down
            fam["hits"].add_metric([ns, "nvme"], nh)
            fam["hits"].add_metric([ns, "cluster"], ch)
            fam["misses"].add_metric([ns], st.misses)
            total = st.hits + st.misses
            fam["ratio"].add_metric([ns], st.hits / total if total else 0.0)
            fam["lookups"].add_metric([ns], st.lookups)
            fam["puts"].add_metric([ns], st.puts)
            fam["put_bytes"].add_metric([ns], st.put_bytes)
            fam["get_bytes"].add_metric([ns], st.get_bytes)
            fam["evictions"].add_metric([ns], st.evictions)
            fam["saved"].add_metric([ns], saved.get(ns, 0))
        yield from fam.values()

        if cl is not None:
            yield from counters(cl, (("cluster_hits", "hits", "Blocks read from Redis/Valkey."),
                                     ("cluster_misses", "misses", "Cluster-tier reads that found nothing usable."),
                                     ("cluster_puts", "puts", "Blocks written to Redis/Valkey."),
                                     ("cluster_errors", "errors", "Redis/Valkey errors and timeouts."),
                                     ("cluster_lookups_cut", "lookups_cut",
                                      "Existence checks (Lookup, an engine scheduler's Acquire) that ran "
                                      "past cluster.lookup_timeout_ms (their keys were misses)."),
                                     ("cluster_dropped_writes", "dropped", "Writes dropped: queue full or closing."),
                                     ("cluster_put_failures", "put_failures",
                                      "Writes queued but not stored: server down, error reply (e.g. out of "
                                      "memory) or timeout."),
                                     ("cluster_checksum_failures", "checksum_failures",
                                      "Cluster records that failed verification (deleted, served as misses)."),
                                     ("cluster_version_skips", "version_skips",
                                      "Cluster records of a format version this daemon does not read (misses, "
                                      "left for the daemons that read them)."),
                                     ("cluster_quota_refused", "quota_refused",
                                      "Writes refused: a block larger than its tenant's whole redis quota."),
                                     ("cluster_unlinks_lost", "unlinks_lost",
                                      "Unlinks (delete, eviction, failed overwrite) not made: their server was down "
                                      "and too many waited already.")))
            g = gauge("cluster_queue_bytes", "Bytes waiting to be written to Redis/Valkey.")
            g.add_metric([], cl["queued_bytes"])
            yield g
            g = gauge("cluster_unlinks_pending", "Unlinks waiting for their Redis/Valkey server to answer again "
                      "(their blocks are misses meanwhile).")
            g.add_metric([], cl["unlinks_pending"])
            yield g
            g = gauge("cluster_connected", "1 while every Redis/Valkey server is reachable.")
            g.add_metric([], 1 if cl["connected"] else 0)
            yield g
            ten = cl["tenants"]
            g = gauge("cluster_tenant_bytes", "Bytes a tenant holds in Redis/Valkey (as of this daemon's last "
                      "write or delete for it; shared by every daemon).", ["tenant"])
            for name, v in sorted(ten["used"].items()):
                g.add_metric([name], v)
            yield g
            g = gauge("cluster_tenant_quota_bytes", "A tenant's redis quota.", ["tenant"])
            for name, v in sorted(ten["quotas"].items()):
                g.add_metric([name], v)
            yield g
        if n is not None:
            yield from counters(n, (("nvme_promotions", "promotions", "Blocks read up from NVMe into RAM."),
                                     ("nvme_demotions", "demotions", "Blocks copied down to NVMe on RAM eviction."),
                                     ("nvme_writes", "writes", "Block files written."),
                                     ("nvme_write_bytes", "write_bytes", "Block bytes written to NVMe."),
                                     ("nvme_read_bytes", "read_bytes", "Block bytes read from NVMe."),
                                     ("nvme_checksum_failures", "checksum_failures",
                                      "NVMe records that failed verification (removed, served as misses)."),
                                     ("nvme_io_errors", "io_errors", "NVMe I/O errors."),
                                     ("nvme_dropped_writes", "dropped_writes",
                                      "Writes not done: no directory with room."),
                                     ("nvme_queue_dropped", "queue_dropped", "Writes dropped: write queue full."),
                                     ("nvme_other_version_files", "other_version",
                                      "Block files of another record format version (a newer kvtier's) set aside: "
                                      "misses here, left on disk uncounted.")))
            q = gauge("nvme_queue_bytes", "Bytes waiting to be written to NVMe.")
            q.add_metric([], n["queued_bytes"])
            yield q
            deg = gauge("nvme_dir_degraded", "1 while a directory is skipped after ENOSPC or I/O errors.", ["dir"])
            for d in n["dirs"]:
                deg.add_metric([d["path"]], 1 if d["degraded"] else 0)
            yield deg


class Metrics:
    def __init__(self, daemon, listen: str):
        self.registry = CollectorRegistry(auto_describe=False)
        self.rpc = Histogram("kvtier_rpc_duration_seconds", "RPC handling time.", ["method", "code"],
                             buckets=BUCKETS, registry=self.registry)
        self.registry.register(_StoreCollector(daemon))
        host, port = split_host_port(listen)
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        h, p = self._server.server_address[:2]
        self.address = f"{h}:{p}"
        log.info("metrics on http://%s/metrics", self.address)

    def observe(self, method: str, code: str, seconds: float) -> None:
        self.rpc.labels(method, code).observe(seconds)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
