"""kvtier prewarm: what ``--check`` must refuse and what the state file must keep, without a
server or a daemon."""
from __future__ import annotations

import json
import os
import time

import pytest

from kvtier.errors import ConfigError
from kvtier.prewarm import plan as P
from kvtier.prewarm.state import Entry, State

TENANT = '[[tenant]]\nname = "a"\n[[tenant.context]]\nname = "c"\ntext = "x"\n'


def _load(tmp_path, text: str) -> P.Plan:
    f = tmp_path / "plan.toml"
    f.write_text(text + TENANT)
    return P.load(str(f))


def test_check_refuses_promote_enabled_without_a_budget(tmp_path):
    # the run would stop with "ram_budget must be set" before any work, every night
    with pytest.raises(ConfigError, match="promote.ram_budget"):
        _load(tmp_path, "[promote]\nenabled = true\n")
    assert _load(tmp_path, '[promote]\nenabled = true\nram_budget = "1GiB"\n').promote


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://127.0.0.1:8000 x",
                                 "http://[::1:8000",  # was a ValueError traceback
                                 "http://127.0.0.1:8000/v1", "http://vllm:8000/v1/"])  # an OpenAI client's base URL
def test_check_refuses_a_url_that_cannot_be_connected_to(tmp_path, url):
    with pytest.raises(ConfigError, match="vllm.url"):
        _load(tmp_path, f'[vllm]\nurl = "{url}"\n')


@pytest.mark.parametrize("setting", ["[vllm]\ntimeout_s = inf", "[vllm]\ntimeout_s = 1e9",
                                     "[run]\nmax_tokens_per_s = nan", "[daemon]\nstore_wait_s = nan",
                                     "[run]\nretry_backoff_s = inf", "[run]\nlate_tokens_per_s = inf",
                                     "[report]\nmin_coverage = nan"])
def test_check_refuses_numbers_that_are_not_finite(tmp_path, setting):
    """TOML has inf and nan: timeout_s = inf crashed the run (OverflowError), a nan pace failed
    every context, a nan store_wait_s never timed out."""
    with pytest.raises(ConfigError, match=setting.split("\n")[1].split(" =")[0]):
        _load(tmp_path, setting + "\n")


def test_check_refuses_credentials_in_the_url_without_echoing_them(tmp_path):
    with pytest.raises(ConfigError, match="vllm.url") as e:
        _load(tmp_path, '[vllm]\nurl = "http://admin:s3cret@127.0.0.1:8000"\n')
    assert "s3cret" not in str(e.value)


def test_state_entry_is_written_soon_even_when_no_other_context_finishes(tmp_path):
    # a context that finishes right after another is saved within the 2 s window, not only
    # when the next one finishes (hours later, for a long context) or at the end: a run killed
    # (SIGKILL, OOM) meanwhile would send it again
    path = str(tmp_path / "state.json")
    st = State(path)
    st.put("a/x", Entry("d1", "ns", 4, 1, 8, ["00" * 32]))
    st.put("a/y", Entry("d2", "ns", 4, 1, 8, ["11" * 32]))
    assert set(State.load(path).entries) == {"a/x"}
    time.sleep(2.5)
    assert set(State.load(path).entries) == {"a/x", "a/y"}


class _Answers:
    """A stand-in server: the answer for each prompt text."""

    def __init__(self, answers: dict[str, dict]):
        self.answers = answers

    def model(self, wanted: str) -> str:
        return wanted or "tiny"

    def post(self, endpoint: str, body: dict) -> dict:
        return self.answers[body["prompt"]]


def test_an_odd_answer_for_one_context_fails_only_that_context(tmp_path):
    import io

    from kvtier.prewarm.report import Progress
    from kvtier.prewarm.run import Run
    ok = {"usage": {"prompt_tokens": 2}, "kv_transfer_params": {"kvtier": {
        "keys": [], "namespace": "vllm", "chunk_size": 4, "ranks": 1}}}
    server = _Answers({"one": {"usage": {"prompt_tokens": 2}, "kv_transfer_params": ["not", "a", "table"]},
                       "two": {"usage": "2", **{k: v for k, v in ok.items() if k != "usage"}},
                       "three": ok})
    plan = P.from_dict({"run": {"concurrency": 1}, "tenant": [{"name": "a", "context": [
        {"name": n, "text": n} for n in ("one", "two", "three")]}]}, str(tmp_path))
    run = Run(plan, None, server, State(str(tmp_path / "state.json")), Progress(3, io.StringIO(), tty=False))
    got = run.prewarm()
    assert (got["a/one"].status, got["a/two"].status, got["a/three"].status) == ("failed", "failed", "stored")
    assert "kv_transfer_params" in got["a/one"].error and "unexpected answer" in got["a/two"].error


