"""One vLLM engine with the kvtier connector in its own process, for tests that need vLLM's
multiprocess executor (tensor parallel workers are separate processes).

    python tests/vllm_engine_proc.py SPEC.json

SPEC: {"model", "address", "tp", "prompts": [[token ids]...], "rounds", "max_tokens", "chunk_size",
"settle_blocks"}. With settle_blocks, each round after the first starts once the daemon holds that
many blocks in namespace "vllm": the workers store behind the steps, and on a busy machine the
first round's stores may still be on their way when the next round looks its prompts up.
Prints one JSON line last: {"rounds": [[{"tokens": [...], "cached": n}, ...], ...]}.
"""
from __future__ import annotations

import json
import os
import sys


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    tp = int(spec.get("tp", 1))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # the workers' OpenMP threads wait without spinning: spinning, they took both CPUs of a small
    # machine from the daemon and the engine's own scheduler (whose lookups then timed out)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if tp > 1:
        # vLLM's CPU workers bind one NUMA node each unless told which CPUs to take
        cpus = sorted(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpus[i % len(cpus)]) for i in range(tp)))
    from vllm import LLM, SamplingParams
    llm = LLM(model=spec["model"], skip_tokenizer_init=True, tensor_parallel_size=tp,
              distributed_executor_backend="mp" if tp > 1 else "uni", enforce_eager=True,
              block_size=32, max_model_len=1024, dtype="bfloat16", enable_prefix_caching=False, seed=0,
              kv_transfer_config={"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm",
                                  "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
                                  "kv_connector_extra_config": {"address": spec["address"],
                                                               "chunk_size": spec.get("chunk_size", 64),
                                                               "retry_s": 0.2, "timeout_s": 10.0}})
    sp = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0, detokenize=False, ignore_eos=True)
    rounds = []
    for r in range(spec.get("rounds", 1)):
        if r and spec.get("settle_blocks"):
            _settle(spec["address"], spec["settle_blocks"])
        outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sp, use_tqdm=False)
        rounds.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens} for o in outs])
    llm.llm_engine.engine_core.shutdown()
    print(json.dumps({"rounds": rounds}), flush=True)


def _settle(address: str, blocks: int, timeout: float = 60.0) -> None:
    """Wait until the daemon holds ``blocks`` blocks in namespace "vllm" (or timeout passed)."""
    import time
    from kvtier.client import Client
    deadline = time.monotonic() + timeout
    with Client(address, attach=False) as c:
        while time.monotonic() < deadline:
            if sum(n.blocks for n in c.stats().namespaces if n.name == "vllm") >= blocks:
                return
            time.sleep(0.05)


if __name__ == "__main__":
    main()
