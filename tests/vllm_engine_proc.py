"""One vLLM engine with the kvtier connector in its own process, for tests that need vLLM's
multiprocess executor (tensor parallel workers are separate processes).

    python tests/vllm_engine_proc.py SPEC.json

SPEC: {"model", "address", "tp", "prompts": [[token ids]...], "rounds", "max_tokens", "chunk_size"}.
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
                                                               "retry_s": 0.2}})
    sp = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0, detokenize=False, ignore_eos=True)
    rounds = []
    for _ in range(spec.get("rounds", 1)):
        outs = llm.generate([{"prompt_token_ids": p} for p in spec["prompts"]], sp, use_tqdm=False)
        rounds.append([{"tokens": list(o.outputs[0].token_ids), "cached": o.num_cached_tokens} for o in outs])
    llm.llm_engine.engine_core.shutdown()
    print(json.dumps({"rounds": rounds}), flush=True)


if __name__ == "__main__":
    main()
