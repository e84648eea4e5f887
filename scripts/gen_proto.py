"""Generate the Python stubs in kvtier/v1/ from proto/kvtier/v1/kvtier.proto.

    python scripts/gen_proto.py            # rewrite kvtier/v1/*_pb2*.py(i)
    python scripts/gen_proto.py --out DIR  # write them under DIR instead

The generator is pinned (grpcio-tools in pyproject's `test` extra) so its
output is byte-stable; tests/test_proto.py regenerates into a temporary
directory and fails when the committed stubs differ.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ["kvtier/v1/kvtier.proto"]


def generate(out: pathlib.Path) -> list[pathlib.Path]:
    from grpc_tools import protoc  # only needed by whoever regenerates
    import importlib.resources

    out.mkdir(parents=True, exist_ok=True)
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit code {rc}")
    return sorted((out / "kvtier" / "v1").glob("kvtier_pb2*"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=ROOT, help="output root (default: the repository)")
    ns = ap.parse_args()
    for p in generate(ns.out):
        print(p.relative_to(ns.out))


if __name__ == "__main__":
    sys.exit(main())
