"""Configuration: the documented file equals the embedded defaults; bad values are clear errors."""
import dataclasses
import pathlib
import tomllib
import urllib.parse

import pytest

from kvtier import config
from kvtier.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "configs" / "kvtier.toml"


def test_documented_defaults_equal_embedded_defaults():
    assert config.load(DOC) == config.Config()


def test_every_setting_is_documented_with_a_comment():
    text = DOC.read_text().splitlines()
    data = tomllib.loads(DOC.read_text())
    for section, cls in config._SECTIONS.items():
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(data[section]) == names, f"[{section}] documents {set(data[section]) ^ names} differently"
        for name in names:
            i = next(i for i, line in enumerate(text) if line.startswith(f"{name} ="))
            assert text[i - 1].startswith("#"), f"{section}.{name} has no comment above it"


@pytest.mark.parametrize("value,expected", [
    (4096, 4096), ("64MiB", 64 << 20), ("2 GiB", 2 << 30), ("1.5GB", 1_500_000_000), ("10kb", 10_000), ("7", 7),
])
def test_parse_size(value, expected):
    assert config.parse_size(value, "x") == expected


@pytest.mark.parametrize("value", ["lots", "12 parsecs", -1, True, 1.5, "-3MiB"])
def test_parse_size_rejects(value):
    with pytest.raises(ConfigError, match="x"):
        config.parse_size(value, "x")


