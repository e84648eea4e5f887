"""The real ``kvtier`` command, run as a subprocess against real daemons."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from kvtier.client import Client

MiB = 1 << 20
NS = "cli-test"
KEY16 = "00112233445566778899aabbccddeeff"
KEY32 = "ff" * 32


def _kvtier() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "kvtier")
    if os.access(exe, os.X_OK):
        return [exe]
    found = shutil.which("kvtier")
    return [found] if found else [sys.executable, "-m", "kvtier.cli"]


KVTIER = _kvtier()


def run(*args, input: bytes | None = None, env_extra: dict | None = None, timeout: float = 30):
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_ADDRESS"}
    env.update(env_extra or {})
    return subprocess.run([*KVTIER, *map(str, args)], input=input, capture_output=True, timeout=timeout, env=env)


def text(p) -> str:
    return p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace")


# ---- put / get ---------------------------------------------------------------------------------------

def test_put_then_get_to_file_and_stdout(daemon, tmp_path):
    data = os.urandom(3 * MiB + 77)  # more than one gRPC chunk
    src = tmp_path / "block.bin"
    src.write_bytes(data)
    p = run("put", "--address", daemon.address, NS, KEY16, src)
    assert p.returncode == 0, text(p)
    assert b"stored" in p.stdout and str(len(data)).encode() in p.stdout

    out = tmp_path / "out.bin"
    p = run("get", "--address", daemon.address, NS, KEY16, out)
    assert p.returncode == 0, text(p)
    assert out.read_bytes() == data

    p = run("get", "--address", daemon.address, NS, KEY16, "-")
    assert p.returncode == 0, text(p)
    assert p.stdout == data

    # the daemon really holds it, under the parsed key
    with Client(daemon.address) as c:
        assert c.get(NS, bytes.fromhex(KEY16)) == data

    # a second put of the same key says so; --overwrite replaces it
    p = run("put", "--address", daemon.address, NS, KEY16, src)
    assert p.returncode == 0 and b"already present" in p.stdout, text(p)
    src.write_bytes(b"replaced")
    p = run("put", "--address", daemon.address, "--overwrite", NS, KEY16, src)
    assert p.returncode == 0, text(p)
    assert run("get", "--address", daemon.address, NS, KEY16, "-").stdout == b"replaced"


def test_keys_32_bytes_and_name_form(daemon, tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"thirty-two")
    assert run("put", "-a", daemon.address, NS, KEY32, src).returncode == 0
    assert run("get", "-a", daemon.address, NS, KEY32, "-").stdout == b"thirty-two"
    src.write_bytes(b"by name")
    assert run("put", "-a", daemon.address, NS, "name:system-prompt", src).returncode == 0
    assert run("get", "-a", daemon.address, NS, "name:system-prompt", "-").stdout == b"by name"


def test_default_address_from_environment(daemon, tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"env")
    env = {"KVTIER_ADDRESS": daemon.address}
    assert run("put", NS, KEY16, src, env_extra=env).returncode == 0
    p = run("get", NS, KEY16, "-", env_extra=env)
    assert p.returncode == 0 and p.stdout == b"env", text(p)


def test_get_missing_key_exits_1(daemon, tmp_path):
    out = tmp_path / "missing.bin"
    p = run("get", "--address", daemon.address, NS, KEY16, out)
    assert p.returncode == 1, text(p)
    assert b"not found" in p.stderr
    assert not out.exists()
    p = run("get", "--address", daemon.address, NS, KEY16, "-")
    assert p.returncode == 1 and p.stdout == b""


@pytest.mark.parametrize("bad,expect", [
    ("xyz", "not hex"),
    ("0011zz", "not hex"),
    ("abcd", "16 or 32 bytes"),
    ("00" * 20, "16 or 32 bytes"),
])
def test_bad_key_exits_2(daemon, tmp_path, bad, expect):
    src = tmp_path / "a"
    src.write_bytes(b"x")
    for args in (("put", "--address", daemon.address, NS, bad, src),
                 ("get", "--address", daemon.address, NS, bad, "-")):
        p = run(*args)
        assert p.returncode == 2, text(p)
        err = p.stderr.decode()
        assert expect in err and "key" in err
    with Client(daemon.address) as c:
        assert list(c.stats().namespaces) == []  # nothing reached the daemon


def test_bad_namespace_and_empty_file_exit_2(daemon, tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"x")
    p = run("put", "--address", daemon.address, "Bad/NS", KEY16, src)
    assert p.returncode == 2 and b"namespace" in p.stderr, text(p)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    p = run("put", "--address", daemon.address, NS, KEY16, empty)
    assert p.returncode == 2 and b"empty" in p.stderr, text(p)
    p = run("put", "--address", daemon.address, NS, KEY16, tmp_path / "no-such-file")
    assert p.returncode == 2, text(p)


# ---- stats ------------------------------------------------------------------------------------------

def test_stats_table_and_json(daemon):
    with Client(daemon.address) as c:
        c.put_many(NS, [(bytes([i]) * 16, b"v" * 5000) for i in range(3)])
        c.get_many(NS, [bytes([0]) * 16, bytes([9]) * 16])  # one hit, one miss
        c.put("second-ns", b"k" * 16, b"w")

    p = run("stats", "--address", daemon.address)
    assert p.returncode == 0, text(p)
    out = p.stdout.decode()
    lines = out.splitlines()
    assert any(line.startswith("tier") and "policy" in line and "capacity" in line for line in lines)
    ram = [line for line in lines if line.startswith("ram")]
    assert ram and "s3fifo" in ram[0] and "64.0 MiB" in ram[0]
    assert any(line.startswith("namespace") and "hit%" in line for line in lines)
    row = [line.split() for line in lines if line.startswith(NS + " ")]
    assert row, out
    assert row[0][1] == "3"  # blocks
    assert "50.0%" in row[0]  # one hit of two
    assert any(line.startswith("second-ns") for line in lines)

    p = run("stats", "--address", daemon.address, "--json")
    assert p.returncode == 0, text(p)
    s = json.loads(p.stdout)
    for field in ("version", "uptime_s", "generation", "arena_path", "leases", "reservations", "tiers",
                  "namespaces", "expired_leases", "expired_reservations"):
        assert field in s, field
    (tier,) = s["tiers"]
    assert tier["name"] == "ram" and tier["policy"] == "s3fifo"
    assert tier["capacity_bytes"] > 0 and tier["blocks"] == 4  # numbers, 64-bit ones too (not strings)
    ns = {n["name"]: n for n in s["namespaces"]}
    assert set(ns) == {NS, "second-ns"}
    assert ns[NS]["blocks"] == 3 and ns[NS]["hits"] == 1 and ns[NS]["misses"] == 1
    assert ns[NS]["puts"] == 3 and ns[NS]["put_bytes"] == 15000

    p = run("stats", "--address", daemon.address, "--json", "--namespace", "second-ns")
    assert p.returncode == 0
    assert [n["name"] for n in json.loads(p.stdout)["namespaces"]] == ["second-ns"]


def test_stats_table_says_which_tier_is_down_and_locks_only_ram(make_daemon, tmp_path):
    import socket
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there: the cluster tier is disconnected
    d = make_daemon(cluster={"url": f"redis://127.0.0.1:{port}", "connect_timeout_ms": 200},
                    nvme={"dirs": [str(tmp_path / "nvme")], "capacity": "64MiB"})
    p = run("stats", "--address", d.address)
    assert p.returncode == 0, text(p)
    rows = {line.split()[0]: line.split() for line in p.stdout.decode().splitlines() if line.strip()}
    assert rows["ram"][-1] == "yes"
    assert rows["nvme"][-1] == "-" and rows["cluster"][-1] == "-", p.stdout.decode()
    # blocks, bytes and capacity are the server's, not counted here: "-", not "0 0 B"
    assert rows["cluster"][2:6] == ["-", "-", "-", "-"], p.stdout.decode()
    assert "cluster: disconnected" in p.stdout.decode(), p.stdout.decode()


def test_stats_into_a_closed_pipe_is_quiet(daemon):
    # kvtier stats | head -1: the reader is gone before the table is written
    with Client(daemon.address) as c:
        for i in range(200):
            c.put(f"ns-{i:03d}", b"k" * 16, b"v")
    r, w = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != "KVTIER_ADDRESS"}
    proc = subprocess.Popen([*KVTIER, "stats", "--address", daemon.address], stdout=w, stderr=subprocess.PIPE,
                            env=env)
    os.close(w)
    os.close(r)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 141 and err == b"", (proc.returncode, err)


def test_stats_of_empty_daemon(daemon):
    p = run("stats", "--address", daemon.address)
    assert p.returncode == 0, text(p)
    assert b"no namespaces yet" in p.stdout


# ---- help -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", [[], ["serve"], ["stats"], ["put"], ["get"], ["check"], ["config"],
                                 ["config", "check"]])
def test_help(cmd):
    p = run(*cmd, "--help")
    assert p.returncode == 0, text(p)
    out = p.stdout.decode()
    assert out.startswith("usage: kvtier" + "".join(" " + c for c in cmd))
    assert "--help" in out


def test_version_and_no_command():
    p = run("--version")
    assert p.returncode == 0 and p.stdout.decode().startswith("kvtier ")
    p = run()
    assert p.returncode == 2 and b"usage" in p.stderr


# ---- config check ---------------------------------------------------------------------------------

VALID = """\
# settings as configs/kvtier.toml documents them
[server]
socket = "/run/kvtier/kvtier.sock"
socket_mode = "0660"
listen = ""
data_listen = ""
data_channel = true
max_message_bytes = "64MiB"
max_batch = 4096
drain_timeout_s = 10
log_level = "info"

