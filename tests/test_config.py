"""Configuration: the documented file equals the embedded defaults; bad values are clear errors."""
import dataclasses
import pathlib
import tomllib

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
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.from_dict(data)


def test_load_reports_file_and_syntax(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[ram\ncapacity = 1\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        config.load(p)
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.toml")


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