@pytest.mark.parametrize("data,field", [
    ({"ram": {"capacity": "big"}}, "ram.capacity"),
    ({"ram": {"policy": "random"}}, "ram.policy"),
    ({"ram": {"colour": 1}}, "ram.colour"),
    ({"disk": {}}, "disk"),
    ({"nvme": {"dirs": "/data"}}, "nvme.dirs"),
    ({"nvme": {"durability": "maybe"}}, "nvme.durability"),
    ({"nvme": {"codec": "zstd"}}, "nvme.codec"),
    ({"server": {"max_batch": "10"}}, "server.max_batch"),
    ({"server": {"max_batch": 0}}, "server.max_batch"),
    ({"server": {"socket_mode": "rw"}}, "server.socket_mode"),
    ({"server": {"listen": "nowhere"}}, "server.listen"),
    ({"server": {"log_level": "loud"}}, "server.log_level"),
    ({"ram": {"capacity": "1MiB"}}, "ram.capacity"),
    ({"ram": {"mlock": "yes"}}, "ram.mlock"),
    ({"ram": {"lease_ms": -5}}, "ram.lease_ms"),
    # accepted once, then failed or misbehaved at start
    ({"server": {"socket_mode": "7777777"}}, "server.socket_mode"),
    ({"server": {"listen": "127.0.0.1:99999", "insecure_tcp": True}}, "0-65535"),
    ({"server": {"data_listen": ":65536", "insecure_tcp": True}}, "server.data_listen"),
    ({"metrics": {"listen": "127.0.0.1:70000"}}, "metrics.listen"),
    ({"server": {"max_message_bytes": "8GiB"}}, "server.max_message_bytes"),
    ({"server": {"drain_timeout_s": float("inf")}}, "server.drain_timeout_s"),
    ({"cluster": {"url": "redis://"}}, "cluster.url"),
    ({"cluster": {"url": "redis://h:1", "reconnect_max_s": float("nan")}}, "cluster.reconnect_max_s"),
    ({"cluster": {"seeds": [":7000"], "url": "redis://h:1", "cluster": True}}, "cluster.seeds"),
    ({"ram": {"lease_ms": 700_000}}, "ram.lease_ms"),
    ({"nvme": {"queue_bytes": 0}}, "nvme.queue_bytes"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.from_dict(data)


def test_ports_and_hosts_that_are_fine():
    c = config.from_dict({"server": {"listen": "[::1]:65535", "data_listen": ":0", "insecure_tcp": True},
                          "metrics": {"listen": "localhost:9464"},
                          "cluster": {"url": "valkeys://user@valkey-0.kv.internal:6379", "cluster": True,
                                      "seeds": ["10.0.0.2:6379", "[fd00::2]:6379"]}})
    assert c.server.listen == "[::1]:65535" and len(c.cluster.seeds) == 2


def test_load_reports_file_and_syntax(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[ram\ncapacity = 1\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        config.load(p)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


def test_auto_capacity_counts_the_arena_it_would_replace(tmp_path, monkeypatch):
    """A restart sizes the arena as the start before it did, though that arena still fills its
    filesystem: else the sizes differ and ram.persist cannot keep the RAM tier."""
    free = {"bytes": 1 << 30}

    class St:
        f_frsize = 4096

        @property
        def f_bavail(self):
            return free["bytes"] // 4096
    monkeypatch.setattr(config.os, "statvfs", lambda d: St())
    arena = tmp_path / "arena"
    first = config.auto_capacity(str(arena))
    with open(arena, "wb") as f:   # the first run's arena, all of it in the filesystem
        f.truncate(first)
        f.write(b"\1" * first)
    free["bytes"] -= first
    assert config.auto_capacity(str(arena)) == first


def test_the_daemon_socket_follows_a_writable_runtime_directory(tmp_path, monkeypatch):
    base = tmp_path / "run"
    (base / "kvtier").mkdir(parents=True)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    writable = {str(base), str(base / "kvtier")}
    monkeypatch.setattr(config.os, "access", lambda p, mode: str(p) in writable)
    assert config.default_socket() == str(base / "kvtier" / "kvtier.sock")
    writable.discard(str(base))  # systemd: /run is root's, RuntimeDirectory=kvtier the daemon user's
    assert config.default_socket() == str(base / "kvtier" / "kvtier.sock")
    writable.clear()
    assert config.default_socket() == f"/tmp/kvtier-{config.os.getuid()}/kvtier.sock"


def test_a_client_given_no_address_finds_the_system_daemon(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTIER_ADDRESS", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    system = tmp_path / "system.sock"
    monkeypatch.setattr(config, "SYSTEM_SOCKET", str(system))
    own = config.default_socket()
    assert config.default_address() == f"unix://{own}"       # nothing anywhere: its own default
    system.touch()
    assert config.default_address() == f"unix://{system}"    # only the unit's socket exists
    (tmp_path / "kvtier").mkdir()
    pathlib.Path(own).touch()
    assert config.default_address() == f"unix://{own}"       # its own daemon first
    monkeypatch.setenv("KVTIER_ADDRESS", "unix:///elsewhere.sock")
    assert config.default_address() == "unix:///elsewhere.sock"


class _Fs:
    """A statvfs answer: free bytes in 4 KiB blocks, or no size at all (hugetlbfs without size=)."""

    def __init__(self, free: int | None, bsize: int = 4096):
        self.f_frsize = self.f_bsize = bsize
        self.f_blocks = 0 if free is None else (1 << 40) // bsize
        self.f_bavail = 0 if free is None else free // bsize


def test_a_configured_arena_that_does_not_fit_is_named(tmp_path, monkeypatch):
    """ram.capacity beyond the free space of the arena's tmpfs would fill it while the daemon
    locks the arena (and be killed for memory); beyond the free huge pages it fails to map."""
    arena = tmp_path / "kv" / "arena"
    cfg = config.from_dict({"ram": {"arena_path": str(arena), "capacity": "1GiB"}})
    fs = {"now": _Fs(512 << 20)}
    monkeypatch.setattr(config.os, "statvfs", lambda d: fs["now"])
    problem = config.arena_room_problem(cfg)
    assert problem.startswith("ram.capacity: 1.0 GiB does not fit in ") and "512.0 MiB free" in problem
    arena.parent.mkdir()
    with open(arena, "wb") as f:   # the previous run's arena: a restart takes its place
        f.write(b"\1" * (600 << 20))
    assert config.arena_room_problem(cfg) is None
    arena.unlink()
    fs["now"] = _Fs(2 << 30)
    assert config.arena_room_problem(cfg) is None
    assert config.arena_room_problem(config.from_dict({"ram": {"arena_path": str(arena)}})) is None  # auto

    pages = tmp_path / "hugepages" / "hugepages-2048kB"
    pages.mkdir(parents=True)
    (pages / "free_hugepages").write_text("300\n")
    (pages / "resv_hugepages").write_text("0\n")
    fs["now"] = _Fs(None, bsize=2 << 20)
    problem = config.arena_room_problem(cfg, hugepages_dir=str(tmp_path / "hugepages"))
    assert "free huge pages" in problem and "600.0 MiB" in problem and "nr_hugepages" in problem
    (pages / "free_hugepages").write_text("512\n")
    assert config.arena_room_problem(cfg, hugepages_dir=str(tmp_path / "hugepages")) is None

    total = config.os.sysconf("SC_PAGE_SIZE") * config.os.sysconf("SC_PHYS_PAGES")
    huge = config.from_dict({"ram": {"arena_path": str(arena), "capacity": 2 * total}})
    assert "more than this machine's memory" in config.arena_room_problem(huge)


def test_auto_capacity_fits_the_machine():
    cfg = config.Config()
    cap = cfg.arena_capacity
    total = config.os.sysconf("SC_PAGE_SIZE") * config.os.sysconf("SC_PHYS_PAGES")
    assert 64 << 20 <= cap <= max(64 << 20, total // 4)


@pytest.mark.parametrize("text,line,field", [
    ('[server]\nlog_level = "info"\n\n[ram]\ncapacity = "lots"\n', 5, "ram.capacity"),
    ('[ram]\npolicy = "lru"\n[disk]\nx = 1\n', 3, "disk"),
    ('[server]\n# comment\nmax_batch = 0\n', 3, "server.max_batch"),
    ('[ram]\nmlock = true\npolicy = "fifo"\n', 3, "ram.policy"),
])
def test_errors_name_the_line(tmp_path, text, line, field):
    p = tmp_path / "k.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(f"{p}:{line}: ") and field in str(e.value)


def test_example_node_config_is_valid():
    cfg = config.load(ROOT / "configs" / "h200-node.toml")
    assert cfg.ram.capacity == 1200 << 30 and len(cfg.nvme.dirs) == 4 and cfg.cluster.cluster
    assert cfg.server.tls_cert and cfg.auth.tenants_file


def test_example_node_config_keeps_its_secrets_out_of_the_clients_reach():
    """The config is readable by group kvtier, which every client on the node is in (socket and
    arena): the Valkey password and the TLS private key live in files of the daemon's user alone."""
    cfg = config.load(ROOT / "configs" / "h200-node.toml")
    assert cfg.cluster.password == "" and urllib.parse.urlsplit(cfg.cluster.url).password is None
    for secret in (cfg.cluster.password_file, cfg.server.tls_key):
        assert secret.startswith("/etc/kvtier/secrets/"), secret


def test_a_file_that_is_not_utf8_is_a_config_error_naming_the_line(tmp_path):
    p = tmp_path / "latin1.toml"
    p.write_bytes(b'[server]\nlog_level = "info"\n# caf\xe9\n')
    with pytest.raises(config.ConfigError, match=r"latin1.toml:3: not UTF-8 text \(byte 0xe9\)"):
        config.load(str(p))


def test_relative_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    """systemd starts the daemon in /: a relative path in the file must not depend on that, nor
    differ between `kvtier config check` run beside the file and `kvtier serve` under the unit."""
    d = tmp_path / "etc"
    d.mkdir()
    (d / "tenants.toml").write_text("")
    p = d / "kvtier.toml"
    p.write_text('[server]\nsocket = "run/k.sock"\n[ram]\narena_path = "/dev/shm/kvt/arena"\n'
                 '[nvme]\ndirs = ["nv0", "/abs/nv1"]\n[auth]\ntenants_file = "tenants.toml"\n')
    monkeypatch.chdir("/")
    cfg = config.load(str(p))
    assert cfg.server.socket == str(d / "run" / "k.sock")
    assert cfg.ram.arena_path == "/dev/shm/kvt/arena"
    assert list(cfg.nvme.dirs) == [str(d / "nv0"), "/abs/nv1"]
    assert cfg.auth.tenants_file == str(d / "tenants.toml")
    assert config.from_dict({"nvme": {"dirs": ["nv0"]}}).nvme.dirs == ("nv0",)  # a dict: as given
