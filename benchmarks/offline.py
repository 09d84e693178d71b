"""Offline throughput of ``Engine.generate`` against baselines measured in the same run.

Workload: ``--num-requests`` requests (256 by default) from a fixed seed, prompt lengths
16..1024 and output lengths 8..256, both long-tailed (clipped log-normal); every request
generates exactly its output length (greedy, eos ignored). Model: a random
Llama-architecture checkpoint of about 50M parameters (float32), built with
``transformers`` and loaded through the normal path.

Printed (a markdown table, for ``benchmarks/RESULTS.md``):

1. output tokens/s of ``Engine.generate`` vs ``transformers`` ``generate`` on static,
   left-padded batches of 16, the requests sorted by prompt length first (same prompts,
   each batch runs to its longest output), at the faster of 1 and all torch threads
   (``pick_threads``: on a loaded box torch's threads stall each other);
2. the Engine vs the same Engine with ``static_batching=True`` (a batch of
   ``max_num_seqs`` is admitted only when the previous one has finished);
3. batch-1 decode tokens/s vs the memory-bandwidth roofline: bandwidth measured by a
   large array copy, roofline = bandwidth / weight bytes read per token;
4. the share of computed token slots that are padding (the Engine's bucketed, packed
   steps vs padded static batches) and the number of compiles;
5. what this machine allows at best (a model of step cost, every input measured in the
   same run). A step costs a fixed part ``a`` (reading the weights; bounded above by one
   batch-1 decode step) plus work per token that is the same whichever way tokens are
   grouped. That work is at least ``F``: the workload's matmul FLOPs (prompt tokens and
   fed output tokens through the layers, sampled tokens through the LM head; attention
   left out) at the best float32 matmul rate measured here. Continuous batching needs at
   least ``N_min = ceil((output tokens - requests) / max_num_seqs)`` steps, static
   batching took ``N_static``, so continuous / static is at most
   ``(a N_static + F) / (a N_min + F)`` (adding equal per-token work to both sides only
   lowers a ratio above 1), and the Engine at most ``output tokens / (a N_min + F)``.

Each measured system runs in its own fresh process (``--worker``, started by ``main``):
the Engine, the static Engine, transformers, and the machine's bandwidth and matmul rate,
so that none of them runs beside another's thread pools or caches (transformers after two
JAX engines in one process measured 20x slow). ``--repeats N`` runs the Engine and
transformers N times as back-to-back pairs and prints each pair's ratio and their range:
on a shared machine a ratio from one pair is more stable than either speed. The load
average is printed beside every pair. Workers use the persistent compilation cache
(``--compile-cache``), so only the first run of a configuration pays the warm-up compiles.

``--quick`` runs a smoke version (16 requests, shorter lengths). Run on the CPU:
``JAX_PLATFORMS=cpu python benchmarks/offline.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HF_BATCH = 16
RESULT_PREFIX = "OFFLINE_RESULT "  # a worker's one line of JSON on stdout


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def make_workload(n: int, *, seed: int, vocab: int, max_prompt: int, max_output: int) -> Workload:
    """Long-tailed (log-normal) prompt and output lengths, clipped to [16, max_prompt] / [8, max_output]."""
    rng = np.random.default_rng(seed)
    plen = np.clip(rng.lognormal(np.log(120), 0.9, n), 16, max_prompt).astype(int)
    olen = np.clip(rng.lognormal(np.log(40), 0.8, n), 8, max_output).astype(int)
    prompts = [rng.integers(3, vocab, int(p)).tolist() for p in plen]
    return Workload(prompts, [int(o) for o in olen])


def make_long_tailed_mix(n: int, *, seed: int, vocab: int) -> Workload:
    """The second mix (issue 13 point 9): prompts long-tailed with mean about 56 up to 512
    tokens, outputs mean about 30 up to 128 (seed 4, 48 requests: prompts mean 54 up to 361,
    outputs mean 31 up to 128, 4,067 tokens in all)."""
    rng = np.random.default_rng(seed)
    plen = np.clip(rng.lognormal(np.log(38), 1.0, n), 4, 512).astype(int)
    olen = np.clip(rng.lognormal(np.log(24), 0.7, n), 4, 128).astype(int)
    return Workload([rng.integers(3, vocab, int(p)).tolist() for p in plen], [int(o) for o in olen])


def make_checkpoint(out: Path, *, layers: int, hidden: int, vocab: int, max_len: int) -> Path:
    """A random Llama checkpoint (untied head) saved as safetensors; returns ``out``."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, max_position_embeddings=max_len,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = tf.LlamaForCausalLM(cfg).to(torch.float32).eval()
    model.save_pretrained(str(out))
    return out


