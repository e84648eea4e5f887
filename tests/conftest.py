"""Shared fixtures: real daemons on loopback, each with its own socket and arena.

``daemon``: an in-process daemon (64 MiB arena) on its own event loop thread.
``make_daemon(**sections)``: the same with settings, e.g.
``make_daemon(ram={"capacity": "8MiB", "policy": "lru"})``.
``daemon_process``: ``kvtier serve`` as a real subprocess (for kill tests).
``pki``: a CA with a server and a client certificate; ``tls_daemon(make_daemon, pki)``: a daemon
with TLS on its loopback TCP listeners.
Every daemon is stopped and its files removed at the end of the test.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from kvtier import config
from kvtier.server import DaemonThread


# vLLM opens its engine's ZeroMQ sockets under VLLM_RPC_BASE_PATH (the system's temp directory
# unless set) and leaves them there; the tests' engines, in process or not, use one directory of
# the run's own, removed at its end. Made once per run: a second import of this module (as
# tests.conftest) or a child process that imports it finds the variable set and makes none.
_VLLM_RPC_DIR = None
if "VLLM_RPC_BASE_PATH" not in os.environ:
    _VLLM_RPC_DIR = tempfile.mkdtemp(prefix="kvt-vllm-rpc-")
    os.environ["VLLM_RPC_BASE_PATH"] = _VLLM_RPC_DIR


def pytest_unconfigure(config):
    if _VLLM_RPC_DIR is not None:
        shutil.rmtree(_VLLM_RPC_DIR, ignore_errors=True)


def _dirs():
    tag = uuid.uuid4().hex[:10]
    sock_dir = tempfile.mkdtemp(prefix=f"kvt-{tag}-")  # short: AF_UNIX paths are limited to 107 bytes
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    arena_dir = os.path.join(shm, f"kvtier-test-{tag}")
    return sock_dir, arena_dir


def make_config(sock_dir: str, arena_dir: str, **sections) -> config.Config:
    # gc_freeze_s 0: these daemons share the test process, and a freeze would take the tests'
    # objects out of the collector's reach too; tests/test_gcfreeze.py turns it on
    data = {"server": {"socket": os.path.join(sock_dir, "kvtier.sock"), "drain_timeout_s": 1.0, "gc_freeze_s": 0},
            "metrics": {"listen": ""},
            "ram": {"arena_path": os.path.join(arena_dir, "arena"), "capacity": "64MiB"}}
    for name, vals in sections.items():
        data.setdefault(name, {}).update(vals)
    return config.from_dict(data)


def wait_until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll pred() until it is true; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def make_daemon():
    started: list[DaemonThread] = []
    dirs: list[str] = []

    def factory(**sections) -> DaemonThread:
        sock_dir, arena_dir = _dirs()
        dirs.extend([sock_dir, arena_dir])
        d = DaemonThread(make_config(sock_dir, arena_dir, **sections)).start()
        started.append(d)
        return d

    yield factory
    with contextlib.ExitStack() as stack:  # every daemon stopped and every directory removed,
        for p in dirs:                     # also when a stop raises (that is raised after)
            stack.callback(shutil.rmtree, p, True)
        for d in started:
            stack.callback(d.stop)


@pytest.fixture
def daemon(make_daemon) -> DaemonThread:
    return make_daemon()


class DaemonProcess:
    """``kvtier serve --config FILE`` in a subprocess."""

    def __init__(self, cfg_text: str, sock_path: str, workdir: str):
        self.cfg_path = os.path.join(workdir, "kvtier.toml")
        with open(self.cfg_path, "w") as f:
            f.write(cfg_text)
        self.sock_path = sock_path
        self.address = f"unix://{sock_path}"
        self.log_path = os.path.join(workdir, "daemon.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "DaemonProcess":
        from kvtier.client import Client
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--config", self.cfg_path],
                                     stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{open(self.log_path).read()}")
            if os.path.exists(self.sock_path):
                try:
                    with Client(self.address, timeout=2) as c:
                        c.stats()
                    return self
                except Exception:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not start:\n{open(self.log_path).read()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout)
        return self.proc.returncode if self.proc else 0


@pytest.fixture
def daemon_process():
    """Factory: daemon_process(extra_toml="") -> a started DaemonProcess."""
    made: list[tuple[DaemonProcess, str, str]] = []

    def factory(extra_toml: str = "", capacity: str = "64MiB") -> DaemonProcess:
        sock_dir, arena_dir = _dirs()
        sock = os.path.join(sock_dir, "kvtier.sock")
        text = (f'[server]\nsocket = "{sock}"\ndrain_timeout_s = 1.0\n'
                f'[ram]\narena_path = "{arena_dir}/arena"\ncapacity = "{capacity}"\n')
        if "[metrics]" not in extra_toml:
            text += '[metrics]\nlisten = ""\n'
        text += extra_toml
        d = DaemonProcess(text, sock, sock_dir)
        made.append((d, sock_dir, arena_dir))
        return d.start()

    yield factory
    for d, sock_dir, arena_dir in made:
        d.kill()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA, and a server and a client certificate it signed (for localhost and 127.0.0.1)."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kvtier-test-ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                 "-out", f"{name}.csr", cwd=d)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", "san.cnf", "-out", f"{name}.pem", cwd=d)
    return d


def tls_daemon(make_daemon, pki, mutual: bool = False):
    """A daemon whose TCP listeners (gRPC and data channel, on loopback) speak TLS with pki's
    server certificate; ``mutual``: they also ask for a client certificate signed by its CA."""
    server = {"listen": "127.0.0.1:0", "data_listen": "127.0.0.1:0",
              "tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    if mutual:
        server["tls_client_ca"] = str(pki / "ca.pem")
    return make_daemon(server=server)
