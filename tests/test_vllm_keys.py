"""The vLLM connector's pure-Python parts: key derivation (golden vectors), hash-stability
checks, settings and per-request options, the supported-version list, and a cheap import.
Runs without vLLM or torch installed."""
from __future__ import annotations

import dataclasses
import hashlib
import struct
import subprocess
import sys

import pytest

from kvtier.errors import ConfigError
from kvtier.vllm import SUPPORTED_VLLM, is_supported
from kvtier.vllm.keys import (
    FORMAT_VERSION,
    Fingerprint,
    UnstableHashError,
    check_hash_stability,
    chunk_hashes,
    chunk_key,
    chunk_keys,
    layout_tag,
    scope_digest,
    weights_variant,
)
from kvtier.vllm.settings import ConnectorSettings, request_options

LAYOUT = layout_tag([("model.layers.0.self_attn.attn", (8, 16, 256), "bfloat16"),
                     ("model.layers.1.self_attn.attn", (8, 16, 256), "bfloat16")])
FP = Fingerprint(model="meta-llama/Llama-3.1-8B-Instruct", revision="0e9e39f", kv_dtype="bfloat16",
                 layout=LAYOUT, block_size=16, chunk_size=256, tp_size=2, tp_rank=1, pp_size=1,
                 pp_rank=0, hash_algo="sha256")
CHUNK_HASH = bytes(range(32))

# Golden vectors: a change here changes every key in every deployed cache. Only with a new
# FORMAT_VERSION.
GOLDEN_DIGEST = "4ac781ee3f30ce60bef744ac11bec66a756716cd93ce8ecbf641f82a91fd630f"
GOLDEN_SCOPE = "3036707c9ff9fd71d8516f284ebc4e9f5f81985ccdf650280002158a8a147cc0"        # acme, salt-1
GOLDEN_KEY = "7f6df7fb5312f11ab56dc86a963dafbcf80f1ce89dadc1dfc7b3bf3c24842181"
GOLDEN_SCOPE_PLAIN = "d5770b8f3b7d5de4168f4db8c15260784833e83683d4a79d78b6642f6c998f6b"  # no tenant, no salt
GOLDEN_KEY_PLAIN = "3261bbf50d4dd4e720569312e1013d5547a4b6d51da2504ab387cf92a401d5b3"


def test_golden_vectors():
    assert FORMAT_VERSION == 1
    assert FP.canonical() == (
        b"model=meta-llama/Llama-3.1-8B-Instruct\nrevision=0e9e39f\nkv_dtype=bfloat16\n"
        b"layout=model.layers.0.self_attn.attn:8x16x256:bfloat16;"
        b"model.layers.1.self_attn.attn:8x16x256:bfloat16\n"
        b"block_size=16\nchunk_size=256\ntp_size=2\ntp_rank=1\npp_size=1\npp_rank=0\n"
        b"hash_algo=sha256\nformat_version=1\n")
    assert FP.digest().hex() == GOLDEN_DIGEST
    scope = scope_digest(FP.digest(), "acme", "salt-1")
    assert scope.hex() == GOLDEN_SCOPE
    assert chunk_key(scope, CHUNK_HASH).hex() == GOLDEN_KEY
    plain = scope_digest(FP.digest())
    assert plain.hex() == GOLDEN_SCOPE_PLAIN
    assert chunk_key(plain, CHUNK_HASH).hex() == GOLDEN_KEY_PLAIN
    assert chunk_keys(FP.digest(), [CHUNK_HASH], "acme", "salt-1") == [bytes.fromhex(GOLDEN_KEY)]


def test_derivation_matches_the_documented_formula():
    """The module docstring's formula, written out independently."""
    digest = hashlib.sha256(b"kvtier-vllm-fingerprint\0" + FP.canonical()).digest()
    lp = lambda b: struct.pack(">I", len(b)) + b  # noqa: E731
    scope = hashlib.sha256(b"kvtier-vllm-scope\0" + digest + lp(b"acme") + lp(b"salt-1")).digest()
    key = hashlib.sha256(b"kvtier-vllm-chunk\0" + scope + CHUNK_HASH).digest()
    assert len(key) == 32
    assert key == chunk_keys(FP.digest(), [CHUNK_HASH], "acme", "salt-1")[0]


OTHER = {"model": "other/model", "revision": "abc", "kv_dtype": "float8_e4m3fn",
         "layout": layout_tag([("l0", (16, 8, 256), "bfloat16")]), "block_size": 32, "chunk_size": 512,
         "tp_size": 4, "tp_rank": 0, "pp_size": 2, "pp_rank": 1, "hash_algo": "sha256_cbor",
         "format_version": 2, "variant": "quantization=fp8"}


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Fingerprint)])
def test_every_fingerprint_field_changes_the_keys(name):
    base = dataclasses.replace(FP, pp_size=2) if name == "pp_rank" else FP
    other = dataclasses.replace(base, **{name: OTHER[name]})
    assert other.digest() != base.digest()
    assert chunk_keys(other.digest(), [CHUNK_HASH]) != chunk_keys(base.digest(), [CHUNK_HASH])


