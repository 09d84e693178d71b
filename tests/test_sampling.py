"""On-device sampling against independent references, per-row parameters, seeded reproducibility.

Truncation (temperature, top-k, top-p, min-p) is checked against transformers' logits
warpers chained as ``generate`` chains them (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper, MinPLogitsWarper), over a grid of parameters; sampled frequencies are
checked against the distribution those warpers leave (chi-square, fixed seeds).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energon_jax.sampling import MAX_LOGPROBS, apply_penalties, sample, warp

V = 64
H = 12


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FakeSamplingBatch:
    """The fields of batch.SamplingBatch that sampling reads (same names, same shapes)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array
    step: jax.Array
    history: jax.Array
    prompt_len: jax.Array
    num_logprobs: jax.Array
    min_tokens: jax.Array
    ban_ids: jax.Array


def make_batch(b: int, **fields) -> FakeSamplingBatch:
    defaults = dict(
        temperature=np.zeros(b, np.float32),
        top_k=np.zeros(b, np.int32),
        top_p=np.ones(b, np.float32),
        min_p=np.zeros(b, np.float32),
        repetition_penalty=np.ones(b, np.float32),
        presence_penalty=np.zeros(b, np.float32),
        frequency_penalty=np.zeros(b, np.float32),
        seed=np.zeros(b, np.uint32),
        step=np.zeros(b, np.int32),
        history=np.full((b, H), -1, np.int32),
        prompt_len=np.zeros(b, np.int32),
        num_logprobs=np.zeros(b, np.int32),
        min_tokens=np.zeros(b, np.int32),
        ban_ids=np.full((b, 16), -1, np.int32),
    )
    for name, value in fields.items():
        defaults[name] = np.asarray(value, defaults[name].dtype)
    return FakeSamplingBatch(**defaults)


_sample = jax.jit(sample)


def _logits(rng, b):
    return rng.standard_normal((b, V)).astype(np.float32) * 3


def test_greedy_and_logprobs():
    rng = np.random.default_rng(0)
    logits = _logits(rng, 5)
    logits[2, [7, 40]] = logits[2].max() + 1.0  # a tie: the first index wins, as np.argmax
    ids, lp, top_ids, top_lp = _sample(jnp.asarray(logits), make_batch(5, num_logprobs=[0, 3, 0, 0, 0]))
    ref_lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    np.testing.assert_array_equal(np.asarray(ids), logits.argmax(-1))
    np.testing.assert_allclose(np.asarray(lp), ref_lp[np.arange(5), logits.argmax(-1)], rtol=1e-5, atol=1e-5)
    order = np.argsort(-ref_lp, axis=-1)[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(top_ids), order)
    np.testing.assert_allclose(np.asarray(top_lp), np.take_along_axis(ref_lp, order, -1), rtol=1e-5, atol=1e-5)


def test_min_tokens_keeps_the_ban_ids_from_being_sampled():
    rng = np.random.default_rng(11)
    logits = _logits(rng, 3)
    top = logits.argmax(axis=-1)
    ban = np.full((3, 16), -1, np.int32)
    ban[:, 0] = top  # each row's greedy token is its stop id
    s = make_batch(3, min_tokens=[2, 2, 0], step=[1, 2, 0], ban_ids=ban)
    ids = np.asarray(_sample(jnp.asarray(logits), s)[0])
    assert ids[0] == np.argsort(logits[0])[-2]  # one token short of min_tokens: held back
    assert ids[1] == top[1] and ids[2] == top[2]  # min_tokens reached / not asked


def test_top_logprobs_skipped_when_no_row_asks():
    logits = _logits(np.random.default_rng(1), 4)
    ids, lp, top_ids, top_lp = _sample(jnp.asarray(logits), make_batch(4))
    np.testing.assert_array_equal(np.asarray(ids), logits.argmax(-1))
    assert np.isfinite(np.asarray(lp)).all() and (np.asarray(lp) < 0).all()
    assert not np.asarray(top_ids).any() and not np.asarray(top_lp).any()


