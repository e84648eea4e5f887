"""The daemon's lifecycle: ``startup()``, ``main_loop()``, ``shutdown()``.

startup   take the NVMe directories (a second daemon given them is refused
          here), create and lock the arena (in a thread, a piece at a time:
          a stop meanwhile ends the start, and systemd hears of the progress),
          build the hot tier, bind the gRPC server
          (Unix socket, plus TCP when configured) with the health and
          reflection services, start the data channel (which also carries
          unary calls to the same service) and the expiry reaper, then report
          SERVING.
main_loop wait for SIGTERM/SIGINT (or ``stop()``), expiring leases,
          reservations and pins every 100 ms, pinging the systemd watchdog;
          SIGHUP re-reads the config file and applies what can change live
          (log level) and the tenants file (tokens, namespaces, quotas; ""
          turns tenants off), naming the settings that need a restart.
shutdown  report NOT_SERVING and STOPPING=1, stop accepting, give in-flight
          calls up to ``server.drain_timeout_s``, close the data channel, wait
          (same budget each) for queued NVMe writes, then for the cluster
          tier's queue, unmap the arena and its slot table (kept on tmpfs
          for the next start with ``ram.persist``, else removed), remove the
          sockets; exit 0.

A second daemon on the same socket refuses to start instead of stealing it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .arena import Arena, Interrupted, secure_dir
from .cluster import from_config as cluster_from_config
from .auth import AllowAll, Tenants
from . import config as config_mod
from .config import Config
from .datachannel import BindError, DataServer
from .errors import ConfigError
from .gcfreeze import Freezer, Pauses
from .hot import HotTier
from .hugepages import Collapser
from .metrics import Metrics, NullMetrics
from .notify import Notifier
from .service import KVTierService
from .slots import SlotTable, table_path
from .store import Store, open_cold
from .v1 import kvtier_pb2 as pb
from .v1 import kvtier_pb2_grpc as pb_grpc

log = logging.getLogger("kvtier.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVTier"].full_name
# while the arena is being locked (minutes for a large one), systemd hears of its progress at least
# this often and is asked to wait this much longer each time (EXTEND_TIMEOUT_USEC): a start that is
# making progress is not killed at TimeoutStartSec
ARENA_STATUS_S = 1.0
ARENA_EXTEND_S = 120.0
ARENA_LOG_S = 10.0
# calls at once on one gRPC connection: each may hold a request of up to server.max_message_bytes
# before its token is checked; a client's calls past this wait for a free stream
MAX_STREAMS = 256
# the largest answer sent (server.max_message_bytes bounds requests, read before a token is checked):
# a Stats of many namespaces takes about 70 bytes each
MAX_ANSWER = 256 << 20


class _Stopped(Exception):
    """stop() was asked for before the daemon served: the start ends there, as a stop."""


def _socket_in_use(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(0.5)
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.notify = Notifier()
        self.metrics = NullMetrics()
        self.access = Tenants.load(cfg.auth.tenants_file) if cfg.auth.tenants_file else AllowAll()
        self.arena: Arena | None = None
        self.hot: HotTier | None = None
        self.store: Store | None = None
        self.cluster = None
        self._cold = None  # the NVMe tier, opened before the arena, until the Store owns it
        self._enforcing: set[asyncio.Task] = set()
        self.data: DataServer | None = None
        self.server: grpc.aio.Server | None = None
        self.health: health.HealthServicer | None = None
        self.address = ""       # gRPC address clients dial ("unix:///..." or "host:port")
        self._bound_socket = False  # ours to remove at shutdown; a refused start leaves another's alone
        self.tcp_port = 0
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._stopping = threading.Event()  # as _stop, for the threads that make the arena
        self._arena_told = (0.0, 0.0)  # when systemd and the log last heard of the arena's locking
        self._reload = threading.Event()
        self.ready = threading.Event()
        self.gc_pauses = Pauses()  # installed while serving (startup .. shutdown)
        self.gc_freezer = Freezer(cfg.server.gc_freeze_s)
        self.huge_pages = Collapser(cfg.server.huge_pages_s)

    def stop(self) -> None:
        self._stopping.set()
        self._stop.set()

    def _check_stop(self) -> None:
        if self._stopping.is_set():
            raise _Stopped()

    def _arena_progress(self, done: int, size: int) -> None:
        """Called from the thread locking the arena after each piece."""
        pct = f"{done * 100 // size}% of {config_mod.format_size(size)}"
        self._progress("locking the arena in RAM", pct, done >= size, "arena: %s locked")

    def _step_progress(self, what: str, unit: str) -> Callable[..., None]:
        """A progress callback for a long start step after the arena (the RAM tier's restore, the
        NVMe scan), called from its thread: a stop meanwhile ends the start there (_Stopped), and
        systemd hears of the step, as of the arena's locking."""
        first = [True]

        def progress(done: int, total: int = 0) -> None:
            self._check_stop()
            self._progress(what, f"{done} of {total} {unit}" if total else f"{done} {unit}", False,
                           what + ": %s", first[0])
            first[0] = False
        return progress

    def _progress(self, what: str, share: str, last: bool, log_fmt: str, first: bool = False) -> None:
        """Tell systemd (STATUS, EXTEND_TIMEOUT_USEC: the start is making progress) at most every
        ARENA_STATUS_S, and the log every ARENA_LOG_S; a step's ``first`` and ``last`` always."""
        now, (told, logged) = time.monotonic(), self._arena_told
        if not (last or first) and now < told + ARENA_STATUS_S:
            return
        self.notify.send(f"STATUS={what}: {share}", f"EXTEND_TIMEOUT_USEC={int(ARENA_EXTEND_S * 1e6)}")
        if not last and now >= logged + ARENA_LOG_S:
            log.info(log_fmt, share)
            logged = now
        self._arena_told = (now, logged)

    def data_address_for(self, peer: str) -> str:
        """The data channel on the transport the client came in on: its Unix socket for a client
        on the Unix socket (same node), TCP for the others, and none ("": gRPC) for a TCP client
        when the data channel has no TCP listener (the socket's path, on another node, would be
        that node's own daemon)."""
        if self.data is None:
            return ""
        want = "unix://" if peer.startswith("unix:") else "tcp://"
        return next((a for a in self.data.addresses if a.startswith(want)), "")

    def _read(self, path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None

    def _tls_credentials(self):
        s = self.cfg.server
        if not s.tls_cert:
            return None
        ca = self._read(s.tls_client_ca) if s.tls_client_ca else None
        return grpc.ssl_server_credentials([(self._read(s.tls_key), self._read(s.tls_cert))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def _tls_context(self):
        import ssl
        s = self.cfg.server
        if not s.tls_cert:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca:
            ctx.load_verify_locations(s.tls_client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    async def startup(self) -> None:
        cfg = self.cfg
        sock = cfg.socket_path
        config_mod.check_socket_path("server.socket", sock)  # the default too ($XDG_RUNTIME_DIR), before the arena
        in_use = ConfigError(f"another daemon is listening on {sock}; stop it or set server.socket")
        if os.path.exists(sock) and _socket_in_use(sock):  # said first: its directory is that daemon's
            raise in_use
        system = config_mod.SYSTEM_SOCKET
        if not cfg.server.socket and sock != system and os.path.exists(system) and _socket_in_use(system):
            log.warning("the node's daemon (kvtier.service) serves on %s; this is another daemon, with an "
                        "arena of its own (%s), and clients of this user given no address use it; to use the "
                        "node's daemon instead, stop this one (clients: --address unix://%s)",
                        system, cfg.arena_path, system)
        # the per-user default directory must be ours alone; a configured one (a RuntimeDirectory,
        # a directory shared with group kvtier) only not writable by everyone without the sticky bit
        secure_dir(os.path.dirname(os.path.abspath(sock)), not cfg.server.socket, "socket directory")
        if os.path.exists(sock):
            if _socket_in_use(sock):
                raise in_use
            os.unlink(sock)
        # the NVMe directories are taken before the arena is made: a daemon given another's is
        # refused at once, not after locking (and giving back) its RAM
        if cfg.nvme.dirs:
            self._cold = await asyncio.to_thread(open_cold, cfg)
        # mapping, touching and locking a large arena takes seconds to minutes: say so first, and
        # do it in a thread, so a stop (SIGTERM, Ctrl-C) ends it
        log.info("arena %s: %s%s", cfg.arena_path, config_mod.format_size(cfg.arena_capacity),
                 ", locking it in RAM" if cfg.ram.mlock else "")
        self.arena = await asyncio.to_thread(
            Arena, cfg.arena_path, cfg.arena_capacity, cfg.ram.mlock, reattach=cfg.ram.persist,
            private_dir=not cfg.ram.arena_path, stop=self._stopping, progress=self._arena_progress)
        self._check_stop()
        a = self.arena
        pages = "2 MiB pages" if a.huge_pages else "4 KiB pages"
        if a.locked:
            log.info("arena %s: %d bytes on %s (%s), locked in RAM", a.path, a.size, a.backing, pages)
        else:
            log.warning("arena %s: %d bytes on %s, NOT locked: %s", a.path, a.size, a.backing, a.lock_detail)
        if a.not_reused:
            log.warning("arena %s: the previous run's arena is not re-attached (%s); the RAM tier starts empty",
                        a.path, a.not_reused)
        r = cfg.ram
        self.hot = HotTier(start=a.data_offset, end=a.size, policy=r.policy, max_block_bytes=r.max_block_bytes,
                           lease_ms=r.lease_ms, reservation_ms=r.reservation_ms, max_ttl_ms=r.max_ttl_ms,
                           max_pinned=r.max_pinned)
        self._apply_ram_tenants()  # before restore: each restored block is filed under its tenant's group
        if cfg.ram.persist:
            table = SlotTable(table_path(a.path, a.backing), fresh=not a.reattached, arena_id=a.arena_id)
            if table.foreign:
                log.warning("slot table %s describes another arena (a start stopped before it was rewritten): "
                            "the RAM tier starts empty", table.path)
            if a.reattached:
                t0 = time.monotonic()
                # pins recorded by the last run that used the arena, or left by a run before it
                # that an older version (which keeps no pins) followed: then none is trusted
                pins = table.pins_generation == a.previous_generation
                if pins:  # this run owns them from now on: a start stopped during the restore keeps them
                    table.pins_generation = a.generation
                try:
                    kept, dropped = await asyncio.to_thread(
                        self.hot.restore, table, a.view, r.verify_on_restart,
                        self._step_progress("re-attaching the RAM tier", "blocks checked"), pins)
                except BaseException:
                    table.close()  # left as it was, for the next start
                    raise
                log.info("arena re-attached: %d blocks kept, %d dropped, in %.2fs", kept, dropped,
                         time.monotonic() - t0)
                if self.hot.pins_dropped:
                    log.warning("arena: %d recorded pins are not trusted and dropped: the arena was last used by "
                                "a kvtier version that does not record them, or one before 0.2.0 (pin them "
                                "again: kvtier prewarm does at its next run)", self.hot.pins_dropped)
            else:
                self.hot.slots = table
            table.pins_generation = a.generation  # the pins recorded from now on are this run's
        self._check_stop()
        self.store = Store(cfg, self.hot, a.view, a.huge_pages, cold=self._cold)
        self.cluster = cluster_from_config(cfg.cluster)
        await self.cluster.start()
        self.store.attach_cluster(self.cluster, asyncio.get_running_loop())
        self._apply_tenants()
        t0 = time.monotonic()
        n = await asyncio.to_thread(self.store.start, self._step_progress("indexing the NVMe tier", "directories"))
        if cfg.nvme.dirs:
            log.info("nvme: %d blocks indexed from %d directories in %.2fs", n, len(cfg.nvme.dirs),
                     time.monotonic() - t0)
        self._check_stop()
        mm = cfg.server.max_message_bytes
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", mm),
            ("grpc.max_send_message_length", max(mm, MAX_ANSWER)),
            ("grpc.max_concurrent_streams", MAX_STREAMS),
            ("grpc.so_reuseport", 0),
        ])
        service = KVTierService(self)
        pb_grpc.add_KVTierServicer_to_server(service, self.server)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.server.add_insecure_port(f"unix://{sock}")
        self._bound_socket = True
        self.address = f"unix://{sock}"
        creds = self._tls_credentials()
        if cfg.server.listen:
            host, port = config_mod.split_host_port(cfg.server.listen)
            try:
                self.tcp_port = (self.server.add_secure_port(f"{host}:{port}", creds) if creds
                                 else self.server.add_insecure_port(f"{host}:{port}"))
            except RuntimeError:  # grpcio raises where older versions returned port 0
                self.tcp_port = 0
            if not self.tcp_port:
                raise ConfigError(f"server.listen: cannot bind {cfg.server.listen} "
                                  f"(in use, or not an address of this host)")
        await self.server.start()
        mode = int(cfg.server.socket_mode, 8)
        os.chmod(sock, mode)
        if cfg.server.data_channel:
            tcp = config_mod.split_host_port(cfg.server.data_listen) if cfg.server.data_listen else None
            try:
                self.data = DataServer(self.store, a.view, cfg.ram.verify_on_commit, unix_path=sock + ".data",
                                       tcp=tcp, socket_mode=mode, access=self.access, tls=self._tls_context(),
                                       calls=service.call, max_call_bytes=mm,
                                       max_connections=cfg.server.data_max_connections,
                                       observe=lambda *a: self.metrics.observe(*a))
            except BindError as e:
                setting, where = (("server.data_listen", cfg.server.data_listen) if e.tcp
                                  else ("server.socket", e.address))
                raise ConfigError(f"{setting}: cannot bind {where}: {e.strerror}") from None
        if cfg.metrics.listen:
            try:
                self.metrics = Metrics(self, cfg.metrics.listen)
            except OSError as e:
                log.error("metrics.listen: cannot listen on %s (%s); running without metrics", cfg.metrics.listen, e)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.started = time.monotonic()
        self.gc_pauses.install()
        log.info("serving on %s%s; data channel %s; policy %s", self.address,
                 f" and tcp port {self.tcp_port}" if self.tcp_port else "",
                 " and ".join(self.data.addresses) if self.data else "off", r.policy)
        self._check_stop()  # a stop while the listeners were set up: never said ready (no await to serve())
        self.ready.set()

    async def main_loop(self) -> None:
        next_ping = 0.0
        while not self._stop.is_set():
            self.hot.expire()
            self.gc_freezer.tick()
            self.huge_pages.tick()
            if self.notify.watchdog_interval and time.monotonic() >= next_ping:
                self.notify.watchdog()
                next_ping = time.monotonic() + self.notify.watchdog_interval
            if self._reload.is_set():
                self._reload.clear()
                try:
                    self.reload()
                except Exception:  # a reload must never take the serving daemon down with it
                    log.exception("reload failed, keeping the running configuration")
                    self.notify.ready("serving (reload failed)")
            try:
                await asyncio.wait_for(self._stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass

    def _apply_ram_tenants(self) -> None:
        """Tenant groups and RAM quotas into the hot tier (new and restored blocks take them)."""
        with self.hot.lock:
            self.hot.group_of = self.access.group_of
            self.hot.quotas = {t.name: t.ram_quota for t in self.access.tenants.values() if t.ram_quota}

    def _apply_tenants(self) -> None:
        """Tenant groups and RAM/NVMe/Redis quotas into the tiers (new blocks take the new groups);
        a lowered Redis quota is enforced at once, in the background (on the event loop)."""
        tenants = self.access.tenants.values()
        self._apply_ram_tenants()
        cold = self.store.cold
        if hasattr(cold, "lock"):
            with cold.lock:
                cold.group_of = self.access.group_of
                cold.quotas = {t.name: t.nvme_quota for t in tenants if t.nvme_quota}
        self.cluster.set_tenants(self.access.group_of, {t.name: t.redis_quota for t in tenants if t.redis_quota})
        task = asyncio.get_running_loop().create_task(self.cluster.enforce_quotas())
        self._enforcing.add(task)
        task.add_done_callback(self._enforcing.discard)

    def request_reload(self) -> None:
        self._reload.set()

    def reload(self) -> None:
        """Apply a changed config file: live settings now, the rest named for a restart."""
        self.notify.reloading()
        try:  # no file (embedded or programmatic config): re-read only what the config points at
            new = config_mod.load(self.config_path) if self.config_path else self.cfg
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            self.notify.ready("serving (reload refused: bad config)")
            return
        # the tenants file applies live, as at startup: a file (re-read, or another one), or ""
        # for none (no tokens; the socket's permissions are the boundary again)
        tenants_file = self.cfg.auth.tenants_file
        if new.auth.tenants_file or self.access.enabled:
            try:
                self.access = Tenants.load(new.auth.tenants_file) if new.auth.tenants_file else AllowAll()
                tenants_file = new.auth.tenants_file
                if self.data is not None:
                    self.data.access = self.access
                self._apply_tenants()
                if self.access.enabled:
                    log.info("tenants reloaded: %s", ", ".join(sorted(self.access.tenants)))
                else:
                    log.info("tenants off (auth.tenants_file is empty): calls need no token")
            except ConfigError as e:
                log.error("tenants reload refused, keeping the running tenants: %s", e)
        if new.server.log_level != self.cfg.server.log_level:
            logging.getLogger().setLevel(new.server.log_level.upper())
            log.info("log level now %s", new.server.log_level)
        restart = [f"{sec}.{f}" for sec in ("server", "ram", "nvme", "cluster", "metrics", "auth")
                   for f in getattr(new, sec).__dataclass_fields__
                   if (sec, f) not in (("server", "log_level"), ("auth", "tenants_file"))
                   and getattr(getattr(new, sec), f) != getattr(getattr(self.cfg, sec), f)]
        if restart:
            log.warning("reloaded; these changes need a restart to apply: %s", ", ".join(restart))
        else:
            log.info("reloaded")
        self.cfg = config_mod.replace(self.cfg, server={"log_level": new.server.log_level},
                                      auth={"tenants_file": tenants_file})
        self.notify.ready()

    async def shutdown(self) -> None:
        served = self.ready.is_set()  # else a start that failed, cleaning up what it made
        if served:
            log.info("stopping: draining for up to %.1fs", self.cfg.server.drain_timeout_s)
        self.notify.stopping()
        if self.health is not None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.data is not None:
            self.data.stopping = True  # unary calls on the data channel drain with gRPC's
        if self.server is not None:
            await self.server.stop(self.cfg.server.drain_timeout_s)
        if self.data is not None:
            # in a thread: it waits for the connections' threads, which may wait for this loop
            await asyncio.to_thread(self.data.close)
        self.metrics.close()
        self.gc_pauses.remove()
        if self.store is not None:
            await self.store.stop_background()
            await asyncio.to_thread(self.store.close, self.cfg.server.drain_timeout_s)
        elif self._cold is not None:  # a start that ended before the store was made
            self._cold.close()
        for task in list(self._enforcing):
            task.cancel()
        if self.cluster is not None:
            await self.cluster.close(self.cfg.server.drain_timeout_s)
        # the arena and its slot table outlive us, for the next start; a new arena of a start that
        # never served holds nothing yet and goes
        keep = self.cfg.ram.persist and (served or self.arena is not None and self.arena.reattached)
        if self.hot is not None:
            self.hot.slots.close(unlink=not keep)
        if self.arena is not None:
            self.arena.close(unlink=not keep)
        if self._bound_socket:
            try:
                os.unlink(self.cfg.socket_path)
            except FileNotFoundError:
                pass
        if served:
            log.info("stopped")

    async def serve(self, install_signals: bool = True) -> None:
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            try:
                await self.startup()
            except (_Stopped, Interrupted):
                log.info("stopped before serving")
                return
            self.notify.ready(f"serving on {self.address}")
            await self.main_loop()
        finally:
            await self.shutdown()


def run(cfg: Config, config_path: str | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT (``kvtier serve``)."""
    asyncio.run(Daemon(cfg, config_path).serve())


class DaemonThread:
    """A daemon on its own event loop in a background thread (tests, benchmarks, embedding).

        with DaemonThread(cfg) as d:
            Client(d.address)...
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.daemon = Daemon(cfg)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="kvtier-daemon")

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._main())
            if not self.daemon.ready.is_set():
                raise RuntimeError("the daemon was stopped before it served")
        except BaseException as e:  # reported to start()
            self._error = e
            self.daemon.ready.set()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self.daemon._stop = asyncio.Event()
        await self.daemon.serve(install_signals=False)

    def start(self, timeout: float = 30) -> "DaemonThread":
        self._thread.start()
        if not self.daemon.ready.wait(timeout):
            raise TimeoutError("daemon did not start")
        if self._error is not None:
            self._thread.join(timeout)  # the loop closes after ready is set
            raise self._error
        return self

    def stop(self, timeout: float = 30) -> None:
        if self._loop is not None and self._thread.is_alive():
            try:
                self._loop.call_soon_threadsafe(self.daemon.stop)
            except RuntimeError:  # the loop closed meanwhile: the daemon has ended
                pass
        self._thread.join(timeout)

    @property
    def address(self) -> str:
        return self.daemon.address

    @property
    def tcp_address(self) -> str:
        return f"127.0.0.1:{self.daemon.tcp_port}"

    def __enter__(self) -> "DaemonThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
