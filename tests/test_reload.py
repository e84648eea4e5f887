"""SIGHUP (``systemctl reload``) on a real ``kvtier serve``: the tenants file applies live, tenants
on as well as off."""
import hashlib
import signal
import time

import pytest

from kvtier import errors
from kvtier.client import Client

from conftest import wait_until

TOKEN = "token-of-acme-" + "r" * 20
KEY = bytes(range(16))


def _reload(d, text: str) -> None:
    with open(d.cfg_path, "w") as f:
        f.write(text)
    d.proc.send_signal(signal.SIGHUP)


def _log(d) -> str:
    with open(d.log_path) as f:
        return f.read()


def _eventually(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except errors.Unauthenticated:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_reload_turns_tenants_on_and_off(daemon_process, tmp_path):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.acme]\ntoken_sha256 = ["{hashlib.sha256(TOKEN.encode()).hexdigest()}"]\n'
                       f'namespaces = ["acme"]\nram_quota = "1MiB"\n')
    d = daemon_process('[auth]\ntenants_file = ""\n')
    with open(d.cfg_path) as f:
        without = f.read()
    with_tenants = without.replace('tenants_file = ""', f'tenants_file = "{tenants}"')
    with Client(d.address) as c:
        c.put("acme", KEY, b"of acme")

    _reload(d, with_tenants)  # tenants on: a token for every call
    wait_until(lambda: "tenants reloaded: acme" in _log(d), 10, "the reload's log line")
    with pytest.raises(errors.Unauthenticated):
        Client(d.address).stats()
    with Client(d.address, token=TOKEN) as c:
        assert c.get("acme", KEY) == b"of acme"
        with pytest.raises(errors.PermissionDenied):
            c.put("other", KEY, b"not acme's")

    _reload(d, without)  # and off again: no token needed, on gRPC and on the data channel
    with Client(d.address, control="grpc") as g, Client(d.address, attach=False) as dc:
        assert _eventually(lambda: g.get("acme", KEY)) == b"of acme"
        assert dc.get("acme", KEY) == b"of acme"
        assert dc.put("other", KEY, b"anyone's") is True
    wait_until(lambda: "tenants off" in _log(d), 10, "the second reload's log line")
    assert "need a restart" not in _log(d)


def test_a_reload_of_a_file_that_is_not_utf8_is_refused_and_the_daemon_serves_on(daemon_process):
    """A stray byte (a Latin-1 comment) is a config error naming the file and line, at reload as
    at `kvtier config check`: the running daemon keeps its configuration."""
    d = daemon_process('[auth]\ntenants_file = ""\n')
    with open(d.cfg_path) as f:
        text = f.read()
    with Client(d.address) as c:
        c.put("acme", KEY, b"kept")
    with open(d.cfg_path, "wb") as f:
        f.write(text.encode() + b"# caf\xe9\n")
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in _log(d), 10, "the refusal's log line")
    assert "not UTF-8" in _log(d) and d.proc.poll() is None
    with Client(d.address) as c:
        assert c.get("acme", KEY) == b"kept"
