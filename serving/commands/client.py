"""``energon client``: stream a completion from a running server to the terminal."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

NAME = "client"
HELP = "stream a completion from an energon gRPC server (energon serve) to the terminal"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")
    parser.add_argument("--api-key", default=None, help="API key (default: $ENERGON_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, help="CA that signed the server certificate; enables TLS")
    parser.add_argument("--tls-cert", type=Path, help="client certificate, for mutual TLS")
    parser.add_argument("--tls-key", type=Path, help="client private key, for mutual TLS")
    parser.add_argument("--server-name", default=None, help="name to check the server certificate against")
    parser.add_argument("--usage", action="store_true", help="print finish reason and token counts at the end")


def client_config(args: argparse.Namespace):
    from serving.auth import API_KEY_ENV
    from serving.client import ClientConfig

    return ClientConfig(
        target=args.target,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        server_name=args.server_name,
    )


async def _stream(args: argparse.Namespace) -> int:
    import grpc

    from serving.client import InferenceClient, sampling_params

    params = sampling_params(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or None,
    )
    async with InferenceClient(client_config(args)) as client:
        try:
            last = None
            async for resp in client.generate(args.prompt, params, timeout=args.timeout):
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                last = resp
            sys.stdout.write("\n")
            if args.usage and last is not None:
                u = last.usage
                print(
                    f"[finish_reason={last.finish_reason} prompt_tokens={u.prompt_tokens} "
                    f"completion_tokens={u.completion_tokens}]"
                )
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_stream(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
