"""Penalty counts kept on the device (runner's PenaltyTables, slots from PenaltySlots).

Host only: slot assignment (reset on join, a one-row load when a row starts past position
0, release when the request finishes, a spare slot taken from a request not in the step).
Then the engine on the tiny decoder: greedy with repetition / presence / frequency
penalties equals a no-cache reference that applies the penalties in numpy over the whole
history, with planning ahead, chunked prefill, preemption (recompute) and prefix-cache
hits (rows that start past position 0), and no batch carries a history array.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from energon_jax import Engine, SamplingParams
from energon_jax.penalty_slots import PenaltySlots
from test_engine import CONFIG, SMALL_POOL_KW, _prompts, _run_staggered
from tiny_decoder import TinyDecoder


# -- host only ---------------------------------------------------------------------------
def _req(tokens, prompt_len, rp=1.2):
    params = types.SimpleNamespace(uses_penalties=rp != 1.0)
    return types.SimpleNamespace(prompt_token_ids=tokens[:prompt_len], finished=False, params=params,
                                 tokens=lambda a, b: tokens[a:b])


def _row(req, start, n):
    return types.SimpleNamespace(request=req, start_pos=start, num_tokens=n)


def test_slots_reset_continue_load_and_release():
    slots = PenaltySlots(2, vocab=10)
    loads = []
    a, b, plain = _req([1, 2, 3, 4, 4, 5], 3), _req([7, 7, 8, 9], 2), _req([1, 2], 2, rp=1.0)
    assert slots.assign([_row(plain, 0, 2)], loads.append) is None  # no penalty row: nothing to do
    slot, reset = slots.assign([_row(a, 0, 3), _row(plain, 2, 1), _row(b, 0, 2)], lambda *x: loads.append(x))
    assert slot.tolist() == [0, -1, 1] and reset.tolist() == [1, 0, 1] and not loads
    slot, reset = slots.assign([_row(a, 3, 1), _row(b, 2, 1)], lambda *x: loads.append(x))  # decode: continue
    assert slot.tolist() == [0, 1] and not reset.any() and not loads
    # b preempted, back from position 0 (recompute): its slot is zeroed by the step.
    assert slots.assign([_row(b, 0, 3)], lambda *x: loads.append(x))[1].tolist() == [1]
    # A request whose first 3 tokens are cached starts at 3: its slot is rebuilt from the host, once.
    e = _req([7, 7, 8, 9], 2)
    slot, reset = slots.assign([_row(b, 3, 1), _row(e, 3, 1)], lambda *x: loads.append(x))
    assert not reset.any() and len(loads) == 1
    s, counts, seen = loads[0]
    assert s == slot[1] == 0 and counts.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]  # output before 3: one 8
    assert np.flatnonzero(seen).tolist() == [7]  # prompt: 7, 7
    e.finished = True
    # A new request takes a finished request's slot; with none finished, one not in the step.
    a.finished = True
    c = _req([3, 3, 3], 1)
    assert slots.assign([_row(c, 0, 3), _row(b, 4, 1)], lambda *x: loads.append(x))[0].tolist() == [0, 1]
    d = _req([5, 6], 1)
    assert slots.assign([_row(d, 0, 2), _row(c, 3, 1)], lambda *x: loads.append(x))[0].tolist() == [1, 0]
    with pytest.raises(RuntimeError, match="penalty slots"):
        slots.assign([_row(_req([1], 1), 0, 1), _row(c, 4, 1), _row(d, 2, 1)], lambda *x: None)


# -- engine end to end -------------------------------------------------------------------
def _penalized_greedy(model, prompt, params, max_tokens):
    """No-cache greedy with the penalties applied in numpy to the whole history each token."""
    fwd = jax.jit(lambda ids, pos, seg: model(ids, pos, seg)[0])
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        n = len(ids)
        t = -(-n // 32) * 32
        arr = np.zeros(t, np.int32)
        arr[:n] = ids
        seg = np.where(np.arange(t) < n, 0, -1).astype(np.int32)
        logits = np.asarray(fwd(jnp.asarray(arr), jnp.arange(t, dtype=jnp.int32), jnp.asarray(seg)))[n - 1].copy()
        for tok in set(ids):
            rp = params.repetition_penalty
            logits[tok] = logits[tok] / rp if logits[tok] > 0 else logits[tok] * rp
        for tok in set(out):
            logits[tok] -= params.frequency_penalty * out.count(tok) + params.presence_penalty
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


@pytest.fixture(scope="module")
def model():
    return TinyDecoder(CONFIG, seed=5)


@pytest.mark.parametrize("async_scheduling", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_device_penalty_counts_match_reference(model, tiny_checkpoint, async_scheduling):
    from energon_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_checkpoint("llama"))
    # 12 usable pages of 4 tokens: preemptions; a shared 16-token prefix: prefix-cache hits.
    engine = Engine(model, CONFIG, tok, kv_cache_pages=13, async_scheduling=async_scheduling, **SMALL_POOL_KW)
    assert engine._buckets.history_len == 0 and engine.runner.penalty_tables is not None
    shared = _prompts(7, [16])[0]
    prompts = [shared + p for p in _prompts(8, [3, 6, 1])] + _prompts(9, [10, 14])
    params = [
        SamplingParams(max_tokens=18, temperature=0.0, repetition_penalty=1.8, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.7, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0.0, repetition_penalty=0.6, frequency_penalty=0.4, ignore_eos=True),
        SamplingParams(max_tokens=17, temperature=0.0, repetition_penalty=1.5, presence_penalty=-0.5, ignore_eos=True),
    ]
    got = _run_staggered(engine, prompts, params, arrivals=[0, 0, 1, 3, 5])
    want = [_penalized_greedy(model, p, x, x.max_tokens) for p, x in zip(prompts, params)]
    assert got == want
    assert engine.scheduler.num_preemptions > 0
    assert engine._loop._penalty.rebuilds > 0  # some row started past position 0 (cache hit / recompute)
    assert engine.scheduler.pages_used == 0
