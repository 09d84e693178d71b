"""Start ``energon serve``, stream one completion over gRPC, stop the server.

    python examples/serve_and_query.py                       # the embedded demo model
    python examples/serve_and_query.py --model /path/to/ckpt --max-tokens 64

Steps: pick a free port on 127.0.0.1, start ``energon serve`` as a subprocess (no metrics
endpoint), poll the gRPC health service until it says SERVING (the server reports SERVING
only after loading the model and running a warm-up request), stream a completion with
``serving.client.InferenceClient``, then SIGTERM the server, which drains and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_serving(target: str, server: subprocess.Popen, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2

    from serving.client import ClientConfig, InferenceClient

    deadline = time.monotonic() + timeout_s
    async with InferenceClient(ClientConfig(target=target)) as client:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode} before serving")
            try:
                if await client.health(timeout=2.0) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except Exception:  # not listening yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {target} did not report SERVING within {timeout_s:.0f}s")
            await asyncio.sleep(0.5)


async def query(target: str, prompt: str, max_tokens: int) -> str:
    from serving.client import ClientConfig, InferenceClient, sampling_params

    text = ""
    async with InferenceClient(ClientConfig(target=target)) as client:
        params = sampling_params(max_tokens=max_tokens, temperature=0.0)
        print(prompt, end="", flush=True)
        async for resp in client.generate(prompt, params, timeout=120):
            text += resp.text
            print(resp.text, end="", flush=True)
            if resp.finish_reason:
                print(f"\n[finish_reason={resp.finish_reason}, completion tokens={resp.usage.completion_tokens}]")
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded demo model)")
    p.add_argument("--prompt", default="def fibonacci(n):")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for SERVING")
    args = p.parse_args()

    port = free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "energon_jax.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--no-metrics", "--http-port", "0", "--max-model-len", "256", "--max-num-seqs", "2",
           "--max-num-batched-tokens", "64", "--grace", "5"]
    if args.model is not None:
        cmd += ["--model", args.model]
    server = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        asyncio.run(wait_serving(target, server, args.startup_timeout))
        text = asyncio.run(query(target, args.prompt, args.max_tokens))
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)  # drain, then exit 0
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            code = server.wait()
    print(f"server exited with code {code}")
    return 0 if code == 0 and text else 1


if __name__ == "__main__":
    sys.exit(main())
