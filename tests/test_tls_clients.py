"""TLS for the daemon's clients on other nodes: the plain client's warning when its token would
travel in clear, the vLLM connector's and kvtier prewarm's TLS settings, against real TLS daemons."""
from __future__ import annotations

import asyncio
import logging

import pytest

from kvtier import errors
from kvtier.client import TLS, AsyncClient, Client

from conftest import tls_daemon

TOKEN = "token-" + "t" * 26
KEY = bytes(range(16))


def _token_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "token" in r.getMessage() and "TLS" in r.getMessage()]


def test_a_token_over_plaintext_tcp_to_another_host_is_warned_about_once(caplog):
    caplog.set_level(logging.WARNING, logger="kvtier")
    with Client("tcp://192.0.2.7:7070", token=TOKEN, timeout=0.2, attach=False) as c:
        for _ in range(2):  # nothing listens there: each call fails, neither warns again
            with pytest.raises((errors.Unavailable, errors.DeadlineExceeded)):
                c.stats()
    got = _token_warnings(caplog)
    assert len(got) == 1 and "192.0.2.7:7070" in got[0] and TOKEN not in got[0]
    caplog.clear()

    async def async_client():  # a bare host:port is TCP too, and the asyncio client the same
        await AsyncClient("10.1.2.3:7070", token=TOKEN).close()
    asyncio.run(async_client())
    assert len(_token_warnings(caplog)) == 1


@pytest.mark.parametrize("address,token,tls", [
    ("tcp://127.0.0.1:7070", TOKEN, None),      # loopback: never leaves the host
    ("tcp://localhost:7070", TOKEN, None),
    ("[::1]:7070", TOKEN, None),
    ("unix:///run/kvtier/kvtier.sock", TOKEN, None),
    ("tcp://192.0.2.7:7070", None, None),       # no token to give away
    ("tcp://192.0.2.7:7070", TOKEN, "tls"),
])
def test_no_warning_where_the_token_stays_private(caplog, monkeypatch, pki, address, token, tls):
    monkeypatch.delenv("KVTIER_TOKEN", raising=False)
    caplog.set_level(logging.WARNING, logger="kvtier")
    Client(address, token=token, tls=TLS(ca=str(pki / "ca.pem")) if tls else None).close()
    assert _token_warnings(caplog) == []


# ---- the vLLM connector -------------------------------------------------------------------------

def _tls_extra(pki, prefix: str = "tls_") -> dict:
    return {f"{prefix}ca": str(pki / "ca.pem"), f"{prefix}cert": str(pki / "client.pem"),
            f"{prefix}key": str(pki / "client.key")}


