"""Prefill and decode servers behind ``energon router``, shared by the disaggregation tests.

``test_disagg_servers.py`` (serving through the router) and ``test_disagg_security.py`` (keys,
TLS and metrics) talk to the same processes: real ``energon serve --role prefill``, ``energon
serve --role decode`` and ``energon router`` on 127.0.0.1, over the demo model with small limits.

Both modules name this file in ``pytest_plugins``, so pytest registers it once and its fixtures
are one object for the whole session (a fixture imported into two modules would be two, and
three more servers cost ~40 s of the default run):

- ``colocated_tokens``: the reference, greedy tokens of a colocated in-process ``Engine`` with
  the same limits; computed once.
- ``trio``: the processes, started when a test first asks for them and stopped after the last
  test of an unbroken run of tests that use them (a module-scoped fixture's lifetime, spanning
  both modules, which pytest runs one after the other); they must all exit on SIGTERM.

PYTEST_DONT_REWRITE: the test modules import this file before pytest loads it as a plugin, too
late for assertion rewriting (a warning); its one assert carries its own message.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving_harness import CliProcess
from serving.protos.energon.v1 import disagg_pb2 as dpb
from serving.protos.energon.v1 import disagg_pb2_grpc as dpb_grpc
from serving.protos.energon.v1 import inference_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
# Small limits: a chunk of 32 tokens (so a 45-token prompt takes two prefill steps), pages of 16.
LIMITS = dict(max_model_len=128, max_num_batched_tokens=32, kv_cache_pages=64, max_num_seqs=4)
FLAGS = ["--no-warmup", *(f"--{k.replace('_', '-')}={v}" for k, v in LIMITS.items())]
PROMPT_LENS = (5, 16, 45)  # shorter than a page, an exact page multiple, longer than one chunk
MAX_TOKENS = 8
TEXT_PROMPT = "The quick brown fox"  # tokenized by the prefill server
# Greedy with every penalty: the decode server rebuilds each request's counts from its prompt.
PENALTIES = dict(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7)
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the router's --chat-template


def prompt_ids(n: int) -> list[int]:
    """``n`` token ids, the same in every test and in the reference."""
    return [(i * 7) % 50 + 1 for i in range(n)]


def metric(text: str, name: str, default: float | None = None) -> float:
    """The value of one sample line ``name value`` (``name`` with its labels, as Prometheus prints it)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if default is None:
        raise AssertionError(f"{name} not in the scrape")
    return default


class Proc(CliProcess):
    """One ``energon`` subprocess (a role server or the router) on a free port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        super().__init__([*args, "--port", "0"], env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                                                           **(env or {})), prefix="energon-disagg-")


class Trio:
    """Prefill server(s), a decode server and the router in front of them."""

    def __init__(self, num_prefill: int = 1) -> None:
        self.prefills = [Proc("serve", "--role", "prefill", *FLAGS) for _ in range(num_prefill)]
        self.prefill = self.prefills[0]
        self.decode = Proc("serve", "--role", "decode", *FLAGS)
        self.procs = [*self.prefills, self.decode]
        for p in self.procs:
            p.wait_ports(120)
        self._tmp = tempfile.TemporaryDirectory(prefix="energon-router-")
        template = Path(self._tmp.name) / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        self.router = Proc("router", "--prefill", ",".join(p.target for p in self.prefills),
                           "--decode", self.decode.target, "--probe-interval", "0.2", "--http-port", "0",
                           "--chat-template", str(template))
        self.procs.append(self.router)
        self.router.wait_ports(120)
        self.channel = grpc.insecure_channel(self.router.target)
        self.stub = pb_grpc.InferenceStub(self.channel)

    def stats(self, proc: Proc) -> dpb.StatsResponse:
        with grpc.insecure_channel(proc.target) as ch:
            return dpb_grpc.DisaggStub(ch).Stats(dpb.StatsRequest(), timeout=10)

    def health(self) -> int:
        return health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status

    def wait_pages_free(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            used = [self.stats(p).pages_used for p in (self.prefill, self.decode)]
            if used == [0, 0]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"pages still used on (prefill, decode): {used}")
            time.sleep(0.1)

    def close(self) -> list[str]:
        """Stop every process; the ones that needed SIGKILL."""
        killed = []
        for p in reversed(self.procs):
            if not p.stop():
                killed.append(" ".join(p.proc.args[3:6]))
        self.channel.close()
        self._tmp.cleanup()
        return killed


# --- the shared fixtures (this file is a plugin: see the module docstring) ----------------------

_TRIO = pytest.StashKey[Trio]()


@pytest.fixture(scope="session")
def colocated_tokens() -> dict:
    """Greedy tokens of a colocated in-process engine with the same limits (the reference)."""
    from energon_jax.engine import Engine
    from energon_jax.request import SamplingParams

    engine = Engine.from_pretrained(None, warmup=False, **LIMITS)
    chat = engine.tokenizer.encode(TEXT_PROMPT, add_special_tokens=False)  # one user message, CHAT_TEMPLATE
    prompts = [*(prompt_ids(n) for n in PROMPT_LENS), TEXT_PROMPT, chat]
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    ref = {n: (list(o.token_ids), o.text) for n, o in zip([*PROMPT_LENS, "text", "chat"], outs, strict=True)}
    outs = engine.generate([prompt_ids(n) for n in PROMPT_LENS], SamplingParams(max_tokens=MAX_TOKENS, **PENALTIES))
    ref.update({("penalties", n): (list(o.token_ids), o.text) for n, o in zip(PROMPT_LENS, outs, strict=True)})
    return ref


@pytest.fixture
def trio(request: pytest.FixtureRequest) -> Trio:
    """The running trio, started on first use; ``pytest_runtest_teardown`` below stops it."""
    stash = request.config.stash
    if _TRIO not in stash:
        stash[_TRIO] = Trio()
    return stash[_TRIO]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After a test that used the trio, when the next one does not: stop its processes. (Run in
    the test's teardown phase: a failure here is reported as that test's teardown error.)"""
    stash = item.config.stash
    if _TRIO in stash and "trio" not in getattr(nextitem, "fixturenames", ()):
        trio = stash[_TRIO]
        del stash[_TRIO]
        # A handler thread left waiting on an aborted request's queue (cancel test) held the
        # decode server's exit until SIGKILL.
        assert trio.close() == [], "processes that ignored SIGTERM"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A run stopped early (``-x``, Ctrl-C) left the trio running: stop it."""
    if _TRIO in session.config.stash:
        session.config.stash[_TRIO].close()
        del session.config.stash[_TRIO]