def measure_matmul_rate() -> float:
    """Best float32 FLOP/s of XLA matmuls shaped like the model's (and one large square)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    rng = np.random.default_rng(0)
    for m, k, n in ((64, 512, 2816), (512, 512, 2816), (512, 1408, 512), (2048, 2048, 2048)):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        mm = jax.jit(lambda a, b: a @ b)
        mm(x, w).block_until_ready()
        for _ in range(5):
            t = time.perf_counter()
            mm(x, w).block_until_ready()
            best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best


def measure_bandwidth(nbytes: int = 512 * 1024**2) -> float:
    """Bytes/s of a large array copy (read + write), best of 5, the faster of numpy and XLA."""
    import jax
    import jax.numpy as jnp

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    x = jnp.asarray(src)
    copy = jax.jit(lambda a: a + 1.0)
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


@dataclasses.dataclass(frozen=True)
class StepCounts:
    slots: int
    real: int
    steps: int


class StepRecorder:
    """Wraps the runner to count real and padded token slots of every step."""

    def snapshot(self) -> StepCounts:
        return StepCounts(self.slots, self.real, self.steps)

    def __init__(self, runner) -> None:
        self.slots = 0
        self.real = 0
        self.steps = 0
        self._inner = runner.step_async
        runner.step_async = self._step

    def _step(self, batch, *prev):  # prev: the step whose ids fill this one's placeholders
        self.slots += int(batch.input_ids.shape[0])
        self.real += int((np.asarray(batch.segment_ids) >= 0).sum())
        self.steps += 1
        return self._inner(batch, *prev)


def run_engine(engine, w: Workload) -> tuple[float, StepRecorder]:
    from energon_jax import SamplingParams

    # One small untimed run first: the first execution of each step touches fresh memory.
    engine.generate(w.prompts[:2], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
    rec = StepRecorder(engine.runner)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in w.output_lens]
    t = time.perf_counter()
    outs = engine.generate(w.prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    got = sum(len(o.token_ids) for o in outs)
    if got != w.output_tokens:
        raise RuntimeError(f"engine produced {got} tokens, expected {w.output_tokens}")
    return dt, rec.snapshot()


def run_transformers(path: Path, w: Workload, threads: int) -> tuple[float, int, int, int]:
    """Static left-padded batches of HF_BATCH, requests sorted by prompt length (as one would
    batch them offline), at the faster of 1 and ``threads`` torch threads (``pick_threads``);
    returns (seconds, padded slots, real tokens, threads used)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    order = sorted(range(len(w.prompts)), key=lambda i: len(w.prompts[i]))
    batches = []
    for i in range(0, len(order), HF_BATCH):
        prompts = [w.prompts[j] for j in order[i : i + HF_BATCH]]
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        batches.append((ids, mask, [w.output_lens[j] for j in order[i : i + HF_BATCH]]))

    def generate(ids, mask, new: int) -> None:
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)

    used = pick_threads(lambda: generate(*batches[0][:2], 4), threads)
    slots = real = 0
    t = time.perf_counter()
    for ids, mask, outs in batches:
        generate(ids, mask, max(outs))
        slots += ids.shape[0] * (ids.shape[1] + max(outs))
        real += int(mask.sum()) + sum(outs)
    return time.perf_counter() - t, slots, real, used


def pick_threads(probe, threads: int) -> int:
    """The faster torch thread count, 1 or ``threads``, for ``probe()`` (best of 2 each); set on return.

    On a loaded 2-core box torch's OpenMP threads wait on each other at every op: one
    batch of 16 ran 26-56 tok/s on 2 threads and 210-239 on 1 (load average 7-10), which
    is how an earlier baseline came out 20x slow. A quiet box keeps the 2 threads."""
    import torch

    best = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        probe()  # first call: allocations
        times = []
        for _ in range(2):
            t = time.perf_counter()
            probe()
            times.append(time.perf_counter() - t)
        best[n] = min(times)
    used = min(best, key=best.get)
    torch.set_num_threads(used)
    return used


