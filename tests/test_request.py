"""SamplingParams validation (messages name field, value and range), validate_prompt, Request helpers."""

from __future__ import annotations

import re

import pytest

from energon_jax.request import (
    MAX_LOGPROBS,
    Request,
    RequestStatus,
    SamplingParams,
    seed_key_for,
    validate_prompt,
)


def test_defaults_are_valid():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (16, 1.0, 0, 1.0, 0.0)
    assert p.stop == () and p.stop_token_ids == () and p.logprobs is None and p.seed is None
    assert not p.greedy and not p.uses_penalties


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens=0 must be >= 1"),
        ({"max_tokens": 2.5}, "max_tokens=2.5 must be an integer"),
        ({"max_tokens": True}, "max_tokens=True must be an integer"),
        ({"temperature": -0.1}, "temperature=-0.1 must be in [0, 100]"),
        ({"temperature": float("nan")}, "temperature=nan must be in [0, 100]"),
        ({"temperature": "1"}, "temperature='1' must be a number"),
        ({"top_k": -2}, "top_k=-2 must be >= 0 (0 or -1 disables)"),
        ({"top_p": 0.0}, "top_p=0.0 must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"min_p": -0.5}, "min_p=-0.5 must be in [0, 1]"),
        ({"min_p": 1.01}, "min_p=1.01 must be in [0, 1]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty=0.0 must be in (0, 100]"),
        ({"presence_penalty": 2.5}, "presence_penalty=2.5 must be in [-2, 2]"),
        ({"frequency_penalty": -3}, "frequency_penalty=-3 must be in [-2, 2]"),
        ({"seed": 2**64}, f"seed={2**64} must be None or an integer in [-2**63, 2**64)"),
        ({"seed": 1.5}, "seed=1.5 must be None or an integer"),
        ({"logprobs": MAX_LOGPROBS + 1}, f"logprobs={MAX_LOGPROBS + 1} must be None or in [0, 20]"),
        ({"logprobs": -1}, "logprobs=-1 must be None or in [0, 20]"),
        ({"stop": ["ok", ""]}, "stop[1]='' must be a non-empty string"),
        ({"stop": ["ok", 3]}, "stop[1]=3 must be a string"),
        ({"stop_token_ids": [1, -4]}, "stop_token_ids[1]=-4 must be >= 0"),
        ({"stop_token_ids": [1, "x"]}, "stop_token_ids[1]='x' must be an integer"),
        ({"ignore_eos": 1}, "ignore_eos=1 must be a bool"),
    ],
)
def test_invalid_fields_name_field_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_normalisation():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[3, 4], top_k=-1)
    assert p.stop == ("a", "b") and p.stop_token_ids == (3, 4) and p.top_k == 0
    assert SamplingParams(stop="END").stop == ("END",)
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(3, 4)))  # frozen and hashable
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(presence_penalty=0.5).uses_penalties
    assert SamplingParams(repetition_penalty=1.2).uses_penalties


def test_boundaries_are_accepted():
    SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0, min_p=1.0, presence_penalty=-2, frequency_penalty=2)
    SamplingParams(logprobs=0)
    SamplingParams(logprobs=MAX_LOGPROBS, seed=-(2**63))
    SamplingParams(seed=2**64 - 1)


@pytest.mark.parametrize(
    "prompt, kwargs, message",
    [
        ([], {}, "prompt_token_ids=[] must not be empty"),
        ([1, 2, 100], {}, "prompt_token_ids[2]=100 must be an integer in [0, vocab_size=100)"),
        ([1, -1], {}, "prompt_token_ids[1]=-1 must be an integer in [0, vocab_size=100)"),
        ([1, 2], {"stop_token_ids": (5, 150)}, "stop_token_ids[1]=150 must be in [0, vocab_size=100)"),
        ([1] * 20, {"max_tokens": 13}, "prompt length 20 + max_tokens=13 = 33 must be <= max_model_len=32"),
    ],
)
def test_validate_prompt_errors(prompt, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_prompt(prompt, SamplingParams(**kwargs), max_model_len=32, vocab_size=100)


def test_validate_prompt_accepts_exact_fit():
    import numpy as np

    ids = validate_prompt(np.arange(20, dtype=np.int32), SamplingParams(max_tokens=12), max_model_len=32, vocab_size=100)
    assert ids == list(range(20)) and all(type(t) is int for t in ids)


def test_seed_key():
    assert seed_key_for(7) == 7 and seed_key_for(2**32 - 1) == 2**32 - 1
    assert 0 <= seed_key_for(-1) < 2**32 and 0 <= seed_key_for(2**40 + 3) < 2**32
    assert seed_key_for(2**40 + 3) != seed_key_for(3)
    keys = {seed_key_for(None) for _ in range(8)}
    assert len(keys) > 1 and all(0 <= k < 2**32 for k in keys)


def test_request_helpers():
    r = Request("r", [10, 11, 12], SamplingParams(max_tokens=4, seed=5, logprobs=2))
    assert r.status is RequestStatus.WAITING and r.seed_key == 5 and r.output_logprobs == []
    r.output_token_ids += [20, 21]
    assert r.num_tokens == 5 and r.max_num_tokens == 7
    assert [r.token_at(i) for i in range(5)] == [10, 11, 12, 20, 21]
    assert r.tokens(0, 5) == [10, 11, 12, 20, 21]
    assert r.tokens(1, 3) == [11, 12] and r.tokens(3, 5) == [20, 21] and r.tokens(2, 4) == [12, 20]
    assert Request("q", [1], SamplingParams()).output_logprobs is None
    assert r.ttft_s is None and r.latency_s is None
    r.first_token_time, r.finish_time = r.arrival_time + 0.5, r.arrival_time + 2.0
    assert r.ttft_s == pytest.approx(0.5) and r.latency_s == pytest.approx(2.0)