[ram]
arena_path = "/dev/shm/kvtier/arena"
capacity = "2GiB"
mlock = true
policy = "lru"
max_block_bytes = "256MiB"
lease_ms = 30000
reservation_ms = 30000
max_ttl_ms = 600000
verify_on_commit = true
"""


def test_config_check_accepts_valid(tmp_path):
    f = tmp_path / "kvtier.toml"
    f.write_text(VALID)
    p = run("config", "check", f)
    assert p.returncode == 0, text(p)
    out = p.stdout.decode()
    assert "ok" in out and "policy lru" in out and "2.0 GiB" in out and "/run/kvtier/kvtier.sock" in out
    minimal = tmp_path / "minimal.toml"
    minimal.write_text('[ram]\ncapacity = "64MiB"\n')
    p = run("config", "check", minimal)
    assert p.returncode == 0 and "policy s3fifo" in p.stdout.decode(), text(p)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    assert run("config", "check", empty).returncode == 0


@pytest.mark.parametrize("replace,field", [
    (('mlock = true', 'mlock = true\nbogus = 1'), "ram.bogus"),
    (('log_level = "info"', 'log_level = "info"\nmax_conections = 5'), "server.max_conections"),
    (('capacity = "2GiB"', 'capacity = "12 parsecs"'), "ram.capacity"),
    (('capacity = "2GiB"', 'capacity = "1MiB"'), "ram.capacity"),
    (('max_block_bytes = "256MiB"', 'max_block_bytes = "-1"'), "ram.max_block_bytes"),
    (('max_message_bytes = "64MiB"', 'max_message_bytes = "lots"'), "server.max_message_bytes"),
    (('policy = "lru"', 'policy = "mru"'), "ram.policy"),
    (('max_batch = 4096', 'max_batch = "many"'), "server.max_batch"),
    (('max_batch = 4096', 'max_batch = 0'), "server.max_batch"),
    (('log_level = "info"', 'log_level = "loud"'), "server.log_level"),
    (('socket_mode = "0660"', 'socket_mode = "rw"'), "server.socket_mode"),
    (('mlock = true', 'mlock = "yes"'), "ram.mlock"),
])
def test_config_check_rejects_bad_values(tmp_path, replace, field):
    old, new = replace
    assert old in VALID
    f = tmp_path / "bad.toml"
    f.write_text(VALID.replace(old, new, 1))
    p = run("config", "check", f)
    assert p.returncode == 2, text(p)
    err = p.stderr.decode()
    assert field in err, err
    assert str(f) in err
    assert p.stdout == b""


@pytest.mark.parametrize("extra,message", [
    ('[auth]\ntenants_file = "{d}/absent-tenants.toml"\n', "auth.tenants_file: cannot read"),
    ('[auth]\ntenants_file = "{d}/tenants.toml"\n', "tenants.acme"),
    ('[cluster]\nurl = "redis://h:6379"\ntls_ca = "{d}/absent-ca.pem"\n', "cluster.tls_ca: cannot read"),
    # serve found these only after making and locking the arena
    ('[nvme]\ndirs = ["{d}/tenants.toml/nv"]\n', "cannot be created: {d}/tenants.toml is not a directory"),
    ('[nvme]\ndirs = ["{d}/tenants.toml"]\n', "nvme.dirs: {d}/tenants.toml is not a directory"),
])
def test_config_check_reads_the_files_serve_needs(tmp_path, extra, message):
    (tmp_path / "tenants.toml").write_text('[tenants.acme]\nnamespaces = 5\n')
    f = tmp_path / "k.toml"
    f.write_text(VALID + extra.format(d=tmp_path))
    p = run("config", "check", f)
    assert p.returncode == 2, text(p)
    assert message.format(d=tmp_path) in p.stderr.decode() and str(f) in p.stderr.decode(), text(p)
    assert re.search(rf"{re.escape(str(f))}:\d+: ", p.stderr.decode()), text(p)  # the line named


def test_config_check_of_a_tenants_file_says_what_it_is():
    f = pathlib.Path(__file__).resolve().parent.parent / "configs" / "tenants.example.toml"
    p = run("config", "check", f)
    assert p.returncode == 2
    first = next(i for i, ln in enumerate(f.read_text().splitlines(), 1) if ln.startswith("[tenants"))
    assert f"{f}:{first}: unknown section [tenants]" in p.stderr.decode(), text(p)
    assert "a tenants file? name it in [auth] tenants_file" in p.stderr.decode(), text(p)


@pytest.mark.parametrize("fstype,warned", [("devtmpfs", True), ("ext4", True), ("tmpfs", False),
                                            ("hugetlbfs", False)])
def test_config_check_warns_of_an_arena_outside_tmpfs_and_hugetlbfs(tmp_path, monkeypatch, capsys, fstype, warned):
    # e.g. arena_path = "/dev/hugepages/kvtier/arena" with no hugetlbfs mounted there: the
    # daemon would make the arena an ordinary file on /dev
    from kvtier import arena, cli
    monkeypatch.setattr(arena, "_mount_of", lambda path: (fstype, set()))
    f = tmp_path / "k.toml"
    f.write_text('[ram]\narena_path = "/dev/hugepages/kvtier/arena"\ncapacity = "64MiB"\n')
    assert cli.main(["config", "check", str(f)]) == 0
    out, err = capsys.readouterr()
    assert "ok" in out
    assert (f"warning: {f}:2: ram.arena_path: /dev/hugepages/kvtier/arena is on {fstype}" in err) == warned, err


def test_config_check_warns_of_nvme_directories_that_do_not_exist(tmp_path):
    (tmp_path / "nvme0").mkdir()
    f = tmp_path / "k.toml"
    f.write_text(f'[ram]\ncapacity = "64MiB"\n[nvme]\ndirs = ["{tmp_path}/nvme0", "{tmp_path}/nvme1"]\n')
    p = run("config", "check", f)
    err = p.stderr.decode()
    assert p.returncode == 0 and b"ok" in p.stdout, text(p)
    assert f"nvme.dirs: {tmp_path}/nvme1 does not exist" in err and f"{tmp_path}/nvme0 " not in err, err


def test_a_socket_path_too_long_for_a_unix_address_is_a_config_error(tmp_path):
    """It passed config check; serve made the arena, then died in gRPC with a traceback."""
    long_sock = "/run/" + "k" * 90 + "/kvtier.sock"  # 107 bytes + ".data"
    f = tmp_path / "k.toml"
    f.write_text(f'[server]\nsocket = "{long_sock}"\n[ram]\ncapacity = "64MiB"\n')
    p = run("config", "check", f)
    assert p.returncode == 2 and b"Traceback" not in p.stderr, text(p)
    assert f"server.socket: {long_sock} is too long for a Unix socket".encode() in p.stderr, text(p)
    p = run("serve", "--config", f)
    assert p.returncode == 2 and b"Traceback" not in p.stderr and b"too long for a Unix socket" in p.stderr, text(p)
    from kvtier import config
    config.from_dict({"server": {"socket": "/run/" + "k" * 80 + "/kvtier.sock"}})  # 102 bytes: fits


def test_config_check_warns_of_nvme_directories_on_a_drive_not_mounted(tmp_path, monkeypatch, capsys):
    from kvtier import cli, cold
    (tmp_path / "mnt" / "nvme0" / "kvtier").mkdir(parents=True)  # made earlier, on the filesystem beneath
    (tmp_path / "fstab").write_text(f"/dev/nvme0n1 {tmp_path}/mnt/nvme0 xfs defaults 0 2\n")
    (tmp_path / "mounts").write_text("/dev/vda1 / ext4 rw 0 0\n")
    monkeypatch.setattr(cold, "FSTAB", str(tmp_path / "fstab"))
    monkeypatch.setattr(cold, "MOUNTS", str(tmp_path / "mounts"))
    f = tmp_path / "k.toml"
    f.write_text(f'[ram]\ncapacity = "64MiB"\n[nvme]\ndirs = ["{tmp_path}/mnt/nvme0/kvtier"]\n')
    assert cli.main(["config", "check", str(f)]) == 0
    err = capsys.readouterr().err
    assert (f"nvme.dirs: {tmp_path}/mnt/nvme0/kvtier is on {tmp_path}/mnt/nvme0, which /etc/fstab mounts "
            f"but is not mounted now") in err, err


def test_config_check_refuses_the_directories_and_arena_path_serve_would(tmp_path):
    """serve refuses an arena or socket directory that everyone may write without the sticky bit,
    and a symbolic link at the arena's path (tests/test_local_security.py): config check says so
    first, naming the setting's line, and passes once they are fixed."""
    shm, run_dir = tmp_path / "shm", tmp_path / "run"
    shm.mkdir()
    run_dir.mkdir()
    f = tmp_path / "k.toml"
    f.write_text(f'[server]\nsocket = "{run_dir}/kvtier.sock"\n[ram]\narena_path = "{shm}/arena"\n'
                 f'capacity = "64MiB"\n')
    os.chmod(shm, 0o777)
    os.chmod(run_dir, 0o777)
    (shm / "elsewhere").write_bytes(b"x")
    os.symlink(shm / "elsewhere", shm / "arena")
    p = run("config", "check", f)
    err = p.stderr.decode()
    assert p.returncode == 2, text(p)
    assert f"{f}:4: ram.arena_path: arena directory {shm} is writable by every user without the sticky bit" in err, err
    assert f"{f}:2: server.socket: socket directory {run_dir} is writable by every user" in err, err
    assert f"ram.arena_path: {shm}/arena is a symbolic link" in err, err
    os.chmod(shm, 0o1777)  # as /dev/shm: allowed
    os.chmod(run_dir, 0o750)
    (shm / "arena").unlink()
    p = run("config", "check", f)
    assert p.returncode == 0 and b"ok" in p.stdout, text(p)


