"""Regenerate every generated file from protos/: python scripts/generate.py [--check].

Writes the Python messages, gRPC stubs and their .pyi type stubs into
clients/python/prefd/v1/. With --check it generates into a temporary directory
and exits 1 listing every file that differs from the committed one.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUTPUT_ROOT = ROOT / "clients" / "python"
PACKAGE_DIR = Path("prefd") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every proto and return the generated files, relative to out_root."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # The mypy-protobuf plugins live beside this interpreter.
    plugin_dir = Path(sysconfig.get_path("scripts"))
    env_path = f"{plugin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["PATH"] = env_path
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(
        p.relative_to(out_root) for p in (out_root / PACKAGE_DIR).iterdir() if p.name.endswith(GENERATED_SUFFIXES)
    )


def stale_files() -> list[str]:
    """Names of generated files that are missing, extra or different in the working tree."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = set(generate(Path(tmp)))
        committed = {
            p.relative_to(OUTPUT_ROOT)
            for p in (OUTPUT_ROOT / PACKAGE_DIR).iterdir()
            if p.name.endswith(GENERATED_SUFFIXES)
        }
        differing = [
            str(rel)
            for rel in sorted(fresh | committed)
            if rel not in fresh
            or rel not in committed
            or not filecmp.cmp(Path(tmp) / rel, OUTPUT_ROOT / rel, shallow=False)
        ]
    return differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed generated code is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        return 1 if stale else 0
    target = OUTPUT_ROOT / PACKAGE_DIR
    for old in target.iterdir():
        if old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        for rel in generate(Path(tmp)):
            shutil.copyfile(Path(tmp) / rel, OUTPUT_ROOT / rel)
            print(f"wrote {OUTPUT_ROOT / rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