def test_the_api_key_does_not_follow_a_redirect():
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kvtier.prewarm.run import OpenAIServer, Permanent
    seen: list[str | None] = []

    class Other(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            data = b'{"data": [{"id": "tiny"}]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    other = ThreadingHTTPServer(("127.0.0.1", 0), Other)

    class Redirect(Other):
        def do_GET(self):
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    first = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    for s in (first, other):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Permanent, match="redirect"):
            OpenAIServer(f"http://127.0.0.1:{first.server_address[1]}", "sk-secret", 5).first_model()
        assert seen == []
    finally:
        for s in (first, other):
            s.shutdown()
            s.server_close()


@pytest.mark.parametrize("text", ["[]", "null", '{"version": 1, "contexts": []}',
                                  '{"version": 1, "contexts": {"a/x": {"digest": "d", "namespace": "ns", '
                                  '"chunk_size": 4, "ranks": 1, "tokens": 8, "keys": ["not hex"]}}}',
                                  '{"version": 1, "contexts": {"a/x": {"digest": "d", "namespace": "ns", '
                                  '"chunk_size": 4, "ranks": 1, "tokens": 8}}}'])
def test_a_state_file_of_another_shape_is_an_empty_state(tmp_path, text):
    # the state only saves work: a file that is not what this version writes must not stop
    # the run (or fail a context every night until someone deletes it)
    path = tmp_path / "state.json"
    path.write_text(text)
    assert State.load(str(path)).entries == {}


def test_a_field_this_version_does_not_know_keeps_the_state(tmp_path):
    """A field a later version adds to an entry (as chunk_bytes was added) made the file
    unreadable to an earlier one, which then sent every context again: the known fields are
    kept, the others ignored."""
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"version": 1, "contexts": {"a/x": {
        "digest": "d", "namespace": "ns", "chunk_size": 4, "ranks": 1, "tokens": 8, "keys": ["00" * 32],
        "chunk_bytes": 131072, "written_by": "a later kvtier"}}}))
    st = State.load(str(path))
    assert set(st.entries) == {"a/x"}
    assert st.get("a/x") == Entry("d", "ns", 4, 1, 8, ["00" * 32], chunk_bytes=131072)


@pytest.mark.parametrize("answer", ['{"data": [{"name": "tiny"}]}', '{"data": "tiny"}', '{"data": [null]}'])
def test_an_odd_model_list_is_a_clear_error(answer):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from kvtier.prewarm.run import OpenAIServer, Permanent

    class Models(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            data = answer.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Permanent, match="/v1/models"):
            OpenAIServer(f"http://127.0.0.1:{srv.server_address[1]}", None, 5).first_model()
    finally:
        srv.shutdown()
        srv.server_close()


def test_an_unreachable_daemon_is_named_by_the_address_the_run_used(tmp_path, monkeypatch, capsys):
    from kvtier import cli
    sock = tmp_path / "nobody.sock"
    monkeypatch.setenv("KVTIER_ADDRESS", f"unix://{sock}")
    f = tmp_path / "plan.toml"
    f.write_text(f'[run]\nstate = "{tmp_path}/state.json"\n' + TENANT)
    assert cli.main(["prewarm", "--quiet", str(f)]) == cli.EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert f"daemon unreachable at unix://{sock}:" in err and "None" not in err, err
    # the plan's own address, where it gives one
    f.write_text(f'[daemon]\naddress = "unix://{tmp_path}/plan.sock"\n[run]\nstate = "{tmp_path}/state.json"\n'
                 + TENANT)
    assert cli.main(["prewarm", "--quiet", str(f)]) == cli.EXIT_UNAVAILABLE
    assert f"daemon unreachable at unix://{tmp_path}/plan.sock:" in capsys.readouterr().err


