"""The committed stubs in kvtier/v1 are exactly what scripts/gen_proto.py makes from proto/."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stubs_are_fresh(tmp_path):
    generated = _gen_module().generate(tmp_path)
    assert generated, "generator produced nothing"
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run python scripts/gen_proto.py"
        assert committed.read_bytes() == path.read_bytes(), \
            f"{committed.relative_to(ROOT)} is stale: run python scripts/gen_proto.py and commit"


def test_every_rpc_is_documented():
    text = (ROOT / "proto" / "kvtier" / "v1" / "kvtier.proto").read_text().splitlines()
    for i, line in enumerate(text):
        if line.strip().startswith("rpc "):
            assert text[i - 1].strip().startswith("//"), f"undocumented: {line.strip()}"
