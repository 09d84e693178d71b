"""``HeaderChannel``: process 0 tells every worker which step (or row load) comes next,
through ``jax.distributed``'s key-value store, so that no worker syncs with a device to learn
it (``controller.py`` drives it).
"""

from __future__ import annotations

from typing import Any

HEADER_PREFIX = "energon/controller"  # the key-value store's directory for step headers


class HeaderChannel:
    """Process 0 -> every worker: each step's header through the coordination service's
    key-value store (``distributed.key_value_client``), so that no worker syncs with a device
    to learn which compiled step to launch.

    Keys: ``{prefix}/{generation}/{n}`` for step ``n`` of this controller; the value is
    ``"command shape prev n"``. A generation is one controller's lifetime: process 0 draws it
    from a counter in the store, each worker counts its own ``serve()`` calls in the store, so
    both sides number controllers in the order they use them (as the collectives already
    require). Keys do not pile up: once process 0 has fetched step ``n``'s ids, every worker
    has launched step ``n`` (it joined its collectives), so keys ``<= n`` are deleted, and the
    previous generation's leftovers (its last steps and its stop) with them.

    ``client``: anything with the store's methods (``key_value_set``, ``key_value_delete``,
    ``key_value_increment``, ``blocking_key_value_get``); tests pass a dict-backed fake."""

    def __init__(self, client: Any, *, process_index: int, prefix: str = HEADER_PREFIX,
                 poll_s: float = 30.0) -> None:
        self._client, self._pid, self._prefix = client, process_index, prefix
        self._poll_ms = int(1e3 * poll_s)
        self._gen: int | None = None
        self._next = 0  # the next step number to publish (process 0) or to wait for (worker)
        self._acked = -1  # process 0: the last step whose ids it fetched
        self._deleted = 0  # process 0: keys below this step are gone
        self._older_cleared = False  # process 0: the previous generation's directory is gone

    def _key(self, n: int) -> str:
        return f"{self._prefix}/{self._gen}/{n}"

    @property
    def generation(self) -> int:
        if self._gen is None:
            if self._pid == 0:
                self._gen = int(self._client.key_value_increment(f"{self._prefix}/generations", 1))
            else:
                self._gen = int(self._client.key_value_increment(f"{self._prefix}/served/{self._pid}", 1))
        return self._gen

    # -- process 0 ---------------------------------------------------------------------------

    def publish(self, command: int, shape: int, prev: bool) -> int:
        """Post the next step's header; returns its step number (never waits on a worker)."""
        gen, n = self.generation, self._next
        self._client.key_value_set(self._key(n), f"{command} {shape} {int(prev)} {n}")
        self._next += 1
        while self._deleted <= self._acked:  # read by every worker: they ran that step
            self._client.key_value_delete(self._key(self._deleted))
            self._deleted += 1
        if self._acked >= 0 and gen > 1 and not self._older_cleared:  # every worker is in this generation
            self._client.key_value_delete(f"{self._prefix}/{gen - 1}")  # a directory: all of its keys
            self._older_cleared = True
        return n

    def acked(self, n: int) -> None:
        """Process 0 fetched step ``n``'s ids: every worker has read headers ``<= n``."""
        self._acked = max(self._acked, n)

    @property
    def live_keys(self) -> int:
        """Headers of this generation still in the store (process 0's view)."""
        return self._next - self._deleted

    # -- workers -------------------------------------------------------------------------------

    def receive(self) -> tuple[int, int, bool]:
        """Wait for the next step's header: ``(command, shape, prev)``."""
        self.generation  # noqa: B018 -- numbered on first use
        key = self._key(self._next)
        while True:  # an idle server may wait long: poll in slices, so the process stays responsive
            try:
                value = self._client.blocking_key_value_get(key, self._poll_ms)
                break
            except Exception as e:  # noqa: BLE001 -- jax raises its runtime error; only a timeout retries
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
        command, shape, prev, n = (int(v) for v in value.split())
        if n != self._next:
            raise RuntimeError(f"process {self._pid}: header {key} holds step {n}, expected {self._next}")
        self._next += 1
        return command, shape, bool(prev)