def test_check_reads_every_context_and_names_those_it_cannot(tmp_path, capsys):
    # the nightly run would fail them every night; --check is where the operator looks
    from kvtier import cli
    (tmp_path / "kb.txt").write_text("knowledge")
    (tmp_path / "chat.jsonl").write_text('{"role": "system", "content": "hi"}\n')
    f = tmp_path / "plan.toml"
    f.write_text('[[tenant]]\nname = "a"\n'
                 '[[tenant.context]]\nname = "kb"\nfiles = ["kb.txt"]\n'
                 '[[tenant.context]]\nname = "chat"\nmessages = "chat.jsonl"\n'
                 '[[tenant.context]]\nname = "code"\nfiles = ["repo/**/*.py"]\n'
                 '[[tenant.context]]\nname = "ids"\ntokens = "absent.jsonl"\n')
    assert cli.main(["prewarm", "--check", str(f)]) == cli.EXIT_USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert f"context a/code: no file matches {tmp_path}/repo/**/*.py" in err, err
    assert "context a/ids:" in err and "absent.jsonl" in err, err
    assert "a/kb" not in err and "a/chat" not in err and "2 of 4 contexts cannot be read" in err, err
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m.py").write_text("x = 1\n")
    (tmp_path / "absent.jsonl").write_text("[1, 2, 3]\n")
    assert cli.main(["prewarm", "--check", str(f)]) == cli.EXIT_OK
    assert "ok (1 customers, 4 contexts" in capsys.readouterr().out


def test_check_says_when_a_promoting_run_would_refuse_to_start(tmp_path, capsys):
    # kvtier-prewarm.service runs with --promote, which needs promote.ram_budget
    from kvtier import cli
    f = tmp_path / "plan.toml"
    f.write_text(TENANT)
    assert cli.main(["prewarm", "--check", str(f)]) == cli.EXIT_OK
    assert "promote.ram_budget is not set" in capsys.readouterr().err
    assert cli.main(["prewarm", "--check", "--promote", str(f)]) == cli.EXIT_USAGE
    assert "promote.ram_budget must be set" in capsys.readouterr().err
    f.write_text('[promote]\nram_budget = "1GiB"\n' + TENANT)
    assert cli.main(["prewarm", "--check", "--promote", str(f)]) == cli.EXIT_OK
    assert capsys.readouterr().err == ""


def test_a_request_that_trickles_in_ends_at_timeout_s():
    """vllm.timeout_s bounds a whole request: urllib's timeout is per read, and a server (or a
    proxy) sending a byte now and then held a request, and the run, for ever."""
    import socket
    import threading

    from kvtier.prewarm.run import OpenAIServer, Transient
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def trickle():
        c, _ = srv.accept()
        c.recv(65536)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
        while not stop.is_set():
            try:
                c.sendall(b" ")
            except OSError:
                break
            time.sleep(0.2)
        c.close()
    threading.Thread(target=trickle, daemon=True).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Transient, match="no whole answer within vllm.timeout_s"):
            OpenAIServer(f"http://127.0.0.1:{srv.getsockname()[1]}", None, timeout_s=1.0).post("/v1/completions", {})
        assert time.monotonic() - t0 < 5
    finally:
        stop.set()
        srv.close()


def test_a_state_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    """A state under a path that cannot be written (a relative state next to a plan in a
    read-only /etc/kvtier) passed --check; the run sent every context, reported the first one
    failed, printed no report and exited 2, every night."""
    from kvtier import cli
    from kvtier.prewarm.run import run_plan
    (tmp_path / "file").write_text("")
    f = tmp_path / "plan.toml"
    f.write_text('[run]\nstate = "file/state.json"\n' + TENANT)
    assert cli.main(["prewarm", str(f), "--check"]) == cli.EXIT_USAGE
    assert "run.state: cannot write the state file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="run.state: cannot write"):
        run_plan(P.load(str(f)))


