"""Regenerate the committed Python stubs of ``energon/v1/inference.proto``.

Run ``python -m serving.protos.generate`` after editing the proto. protoc writes
``from energon.v1 import inference_pb2`` into the gRPC stub, an import that only
works with ``serving/protos`` on ``sys.path``; we rewrite it to the package path
so the stubs import from anywhere. grpcio-tools is a build/test dependency only.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "energon/v1/inference.proto"
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
_PROTOC_IMPORT = "from energon.v1 import inference_pb2"
_PACKAGE_IMPORT = "from serving.protos.energon.v1 import inference_pb2"


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for ``PROTO_FILE`` into ``out_dir`` (flat) and return their paths."""
    from grpc_tools import protoc  # build-time only

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).resolve().parent / "_proto"
        argv = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
        rc = protoc.main(argv)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {PROTO_FILE}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in OUTPUTS:
            src = Path(tmp) / "energon" / "v1" / name
            text = src.read_text()
            if name.endswith("_grpc.py"):
                if _PROTOC_IMPORT not in text:
                    raise RuntimeError(f"protoc output changed: {_PROTOC_IMPORT!r} not found in {name}")
                text = text.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT)
            dst = out_dir / name
            dst.write_text(text)
            written.append(dst)
    return written


def main() -> int:
    out = PROTO_ROOT / "energon" / "v1"
    for path in generate(out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