def test_connector_settings_take_tls_from_the_extra_config_or_the_environment(pki):
    from kvtier.vllm.settings import ConnectorSettings
    s = ConnectorSettings.from_extra(_tls_extra(pki), env={})
    assert s.tls == TLS(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    env = {k.upper(): v for k, v in _tls_extra(pki, "kvtier_tls_").items()}
    assert ConnectorSettings.from_extra({}, env=env).tls == s.tls
    # the extra config wins over the environment, setting by setting
    only_ca = ConnectorSettings.from_extra({"tls_ca": str(pki / "ca.pem"), "tls_server_name": "localhost"},
                                           env={"KVTIER_TLS_CA": "/nowhere/ca.pem"})
    assert only_ca.tls == TLS(str(pki / "ca.pem"), server_name="localhost")
    assert ConnectorSettings.from_extra({}, env={}).tls is None


@pytest.mark.parametrize("extra,env,message", [
    ({"tls_ca": "/nowhere/ca.pem"}, {}, r"kv_connector_extra_config.tls_ca: cannot read /nowhere/ca.pem"),
    ({}, {"KVTIER_TLS_CA": "/nowhere/ca.pem"}, r"\$KVTIER_TLS_CA: cannot read /nowhere/ca.pem"),
    ({"tls_ca": "{pki}"}, {}, r"tls_ca: cannot read .*: Is a directory"),
    ({"tls_ca": "{pki}/client.key"}, {}, r"tls_ca: .*client.key is not a PEM certificate"),
    ({"tls_ca": "{pki}/ca.pem", "tls_cert": "{pki}/client.pem"}, {}, r"tls_cert and .*tls_key go together"),
    ({"tls_ca": "{pki}/ca.pem", "tls_cert": "{pki}/server.pem", "tls_key": "{pki}/client.key"}, {},
     r"tls_cert.*not a certificate with its key"),
    ({"tls_cert": "{pki}/client.pem", "tls_key": "{pki}/client.key"}, {}, r"tls_cert: needs .*tls_ca"),
])
def test_connector_tls_settings_that_cannot_work_are_refused_at_engine_start(pki, extra, env, message):
    from kvtier.vllm.settings import ConnectorSettings
    extra = {k: v.format(pki=pki) for k, v in extra.items()}
    with pytest.raises(errors.ConfigError, match=message):
        ConnectorSettings.from_extra({"address": "tcp://192.0.2.7:7070", **extra}, env=env)
    with pytest.raises(errors.ConfigError, match=message):  # the address from the environment
        ConnectorSettings.from_extra(extra, env={"KVTIER_ADDRESS": "192.0.2.7:7070", **env})


def test_a_connector_on_the_unix_socket_ignores_the_tls_settings(pki):
    """TLS files are read only for a daemon over TCP: a stale $KVTIER_TLS_CA (the node's image
    sets it for the engines that reach other nodes) stopped an engine on the daemon's own node."""
    from kvtier.vllm.settings import ConnectorSettings
    stale = {"KVTIER_TLS_CA": "/nowhere/ca.pem"}
    ConnectorSettings.from_extra({}, env=stale)
    ConnectorSettings.from_extra({"address": "unix:///run/kvtier/kvtier.sock"}, env=stale)
    with pytest.raises(errors.ConfigError, match="cannot read /nowhere/ca.pem"):
        ConnectorSettings.from_extra({"address": "tcp://192.0.2.7:7070"}, env=stale)


def test_connector_link_reaches_a_mutual_tls_daemon(make_daemon, pki):
    from kvtier.vllm.link import DaemonLink
    from kvtier.vllm.settings import ConnectorSettings
    d = tls_daemon(make_daemon, pki, mutual=True)
    s = ConnectorSettings.from_extra({"address": d.tcp_address, **_tls_extra(pki)}, env={})
    link = DaemonLink(s.address, timeout_s=5.0, retry_s=1.0, tls=s.tls)
    try:
        link.call(lambda c: c.put("vllm", KEY, b"over mutual tls"))
        assert link.call(lambda c: c.get("vllm", KEY)) == b"over mutual tls" and link.failures == 0
    finally:
        link.close()
    without_cert = ConnectorSettings.from_extra({"address": d.tcp_address, "tls_ca": str(pki / "ca.pem")}, env={})
    for tls in (None, without_cert.tls):  # the daemon turns both away
        link = DaemonLink(s.address, timeout_s=2.0, retry_s=1.0, tls=tls)
        with pytest.raises(errors.Unavailable):
            link.call(lambda c: c.stats())
        link.close()


def test_the_connector_halves_use_the_tls_settings(make_daemon, pki, monkeypatch):
    pytest.importorskip("vllm", reason="vLLM is not installed")
    from types import SimpleNamespace as NS

    from kvtier.vllm import worker as worker_mod
    from kvtier.vllm.scheduler import SchedulerHalf
    from kvtier.vllm.settings import ConnectorSettings
    d = tls_daemon(make_daemon, pki, mutual=True)
    env = {k.upper(): v for k, v in _tls_extra(pki, "kvtier_tls_").items()}
    s = ConnectorSettings.from_extra({"address": d.tcp_address, "chunk_size": 8}, env=env)
    cfg = NS(max_concurrent_batches=1, cache_config=NS(block_size=4, prefix_caching_hash_algo="sha256"),
             model_config=NS(model="m", revision=None, quantization=None, hf_overrides=None, hf_config=None),
             parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=1, decode_context_parallel_size=1,
                                rank=0))
    monkeypatch.setattr(worker_mod, "rank_of", lambda c: (0, 0))
    halves = [SchedulerHalf(cfg, NS(kv_cache_groups=[object()]), s), worker_mod.WorkerHalf(cfg, NS(num_blocks=4), s)]
    try:
        for half in halves:
            assert half.link.call(lambda c: c.stats()).tiers and half.link.failures == 0
    finally:
        for half in halves:
            half.link.close()


