"""A plain Python object that owns the computation behind the widget: cache, worker thread,
supersession, progress and errors. No traitlets here, so it is tested without a browser.

Supersession: requests carry an increasing number. The worker computes at most one request at a
time; while it runs, newer requests overwrite a single "pending" slot (the last one wins) and the
running result is cached but not published if a newer request exists. So 50 rapid switches cost
at most two computations and always end showing the last choice.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    """What the controller publishes for one request."""

    key: Hashable
    seq: int
    payload: Any = None
    error: str | None = None
    cached: bool = False
    seconds: float = 0.0


class Controller:
    """Runs ``compute(key) -> payload`` off the caller's thread, caching payloads by key.

    Parameters
    ----------
    compute : the work; may raise (the message is published as an error outcome).
    publish : called with each :class:`Outcome` that is still current (worker thread, or the
        caller's thread for cache hits).
    on_state : called with ``("computing" | "idle", key)`` when the worker starts/stops.
    cache_size : entries kept (least recently used dropped).
    """

    def __init__(
        self,
        compute: Callable[[Hashable], Any],
        publish: Callable[[Outcome], None],
        on_state: Callable[[str, Hashable], None] | None = None,
        cache_size: int = 64,
    ) -> None:
        self._compute = compute
        self._publish = publish
        self._on_state = on_state or (lambda state, key: None)
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Condition()
        self._publish_lock = threading.RLock()
        self._seq = 0
        self._pending: tuple[int, Hashable] | None = None
        self._running: tuple[int, Hashable] | None = None
        self._closed = False
        self.computed: list[Hashable] = []  # keys actually computed, in order (for tests and stats)
        self.last: Outcome | None = None
        self._thread = threading.Thread(target=self._loop, name="nbattr-widget-worker", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------------
    def request(self, key: Hashable) -> int:
        """Ask for ``key``; returns its sequence number. Cache hits are published at once."""
        with self._lock:
            self._seq += 1
            seq = self._seq
            if key in self._cache:
                self._cache.move_to_end(key)
                payload = self._cache[key]
                self._pending = None  # an older pending request is superseded
                hit = True
            else:
                self._pending = (seq, key)
                self._lock.notify_all()
                hit = False
        if hit:
            self._emit(Outcome(key, seq, payload=payload, cached=True))
        return seq

    def cached(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._cache

    def get_cached(self, key: Hashable) -> Any:
        with self._lock:
            return self._cache.get(key)

    @property
    def busy(self) -> bool:
        with self._lock:
            return self._pending is not None or self._running is not None

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until no request is pending or running; False on timeout."""
        end = time.monotonic() + timeout
        with self._lock:
            while self._pending is not None or self._running is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._pending = None
            self._lock.notify_all()

    # -- worker ---------------------------------------------------------------------------
    def _current(self, seq: int) -> bool:
        return seq == self._seq

    def _emit(self, outcome: Outcome) -> None:
        # The publish lock spans the staleness check and the publish, so a stale outcome can never
        # be published after a newer one (worker thread vs. a cache hit on the caller's thread).
        with self._publish_lock:
            with self._lock:
                if not self._current(outcome.seq):
                    return  # stale: a newer request exists
                self.last = outcome
            try:
                self._publish(outcome)
            except Exception:  # noqa: BLE001 - a display failure must not kill the worker
                traceback.print_exc()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                seq, key = self._pending
                self._pending = None
                self._running = (seq, key)
            self._on_state("computing", key)
            t0 = time.perf_counter()
            try:
                payload = self._compute(key)
                err = None
            except Exception as e:  # noqa: BLE001 - shown in the widget
                payload, err = None, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            with self._lock:
                self.computed.append(key)
                if err is None:
                    self._cache[key] = payload
                    self._cache.move_to_end(key)
                    while len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            self._emit(Outcome(key, seq, payload=payload, error=err, seconds=dt))
            with self._lock:
                self._running = None
                idle = self._pending is None
                self._lock.notify_all()
            if idle:
                self._on_state("idle", key)
