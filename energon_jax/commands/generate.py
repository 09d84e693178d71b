"""``energon generate [--model PATH] PROMPT``: stream a completion to the terminal.

Without ``--model`` the embedded demo model (``energon_jax/demo``) is used. Text is
printed as the engine produces it (``Engine.stream``), the prompt first. The engine is
sized for one sequence and compiles lazily (no warm-up of every bucket), so the first
token comes after two small compiles rather than a full warm-up.

Under ``energon launch -n N`` (or with ``--coordinator-address/--num-processes/--process-id``)
the processes join one ``jax.distributed`` run before any device is used and build one
engine over all their devices (``--tp/--dp``): process 0 schedules and prints, the others
run the steps it broadcasts (``serve_if_worker``) and print nothing.
"""

from __future__ import annotations

import argparse
import sys

NAME = "generate"
HELP = "generate text from a prompt, streamed to the terminal (default model: the embedded demo)"


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tp/--pp/--dp/--offload/--resident-layers/--expert-parallel`` and the prefix-cache flags
    (shared with ``energon serve``)."""
    g = parser.add_argument_group("parallelism (energon_jax/parallel)")
    g.add_argument("--tp", type=int, default=None, help="tensor-parallel degree")
    g.add_argument("--pp", type=int, default=None, help="pipeline-parallel degree (single process)")
    g.add_argument("--dp", type=int, default=None, help="data-parallel degree")
    g.add_argument("--offload", choices=("host", "peer"), default=None, help="stream layers from host or peer memory")
    g.add_argument("--resident-layers", type=int, default=None, help="layers kept on device with --offload")
    g.add_argument("--expert-parallel", action="store_true", default=None,
                   help="mixture-of-experts models: whole experts per tp shard (default: each expert's MLP split)")
    add_disagg_arguments(parser)
    c = parser.add_argument_group("prefix caching (energon_jax/kv_cache.py)")
    c.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help="recompute every prompt from its first token (default: reuse cached KV pages of shared prefixes)")
    c.add_argument("--prefix-cache-seed", type=int, default=None,
                   help="seed of the page-hash chain's root (default: random per process)")


def add_disagg_arguments(parser: argparse.ArgumentParser) -> None:
    """``--prefill-devices/--decode-devices/--prefill-tp/--decode-tp`` (also on ``energon info``)."""
    d = parser.add_argument_group("prefill/decode disaggregation (energon_jax/disagg.py)")
    d.add_argument("--prefill-devices", type=int, default=None,
                   help="prefill on the first N devices, decode on the next --decode-devices (default: colocated)")
    d.add_argument("--decode-devices", type=int, default=None, help="devices of the decode group")
    d.add_argument("--prefill-tp", type=int, default=None, help="tensor-parallel degree of the prefill group "
                   "(default and only value for now: --prefill-devices)")
    d.add_argument("--decode-tp", type=int, default=None, help="tensor-parallel degree of the decode group "
                   "(default and only value for now: --decode-devices)")


def parallel_kwargs(args: argparse.Namespace) -> dict[str, object]:
    """The engine keyword arguments of the flags above that were given."""
    names = ("tp", "pp", "dp", "offload", "resident_layers", "expert_parallel", "enable_prefix_caching",
             "prefix_cache_seed",
             "prefill_devices", "decode_devices", "prefill_tp", "decode_tp")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from energon_jax.parallel.distributed import add_distributed_arguments

    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--model", default=None, help="Hugging Face checkpoint directory (default: embedded demo)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (default: 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same output")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="parameter dtype")
    parser.add_argument("--max-model-len", type=int, default=None, help="default: the model's maximum")
    parser.add_argument("--no-prompt", action="store_true", help="print only the generated text")
    add_parallel_arguments(parser)
    add_distributed_arguments(parser)
    from energon_jax import compile_cache

    compile_cache.add_arguments(parser)  # --compile-cache DIR, --no-compile-cache


def run(args: argparse.Namespace) -> int:
    from energon_jax import compile_cache
    from energon_jax.parallel import distributed

    try:  # before anything touches a device or compiles
        compile_cache.configure_from_args(args)
        multi = distributed.initialize(distributed.config_from_args(args))
    except ValueError as e:
        print(f"energon generate: {e}", file=sys.stderr)
        return 2
    try:
        return _generate(args)
    finally:
        if multi:
            distributed.shutdown()


def _generate(args: argparse.Namespace) -> int:
    from energon_jax.engine import Engine
    from energon_jax.parallel.controller import serve_if_worker, shutdown_workers
    from energon_jax.request import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
        )
        engine = Engine.from_pretrained(
            args.model, dtype=args.dtype, max_model_len=args.max_model_len, max_num_seqs=1,
            max_num_batched_tokens=256, warmup=False, **parallel_kwargs(args),
        )
    except ValueError as e:
        print(f"energon generate: {e}", file=sys.stderr)
        return 2
    if serve_if_worker(engine.runner):  # a worker: process 0's steps until it is done, no output
        return 0
    try:
        if engine.tokenizer is None:
            raise ValueError(f"model {engine.model_path!r} has no tokenizer.json: generate needs one for text prompts")
        max_len = engine.config.max_model_len
        n_prompt = len(engine.tokenizer.encode(args.prompt))
        if n_prompt + params.max_tokens > max_len:  # shorten the output rather than refuse
            if n_prompt >= max_len:
                raise ValueError(f"the prompt has {n_prompt} tokens; max_model_len={max_len}")
            params = SamplingParams(**{**params.__dict__, "max_tokens": max_len - n_prompt})
        out = sys.stdout
        if not args.no_prompt:
            out.write(args.prompt)
            out.flush()
        for delta in engine.stream(args.prompt, params):
            out.write(delta.text)
            out.flush()
        out.write("\n")
        return 0
    except ValueError as e:
        print(f"energon generate: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_workers(engine.runner)  # process 0: the workers return from serve()