def test_tenant_and_salt_scope_keys():
    d = FP.digest()
    keys = {chunk_keys(d, [CHUNK_HASH], t, s)[0]
            for t, s in [("", ""), ("a", ""), ("", "a"), ("ab", "c"), ("a", "bc")]}
    assert len(keys) == 5  # length-prefixed: ("ab","c") and ("a","bc") differ
    assert chunk_key(scope_digest(d), b"\x01" * 32) != chunk_key(scope_digest(d), b"\x02" * 32)


def test_a_weights_variant_changes_the_keys_and_none_keeps_them():
    assert FP.variant == "" and b"variant" not in FP.canonical()  # the golden vectors hold
    fp8 = dataclasses.replace(FP, variant=weights_variant("fp8"))
    assert fp8.canonical() == FP.canonical() + b"variant=quantization=fp8\n"
    rope = dataclasses.replace(FP, variant=weights_variant(None, {"rope_scaling": {"type": "yarn", "factor": 4}}))
    assert len({FP.digest(), fp8.digest(), rope.digest()}) == 3
    # the same overrides in another order are the same variant; another value is not
    assert weights_variant(None, {"b": 1, "a": {"y": 2, "x": 1}}) == weights_variant(None, {"a": {"x": 1, "y": 2}, "b": 1})
    assert weights_variant(None, {"a": 1}) != weights_variant(None, {"a": 2})
    assert weights_variant(None, {}) == weights_variant() == ""
    assert "\n" not in weights_variant(None, {"a": "x\ny"})


def test_overrides_given_as_a_function_are_told_apart_by_the_config_they_made():
    from types import SimpleNamespace as NS

    def overrides(factor):  # two closures with one qualified name
        return lambda cfg: cfg

    def made(factor):
        return NS(to_dict=lambda: {"rope_scaling": {"factor": factor}, "hidden_size": 64})
    four, eight = overrides(4), overrides(8)
    assert four.__qualname__ == eight.__qualname__
    v4, v8 = weights_variant(None, four, made(4)), weights_variant(None, eight, made(8))
    assert v4 != v8 and v4.startswith("hf_overrides=config-sha256:")
    assert weights_variant(None, eight, made(4)) == v4  # the same config, the same KV
    with pytest.raises(ValueError, match="function"):
        weights_variant(None, four)


def test_engine_fingerprint_reads_quantization_and_overrides_from_vllm_config():
    from types import SimpleNamespace as NS
    from kvtier.vllm.worker import fingerprint

    def cfg(**model):
        mc = NS(model="m", revision=None, **model)
        return NS(model_config=mc, cache_config=NS(block_size=16, prefix_caching_hash_algo="sha256"),
                  parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1))

    def fp(c):
        return fingerprint(c, ConnectorSettings(), 64, LAYOUT, "bfloat16", 0, 0)
    plain = fp(cfg(quantization=None, hf_overrides={}))
    assert plain.variant == "" and plain == fp(cfg())  # an older vLLM without the fields
    assert fp(cfg(quantization="fp8", hf_overrides={})).variant == "quantization=fp8"
    assert fp(cfg(quantization=None, hf_overrides={"rope_theta": 1e6})).digest() != plain.digest()


def test_fingerprint_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple"):
        dataclasses.replace(FP, chunk_size=100)
    with pytest.raises(ValueError, match="rank"):
        dataclasses.replace(FP, tp_rank=2)
    with pytest.raises(ValueError, match="one line"):
        dataclasses.replace(FP, model="a\nb").canonical()


def test_chunk_hashes_name_each_chunk_by_its_last_block():
    blocks = [bytes([i]) * 32 for i in range(10)]          # one hash per 16 tokens
    assert chunk_hashes(blocks, 160, 64, 16) == [blocks[3], blocks[7]]
    assert chunk_hashes(blocks, 127, 64, 16) == [blocks[3]]  # a partial chunk has no name
    assert chunk_hashes(blocks, 10_000, 64, 16) == [blocks[3], blocks[7]]  # only hashed blocks
    assert chunk_hashes(blocks, 160, 16, 16) == blocks
    assert chunk_hashes([], 100, 64, 16) == []
    with pytest.raises(ValueError):
        chunk_hashes(blocks, 160, 40, 16)


def test_hash_stability():
    assert check_hash_stability("sha256", {}) == "sha256"
    assert check_hash_stability("sha256_cbor", {}) == "sha256_cbor"
    for algo in ("xxhash", "xxhash_cbor"):
        with pytest.raises(UnstableHashError, match="PYTHONHASHSEED"):
            check_hash_stability(algo, {})
        with pytest.raises(UnstableHashError):
            check_hash_stability(algo, {"PYTHONHASHSEED": "random"})
        assert check_hash_stability(algo, {"PYTHONHASHSEED": "0"}) == algo
    with pytest.raises(UnstableHashError, match="unknown"):
        check_hash_stability("md5", {})


