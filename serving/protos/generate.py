"""Regenerate the committed Python stubs of ``energon/v1/inference.proto``.

Run ``python -m serving.protos.generate`` after editing the proto. protoc writes
``from energon.v1 import inference_pb2`` into the gRPC stub, an import that only
works with ``serving/protos`` on ``sys.path``; we rewrite it to the package path
so the stubs import from anywhere. grpcio-tools is a build/test dependency only.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "energon/v1/inference.proto"
DISAGG_PROTO_FILE = "energon/v1/disagg.proto"  # the router's internal service (serving/router.py)
OUTPUTS = ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py")
_PROTOC_IMPORT = "from energon.v1 import inference_pb2"
_PACKAGE_IMPORT = "from serving.protos.energon.v1 import inference_pb2"


def generate(out_dir: Path, proto_file: str = PROTO_FILE) -> list[Path]:
    """Write the stubs for ``proto_file`` into ``out_dir`` (flat) and return their paths."""
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
            str(PROTO_ROOT / proto_file),
        ]
        rc = protoc.main(argv)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} on {proto_file}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        stem = Path(proto_file).stem
        for name in (n.replace("inference", stem) for n in OUTPUTS):
            src = Path(tmp) / "energon" / "v1" / name
            text = src.read_text()
            if stem != "inference":  # imports inference_pb2 (messages it reuses) and its own stubs
                text = text.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT)
                text = text.replace(f"from energon.v1 import {stem}_pb2", f"from serving.protos.energon.v1 import {stem}_pb2")
            elif name.endswith("_grpc.py"):
                if _PROTOC_IMPORT not in text:
                    raise RuntimeError(f"protoc output changed: {_PROTOC_IMPORT!r} not found in {name}")
                text = text.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT)
            dst = out_dir / name
            dst.write_text(text)
            written.append(dst)
    return written


def main() -> int:
    out = PROTO_ROOT / "energon" / "v1"
    for path in [*generate(out), *generate(out, DISAGG_PROTO_FILE)]:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
