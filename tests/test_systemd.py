"""systemd integration: the units verify, and the daemon speaks sd_notify."""
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("kvtier*.*"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_verifies(unit, tmp_path):
    # verify needs the ExecStart binary to exist: point it at this checkout's console script
    exe = shutil.which("kvtier") or str(pathlib.Path(sys.executable).parent / "kvtier")
    text = unit.read_text().replace("/opt/kvtier/bin/kvtier", exe)
    copy = tmp_path / unit.name
    copy.write_text(text)
    for other in UNITS:  # a timer verifies together with its service
        if other != unit:
            (tmp_path / other.name).write_text(other.read_text().replace("/opt/kvtier/bin/kvtier", exe))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True, text=True,
                       env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    problems = [l for l in (r.stdout + r.stderr).splitlines()
                if l.strip() and "Failed to" not in l and "/dev/hugepages" not in l]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_every_unit_is_documented():
    for unit in UNITS:
        head = unit.read_text().splitlines()[0]
        assert head.startswith("#"), f"{unit.name} has no header comment"


def _unit(name: str) -> dict[str, list[str]]:
    """A unit file's settings: name -> values, in order."""
    out: dict[str, list[str]] = {}
    for line in (ROOT / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_prewarm_units():
    assert {"kvtier-prewarm.service", "kvtier-prewarm.timer"} <= {u.name for u in UNITS}
    timer = _unit("kvtier-prewarm.timer")
    assert timer["Persistent"] == ["true"] and timer["Unit"] == ["kvtier-prewarm.service"]
    assert timer["RandomizedDelaySec"] and timer["RandomizedDelaySec"][0] not in ("0", "")
    assert timer["WantedBy"] == ["timers.target"]
    svc = _unit("kvtier-prewarm.service")
    assert svc["Type"] == ["oneshot"] and "kvtier.service" in svc["After"][0]
    # never starts a daemon the operator stopped (Wants= would)
    assert svc["Requisite"] == ["kvtier.service"] and "kvtier.service" not in " ".join(svc.get("Wants", []))
    argv = svc["ExecStart"][0].split()
    assert argv[:2] == ["/opt/kvtier/bin/kvtier", "prewarm"] and argv[-1].endswith(".toml")
    from kvtier.cli import build_parser
    args = build_parser().parse_args(argv[1:])           # the command line is one kvtier accepts
    assert args.promote and args.quiet
    if shutil.which("systemd-analyze"):                   # nightly: the next runs are a day apart
        r = subprocess.run(["systemd-analyze", "calendar", "--iterations=2", timer["OnCalendar"][0]],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        runs = [l.split(":", 1)[1].strip() for l in r.stdout.splitlines() if "Iter." in l or "Next elapse" in l]
        assert len(runs) == 2 and runs[0].split()[2] == runs[1].split()[2], r.stdout  # same time of day


def _recv_all(sock, until, timeout):
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        got.append(msg)
        if until(got):
            break
    return got


def test_ready_watchdog_stopping(tmp_path):
    sock_dir = tempfile.mkdtemp(prefix="kvt-n-")
    arena_dir = f"/dev/shm/kvtier-test-notify-{os.getpid()}"
    notify_path = os.path.join(sock_dir, "notify")
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(notify_path)
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[server]\nsocket = "{sock_dir}/k.sock"\ndrain_timeout_s = 1.0\n'
                   f'[ram]\narena_path = "{arena_dir}/arena"\ncapacity = "16MiB"\n')
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000"}
    p = subprocess.Popen([sys.executable, "-m", "kvtier.cli", "serve", "--config", str(cfg)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        msgs = _recv_all(ns, lambda g: sum("WATCHDOG=1" in m for m in g) >= 3, 30)
        ready = [m for m in msgs if "READY=1" in m]
        assert ready, msgs
        assert f"MAINPID={p.pid}" in ready[0]
        assert os.path.exists(f"{sock_dir}/k.sock")  # READY comes only once the socket is bound
        assert sum("WATCHDOG=1" in m for m in msgs) >= 3, msgs

        p.send_signal(signal.SIGHUP)
        msgs = _recv_all(ns, lambda g: any("READY=1" in m for m in g), 10)
        assert any("RELOADING=1" in m for m in msgs) and any("READY=1" in m for m in msgs), msgs

        p.send_signal(signal.SIGTERM)
        msgs = _recv_all(ns, lambda g: any("STOPPING=1" in m for m in g), 10)
        assert any("STOPPING=1" in m for m in msgs), msgs
        assert p.wait(30) == 0, p.stderr.read().decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        ns.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)


def test_notifier_is_a_noop_outside_systemd():
    from kvtier.notify import Notifier
    n = Notifier({})
    assert not n.enabled and not n.ready() and n.watchdog_interval == 0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval == 0