def test_config_check_accepts_the_shipped_config(tmp_path):
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "kvtier.toml")
    if not os.path.exists(shipped):
        pytest.skip("no configs/kvtier.toml in this checkout")
    f = tmp_path / "kvtier.toml"
    with open(shipped) as src:
        f.write_text(src.read())
    p = run("config", "check", f)
    assert p.returncode == 0, text(p)
    assert "ok" in p.stdout.decode()


def test_config_check_rejects_unknown_section_bad_toml_and_missing_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(VALID + "\n[bogus_section]\nx = 1\n")
    p = run("config", "check", f)
    assert p.returncode == 2 and b"bogus_section" in p.stderr, text(p)
    f.write_text("[ram\ncapacity = ")
    p = run("config", "check", f)
    assert p.returncode == 2 and str(f).encode() in p.stderr, text(p)
    p = run("config", "check", tmp_path / "absent.toml")
    assert p.returncode == 2 and b"cannot read" in p.stderr, text(p)


# ---- serve ------------------------------------------------------------------------------------------

def test_serve_answers_stats_and_exits_0_on_sigterm():
    tag = uuid.uuid4().hex[:10]
    sock_dir = tempfile.mkdtemp(prefix=f"kvt-{tag}-")
    arena_dir = f"/dev/shm/kvtier-test-{tag}" if os.path.isdir("/dev/shm") else os.path.join(sock_dir, "arena")
    sock = os.path.join(sock_dir, "kvtier.sock")
    cfg = os.path.join(sock_dir, "kvtier.toml")
    with open(cfg, "w") as f:
        f.write(f'[server]\nsocket = "{sock}"\ndrain_timeout_s = 1.0\nlog_level = "info"\n'
                f'[ram]\narena_path = "{arena_dir}/arena"\ncapacity = "16MiB"\npolicy = "lru"\n'
                f'[metrics]\nlisten = ""\n')
    proc = subprocess.Popen([*KVTIER, "serve", "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        p = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()
            if os.path.exists(sock):
                p = run("stats", "--address", f"unix://{sock}", "--json")
                if p.returncode == 0:
                    break
            time.sleep(0.1)
        assert p is not None and p.returncode == 0, "the daemon never answered stats"
        s = json.loads(p.stdout)
        assert s["tiers"][0]["policy"] == "lru"
        assert int(s["tiers"][0]["capacity_bytes"]) == 16 * MiB - 4096
        assert s["arena_path"] == f"{arena_dir}/arena" and os.path.exists(s["arena_path"])
        # it serves data, too
        src = os.path.join(sock_dir, "blob")
        with open(src, "wb") as f:
            f.write(b"served")
        assert run("put", "-a", f"unix://{sock}", NS, KEY16, src).returncode == 0
        assert run("get", "-a", f"unix://{sock}", NS, KEY16, "-").stdout == b"served"

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        assert rc == 0, proc.stderr.read().decode()
        assert not os.path.exists(sock), "socket left behind"
        err = proc.stderr.read().decode()
        assert "stopped" in err
        # the arena is announced before the (for a large one, long) mapping and locking
        announced = err.index(f"arena {arena_dir}/arena: 16.0 MiB")
        assert announced < err.index(f"arena {arena_dir}/arena: {16 * MiB} bytes"), err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)


def test_serve_with_bad_config_exits_2(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[ram]\npolicy = "mru"\n')
    p = run("serve", "--config", f)
    assert p.returncode == 2 and b"ram.policy" in p.stderr, text(p)


def test_serve_and_config_check_refuse_an_arena_larger_than_the_machine(tmp_path):
    # it would be locked in RAM whole: the tmpfs fills and the daemon is killed for memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    arena_dir = f"/dev/shm/kvtier-test-{uuid.uuid4().hex[:10]}" if os.path.isdir("/dev/shm") else str(tmp_path / "a")
    f = tmp_path / "big.toml"
    f.write_text(f'[server]\nsocket = "{tmp_path}/kvtier.sock"\n[metrics]\nlisten = ""\n'
                 f'[ram]\narena_path = "{arena_dir}/arena"\ncapacity = {2 * total}\n')
    try:
        p = run("config", "check", f)
        assert p.returncode == 2 and b"ram.capacity" in p.stderr and b"memory" in p.stderr, text(p)
        p = run("serve", "--config", f)
        assert p.returncode == 2, text(p)
        assert f"{f}:7: ram.capacity:".encode() in p.stderr and b"Traceback" not in p.stderr, text(p)
        assert not os.path.exists(arena_dir) and not os.path.exists(tmp_path / "kvtier.sock")
    finally:
        shutil.rmtree(arena_dir, ignore_errors=True)


@pytest.mark.parametrize("setting", ["ram.arena_path", "nvme.dirs"])
def test_serve_names_the_setting_whose_path_cannot_be_used(tmp_path, setting):
    # a plain file stands where a directory should be: the configuration's error (an NVMe
    # directory that is merely missing, its drive not mounted, is skipped: test_nvme_recovery.py)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    tag = uuid.uuid4().hex[:10]
    arena_dir = f"/dev/shm/kvtier-test-{tag}" if os.path.isdir("/dev/shm") else str(tmp_path / "arena")
    arena = f"{blocker}/arena" if setting == "ram.arena_path" else f"{arena_dir}/arena"
    nvme = f"{blocker}/nvme" if setting == "nvme.dirs" else f"{tmp_path}/nvme"
    f = tmp_path / "k.toml"
    f.write_text(f'[server]\nsocket = "{tmp_path}/kvtier.sock"\ndrain_timeout_s = 1.0\n[metrics]\nlisten = ""\n'
                 f'[ram]\narena_path = "{arena}"\ncapacity = "16MiB"\n[nvme]\ndirs = ["{nvme}"]\n')
    try:
        p = run("serve", "--config", f)
        err = p.stderr.decode()
        assert p.returncode == 2, err
        path = arena if setting == "ram.arena_path" else nvme
        assert f"error: {setting}: cannot use {path}: " in err and "Traceback" not in err, err
    finally:
        shutil.rmtree(arena_dir, ignore_errors=True)


@pytest.mark.parametrize("setting", ["server.listen", "server.data_listen", "metrics.listen"])
def test_serve_names_the_setting_whose_port_is_taken(setting):
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    taken = f"127.0.0.1:{busy.getsockname()[1]}"
    tag = uuid.uuid4().hex[:10]
    sock_dir = tempfile.mkdtemp(prefix=f"kvt-{tag}-")
    arena_dir = f"/dev/shm/kvtier-test-{tag}" if os.path.isdir("/dev/shm") else os.path.join(sock_dir, "arena")
    sock = os.path.join(sock_dir, "kvtier.sock")
    listen = {"server.listen": "127.0.0.1:0", "server.data_listen": "127.0.0.1:0", "metrics.listen": ""}
    listen[setting] = taken
    cfg = os.path.join(sock_dir, "kvtier.toml")
    with open(cfg, "w") as f:
        f.write(f'[server]\nsocket = "{sock}"\ndrain_timeout_s = 1.0\ninsecure_tcp = true\n'
                f'listen = "{listen["server.listen"]}"\ndata_listen = "{listen["server.data_listen"]}"\n'
                f'[ram]\narena_path = "{arena_dir}/arena"\ncapacity = "16MiB"\n'
                f'[metrics]\nlisten = "{listen["metrics.listen"]}"\n')
    proc = subprocess.Popen([*KVTIER, "serve", "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        if setting == "metrics.listen":  # the daemon serves on without metrics, and says which setting
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and run("stats", "-a", f"unix://{sock}").returncode != 0:
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(20) == 0
            err = proc.stderr.read().decode()
            assert f"metrics.listen: cannot listen on {taken}" in err, err
            assert f"data channel unix://{sock}.data and tcp://127.0.0.1:" in err, err  # both served
        else:  # a listener the daemon is for: it refuses to start, naming the setting and the address
            rc = proc.wait(30)
            err = proc.stderr.read().decode()
            assert rc == 2, err
            assert f"{setting}: cannot bind {taken}" in err, err
            assert "Traceback" not in err, err
            assert "stopping" not in err and "stopped" not in err, err  # it never served
            assert not os.path.exists(sock) and not os.path.exists(sock + ".data")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        busy.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)


# ---- unreachable daemon -----------------------------------------------------------------------------

def test_unreachable_daemon_exits_3(tmp_path):
    addr = f"unix://{tmp_path}/nobody-here.sock"
    src = tmp_path / "a"
    src.write_bytes(b"x")
    for args in (("stats", "--address", addr), ("stats", "--json", "--address", addr),
                 ("put", "--address", addr, NS, KEY16, src), ("get", "--address", addr, NS, KEY16, "-"),
                 ("stats", "--address", "127.0.0.1:1")):
        p = run(*args)
        assert p.returncode == 3, (args, text(p))
        assert b"unreachable" in p.stderr
        assert p.stdout == b""
        if addr in args:  # no socket: say what to check
            assert b"is `kvtier serve` running?" in p.stderr and b"--address" in p.stderr, text(p)


def test_a_closed_tcp_connection_suggests_tls(tmp_path):
    # a daemon's TCP listener with TLS closes a plaintext client's connection; say what to give
    import socket
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.2)
    stop = threading.Event()

    def close_each():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            conn.close()
    t = threading.Thread(target=close_each, daemon=True)
    t.start()
    try:
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        p = run("stats", "--address", addr, timeout=60)
        assert p.returncode == 3 and b"--tls-ca" in p.stderr, text(p)
        ca = tmp_path / "ca.pem"
        ca.write_text("")
        p = run("stats", "--address", addr, "--tls-ca", ca, timeout=60)
        assert p.returncode in (2, 3) and b"Traceback" not in p.stderr, text(p)
    finally:
        stop.set()
        t.join(5)
        srv.close()
    p = run("stats", "--address", "unix:///nonexistent/kvtier.sock")
    assert p.returncode == 3 and b"--tls" not in p.stderr, text(p)


def test_a_daemon_with_tenants_asks_for_a_token(make_daemon, tmp_path):
    from kvtier.auth import new_token
    tok, digest = new_token()
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(f'[tenants.ops]\ntoken_sha256 = ["{digest}"]\nnamespaces = ["*"]\n')
    d = make_daemon(auth={"tenants_file": str(tenants)})
    p = run("stats", "--address", d.address, env_extra={"KVTIER_TOKEN": ""})
    assert p.returncode == 4 and b"--token" in p.stderr and b"KVTIER_TOKEN" in p.stderr, text(p)
    p = run("stats", "--address", d.address, "--token", "wrong")
    assert p.returncode == 4 and b"unknown token" in p.stderr and b"--token" not in p.stderr, text(p)
    assert run("stats", "--address", d.address, "--token", tok).returncode == 0