# ---- kvtier prewarm -----------------------------------------------------------------------------

PLAN_TENANT = '[[tenant]]\nname = "acme"\n[[tenant.context]]\nname = "kb"\ntext = "{text}"\n'


def _plan(tmp_path, daemon_section: str, url: str = "http://127.0.0.1:9") -> str:
    f = tmp_path / "plan.toml"
    f.write_text(f'[vllm]\nurl = "{url}"\n[daemon]\n{daemon_section}\n[run]\nstate = "{tmp_path}/state.json"\n'
                 + PLAN_TENANT.format(text=" ".join(f"w{i}" for i in range(18))))
    return str(f)


def test_a_plan_takes_the_daemons_tls_files_relative_to_itself(tmp_path, pki):
    from kvtier.prewarm import plan as P
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    p = P.load(_plan(tmp_path, 'tls_ca = "ca.pem"\ntls_cert = "client.pem"\ntls_key = "client.key"\n'
                               'tls_server_name = "localhost"'))
    assert p.daemon_tls == TLS(str(tmp_path / "ca.pem"), str(tmp_path / "client.pem"), str(tmp_path / "client.key"),
                               "localhost")
    assert P.load(_plan(tmp_path, "")).daemon_tls is None


@pytest.mark.parametrize("section,message,line", [
    ('tls_ca = "missing.pem"', r"daemon.tls_ca: cannot read .*missing.pem: No such file", 4),
    ('tls_ca = "{pki}/ca.pem"\ntls_cert = "{pki}/client.pem"', r"daemon.tls_cert and daemon.tls_key go together", 5),
    ('tls_cert = "{pki}/client.pem"\ntls_key = "{pki}/client.key"', r"daemon.tls_cert: needs daemon.tls_ca", 4),
    ('tls_ca = "{pki}/client.key"', r"daemon.tls_ca: .* is not a PEM certificate", 4),
])
def test_a_plan_whose_tls_files_cannot_work_is_refused_with_file_and_line(tmp_path, pki, section, message, line):
    from kvtier.prewarm import plan as P
    path = _plan(tmp_path, section.format(pki=pki))
    with pytest.raises(errors.ConfigError, match=message) as e:
        P.load(path)
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_prewarm_runs_against_a_mutual_tls_daemon(tmp_path, make_daemon, pki):
    import io

    from kvtier.prewarm import plan as P
    from kvtier.prewarm.run import run_plan
    from test_prewarm import FakeVLLM
    d = tls_daemon(make_daemon, pki, mutual=True)
    fake = FakeVLLM(d.address)  # the engine reaches the daemon on its node; prewarm over TCP
    try:
        tls = f'tls_ca = "{pki}/ca.pem"\ntls_cert = "{pki}/client.pem"\ntls_key = "{pki}/client.key"'
        plan = P.load(_plan(tmp_path, f'address = "{d.tcp_address}"\n{tls}', url=fake.url))
        rep = run_plan(plan, progress_out=io.StringIO(), tty=False)
        assert rep.tenants[0].summary()["coverage"]["total"] == 1.0 and len(fake.requests) == 1
        no_tls = P.load(_plan(tmp_path, f'address = "{d.tcp_address}"', url=fake.url))
        with pytest.raises(errors.Unavailable):  # the daemon turns a client without TLS away
            run_plan(no_tls, progress_out=io.StringIO(), tty=False)
    finally:
        fake.close()