def _penalties_reference(logits, history, prompt_len, rp, pres, freq):
    out = logits.copy()
    for b in range(logits.shape[0]):
        hist = [t for t in history[b] if t >= 0]
        seen = set(hist)
        outputs = [t for j, t in enumerate(history[b]) if t >= 0 and j >= prompt_len[b]]
        for t in seen:
            out[b, t] = out[b, t] / rp[b] if out[b, t] > 0 else out[b, t] * rp[b]
        for t in set(outputs):
            out[b, t] -= freq[b] * outputs.count(t) + pres[b]
    return out


def test_penalties_match_reference():
    rng = np.random.default_rng(1)
    b = 4
    logits = _logits(rng, b)
    history = np.full((b, H), -1, np.int32)
    lens = [0, 5, 12, 8]
    for i, n in enumerate(lens):
        history[i, :n] = rng.integers(0, 8, n)  # small ids so repeats happen
    prompt_len = np.array([0, 2, 6, 8], np.int32)
    rp = np.array([1.3, 1.0, 0.7, 2.0], np.float32)
    pres = np.array([0.5, -0.3, 0.0, 1.0], np.float32)
    freq = np.array([0.2, 0.4, 1.5, 0.0], np.float32)
    batch = make_batch(
        b, history=history, prompt_len=prompt_len, repetition_penalty=rp, presence_penalty=pres, frequency_penalty=freq
    )
    got = np.asarray(jax.jit(apply_penalties)(jnp.asarray(logits), batch))
    want = _penalties_reference(logits, history, prompt_len, rp, pres, freq)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Greedy sampling uses the penalised logits.
    ids, *_ = _sample(jnp.asarray(logits), batch)
    np.testing.assert_array_equal(np.asarray(ids), want.argmax(-1))


def _hf_warped(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """One row's logits after transformers' warpers, added as ``generate`` adds them (same order,
    same skip conditions, ``min_tokens_to_keep=1``); -inf where a token is dropped."""
    import torch
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p > 0.0:
        warpers.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    scores = torch.tensor(logits[None], dtype=torch.float32)
    ids = torch.zeros((1, 1), dtype=torch.long)
    for w in warpers:
        scores = w(ids, scores)
    return scores[0].numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


_warp = jax.jit(warp)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    # The example: after top_k=2, {0.4, 0.3} renormalise to {0.57, 0.43}; 0.57
    # already reaches top_p=0.5, so only token 0 stays (top-p on the full softmax kept {0, 1}).
    logits = np.log(np.array([[0.4, 0.3, 0.1, 0.1, 0.1]], np.float32))
    got = np.asarray(_warp(jnp.asarray(logits), make_batch(1, temperature=[1.0], top_k=[2], top_p=[0.5])))
    want = _hf_warped(logits[0], 1.0, 2, 0.5, 0.0)
    assert np.flatnonzero(np.isfinite(want)).tolist() == [0]
    assert np.flatnonzero(np.isfinite(got[0])).tolist() == [0]


GRID = [(t, k, p, m) for t in (0.5, 1.0, 1.7) for k in (0, 1, 3, 10) for p in (1.0, 0.9, 0.6, 0.2)
        for m in (0.0, 0.05, 0.3)]


def test_truncation_matches_transformers_warpers_over_a_grid():
    rng = np.random.default_rng(2)
    b = len(GRID)
    logits = _logits(rng, b)
    temp, top_k, top_p, min_p = (np.array(col) for col in zip(*GRID))
    got = np.asarray(_warp(jnp.asarray(logits), make_batch(b, temperature=temp, top_k=top_k, top_p=top_p,
                                                              min_p=min_p)))
    for row, (t, k, p, m) in enumerate(GRID):
        want = _hf_warped(logits[row], t, k, p, m)
        kept = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got[row]), kept, err_msg=f"kept set, {t=} {k=} {p=} {m=}")
        np.testing.assert_allclose(_softmax(got[row]), _softmax(want), rtol=1e-5, atol=1e-7,
                                   err_msg=f"distribution, {t=} {k=} {p=} {m=}")
    assert {int(np.isfinite(g).sum()) for g in got} >= {1, 3, 10, V}  # the grid reaches every regime


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = np.array([[3.0, 1.0, 2.0, 2.0, 0.5, 2.0]], np.float32)
    got = np.asarray(_warp(jnp.asarray(logits), make_batch(1, temperature=[1.0], top_k=[2])))
    want = _hf_warped(logits[0], 1.0, 2, 1.0, 0.0)
    np.testing.assert_array_equal(np.isfinite(got[0]), np.isfinite(want))
    assert np.isfinite(want).sum() == 4  # 3.0 and the three tokens tied at 2.0


