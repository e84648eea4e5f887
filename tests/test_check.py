"""`kvtier check [--repair]`: finds corrupt and orphan files, removes them on request."""
import os
import subprocess
import sys

from kvtier.cold import ColdTier, check_dir
from kvtier.record import checksum


def _fill(d, n=6, size=10_000):
    t = ColdTier([(str(d), 1 << 30)], direct_io="off")
    paths = []
    for i in range(n):
        key = bytes([i]) * 16
        data = os.urandom(size)
        assert t.write("ns", key, memoryview(data), len(data), checksum(data))
        paths.append(t._path(0, "ns", key))
    return paths


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "check", *args], capture_output=True, text=True)


def test_check_reports_then_repairs(tmp_path):
    paths = _fill(tmp_path)
    with open(paths[0], "r+b") as f:  # flip one payload bit
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x10]))
    with open(paths[1], "r+b") as f:  # truncate another
        f.truncate(os.path.getsize(paths[1]) - 100)
    orphan = os.path.join(os.path.dirname(paths[2]), ".x.kvb.1234.tmp")
    open(orphan, "wb").write(b"partial")

    rep = check_dir(str(tmp_path))
    assert (rep.files, rep.ok, len(rep.corrupt), len(rep.orphans)) == (6, 4, 2, 1)

    r = _cli("--dir", str(tmp_path))
    assert r.returncode == 1, r.stderr
    assert "2 corrupt" in r.stdout and "1 orphan" in r.stdout and paths[0] in r.stdout
    assert all(os.path.exists(p) for p in paths) and os.path.exists(orphan)  # no repair without --repair

    r = _cli("--dir", str(tmp_path), "--repair")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(paths[0]) and not os.path.exists(paths[1]) and not os.path.exists(orphan)
    assert all(os.path.exists(p) for p in paths[2:])

    r = _cli("--dir", str(tmp_path))
    assert r.returncode == 0 and "4 ok" in r.stdout and "0 corrupt" in r.stdout


def test_check_takes_dirs_from_config(tmp_path):
    d = tmp_path / "nvme"
    _fill(d, n=2)
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[nvme]\ndirs = ["{d}"]\ncapacity = "1GiB"\n')
    r = _cli("--config", str(cfg))
    assert r.returncode == 0 and "2 block files, 2 ok" in r.stdout


def test_check_without_dirs_is_a_usage_error(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text("")
    r = _cli("--config", str(cfg))
    assert r.returncode == 2 and "no NVMe directories" in r.stderr
    assert str(cfg) in r.stderr and "give --config" not in r.stderr, r.stderr  # it was given
    r = _cli("--dir", str(tmp_path / "absent"))
    assert r.returncode == 2 and r.stderr == f"{tmp_path / 'absent'}: no such directory\n", r.stderr


def test_check_leaves_the_files_of_another_format_version(tmp_path):
    """Files a newer kvtier wrote (read back after a rollback) are sound, only not this version's:
    reported apart, exit 0, and --repair keeps them."""
    from kvtier import record
    paths = _fill(tmp_path, n=3)
    with open(paths[0], "r+b") as f:
        f.seek(4)
        f.write(bytes([record.VERSION + 1]))
    for args in ((), ("--repair",)):
        r = _cli("--dir", str(tmp_path), *args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 corrupt" in r.stdout and "1 file(s) of another kvtier version, left alone" in r.stdout
        assert all(os.path.exists(p) for p in paths)
