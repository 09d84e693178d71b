"""The committed gRPC stubs are current and import from anywhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dataclasses

from energon_jax.request import SamplingParams

from serving.protos import generate

STUB_DIR = generate.PROTO_ROOT / "energon" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = generate.generate(tmp_path)
    assert sorted(p.name for p in fresh) == sorted(generate.OUTPUTS)
    for path in fresh:
        committed = (STUB_DIR / path.name).read_text()
        assert committed == path.read_text(), f"{path.name} is stale: run python -m serving.protos.generate"


def test_committed_disagg_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    for path in generate.generate(tmp_path, generate.DISAGG_PROTO_FILE):
        assert path.name.startswith("disagg_pb2")
        committed = (STUB_DIR / path.name).read_text()
        assert committed == path.read_text(), f"{path.name} is stale: run python -m serving.protos.generate"


def test_stubs_import_without_protos_on_sys_path(tmp_path: Path) -> None:
    # A fresh interpreter in an unrelated directory: the grpc stub must import its
    # message module through the package path, not 'energon.v1'.
    code = (
        "from serving.protos.energon.v1 import inference_pb2 as pb, inference_pb2_grpc as g\n"
        "req = pb.GenerateRequest(request_id='r', text='hi', params=pb.SamplingParams(top_p=0.5))\n"
        "assert pb.GenerateRequest.FromString(req.SerializeToString()) == req\n"
        "assert hasattr(g, 'InferenceStub') and hasattr(g, 'add_InferenceServicer_to_server')\n"
        "import sys; assert 'energon' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_sampling_params_message_mirrors_every_python_field() -> None:
    from serving.protos.energon.v1 import inference_pb2 as pb

    wire = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields}
    python = {
        "max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
        "frequency_penalty", "seed", "stop", "stop_token_ids", "ignore_eos", "logprobs", "skip_special_tokens",
        "min_tokens",
    }  # fmt: skip
    assert wire == python
    assert python == {f.name for f in dataclasses.fields(SamplingParams)}