def test_sampled_frequencies_match_the_warped_distribution():
    from scipy import stats

    rng = np.random.default_rng(3)
    row = rng.standard_normal(V).astype(np.float32)
    t, k, p, m = 0.8, 24, 0.9, 0.05
    n = 20000
    ids, *_ = _sample(jnp.asarray(np.repeat(row[None], n, 0)), make_batch(
        n, temperature=np.full(n, t), top_k=np.full(n, k), top_p=np.full(n, p), min_p=np.full(n, m),
        seed=np.arange(n), step=np.full(n, 5)))
    want = _softmax(_hf_warped(row, t, k, p, m).astype(np.float64))
    counts = np.bincount(np.asarray(ids), minlength=V)
    assert counts[want == 0].sum() == 0  # nothing outside the kept set
    kept = np.flatnonzero(want > 0)
    assert len(kept) >= 8
    expected = want[kept] * n
    # Bins expected to hold fewer than 5 draws are merged, as a chi-square test needs.
    small = expected < 5
    obs = np.append(counts[kept][~small], counts[kept][small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp *= obs.sum() / exp.sum()  # (float rounding only: every draw is inside the kept set)
    assert stats.chisquare(obs, exp).pvalue > 1e-3
    assert 0.5 * np.abs(counts / n - want).sum() < 0.02  # total variation


def test_sampled_tokens_stay_in_the_kept_set():
    rng = np.random.default_rng(3)
    logits = _logits(rng, 1)
    n = 200
    batch = make_batch(
        n,
        temperature=np.full(n, 1.5),
        top_k=np.full(n, 4),
        top_p=np.full(n, 0.95),
        seed=np.arange(n),
    )
    ids, *_ = _sample(jnp.asarray(np.repeat(logits, n, 0)), batch)
    kept = set(np.flatnonzero(np.isfinite(_hf_warped(logits[0], 1.5, 4, 0.95, 0.0))))
    got = set(np.asarray(ids).tolist())
    assert got <= kept
    assert len(got) > 1  # different seeds really sample different tokens


def test_seed_gives_same_token_whatever_the_companions():
    rng = np.random.default_rng(4)
    target = _logits(rng, 1)[0]
    outs = []
    for b, row in ((1, 0), (6, 3), (8, 7)):
        logits = _logits(rng, b)
        logits[row] = target
        temp = rng.uniform(0.5, 2.0, b).astype(np.float32)
        seed = rng.integers(0, 2**32, b, dtype=np.uint32)
        step = rng.integers(0, 50, b)
        temp[row], seed[row], step[row] = 1.0, 1234, 7
        top_p = rng.uniform(0.5, 1.0, b).astype(np.float32)
        top_p[row] = 1.0
        ids, *_ = _sample(jnp.asarray(logits), make_batch(b, temperature=temp, seed=seed, step=step, top_p=top_p))
        outs.append(int(np.asarray(ids)[row]))
    assert outs[0] == outs[1] == outs[2]
    # ...and the step number is part of the key: over many steps the same seed varies.
    n = 32
    ids, *_ = _sample(
        jnp.asarray(np.repeat(target[None], n, 0)),
        make_batch(n, temperature=np.full(n, 2.0), seed=np.full(n, 1234), step=np.arange(n)),
    )
    assert len(set(np.asarray(ids).tolist())) > 1


def test_mixed_greedy_and_random_rows():
    rng = np.random.default_rng(5)
    logits = _logits(rng, 4)
    temp = np.array([0.0, 1.0, 0.0, 0.8], np.float32)
    ids, lp, *_ = _sample(jnp.asarray(logits), make_batch(4, temperature=temp, seed=[1, 2, 3, 4]))
    ids = np.asarray(ids)
    assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()
    assert np.all((ids >= 0) & (ids < V))
    assert np.all(np.isfinite(np.asarray(lp)))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_top_k_one_is_greedy(temperature):
    rng = np.random.default_rng(6)
    logits = _logits(rng, 6)
    ids, *_ = _sample(
        jnp.asarray(logits), make_batch(6, temperature=np.full(6, temperature), top_k=np.ones(6), seed=np.arange(6))
    )
    np.testing.assert_array_equal(np.asarray(ids), logits.argmax(-1))


def _table_params_copied_or_not_aliased(hlo: str, shapes: tuple[str, ...]) -> tuple[list[str], list[int]]:
    """In compiled HLO text: the instructions that copy an array of one of ``shapes``, and the
    entry parameters of those shapes whose buffer no output aliases."""
    import re

    copies = [m.group(0) for m in re.finditer(r"%(\S+) = ((?:s32|pred)\[\d+,\d+\])\S* (\S+?)\(", hlo)
              if m.group(2) in shapes and "copy" in m.group(1) + m.group(3)]
    entry = hlo[hlo.index("\nENTRY "):]
    params = [int(m.group(2)) for m in re.finditer(r"= ((?:s32|pred)\[\d+,\d+\])\S* parameter\((\d+)\)", entry)
              if m.group(1) in shapes]
    header = hlo.splitlines()[0]
    return copies, [i for i in params if not re.search(rf"\({i}, \{{\}}, (may|must)-alias\)", header)]


def test_penalty_tables_stay_in_place_through_a_step_without_penalty_rows():
    """A step where no row holds a slot leaves the tables as they were, and the compiled update
    and sampler (the tables donated, as the runner's step donates them) copy neither table:
    XLA aliases them through ``update_penalty_tables``'s conditional. A copy would cost every
    step a pass over ``[S, V]`` (5 MiB at 32 slots x 32000 ids; benchmarks/penalty_tables.py)."""
    from energon_jax.batch import Buckets, dummy_batch
    from energon_jax.sampling import PenaltyTables, update_penalty_tables

    slots, vocab, rows = 8, 1000, 4  # rows != slots: no other array has the tables' shape
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 5, (slots, vocab)).astype(np.int32)
    seen = rng.random((slots, vocab)) < 0.3
    buckets = Buckets.create(max_num_batched_tokens=16, max_num_seqs=rows, max_model_len=32, page_size=4,
                             penalty_tables=True)
    batch = dummy_batch(buckets, 16, rows, 0)
    batch.input_ids[:10] = rng.integers(3, vocab, 10)
    batch.segment_ids[:10] = np.repeat(np.arange(rows), [4, 3, 2, 1])
    batch.positions[:10] = [0, 1, 2, 3, 5, 6, 7, 2, 3, 9]
    batch.sampling.penalty_reset[:] = 1  # joining rows, but without a slot: nothing to zero
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)

    def step(tables, logits, batch):
        s = batch.sampling
        tables = update_penalty_tables(tables, batch.input_ids, batch.segment_ids, batch.positions, s)
        return tables, sample(logits, s, tables)[0]

    jitted = jax.jit(step, donate_argnums=(0,))
    tables = PenaltyTables(jnp.asarray(counts), jnp.asarray(seen))
    hlo = jitted.lower(tables, logits, batch).compile().as_text()
    copies, unaliased = _table_params_copied_or_not_aliased(hlo, (f"s32[{slots},{vocab}]", f"pred[{slots},{vocab}]"))
    assert copies == [] and unaliased == []
    out, ids = jitted(tables, logits, batch)
    np.testing.assert_array_equal(np.asarray(out.output_counts), counts)
    np.testing.assert_array_equal(np.asarray(out.prompt_seen), seen)
    np.testing.assert_array_equal(np.asarray(ids), np.argmax(logits, axis=-1))