def test_settings():
    s = ConnectorSettings.from_extra({"namespace": "team-a", "chunk_size": 128, "load_async": False,
                                      "timeout_s": 2, "tenant": "acme"})
    assert (s.namespace, s.chunk_size, s.load_async, s.timeout_s, s.tenant) == ("team-a", 128, False, 2.0, "acme")
    assert ConnectorSettings.from_extra(None) == ConnectorSettings()
    assert ConnectorSettings().resolve_chunk_size(16) == 256
    assert ConnectorSettings().resolve_chunk_size(96) == 192
    assert ConnectorSettings().resolve_chunk_size(512) == 512
    with pytest.raises(ConfigError, match="not a multiple"):
        ConnectorSettings(chunk_size=100).resolve_chunk_size(16)
    for bad in ({"nope": 1}, {"chunk_size": "256"}, {"load_async": 1}, {"namespace": "Bad NS"},
                {"timeout_s": 0}, {"lease_ms": -1}, {"chunk_size": 0}, {"namespace": None}):
        with pytest.raises(ConfigError):
            ConnectorSettings.from_extra(bad)


def test_an_invalid_tenant_namespace_is_explained_in_full():
    # "_x" is made of allowed characters: the message must say what else is wrong with it
    s = ConnectorSettings.from_extra({"tenant_namespace": "{tenant}"})
    with pytest.raises(ValueError, match="starting with a letter or digit"):
        s.namespace_for("_x")
    with pytest.raises(ConfigError, match="starting with a letter or digit"):
        ConnectorSettings.from_extra({"tenant_namespace": "_{tenant}"})


def test_request_options():
    s = ConnectorSettings(tenant="base")
    o = request_options(None, s)
    assert (o.tenant, o.load, o.store, o.pin) == ("base", True, True, False)
    o = request_options({"kvtier": {"tenant": "acme", "pin": 3600}}, s)
    assert (o.tenant, o.pin, o.pin_s) == ("acme", True, 3600)
    assert request_options({"kvtier": {"pin": True}}, s).pin_s == 0
    warned = []                     # pinned for 0 seconds is no pin, not one until unpinned
    o = request_options({"kvtier": {"pin": 0}}, s, warn=warned.append)
    assert (o.pin, o.pin_s) == (False, 0) and len(warned) == 1
    for name in ("pin", "ttl"):     # longer than the daemon's Pin takes (uint32): not a failed store
        warned = []
        o = request_options({"kvtier": {name: 2**32}}, s, warn=warned.append)
        assert (o.pin, o.pin_s) == (False, 0) and len(warned) == 1
        assert request_options({"kvtier": {name: 2**32 - 1}}, s).pin_s == 2**32 - 1
    o = request_options({"kvtier": {"skip": True, "load": True}}, s)
    assert not o.load and not o.store
    o = request_options({"kvtier": {"store": False}}, s)
    assert o.load and not o.store
    warned = []
    o = request_options({"kvtier": {"ttl_s": 5, "pin": "yes", "tenant": 3}}, s, warn=warned.append)
    assert (o.pin, o.tenant) == (False, "base") and len(warned) == 3  # ttl_s: no per-block expiry yet
    assert request_options({"kvtier": "x"}, s, warn=warned.append).tenant == "base"
    assert request_options({"other_connector": {}}, s).tenant == "base"


def test_an_engine_honours_only_the_request_options_it_lists():
    """An engine whose callers must not pick another customer's tenant or pin RAM lists what
    they may set; the rest is logged and ignored, never a failed request."""
    s = ConnectorSettings.from_extra({"tenant": "base", "request_options": ["skip", "load", "store"]})
    warned = []
    o = request_options({"kvtier": {"tenant": "other", "pin": True, "ttl": 60, "return_keys": True,
                                    "store": False}}, s, warn=warned.append)
    assert (o.tenant, o.pin, o.pin_s, o.return_keys, o.load, o.store) == ("base", False, 0, False, True, False)
    assert len(warned) == 4 and all("request_options" in w for w in warned), warned
    assert not request_options({"kvtier": {"skip": True}}, s).load
    none = ConnectorSettings.from_extra({"request_options": []})
    assert request_options({"kvtier": {"skip": True, "tenant": "x"}}, none).load
    every = ConnectorSettings.from_extra({})
    assert request_options({"kvtier": {"tenant": "x", "pin": 5}}, every).pin_s == 5
    for bad in (["tenant", "namespace"], "tenant", [1]):
        with pytest.raises(ConfigError, match="request_options"):
            ConnectorSettings.from_extra({"request_options": bad})


def test_supported_versions():
    assert "0.32.0" in SUPPORTED_VLLM
    assert any(v.startswith("0.33") for v in SUPPORTED_VLLM)
    for v in ("0.32.0", "0.32.0+cpu", "0.33.0", "0.33.4"):
        assert is_supported(v), v
    for v in ("0.31.9", "0.32.1", "0.34.0", "0.330.1", "0.33.1rc1", "1.0.0"):
        assert not is_supported(v), v


def test_import_is_cheap():
    """vLLM imports the connector module in every process: no torch, vLLM or gRPC at import."""
    code = ("import sys, kvtier.vllm, kvtier.vllm.keys; "
            "print(sorted(m for m in ('torch', 'vllm', 'grpc', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
