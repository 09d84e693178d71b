'''Train the embedded demo model: a small Llama on the Python standard library's source.

Every machine with Python has the corpus: the ``.py`` files under the running
interpreter's stdlib directory (``sysconfig.get_paths()["stdlib"]``; test suites and
site-packages left out). Steps:

1. a byte-level BPE vocabulary (``tokenizers``, 4096 tokens by default), with
   ``<|endoftext|>`` as bos/eos: it opens every file, and ``encode`` prepends it;
2. a Llama-architecture model (GQA, RoPE, RMSNorm, SwiGLU, tied embeddings) written here
   as a pure-JAX forward over a dict of Hugging Face-named float32 arrays, trained with
   optax AdamW on random windows of the concatenated token stream, one hold-out file in
   fifty kept aside for the held-out loss;
3. saved as a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json,
   tokenizer_config.json, generation_config.json) every few minutes, so a usable model
   exists early;
4. at the end, ``transformers.LlamaForCausalLM`` loads the checkpoint and must give the
   same logits as the training forward (float32), proving the files are a correct HF
   checkpoint; then it samples a few completions with ``generate``.

Run (the shipped model: ``--minutes 58``; the schedule follows wall time):

    nohup nice -n 5 python examples/train_demo_model.py --out energon_jax/demo --minutes 58 > train.log 2>&1 &

Result of the shipped checkpoint (energon_jax/demo), filled in from its training log:
    run on 2 shared CPU cores (load average 6-11 from other jobs), 58 min, 832 steps of
    8 x 512 tokens (3.4M tokens, about one epoch of 647 stdlib files); 2,361,024
    parameters (d_model 192, 4 layers, 6 heads / 2 KV heads, FFN 512, vocab 4096, tied
    embeddings), 9.4 MB float32.
    final train loss 3.474, held-out loss 3.564 (nats/token; uniform guess: 8.318).
    transformers parity of the saved checkpoint: max |diff| / max |logit| = 8.0e-07.
    transformers generate from "def fibonacci(n):", greedy, 96 new tokens:

        def fibonacci(n):
            """Return a new file for the file.

            """
            if not isinstance(name, str):
                return self.get_name(name, 'b' + 1)

            def __init__(self, name, name, value):
                """Return the object is a list of the object.

                If the name of the value of the value.
                """
                return self.name
            ...

    temperature 0.8 (torch seed 0): Python-shaped (indentation, calls, tuples, comments,
    if/else), meaning-free (an excerpt):

        def fibonacci(n):
            n = w = 0
            pfj(3, 1, 2,65)
            # The the b
            i2d2 = (2,0, 1)
'''
# (The docstring is delimited by ''' because the sample completions above contain """.)

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOT = "<|endoftext|>"
SKIPPED_DIRS = {"site-packages", "test", "tests", "idle_test", "lib2to3", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    hidden_size: int = 192  # D
    num_layers: int = 4
    num_heads: int = 6  # N
    num_kv_heads: int = 2  # K
    intermediate_size: int = 512  # F
    max_len: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:  # H
        return self.hidden_size // self.num_heads

    def to_hf(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_len,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "initializer_range": 0.02,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "torch_dtype": "float32",
            "use_cache": True,
        }


# -- corpus and tokenizer --------------------------------------------------------------


def stdlib_sources() -> list[tuple[str, str]]:
    """(relative path, text) of every decodable stdlib .py file, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIPPED_DIRS & set(rel.parts):
            continue
        try:
            out.append((str(rel), path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eot = tok.token_to_id(EOT)
    # Every training file starts after <|endoftext|>, so a prompt does too.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOT}:0 $A:0", pair=f"{EOT}:0 $A:0 {EOT}:1 $B:1", special_tokens=[(EOT, eot)]
    )
    return tok


def token_stream(tok: Tokenizer, texts: list[str]) -> np.ndarray:
    """<|endoftext|> file <|endoftext|> file ... as one uint16 array."""
    encodings = tok.encode_batch(texts, add_special_tokens=True)
    return np.concatenate([np.asarray(e.ids, np.uint16) for e in encodings])


# -- the model: pure JAX over Hugging Face-named parameters -----------------------------


def init_params(cfg: ModelConfig, key: jax.Array) -> dict[str, jax.Array]:
    D, F, H = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.num_layers)
    keys = iter(jax.random.split(key, 1 + 7 * cfg.num_layers))

    def normal(shape, s=std):
        return s * jax.random.normal(next(keys), shape, jnp.float32)

    p = {"model.embed_tokens.weight": normal((cfg.vocab_size, D)), "model.norm.weight": jnp.ones(D)}
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        # HF Linear weights are [out, in].
        p[pre + "self_attn.q_proj.weight"] = normal((cfg.num_heads * H, D))
        p[pre + "self_attn.k_proj.weight"] = normal((cfg.num_kv_heads * H, D))
        p[pre + "self_attn.v_proj.weight"] = normal((cfg.num_kv_heads * H, D))
        p[pre + "self_attn.o_proj.weight"] = normal((D, cfg.num_heads * H), out_std)
        p[pre + "mlp.gate_proj.weight"] = normal((F, D))
        p[pre + "mlp.up_proj.weight"] = normal((F, D))
        p[pre + "mlp.down_proj.weight"] = normal((D, F), out_std)
        p[pre + "input_layernorm.weight"] = jnp.ones(D)
        p[pre + "post_attention_layernorm.weight"] = jnp.ones(D)
    return p


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF's convention: rotate_half over the two halves of the head dim."""
    H = x.shape[-1]  # x: [B, T, N, H]
    inv_freq = 1.0 / theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H)  # [H/2]
    freqs = positions[:, None].astype(jnp.float32) * inv_freq[None, :]  # [T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [T, H]
    cos, sin = jnp.cos(emb)[None, :, None, :], jnp.sin(emb)[None, :, None, :]
    x1, x2 = x[..., : H // 2], x[..., H // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def forward(p: dict[str, jax.Array], tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """tokens [B, T] -> logits [B, T, V]; dense causal attention."""
    B, T = tokens.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    positions = jnp.arange(T)
    mask = jnp.tril(jnp.ones((T, T), bool))
    x = p["model.embed_tokens.weight"][tokens]  # [B, T, D]
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        h = rms_norm(x, p[pre + "input_layernorm.weight"], cfg.rms_norm_eps)
        q = (h @ p[pre + "self_attn.q_proj.weight"].T).reshape(B, T, N, H)
        k = (h @ p[pre + "self_attn.k_proj.weight"].T).reshape(B, T, K, H)
        v = (h @ p[pre + "self_attn.v_proj.weight"].T).reshape(B, T, K, H)
        q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
        q = q.reshape(B, T, K, N // K, H)  # query heads grouped by the KV head they share
        scores = jnp.einsum("btkgh,bskh->bkgts", q, k) / math.sqrt(H)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        attn = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(scores, axis=-1), v).reshape(B, T, N * H)
        x = x + attn @ p[pre + "self_attn.o_proj.weight"].T
        h = rms_norm(x, p[pre + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = jax.nn.silu(h @ p[pre + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ p[pre + "mlp.up_proj.weight"].T)) @ p[pre + "mlp.down_proj.weight"].T
    x = rms_norm(x, p["model.norm.weight"], cfg.rms_norm_eps)
    return x @ p["model.embed_tokens.weight"].T  # tied embeddings


def loss_fn(p: dict[str, jax.Array], batch: jax.Array, cfg: ModelConfig) -> jax.Array:
    logits = forward(p, batch[:, :-1], cfg)  # batch: [B, T+1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# -- training ------------------------------------------------------------------------


def save_checkpoint(out: Path, params: dict, cfg: ModelConfig, tok: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.asarray(v, np.float32) for name, v in params.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    gen = {"bos_token_id": 0, "eos_token_id": 0, "max_length": cfg.max_len}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": None,
        "pad_token": None,
        "model_max_length": cfg.max_len,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def sample_windows(data: np.ndarray, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    starts = rng.integers(0, len(data) - length - 1, size=batch)
    return np.stack([data[s : s + length + 1] for s in starts]).astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("energon_jax/demo"))
    ap.add_argument("--minutes", type=float, default=35.0, help="training wall-time budget")
    ap.add_argument("--max-steps", type=int, default=0, help="schedule by steps instead of --minutes")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=192)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--save-every-min", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.time()
    sources = stdlib_sources()
    held = [text for i, (_, text) in enumerate(sources) if i % 50 == 7]
    train = [text for i, (_, text) in enumerate(sources) if i % 50 != 7]
    tok = train_tokenizer(train, args.vocab)
    train_ids, held_ids = token_stream(tok, train), token_stream(tok, held)
    print(
        f"corpus: {len(train)} train files ({len(train_ids):,} tokens), {len(held)} held-out "
        f"({len(held_ids):,} tokens), vocab {tok.get_vocab_size()}, {time.time() - t0:.0f}s",
        flush=True,
    )
    cfg = ModelConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=args.d_model, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.ffn, max_len=args.seq_len,
    )
    params = init_params(cfg, jax.random.key(args.seed))
    n_params = sum(int(v.size) for v in params.values())
    print(f"model: {cfg}, {n_params:,} parameters ({4 * n_params / 2**20:.1f} MiB float32)", flush=True)

    # AdamW at unit rate; the schedule multiplies the update, so the number of steps can
    # be fixed after timing the first ones. No weight decay on norms.
    decay_mask = {k: v.ndim == 2 for k, v in params.items()}
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1.0, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask),
    )
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, batch, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, cfg)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + lr * u, params, updates)
        return params, opt_state, loss

    eval_loss = jax.jit(lambda p, b: loss_fn(p, b, cfg))
    eval_rng = np.random.default_rng(1234)
    held_batches = [sample_windows(held_ids, eval_rng, args.batch, args.seq_len) for _ in range(8)]

    def held_out_loss(p) -> float:
        return float(np.mean([eval_loss(p, b) for b in held_batches]))

    # The learning-rate schedule follows wall time, not a step count: the machine is shared
    # and the step time changes with the load, but the run must end on time.
    rng = np.random.default_rng(args.seed)
    warmup, step, budget_s = 30, 0, args.minutes * 60
    train_start = last_save = time.time()
    recent: list[float] = []
    while True:
        elapsed = time.time() - train_start
        progress = step / args.max_steps if args.max_steps else elapsed / budget_s
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        batch = sample_windows(train_ids, rng, args.batch, args.seq_len)
        params, opt_state, loss = train_step(params, opt_state, batch, jnp.float32(lr))
        step += 1
        recent.append(float(loss))
        if step % 25 == 0:
            print(f"step {step} loss {np.mean(recent):.3f} lr {lr:.2e} "
                  f"{(time.time() - train_start) / 60:.1f} min", flush=True)
            recent = []
        if time.time() - last_save > args.save_every_min * 60:
            save_checkpoint(args.out, params, cfg, tok)
            last_save = time.time()
            print(f"saved {args.out} at step {step}, held-out loss {held_out_loss(params):.3f}", flush=True)

    save_checkpoint(args.out, params, cfg, tok)
    final_train = float(np.mean([eval_loss(params, sample_windows(train_ids, eval_rng, args.batch, args.seq_len))
                                 for _ in range(8)]))
    print(f"final: step {step}, train loss {final_train:.3f}, held-out loss {held_out_loss(params):.3f}, "
          f"{(time.time() - train_start) / 60:.1f} min", flush=True)
    verify_with_transformers(args.out, params, cfg, held_batches[0][:2, :64])


def verify_with_transformers(out: Path, params: dict, cfg: ModelConfig, sample: np.ndarray) -> None:
    """The saved files must be a correct HF Llama checkpoint: same logits as training."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(sample.astype(np.int64))).logits.numpy()
    ours = np.asarray(forward(params, jnp.asarray(sample), cfg))
    err = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    print(f"transformers parity: max |diff| / max |logit| = {err:.2e}", flush=True)
    if err > 1e-4:
        raise SystemExit(f"saved checkpoint does not match the training forward: {err=:.2e} > 1e-4")

    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok("def fibonacci(n):", return_tensors="pt")
    torch.manual_seed(0)
    for name, kwargs in [("greedy", {"do_sample": False}), ("temperature 0.8", {"do_sample": True, "temperature": 0.8})]:
        ids = model.generate(**prompt, max_new_tokens=96, pad_token_id=tok.eos_token_id, **kwargs)
        print(f"--- sample ({name}) ---\n{tok.decode(ids[0], skip_special_tokens=True)}\n---", flush=True)


if __name__ == "__main__":
    main()