def batch1_decode(engine, vocab: int, n: int = 64) -> float:
    """Decode tokens/s of one request alone: (n - 1) tokens over the time after the first."""
    from energon_jax import SamplingParams

    prompt = list(range(3, 3 + 16))
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    out = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)[0]
    return (n - 1) / (out.latency_s - out.ttft_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from energon_jax import compile_cache

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 16 requests, prompts <= 256, outputs <= 64")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--min-token-bucket", type=int, default=1, help="smallest step bucket (1: batch-1 decode unpadded)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-static", action="store_true", help="leave out the static_batching Engine")
    ap.add_argument("--repeats", type=int, default=1,
                    help="back-to-back (Engine, transformers) pairs, each system in a fresh process")
    ap.add_argument("--mix", choices=["default", "long-tail"], default="default",
                    help="long-tail: 48 requests, prompts mean ~56 up to 512, outputs mean ~30 up to 128, "
                         "seed 4 (use with --layers 12 --hidden 256 for the 26M model of issue 13)")
    ap.add_argument("--worker", choices=["engine", "static", "transformers", "machine"], help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)
    compile_cache.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"repeats={args.repeats} must be >= 1")
    if args.mix == "long-tail":
        args.num_requests, args.max_prompt, args.max_output = 48, 512, 128
        if args.seed == 0:
            args.seed = 4
    if args.quick:
        args.num_requests, args.max_prompt, args.max_output, args.max_num_seqs = 16, 256, 64, 8
    return args


def workload(args: argparse.Namespace) -> Workload:
    if args.mix == "long-tail":
        return make_long_tailed_mix(args.num_requests, seed=args.seed, vocab=args.vocab)
    return make_workload(args.num_requests, seed=args.seed, vocab=args.vocab, max_prompt=args.max_prompt,
                         max_output=args.max_output)


def worker(args: argparse.Namespace) -> dict:
    """One measurement in this (fresh) process; returns what ``main`` prints."""
    w, path = workload(args), Path(args.checkpoint)
    if args.worker == "transformers":
        hf_s, slots, real, used = run_transformers(path, w, threads=os.cpu_count() or 1)
        return dict(seconds=hf_s, slots=slots, real=real, threads=used)
    if args.worker == "machine":
        return dict(bandwidth=measure_bandwidth(), flop_rate=measure_matmul_rate())
    import jax

    from energon_jax import Engine, compile_cache

    compile_cache.configure_from_args(args)
    kw = dict(max_model_len=args.max_prompt + args.max_output, page_size=16, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, min_token_bucket=args.min_token_bucket,
              static_batching=args.worker == "static")
    t = time.perf_counter()
    engine = Engine.from_pretrained(path, dtype="float32", **kw)
    out = dict(warmup_s=time.perf_counter() - t, compiles_warm=engine.num_compiles)
    seconds, rec = run_engine(engine, w)
    out.update(seconds=seconds, slots=rec.slots, real=rec.real, steps=rec.steps, compiles_after=engine.num_compiles)
    if args.worker == "engine":
        leaves = jax.tree.leaves(engine.runner._state)
        out.update(batch1=batch1_decode(engine, args.vocab), n_params=sum(x.size for x in leaves),
                   weight_bytes=sum(x.size * x.dtype.itemsize for x in leaves),
                   jax=f"{jax.__version__} ({jax.default_backend()})")
    return out


