"""Logs: logfmt lines, syslog priorities under journald, never a token."""
import hashlib
import io
import logging
import os
import subprocess
import sys
import time

from kvtier.logs import LogfmtFormatter, setup


def _line(journald, level, msg):
    rec = logging.LogRecord("kvtier.x", level, __file__, 1, msg, (), None)
    return LogfmtFormatter(journald).format(rec)


def test_logfmt_and_journald_priorities():
    assert _line(True, logging.WARNING, 'arena "x" not locked') == \
        '<4>level=warning logger=kvtier.x msg="arena \\"x\\" not locked"'
    assert _line(True, logging.ERROR, "boom").startswith("<3>level=error ")
    assert _line(True, logging.INFO, "ok").startswith("<6>level=info ")
    line = _line(False, logging.INFO, "serving")
    assert line.startswith("ts=") and line.endswith("level=info logger=kvtier.x msg=serving")


def test_daemon_logs_never_contain_the_token(tmp_path):
    token = "s3cr3t-token-" + "q" * 20
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.a]\ntoken_sha256 = ["{hashlib.sha256(token.encode()).hexdigest()}"]\n'
                       f'namespaces = ["a-*"]\n')
    sock = f"/tmp/kvt-log-{os.getpid()}/k.sock"
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[server]\nsocket = "{sock}"\nlog_level = "debug"\ndrain_timeout_s = 1.0\n'
                   f'[ram]\narena_path = "/dev/shm/kvt-log-{os.getpid()}/arena"\ncapacity = "8MiB"\npersist = false\n'
                   f'[metrics]\nlisten = ""\n[auth]\ntenants_file = "{tenants}"\n')
    env = {**os.environ, "JOURNAL_STREAM": "8:1234"}
    p = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--config", str(cfg)], env=env,
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        from kvtier import errors
        from kvtier.client import Client
        deadline = time.monotonic() + 20
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        with Client(f"unix://{sock}", token=token) as c:
            c.put("a-1", b"k" * 16, b"payload-that-must-not-be-logged")
        try:
            Client(f"unix://{sock}", token="wrong-" + token).stats()
        except errors.Unauthenticated:
            pass
    finally:
        p.terminate()
        _, err = p.communicate(timeout=30)
        import shutil
        shutil.rmtree(os.path.dirname(sock), ignore_errors=True)
        shutil.rmtree(f"/dev/shm/kvt-log-{os.getpid()}", ignore_errors=True)
    text = err.decode()
    assert "<6>level=info logger=kvtier.server" in text
    assert token not in text and "payload-that-must-not-be-logged" not in text


def test_write_queues_larger_than_the_arena_allows_are_capped_and_said(make_daemon, tmp_path, caplog):
    """nvme.queue_bytes is at most half the arena, cluster.queue_bytes a quarter: a larger setting is
    capped at start, and the log says to what (configs/kvtier.toml promises nothing silently clamped)."""
    caplog.set_level(logging.INFO, logger="kvtier.store")
    d = make_daemon(ram={"capacity": "16MiB"}, nvme={"dirs": [str(tmp_path / "nv")], "queue_bytes": "1GiB"})
    assert d.daemon.store.queue_limit < 1 << 30
    said = [r.getMessage() for r in caplog.records if r.name == "kvtier.store"]
    assert any(m.startswith(f"nvme.queue_bytes: {1 << 30} bytes, more than half the arena: "
                            f"{d.daemon.store.queue_limit} bytes") for m in said), said
