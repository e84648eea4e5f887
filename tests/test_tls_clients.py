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