def test_a_second_run_of_one_state_is_refused_while_the_first_runs(tmp_path, capsys):
    """The timer's run and an operator's run at once sent every context twice, and the later
    writer of the state dropped what the other recorded."""
    from kvtier import cli
    f = tmp_path / "plan.toml"
    f.write_text(f'[run]\nstate = "{tmp_path}/state.json"\n' + TENANT)
    held = State(str(tmp_path / "state.json")).lock()
    try:
        assert cli.main(["prewarm", str(f), "--quiet"]) == cli.EXIT_ERROR
        assert "another prewarm run of this state" in capsys.readouterr().err
    finally:
        os.close(held)
    fd = State(str(tmp_path / "state.json")).lock()  # free again once the first has ended
    os.close(fd)


@pytest.fixture
def berlin(monkeypatch):
    """Local time is Europe/Berlin's: clocks go forward on 2026-03-29, back on 2026-10-25."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def _run_at(tmp_path, start, run: dict):
    """A Run of a one-context plan with these [run] settings, started at ``start`` (local
    time), its monotonic clock at 0."""
    import io

    from kvtier.prewarm.report import Progress
    from kvtier.prewarm.run import Run
    plan = P.from_dict({"run": run, "tenant": [{"name": "a", "context": [{"name": "c", "text": "x"}]}]},
                       str(tmp_path))
    return Run(plan, None, None, State(str(tmp_path / "s.json")), Progress(0, io.StringIO(), False),
               clock=lambda: 0.0, now=start)


def test_a_clock_deadline_is_wall_clock_time_on_a_dst_night(tmp_path, berlin):
    """The night clocks go forward, 01:00 to 06:30 is 4.5 hours, not 5.5: the run went on an
    hour into the morning's traffic (and stopped an hour early the night they go back)."""
    import datetime as dt

    def deadline_after(start: dt.datetime, deadline: str = "06:30") -> float:
        return _run_at(tmp_path, start, {"deadline": deadline}).deadline
    assert deadline_after(dt.datetime(2026, 3, 29, 1, 0)) == 4.5 * 3600   # CET -> CEST
    assert deadline_after(dt.datetime(2026, 10, 25, 1, 0)) == 6.5 * 3600  # CEST -> CET
    assert deadline_after(dt.datetime(2026, 1, 5, 23, 0)) == 7.5 * 3600
    assert deadline_after(dt.datetime(2026, 3, 29, 1, 0), "5h") == 5 * 3600  # a duration stays one


def test_started_after_the_deadline_is_decided_in_wall_clock_time(tmp_path, berlin):
    """With max_run 5h, 01:00 the night clocks go forward is 4.5 hours before 06:30, but the
    clocks' difference (5.5 h) made the run late from the start: it sent nothing all night.
    The night they go back, a run 6 hours before the deadline, over a 5.5 h max_run, was not
    late and ran through it."""
    import datetime as dt
    spring = _run_at(tmp_path, dt.datetime(2026, 3, 29, 1, 0), {"deadline": "06:30", "max_run": "5h"})
    assert not spring.late and spring.deadline == 4.5 * 3600
    autumn = _run_at(tmp_path, dt.datetime(2026, 10, 25, 1, 30), {"deadline": "06:30", "max_run": "5.5h"})
    assert autumn.late and autumn.deadline == -19 * 3600   # the 06:30 of the day before


def test_a_stop_during_a_retry_backoff_is_an_interruption(tmp_path):
    """SIGTERM while a context waited to retry ended the wait, as it should, but the context
    was reported failed "(no retry: deadline)": a run with no deadline, stopped by hand."""
    import io
    import threading

    from kvtier.prewarm.report import Progress
    from kvtier.prewarm.run import Run, Transient
    refused = threading.Event()

    class Refusing(_Answers):
        def post(self, endpoint: str, body: dict) -> dict:
            refused.set()
            raise Transient("connection refused")

    plan = P.from_dict({"run": {"retries": 3, "retry_backoff_s": 60}, "tenant": [{"name": "a", "context": [
        {"name": "c", "text": "x"}]}]}, str(tmp_path))
    run = Run(plan, None, Refusing({}), State(str(tmp_path / "state.json")), Progress(1, io.StringIO(), False))
    threading.Thread(target=lambda: refused.wait(10) and run.cancel(), daemon=True).start()
    t0 = time.monotonic()
    r = run.prewarm()["a/c"]
    assert time.monotonic() - t0 < 30
    assert (r.status, r.error, r.attempts) == ("not run", "interrupted", 1)