def spawn(role: str, checkpoint: Path) -> dict:
    """Run ``--worker role`` in a fresh Python process with this run's arguments."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", role, "--checkpoint",
           str(checkpoint)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {role!r} failed (exit {proc.returncode}): {proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def load_average() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def span(values: list[float], fmt: str = "{:.1f}") -> str:
    """The median of ``values``, and their range when there are several."""
    mid = fmt.format(float(np.median(values)))
    return mid if len(values) == 1 else f"{mid} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return
    w = workload(args)
    max_len = args.max_prompt + args.max_output
    pairs = []  # (engine result, transformers result or None, load average before the pair)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), layers=args.layers, hidden=args.hidden, vocab=args.vocab, max_len=max_len)
        for _ in range(args.repeats):
            load = load_average()
            eng = spawn("engine", path)
            hf = None if args.skip_transformers else spawn("transformers", path)
            pairs.append((eng, hf, load))
            print(f"pair {len(pairs)}: Engine {w.output_tokens / eng['seconds']:.1f} tok/s"
                  + ("" if hf is None else f", transformers {w.output_tokens / hf['seconds']:.1f} tok/s "
                     f"({hf['threads']} threads), ratio {hf['seconds'] / eng['seconds']:.2f}x")
                  + f"; load average {load}", file=sys.stderr, flush=True)
        static = None if args.skip_static else spawn("static", path)
        machine = spawn("machine", path)

    eng0 = pairs[0][0]
    out_tok = w.output_tokens
    bw, flop_rate = machine["bandwidth"], machine["flop_rate"]
    weight_bytes, n_params = eng0["weight_bytes"], eng0["n_params"]
    roofline = bw / weight_bytes
    eng_tps = [out_tok / e["seconds"] for e, _, _ in pairs]
    lines = [
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPU threads, "
        f"jax {eng0['jax']}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load average (1/5/15 min) "
        f"before each pair: {', '.join(load for _, _, load in pairs)}",
        f"workload: {len(w.prompts)} requests (seed {args.seed}), prompt {min(map(len, w.prompts))}..."
        f"{max(map(len, w.prompts))} (mean {np.mean([len(p) for p in w.prompts]):.0f}), output "
        f"{min(w.output_lens)}...{max(w.output_lens)} (mean {np.mean(w.output_lens):.0f}), {out_tok} output tokens",
        f"model: random Llama, {n_params / 1e6:.1f}M params float32 ({args.layers} layers, hidden {args.hidden}, "
        f"vocab {args.vocab}); engine max_num_seqs={args.max_num_seqs}, "
        f"max_num_batched_tokens={args.max_num_batched_tokens}, min_token_bucket={args.min_token_bucket}, "
        f"page_size=16; warm-up {eng0['warmup_s']:.1f}s; each system in its own process, "
        f"{len(pairs)} back-to-back pair(s): median (range)",
        "",
        "| measurement | value | baseline | ratio |",
        "|---|---|---|---|",
    ]
    if not args.skip_transformers:
        hf_tps = [out_tok / hf["seconds"] for _, hf, _ in pairs]
        ratios = [hf["seconds"] / e["seconds"] for e, hf, _ in pairs]
        threads = sorted({hf["threads"] for _, hf, _ in pairs})
        lines.append(f"| Engine.generate vs transformers generate (static batches of {HF_BATCH}, sorted by prompt "
                     f"length, torch threads {'/'.join(map(str, threads))}), output tok/s | {span(eng_tps)} | "
                     f"{span(hf_tps)} | {span(ratios, '{:.2f}')}x |")
    if static is not None:
        lines.append(f"| Engine (continuous, first pair) vs Engine static_batching, output tok/s | {eng_tps[0]:.1f} | "
                     f"{out_tok / static['seconds']:.1f} | {static['seconds'] / eng0['seconds']:.2f}x |")
    b1 = eng0["batch1"]
    lines.append(f"| batch-1 decode tok/s vs roofline ({bw / 1e9:.1f} GB/s / {weight_bytes / 1e6:.0f} MB per token) "
                 f"| {b1:.1f} | {roofline:.1f} | {b1 / roofline:.0%} |")
    lines.append(f"| padding share of computed token slots: Engine (packed, bucketed) | "
                 f"{1 - eng0['real'] / eng0['slots']:.1%} ({eng0['steps']} steps) | | |")
    if not args.skip_transformers:
        hf0 = pairs[0][1]
        hf_pad = 1 - hf0["real"] / hf0["slots"]
        lines.append(f"| padding share: transformers static padded batches | {hf_pad:.1%} | | |")
    if static is not None:
        lines.append(f"| padding share: Engine static_batching | {1 - static['real'] / static['slots']:.1%} "
                     f"({static['steps']} steps) | | |")
    lines.append(f"| compiles: after warm-up / after the workload | {eng0['compiles_warm']} / {eng0['compiles_after']} "
                 "| | |")
    # 5. ceilings (module docstring): a = one batch-1 step, F = matmul FLOPs at the best rate.
    head_params = args.vocab * args.hidden
    layer_params = n_params - 2 * head_params  # all but the embedding table and the untied head
    fed = sum(len(p) for p in w.prompts) + out_tok - len(w.prompts)
    flops = 2 * layer_params * fed + 2 * head_params * out_tok
    f_s, a_s = flops / flop_rate, 1 / b1
    n_min = -(-(out_tok - len(w.prompts)) // args.max_num_seqs)
    lines += [
        "",
        f"ceilings on this machine: fixed step cost a <= 1 / batch-1 rate = {a_s * 1e3:.2f} ms; matmul work "
        f"F = {flops / 1e12:.2f} TFLOP at {flop_rate / 1e9:.0f} GFLOP/s (best measured) = {f_s:.1f} s; "
        f"N_min = {n_min}, Engine steps = {eng0['steps']}"
        + ("" if static is None else f", N_static = {static['steps']}"),
        "",
        "| ceiling | value |",
        "|---|---|",
    ]
    if static is not None:
        lines.append(f"| continuous / static at most (a N_static + F) / (a N_min + F) | "
                     f"{(a_s * static['steps'] + f_s) / (a_s * n_min + f_s):.2f}x |")
    lines.append(f"| Engine output tok/s at most output tokens / (a N_min + F) | {out_tok / (a_s * n_min + f_s):.1f} |")
    if not args.skip_transformers:
        best = pairs[0][1]["seconds"] / (a_s * n_min + f_s)
        lines.append(f"| Engine vs transformers at most (first pair) | {best:.2f}x |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
