"""kvtier prewarm without vLLM: the plan, contexts, coverage, and runs against a real daemon
and a stand-in OpenAI server that stores chunks the way the connector does.

The stand-in (``FakeVLLM``) tokenizes on whitespace, names chunk c of a prompt by a hash of
its tenant and first (c+1)*CHUNK tokens, stores one block per chunk in the tenant's
namespace, pins it as asked and answers with the connector's kv_transfer_params. The real
connector and a real vLLM are in tests/test_prewarm_e2e.py.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvtier import cli
from kvtier.client import Client
from kvtier.errors import ConfigError
from kvtier.prewarm import plan as P
from kvtier.prewarm.report import ContextResult, Progress, TenantReport, coverage
from kvtier.prewarm.run import Pacer, run_plan
from kvtier.prewarm.state import Entry, State
from kvtier.vllm.settings import ConnectorSettings, request_options

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHUNK = 4
BLOCK_BYTES = 64 << 10
pytestmark = pytest.mark.timeout(120)


# ---- the plan ---------------------------------------------------------------------------------

def test_example_plan_parses():
    p = P.load(str(ROOT / "configs" / "prewarm.example.toml"))
    assert [t.name for t in p.tenants] == ["acme", "globex"]
    acme, globex = p.tenants
    assert (acme.pin, acme.ttl_s) == ("ram", 36 * 3600)
    assert (globex.pin, globex.ttl_s) == ("none", 36 * 3600)
    assert [c.kind for c in acme.contexts] == ["files", "messages", "text"]
    assert acme.contexts[0].files[0] == str(ROOT / "configs" / "acme" / "repo" / "**" / "*.py")
    assert globex.contexts[0].kind == "tokens"
    assert (p.deadline, p.max_run_s, p.ram_budget, p.min_coverage) == ("06:30", 12 * 3600, 8 << 30, 0.95)
    # every setting the code knows is in the example, and nothing else
    text = (ROOT / "configs" / "prewarm.example.toml").read_text()
    for section, keys in P._SECTIONS.items():
        for k in keys:
            assert f"\n{k} = " in text, f"[{section}] {k} is not in the example plan"


def _plan(tmp_path, text: str) -> str:
    f = tmp_path / "plan.toml"
    f.write_text(text)
    return str(f)


@pytest.mark.parametrize("text, message, line", [
    ('[run]\nconcurency = 2\n[[tenant]]\nname = "a"\n[[tenant.context]]\nname = "c"\ntext = "x"\n',
     "run.concurency: unknown setting", 2),
    ('[[tenant]]\nname = "a"\npin = "gpu"\n[[tenant.context]]\nname = "c"\ntext = "x"\n',
     "pin must be one of ram, none", 2),
    ('[[tenant]]\nname = "a"\n\n[[tenant.context]]\nname = "c"\ntext = "x"\nfiles = ["y"]\n',
     "give exactly one of", 5),
    ('[[tenant]]\nname = "a"\n[[tenant.context]]\nname = "c"\ntext = "x"\n[[tenant]]\nname = "b"\n',
     "tenant 'b': no [[tenant.context]]", 7),
    ('[run]\ndeadline = "25:00"\n[[tenant]]\nname = "a"\n[[tenant.context]]\nname = "c"\ntext = "x"\n',
     "not a time of day", 2),
    ('[report]\nmin_coverage = 95\n[[tenant]]\nname = "a"\n[[tenant.context]]\nname = "c"\ntext = "x"\n',
     "a fraction from 0 to 1", 2),
    ('[vllm]\nurl = "localhost"\n', "no [[tenant]]", None),
    ('[run]\ndeadline = "14h"\nafter_deadline = "slow"\n[[tenant]]\nname = "a"\n[[tenant.context]]\nname = "c"\n'
     'text = "x"\n', "run.deadline: 14h is not before run.max_run (12h)", 2),
])
def test_bad_plans_name_file_line_and_setting(tmp_path, text, message, line):
    path = _plan(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        P.load(path)
    assert message in str(e.value)
    prefix = f"{path}:{line}: " if line else f"{path}: "
    assert str(e.value).startswith(prefix), str(e.value)


def test_deadline_clock_late_and_duration():
    p = P.Plan(deadline="06:30", max_run_s=12 * 3600)
    night = dt.datetime(2026, 1, 5, 23, 0)
    assert p.deadline_in(night) == (7.5 * 3600, False)
    assert p.deadline_in(dt.datetime(2026, 1, 6, 2, 0)) == (4.5 * 3600, False)
    # a catch-up run after a reboot at 09:00 is late, not 21.5 hours early
    assert p.deadline_in(dt.datetime(2026, 1, 6, 9, 0)) == (-2.5 * 3600, True)
    assert P.Plan(deadline="90m").deadline_in(night) == (90 * 60, False)
    assert P.Plan().deadline_in(night) == (None, False)


def test_contexts_are_read_into_requests(tmp_path):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "b.py").write_text("B")
    (tmp_path / "src" / "pkg" / "a.py").write_text("A")
    (tmp_path / "src" / "notes.txt").write_text("N")
    (tmp_path / "chat.jsonl").write_text('{"role": "system", "content": "be brief"}\n\n'
                                         '{"role": "user", "content": "hi"}\n')
    (tmp_path / "tools.json").write_text('[{"type": "function", "function": {"name": "f"}}]')
    (tmp_path / "ids.jsonl").write_text("[1, 2, 3]\n4\n[5]\n")
    path = _plan(tmp_path, '''
[[tenant]]
name = "a"
[[tenant.context]]
name = "code"
files = ["src/**/*.py", "src/notes.txt"]
header = "# {path}\\n"
separator = "|"
[[tenant.context]]
name = "chat"
messages = "chat.jsonl"
tools = "tools.json"
[[tenant.context]]
name = "ids"
tokens = "ids.jsonl"
''')
    code, chat, ids = P.load(path).tenants[0].contexts
    got = P.load_context(code)
    src = tmp_path / "src"
    assert got.endpoint == "/v1/completions" and got.files == 3
    assert got.body["prompt"] == f"# {src}/b.py\nB|# {src}/pkg/a.py\nA|# {src}/notes.txt\nN"
    got = P.load_context(chat)
    assert got.endpoint == "/v1/chat/completions"
    assert got.body == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                        "add_generation_prompt": False,
                        "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert P.load_context(ids).body == {"prompt": [1, 2, 3, 4, 5]}
    (tmp_path / "ids.jsonl").write_text('[1, "two"]\n')
    with pytest.raises(ValueError, match="ids.jsonl:1: expected a token id"):
        P.load_context(ids)
    with pytest.raises(ValueError, match="no file matches"):
        P.load_context(P.Context("a", "x", "files", files=(str(tmp_path / "none" / "*.py"),)))


def test_coverage_counts_the_present_prefix_by_slowest_tier():
    # two ranks per chunk; chunk 2 has one rank on NVMe; chunk 3 misses a rank; chunk 4 present
    tiers = [1, 1, 1, 1, 1, 2, 1, 0, 1, 1]
    assert coverage(tiers, 2, 64, 5 * 64 + 10) == {"ram": 128, "nvme": 64, "redis": 0}
    # fewer keys than the prompt has chunks (the connector stored only two of three)
    assert coverage([3, 1], 1, 64, 200) == {"ram": 64, "nvme": 0, "redis": 64}
    t = TenantReport("a", [ContextResult("a", "x", "stored", tokens=330, chunk_size=64,
                                         coverage={"ram": 128, "nvme": 64, "redis": 0})])
    assert t.cacheable == 320 and t.fraction() == pytest.approx(0.6) and t.fraction("ram") == pytest.approx(0.4)
    t.contexts.append(ContextResult("a", "y", "failed", error="boom"))
    assert t.incomplete and t.summary()["failures"] == [{"context": "y", "error": "boom"}]


def test_progress_bar_on_a_terminal_lines_otherwise():
    out = io.StringIO()
    p = Progress(2, out, tty=True)
    p.update(ContextResult("a", "x", "stored", tokens=1000, stored_chunks=3))
    p.update(ContextResult("b", "y", "failed", error="HTTP 400"))
    assert out.getvalue().startswith("\r\x1b[K[############------------] 1/2  1,000 tokens  a/x")
    assert out.getvalue().endswith("[########################] 2/2  1,000 tokens  1 failed  b/y\n")
    out = io.StringIO()
    p = Progress(1, out, tty=False)
    p.update(ContextResult("a", "x", "resident", tokens=64))
    assert out.getvalue() == "prewarm 1/1 a/x: already resident, 64 tokens, 0.0s\n"


def test_pacer_spaces_requests_by_tokens():
    p = Pacer(1000)
    assert p.wait_s() == 0
    p.spend(500)
    assert 0.4 < p.wait_s() <= 0.5
    p.spend(500)
    assert 0.9 < p.wait_s() <= 1.0
    assert Pacer(0).wait_s() == 0


def test_state_file_round_trip_and_unreadable(tmp_path):
    path = str(tmp_path / "sub" / "state.json")
    st = State(path)
    st.put("a/x", Entry("d1", "vllm-a", 64, 1, 100, ["00" * 32], 1.0, "m"))
    st.save()
    assert State.load(path).get("a/x") == st.get("a/x")
    assert [f for f in os.listdir(tmp_path / "sub")] == ["state.json"]   # no temp files left
    (tmp_path / "sub" / "state.json").write_text("{not json")
    assert State.load(path).entries == {}


# ---- connector settings used by prewarm -----------------------------------------------------------

def test_tenant_namespace_setting_and_request_options():
    s = ConnectorSettings.from_extra({"tenant_namespace": "{namespace}-{tenant}"})
    warned = []
    o = request_options({"kvtier": {"tenant": "acme", "ttl": 3600, "return_keys": True}}, s, warned.append)
    assert (o.namespace, o.pin, o.pin_s, o.return_keys, o.load, o.store) == ("vllm-acme", True, 3600, True, True, True)
    assert request_options(None, s).namespace == "vllm"        # no tenant: the engine's namespace
    o = request_options({"kvtier": {"tenant": "Acme Corp"}}, s, warned.append)
    assert (o.namespace, o.load, o.store) == ("vllm", False, False) and "not valid" in warned[-1]
    o = request_options({"kvtier": {"ttl": 60, "pin": False}}, s)
    assert not o.pin
    # the default: one namespace for every tenant
    d = ConnectorSettings.from_extra({})
    assert request_options({"kvtier": {"tenant": "acme"}}, d).namespace == "vllm"
    for bad in ("{namespace}", "{tenant}-{model}", "{tenant", "UPPER-{tenant}"):
        with pytest.raises(ConfigError, match="tenant_namespace"):
            ConnectorSettings.from_extra({"tenant_namespace": bad})
    with pytest.raises(ConfigError, match="tenant"):
        ConnectorSettings.from_extra({"tenant_namespace": "{tenant}", "tenant": "Bad Name"})


# ---- runs against a daemon and a stand-in server ------------------------------------------------

class FakeVLLM:
    """An OpenAI server that does what vLLM with the kvtier connector does, in miniature."""

    def __init__(self, address: str, ranks: int = 1):
        self.address, self.ranks = address, ranks
        self.requests: list[dict] = []
        self.fail: list[int] = []       # HTTP status of the next requests, in order
        self.delay_s = 0.0
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"data": [{"id": "tiny"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code, obj = fake.handle(self.path, body)
                self._send(code, obj)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def handle(self, path, body):
        with self.lock:
            self.requests.append(body)
            if self.fail:
                code = self.fail.pop(0)
                return code, {"error": {"message": f"status {code}"}}
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            if "messages" in body:
                toks = " ".join(f"<{m['role']}> {m['content']}" for m in body["messages"]).split()
            elif isinstance(body["prompt"], list):
                toks = [str(t) for t in body["prompt"]]
            else:
                toks = body["prompt"].split()
            kv = body["kv_transfer_params"]["kvtier"]
            tenant = kv.get("tenant", "")
            ns = f"vllm-{tenant}" if tenant else "vllm"
            keys = [hashlib.sha256(f"{tenant}|{r}|{' '.join(toks[:(c + 1) * CHUNK])}".encode()).digest()
                    for c in range(len(toks) // CHUNK) for r in range(self.ranks)]
            with Client(self.address) as c:
                stored = c.put_many(ns, [(k, k * (BLOCK_BYTES // 32)) for k in keys])
                if kv.get("pin") is not False:
                    c.pin(ns, keys, kv.get("ttl", 0))
            params = {"namespace": ns, "chunk_size": CHUNK, "loaded_tokens": 0,
                      "stored_chunks": sum(stored) // self.ranks, "cached_tokens": len(keys) // self.ranks * CHUNK,
                      "tenant": tenant, "ranks": self.ranks}
            if kv.get("return_keys"):
                params["keys"] = [k.hex() for k in keys]
            return 200, {"choices": [{"text": " x"}], "usage": {"prompt_tokens": len(toks)},
                         "kv_transfer_params": {"kvtier": params}}
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_vllm(daemon):
    made = []

    def make(**kw):
        f = FakeVLLM(daemon.address, **kw)
        made.append(f)
        return f
    yield make
    for f in made:
        f.close()


def words(n: int, seed: int) -> str:
    return " ".join(f"w{(seed * 7919 + i) % 997}" for i in range(n))


def write_plan(tmp_path, url, address, extra: str = "", tenants: str | None = None) -> str:
    (tmp_path / "kb.txt").write_text(words(18, 1))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"role": "system", "content": words(11, 2)}) + "\n")
    (tmp_path / "ids.jsonl").write_text(json.dumps(list(range(100, 113))) + "\n")
    tenants = tenants if tenants is not None else f'''
[[tenant]]
name = "acme"
ttl = "1h"
[[tenant.context]]
name = "kb"
files = "kb.txt"
[[tenant.context]]
name = "chat"
messages = "chat.jsonl"

[[tenant]]
name = "globex"
pin = "none"
[[tenant.context]]
name = "ids"
tokens = "ids.jsonl"
[[tenant.context]]
name = "prompt"
text = "{words(9, 3)}"
'''
    return _plan(tmp_path, f'''
[vllm]
url = "{url}"
[daemon]
address = "{address}"
[run]
state = "{tmp_path}/state.json"
retry_backoff_s = 0.01
{extra}
{tenants}''')


def summary(rep) -> dict:
    return {t.name: t.summary() for t in rep.tenants}


def test_run_stores_reports_and_skips_resident_contexts(tmp_path, daemon, fake_vllm):
    fake = fake_vllm()
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address))
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    s = summary(rep)
    # kb: 18 tokens -> 4 chunks; chat: 12 tokens -> 3; ids: 13 -> 3; prompt: 9 -> 2
    assert (s["acme"]["stored"], s["acme"]["tokens"], s["acme"]["stored_chunks"]) == (2, 30, 7)
    assert s["acme"]["cacheable_tokens"] == 28 and s["globex"]["cacheable_tokens"] == 20
    assert (s["globex"]["stored"], s["globex"]["tokens"], s["globex"]["stored_chunks"]) == (2, 22, 5)
    for t in ("acme", "globex"):
        assert s[t]["coverage"] == {"ram": 1.0, "nvme": 0.0, "redis": 0.0, "total": 1.0}
    assert len(fake.requests) == 4
    bodies = {json.dumps(b.get("messages") or b["prompt"]): b for b in fake.requests}
    chat = next(b for b in bodies.values() if "messages" in b)
    assert chat["max_tokens"] == 1 and chat["add_generation_prompt"] is False and chat["model"] == "tiny"
    assert chat["kv_transfer_params"] == {"kvtier": {"tenant": "acme", "return_keys": True, "ttl": 3600}}
    assert all(b["kv_transfer_params"]["kvtier"]["pin"] is False for b in fake.requests
               if b["kv_transfer_params"]["kvtier"]["tenant"] == "globex")
    with Client(daemon.address) as c:
        st = {n.name: n for n in c.stats().namespaces}
        assert st["vllm-acme"].blocks == 7 and st["vllm-globex"].blocks == 5
        assert c.stats().tiers[0].pinned_blocks == 7                       # acme: pin class ram

    # the second run sends nothing: every context is resident
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    assert len(fake.requests) == 4
    s = summary(rep)
    assert s["acme"]["resident"] == 2 and s["globex"]["resident"] == 2 and s["acme"]["stored_chunks"] == 0
    assert s["acme"]["coverage"]["total"] == 1.0
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False, force=True)     # --force sends all
    assert len(fake.requests) == 8 and summary(rep)["acme"]["stored"] == 2
    del fake.requests[4:]

    # a changed file and a lost chunk are sent again; the rest is still skipped
    (tmp_path / "kb.txt").write_text(words(18, 5))
    e = State.load(plan.state).get("globex/ids")
    with Client(daemon.address) as c:
        assert c.delete(e.namespace, [bytes.fromhex(e.keys[-1])]) == 1
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    sent = fake.requests[4:]
    assert sorted(b["kv_transfer_params"]["kvtier"]["tenant"] for b in sent) == ["acme", "globex"]
    assert summary(rep)["globex"]["coverage"]["total"] == 1.0


def test_transient_errors_are_retried_permanent_ones_fail(tmp_path, daemon, fake_vllm):
    fake = fake_vllm()
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address, "concurrency = 1\nretries = 2"))
    fake.fail = [503, 429]
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    first = rep.tenants[0].contexts[0]
    assert (first.status, first.attempts) == ("stored", 3)
    assert all(c.status == "stored" for t in rep.tenants for c in t.contexts)

    os.unlink(plan.state)
    fake.fail = [400, 503, 503, 503]       # kb: bad request, not retried; chat: gives up after 3
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False, min_coverage=0.5)
    kb, chat = rep.tenants[0].contexts
    assert (kb.status, kb.attempts) == ("failed", 1) and "HTTP 400" in kb.error
    assert (chat.status, chat.attempts) == ("failed", 3) and "HTTP 503" in chat.error
    assert [c.status for c in rep.tenants[1].contexts] == ["stored", "stored"]
    assert rep.under_threshold() == ["acme"]
    out = io.StringIO()
    rep.write_table(out)
    assert "acme/kb: failed after 1 attempt(s): HTTP 400" in out.getvalue()
    acme_row = next(l for l in out.getvalue().splitlines() if l.startswith("acme "))
    assert acme_row.split()[-3] == "0.0%*"            # nothing of acme is known to be covered
    globex_row = next(l for l in out.getvalue().splitlines() if l.startswith("globex "))
    assert globex_row.split()[-3] == "100.0%"


def test_deadline_stops_the_run(tmp_path, daemon, fake_vllm):
    fake = fake_vllm()
    fake.delay_s = 0.7
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address, 'concurrency = 1\ndeadline = "1s"'))
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    status = [c.status for t in rep.tenants for c in t.contexts]
    n = status.count("stored")
    assert 1 <= n <= 2 and status == ["stored"] * n + ["not run"] * (4 - n), status
    assert len(fake.requests) == n
    assert rep.stopped_at_deadline and rep.under_threshold() == []
    rep.min_coverage = 0.9
    assert "globex" in rep.under_threshold()


def test_late_run_goes_slow_one_at_a_time(tmp_path, daemon, fake_vllm):
    fake = fake_vllm()
    fake.delay_s = 0.05
    passed = (dt.datetime.now() - dt.timedelta(hours=2)).strftime("%H:%M")
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address,
                             f'concurrency = 4\ndeadline = "{passed}"\nmax_run = "1h"\n'
                             'after_deadline = "slow"\nlate_tokens_per_s = 100'))
    t0 = time.monotonic()
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    took = time.monotonic() - t0
    assert rep.late
    assert all(c.status == "stored" for t in rep.tenants for c in t.contexts)
    assert fake.max_in_flight == 1
    # 52 prompt tokens at 100 per second: the last request waits for the first three (~0.4 s)
    assert took >= 0.35


def test_a_slow_run_ends_max_run_after_its_start_with_a_report(tmp_path, daemon, fake_vllm):
    """With after_deadline = "slow" a late run had no end of its own: it went on until every
    context was sent, however long, and only the unit's TimeoutStartSec stopped it (exit 130,
    no report). It now stops max_run after its start."""
    fake = fake_vllm()
    passed = (dt.datetime.now() - dt.timedelta(hours=2)).strftime("%H:%M")
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address,
                             f'deadline = "{passed}"\nmax_run = "1s"\nafter_deadline = "slow"\n'
                             'late_tokens_per_s = 10'))
    t0 = time.monotonic()
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    took = time.monotonic() - t0
    # 52 prompt tokens at 10 a second: about 4 s to send them all; the first request or none
    # goes before the end
    ctxs = [c for t in rep.tenants for c in t.contexts]
    assert [c.status for c in ctxs].count("stored") <= 1 and len(fake.requests) <= 1
    not_run = [c for c in ctxs if c.status == "not run"]
    assert len(not_run) >= 3 and all(c.error == "run.max_run reached" for c in not_run), not_run
    assert rep.late and rep.stopped_at_max_run and not rep.stopped_at_deadline
    assert took < 3
    out = io.StringIO()
    rep.write_table(out)
    assert "stopped at run.max_run" in out.getvalue(), out.getvalue()


def test_max_tokens_per_s_paces_the_night_too(tmp_path, daemon, fake_vllm):
    fake = fake_vllm()
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address, "concurrency = 1\nmax_tokens_per_s = 100"))
    t0 = time.monotonic()
    run_plan(plan, progress_out=io.StringIO(), tty=False)
    assert time.monotonic() - t0 >= 0.35


def test_promote_brings_chunks_back_into_ram_within_the_budget(tmp_path, make_daemon, fake_vllm):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    d = make_daemon(ram={"capacity": "4MiB", "policy": "lru"}, nvme={"dirs": [str(nvme)]})
    fake = FakeVLLM(d.address, ranks=2)
    try:
        tenants = f'''
[[tenant]]
name = "globex"
pin = "none"
[[tenant.context]]
name = "kb"
text = "{words(24, 7)}"
'''
        path = write_plan(tmp_path, fake.url, d.address, tenants=tenants)
        plan = P.load(path)
        rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
        assert summary(rep)["globex"]["stored_chunks"] == 6             # 12 blocks of 64 KiB
        keys = State.load(plan.state).get("globex/kb").key_bytes()
        with Client(d.address) as c:                                     # daytime traffic evicts them
            for i in range(6):
                c.put_many("other", [(hashlib.sha256(f"{i}-{j}".encode()).digest(), bytes(256 << 10))
                                     for j in range(4)])
            assert all(t == 2 for t in c.lookup("vllm-globex", keys)[0]), "not all on NVMe only"
        rep = run_plan(plan, progress_out=io.StringIO(), tty=False)          # on NVMe: resident
        assert summary(rep)["globex"]["resident"] == 1 and len(fake.requests) == 1
        assert summary(rep)["globex"]["coverage"] == {"ram": 0.0, "nvme": 1.0, "redis": 0.0, "total": 1.0}

        with pytest.raises(ConfigError, match="ram_budget must be set"):
            run_plan(plan, progress_out=io.StringIO(), tty=False, promote=True)
        assert len(fake.requests) == 1
        # a budget of 7 blocks: 3 whole chunks (2 ranks each) come up, in prefix order
        with open(path, "a") as f:
            f.write('\n[promote]\nram_budget = "448KiB"\n')
        plan = P.load(path)
        rep = run_plan(plan, progress_out=io.StringIO(), tty=False, promote_only=True)
        s = summary(rep)["globex"]
        assert s["promoted_chunks"] == 3 and rep.ram_budget_used == 6 * BLOCK_BYTES
        assert s["coverage"]["ram"] == pytest.approx(0.5) and s["coverage"]["nvme"] == pytest.approx(0.5)
        with Client(d.address) as c:
            assert c.lookup("vllm-globex", keys)[0] == [1] * 6 + [2] * 6
    finally:
        fake.close()


def test_chunks_the_daemon_left_unpinned_are_reported(tmp_path, make_daemon):
    """Past ram.max_pinned the daemon leaves a Pin's blocks unpinned: the report says which
    contexts lost their pin and how many chunks, in the table and the JSON, run after run."""
    # 4 MiB, max_pinned 0.1: 6 blocks of 64 KiB may be pinned; acme's two contexts are 7 chunks
    d = make_daemon(ram={"capacity": "4MiB", "policy": "lru", "max_pinned": 0.1})
    fake = FakeVLLM(d.address)
    try:
        plan = P.load(write_plan(tmp_path, fake.url, d.address))
        rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
        s = summary(rep)
        assert s["acme"]["coverage"]["ram"] == 1.0 and s["globex"]["unpinned_chunks"] == 0  # pin = "none"
        with Client(d.address) as c:
            pinned = c.stats().tiers[0].pinned_blocks
        assert pinned == 6 and s["acme"]["unpinned_chunks"] == 7 - pinned
        out = io.StringIO()
        rep.write_table(out)
        left = [ln for ln in out.getvalue().splitlines() if "left unpinned" in ln]
        assert len(left) == 1 and "ram.max_pinned" in left[0] and left[0].lstrip().startswith("acme/"), out.getvalue()
        assert json.loads(json.dumps(rep.to_dict()))["tenants"][0]["unpinned_chunks"] == 1
        with Client(d.address) as c:  # the next run (all resident) pins again, and says so again
            c.unpin("vllm-acme", [bytes.fromhex(k) for e in ("acme/kb", "acme/chat")
                                  for k in State.load(plan.state).get(e).keys])
        rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
        assert summary(rep)["acme"]["resident"] == 2 and summary(rep)["acme"]["unpinned_chunks"] == 1
        with Client(d.address) as c:
            assert c.stats().tiers[0].pinned_blocks == 6
    finally:
        fake.close()


def test_cli_json_table_exit_codes(tmp_path, daemon, fake_vllm, capsys):
    fake = fake_vllm()
    path = write_plan(tmp_path, fake.url, daemon.address)
    assert cli.main(["prewarm", path, "--check"]) == 0
    assert "2 customers, 4 contexts" in capsys.readouterr().out
    assert cli.main(["prewarm", path, "--json", "--quiet", "--min-coverage", "95%"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert [t["tenant"] for t in data["tenants"]] == ["acme", "globex"]
    assert data["tenants"][0]["coverage"]["total"] == 1.0 and data["under_threshold"] == []
    assert data["tenants"][1]["context_results"][0]["namespace"] == "vllm-globex"
    assert err.count("\n") == 4 and "prewarm 4/4" in err

    fake.fail = [400] * 8
    (tmp_path / "kb.txt").write_text(words(18, 9))                      # kb must be sent again
    assert cli.main(["prewarm", path, "--quiet", "--min-coverage", "0.95"]) == cli.EXIT_COVERAGE
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["customer", "contexts", "tokens", "stored", "RAM", "NVMe", "Redis",
                                           "total", "time", "failed"]
    assert "coverage under the threshold for: acme" in out

    fake.close()
    os.unlink(str(tmp_path / "state.json"))
    assert cli.main(["prewarm", path, "--quiet"]) == cli.EXIT_UNAVAILABLE   # vLLM down
    assert "vLLM at http://127.0.0.1" in capsys.readouterr().err
    assert cli.main(["prewarm", str(tmp_path / "nope.toml")]) == cli.EXIT_USAGE


def test_sigterm_saves_progress_and_the_next_run_resumes(tmp_path, daemon, fake_vllm):
    fake = fake_vllm()
    fake.delay_s = 0.3
    path = write_plan(tmp_path, fake.url, daemon.address, "concurrency = 1")
    p = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "prewarm", path, "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(fake.requests) < 2 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    sent = len(fake.requests)
    assert 2 <= sent < 4, "the run was not interrupted mid-way"
    order = ["acme/kb", "acme/chat", "globex/ids", "globex/prompt"]
    # every context sent was finished (the one in flight too) and recorded; nothing else started
    assert set(State.load(str(tmp_path / "state.json")).entries) == set(order[:sent])
    rep = run_plan(P.load(path), progress_out=io.StringIO(), tty=False)
    status = {c.id: c.status for t in rep.tenants for c in t.contexts}
    assert status == {cid: "resident" if i < sent else "stored" for i, cid in enumerate(order)}
    assert len(fake.requests) == 4


def test_max_tokens_per_s_holds_with_requests_in_parallel(tmp_path, daemon, fake_vllm):
    # four contexts, four at once: without booking tokens before sending, all four start at
    # once and the whole plan (52 tokens) goes out in an instant at a 100 tokens/s limit
    fake = fake_vllm()
    fake.delay_s = 0.02
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address, "concurrency = 4\nmax_tokens_per_s = 100"))
    t0 = time.monotonic()
    rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
    assert all(c.status == "stored" for t in rep.tenants for c in t.contexts)
    assert time.monotonic() - t0 >= 0.3


def test_pins_follow_the_plan_night_after_night(tmp_path, daemon, fake_vllm):
    """Prewarm never unpinned: a context whose sources changed kept its old chunks pinned, one
    that left the plan too, and a customer moved to pin = "none" kept them all; with the
    default ttl (until unpinned) they filled ram.max_pinned night after night."""
    fake = fake_vllm()

    def night(tenants: str):
        return run_plan(P.load(write_plan(tmp_path, fake.url, daemon.address, tenants=tenants)),
                        progress_out=io.StringIO(), tty=False)

    def pinned() -> int:
        with Client(daemon.address) as c:
            return c.stats().tiers[0].pinned_blocks

    kb, old, shared = words(16, 1), words(16, 2), words(8, 5)  # 4 chunks each; shared: a 2-chunk prefix
    night(f'[[tenant]]\nname = "acme"\n[[tenant.context]]\nname = "kb"\ntext = "{kb}"\n'
          f'[[tenant.context]]\nname = "old"\ntext = "{old}"\n'
          f'[[tenant.context]]\nname = "p1"\ntext = "{shared} {words(8, 6)}"\n')
    assert pinned() == 12
    # the next night: kb changed, old left the plan, p1 changed but keeps its first two chunks,
    # which p2 (new) shares
    rep = night(f'[[tenant]]\nname = "acme"\n[[tenant.context]]\nname = "kb"\ntext = "{words(16, 3)}"\n'
                f'[[tenant.context]]\nname = "p1"\ntext = "{shared} {words(8, 7)}"\n'
                f'[[tenant.context]]\nname = "p2"\ntext = "{shared} {words(8, 8)}"\n')
    assert {c.name: c.status for c in rep.tenants[0].contexts} == {"kb": "stored", "p1": "stored", "p2": "stored"}
    assert pinned() == 4 + 2 + 2 + 2  # kb, the shared prefix, p1's and p2's own
    assert set(State.load(str(tmp_path / "state.json")).entries) == {"acme/kb", "acme/p1", "acme/p2"}
    # the customer stops pinning: its contexts stay stored (resident), nothing pinned
    rep = night(f'[[tenant]]\nname = "acme"\npin = "none"\n[[tenant.context]]\nname = "kb"\ntext = "{words(16, 3)}"\n')
    assert [c.status for c in rep.tenants[0].contexts] == ["resident"]
    assert pinned() == 0


def test_a_shorter_pin_ttl_takes_effect(tmp_path, daemon, fake_vllm):
    """The daemon only ever lengthens a pin: a customer moved from ttl 0 (until unpinned) to
    a ttl kept its pins for ever. The pins are made anew when the ttl changes."""
    fake = fake_vllm()
    text = words(16, 1)

    def night(ttl: str):
        run_plan(P.load(write_plan(tmp_path, fake.url, daemon.address, tenants=(
            f'[[tenant]]\nname = "acme"\nttl = "{ttl}"\n[[tenant.context]]\nname = "kb"\ntext = "{text}"\n'))),
            progress_out=io.StringIO(), tty=False)
        return State.load(str(tmp_path / "state.json")).entries["acme/kb"]

    assert night("0s").pinned_ttl_s == 0
    hot = daemon.daemon.hot
    e = night("2s")
    assert e.pinned_ttl_s == 2
    keys = e.key_bytes()
    with hot.lock:
        until = [hot._blocks("vllm-acme")[k].pin_until for k in keys]
    assert all(0 < u < time.time() + 60 for u in until), until  # not pinned for ever any more


def test_a_stop_while_waiting_for_the_pace_starts_nothing(tmp_path, daemon, fake_vllm):
    """SIGTERM: a worker waiting its turn under max_tokens_per_s sent a new request when its
    wait ended, and the stop took that wait plus the request."""
    from kvtier.prewarm.report import Progress
    from kvtier.prewarm.run import OpenAIServer, Run
    fake = fake_vllm()
    plan = P.load(write_plan(tmp_path, fake.url, daemon.address, "concurrency = 2\nmax_tokens_per_s = 4"))
    with Client(daemon.address) as kv:
        run = Run(plan, kv, OpenAIServer(plan.url), State(plan.state), Progress(0, io.StringIO(), False))
        threading.Timer(1.0, run.cancel).start()  # the first request goes, the others wait seconds
        t0 = time.monotonic()
        out = run.prewarm()
        took = time.monotonic() - t0
    assert len(fake.requests) <= 2 and took < 4, (len(fake.requests), took)
    assert sum(r.error == "interrupted" for r in out.values()) >= 2


@pytest.mark.parametrize("model", ["tiny", "other"])
def test_vllm_unreachable_or_without_the_model_exits_3_with_the_model_set(tmp_path, daemon, fake_vllm, capsys, model):
    """With vllm.model set, the only reachability check (the model list) was skipped: every
    context failed and the run exited 0, so the unit succeeded and nobody was told."""
    fake = fake_vllm()
    path = write_plan(tmp_path, fake.url, daemon.address)
    text = pathlib.Path(path).read_text().replace("[vllm]\n", f'[vllm]\nmodel = "{model}"\n', 1)
    pathlib.Path(path).write_text(text)
    if model == "tiny":
        fake.close()  # down
    assert cli.main(["prewarm", path, "--quiet"]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"vLLM at {fake.url}" in err
    if model == "other":
        assert "vllm.model 'other' is not served there (it serves tiny)" in err
    assert fake.requests == []


def _evicted_to_nvme(tmp_path, make_daemon, tenants: str, extra: str = ""):
    """A daemon with a small RAM tier over NVMe, a plan run once, then daytime traffic that
    moves every block of it to NVMe: (daemon, fake server, plan file)."""
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    d = make_daemon(ram={"capacity": "4MiB", "policy": "lru"}, nvme={"dirs": [str(nvme)]})
    fake = FakeVLLM(d.address, ranks=2)
    path = write_plan(tmp_path, fake.url, d.address, extra, tenants=tenants)
    run_plan(P.load(path), progress_out=io.StringIO(), tty=False)
    with Client(d.address) as c:
        for i in range(6):
            c.put_many("other", [(hashlib.sha256(f"{i}-{j}".encode()).digest(), bytes(256 << 10))
                                 for j in range(4)])
        for e in State.load(str(tmp_path / "state.json")).entries.values():
            assert set(c.lookup(e.namespace, e.key_bytes())[0]) == {2}, "not all on NVMe only"
    return d, fake, path


def test_promote_never_goes_over_the_ram_budget(tmp_path, make_daemon):
    """A chunk (two ranks of 64 KiB) larger than the whole budget was promoted anyway: the
    first chunk of the phase came up before its size was known."""
    tenants = f'[[tenant]]\nname = "globex"\npin = "none"\n[[tenant.context]]\nname = "kb"\ntext = "{words(8, 7)}"\n'
    d, fake, path = _evicted_to_nvme(tmp_path, make_daemon, tenants, '[promote]\nram_budget = "64KiB"')
    try:
        rep = run_plan(P.load(path), progress_out=io.StringIO(), tty=False, promote_only=True)
        kb = rep.tenants[0].contexts[0]
        assert kb.promoted_chunks == 0 and rep.ram_budget_used == 0
        assert "RAM budget" in kb.not_promoted
        keys = State.load(str(tmp_path / "state.json")).get("globex/kb").key_bytes()
        with Client(d.address) as c:
            assert c.lookup("vllm-globex", keys)[0] == [2] * 4
        out = io.StringIO()
        rep.write_table(out)
        assert "globex/kb: not promoted" in out.getvalue() and "RAM budget" in out.getvalue(), out.getvalue()
        assert rep.to_dict()["tenants"][0]["context_results"][0]["not_promoted"] == kb.not_promoted
    finally:
        fake.close()


def test_promote_only_labels_what_the_daemon_holds(tmp_path, daemon, fake_vllm):
    """--promote-only called every recorded context resident without asking the daemon: one
    that lost a chunk since was resident too."""
    fake = fake_vllm()
    path = write_plan(tmp_path, fake.url, daemon.address, '[promote]\nram_budget = "1GiB"')
    run_plan(P.load(path), progress_out=io.StringIO(), tty=False)
    e = State.load(str(tmp_path / "state.json")).get("globex/ids")
    with Client(daemon.address) as c:
        assert c.delete(e.namespace, [bytes.fromhex(e.keys[-1])]) == 1
    rep = run_plan(P.load(path), progress_out=io.StringIO(), tty=False, promote_only=True)
    status = {c.id: c.status for t in rep.tenants for c in t.contexts}
    assert status == {"acme/kb": "resident", "acme/chat": "resident", "globex/ids": "not run",
                      "globex/prompt": "resident"}
    ids = rep.tenants[1].contexts[0]
    assert "1 of 3 chunks" in ids.error and ids.coverage["ram"] == 8, ids
    assert len(fake.requests) == 4


def test_promote_reads_no_chunk_of_an_unknown_size(tmp_path, make_daemon):
    """The budget can only hold if a chunk's size is known before it is read: it is recorded
    from a chunk seen in RAM, or taken from another context of the same engine. A context
    recorded without it (an older state), with nothing in RAM, is left on NVMe and named."""
    tenants = (f'[[tenant]]\nname = "globex"\npin = "none"\n[[tenant.context]]\nname = "kb"\n'
               f'text = "{words(8, 7)}"\n[[tenant.context]]\nname = "faq"\ntext = "{words(8, 8)}"\n')
    d, fake, path = _evicted_to_nvme(tmp_path, make_daemon, tenants, '[promote]\nram_budget = "1GiB"')
    state = str(tmp_path / "state.json")

    def forget(*cids):
        data = json.loads(pathlib.Path(state).read_text())
        assert all(data["contexts"][c]["chunk_bytes"] == 2 * BLOCK_BYTES for c in data["contexts"])
        for c in cids:
            del data["contexts"][c]["chunk_bytes"]
        pathlib.Path(state).write_text(json.dumps(data))

    def promote():
        rep = run_plan(P.load(path), progress_out=io.StringIO(), tty=False, promote_only=True)
        return {c.name: c for c in rep.tenants[0].contexts}

    try:
        forget("globex/kb")                                        # faq's size stands for kb's
        got = promote()
        assert (got["kb"].promoted_chunks, got["faq"].promoted_chunks) == (2, 2)
        assert got["kb"].not_promoted == "" and State.load(state).get("globex/kb").chunk_bytes == 2 * BLOCK_BYTES
        with Client(d.address) as c:                               # back to NVMe
            for i in range(6):
                c.put_many("other", [(hashlib.sha256(f"again-{i}-{j}".encode()).digest(), bytes(256 << 10))
                                     for j in range(4)])
        forget("globex/kb", "globex/faq")
        got = promote()
        assert (got["kb"].promoted_chunks, got["faq"].promoted_chunks) == (0, 0)
        assert "not known yet" in got["kb"].not_promoted and "not known yet" in got["faq"].not_promoted
        assert got["kb"].coverage["nvme"] == 8
    finally:
        fake.close()


def test_promote_counts_a_shared_prefix_once(tmp_path, make_daemon):
    """Contexts that share a prefix share its chunks: each counted them against the budget, so
    the plan's chunks seemed to take more RAM than they do and the second context's own chunks
    were left on NVMe although they fit."""
    shared = words(8, 5)  # two chunks
    tenants = (f'[[tenant]]\nname = "globex"\npin = "none"\n[[tenant.context]]\nname = "p1"\n'
               f'text = "{shared} {words(8, 6)}"\n[[tenant.context]]\nname = "p2"\ntext = "{shared} {words(8, 7)}"\n')
    # 6 distinct chunks of 128 KiB (2 ranks of 64 KiB): 768 KiB
    d, fake, path = _evicted_to_nvme(tmp_path, make_daemon, tenants, '[promote]\nram_budget = "768KiB"')
    try:
        rep = run_plan(P.load(path), progress_out=io.StringIO(), tty=False, promote_only=True)
        p1, p2 = rep.tenants[0].contexts
        assert (p1.promoted_chunks, p2.promoted_chunks) == (4, 2) and p2.not_promoted == ""
        assert rep.ram_budget_used == 6 * 2 * BLOCK_BYTES
        assert rep.tenants[0].fraction("ram") == 1.0
    finally:
        fake.close()


def test_a_night_where_nothing_was_prewarmed_fails_without_a_threshold(tmp_path, daemon, fake_vllm, capsys):
    """Every context failed and no min_coverage was set: the run exited 0 and the timer's unit
    succeeded on a night that prewarmed nothing."""
    fake = fake_vllm()
    path = write_plan(tmp_path, fake.url, daemon.address)
    fake.fail = [400] * 4
    assert cli.main(["prewarm", path, "--quiet"]) == cli.EXIT_NOTHING
    out = capsys.readouterr().out
    assert "nothing was prewarmed" in out, out
    fake.fail = [400] * 3                                   # one context stored: a partial night
    assert cli.main(["prewarm", path, "--quiet", "--json"]) == cli.EXIT_OK
    assert json.loads(capsys.readouterr().out)["nothing_prewarmed"] is False
    fake.fail = [400] * 3                                   # the stored one is resident now
    assert cli.main(["prewarm", path, "--quiet"]) == cli.EXIT_OK
