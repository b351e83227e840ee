"""Regenerate the checked-in protobuf/gRPC code: `python -m mixer.protogen` (needs grpcio-tools).

`python -m mixer.protogen --check` exits 1 when the checked-in code differs from what the
pinned grpcio-tools generates from proto/.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "mixer/v1/mixer.proto"
OUTPUTS = ("mixer_pb2.py", "mixer_pb2.pyi", "mixer_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / "proto" / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on proto/{PROTO}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    ns = ap.parse_args(argv)
    target = ROOT / "mixer" / "v1"
    if not ns.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in OUTPUTS if not (target / n).exists() or not filecmp.cmp(Path(tmp) / "mixer/v1" / n, target / n, shallow=False)]
    if stale:
        print(f"stale generated code in mixer/v1: {', '.join(stale)}; run `python -m mixer.protogen`", file=sys.stderr)
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
