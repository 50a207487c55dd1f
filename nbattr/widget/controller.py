"""A plain Python object that owns the computation behind the widget: cache, worker thread,
supersession, progress and errors. No traitlets here, so it is tested without a browser.

Supersession: requests carry an increasing number. The worker computes at most one request at a
time; while it runs, newer requests overwrite a single "pending" slot (the last one wins), and the
running computation is stopped before its next chunk of work (:func:`nbattr.watch`; a compute
function that does not use the engine runs to the end, cached but not published). So 50 rapid
switches cost at most two computations, the first cut short, and always end showing the last
choice; ``cancelled`` lists the keys that were stopped.

Progress: ``on_progress(fraction)`` is called from the worker as the engine's chunked passes
advance (at most every ``PROGRESS_EVERY`` seconds, and at each pass's end).

Prefetch (optional): after a computed result is published and no newer request is pending, the
worker calls ``prefetch(key, stop)`` once and puts the payloads it returns (``{key: payload}``) in
the cache *without publishing them*; a later request for one of those keys is then a cache hit. It
is skipped when the request's own computation took longer than ``prefetch_after`` seconds, after
errors and after cache hits. ``stop()`` turns True as soon as a newer request is pending (or the
controller is closed), so a prefetch can give up between its steps. A request that arrives while a
prefetch runs is kept in the pending slot and served right after it (from the cache if the prefetch
produced its key): its worst-case extra latency is the rest of one prefetch call. A prefetch may
stop its engine call for a request it will not serve (:meth:`pending` names the waiting key;
``Cancelled`` from a prefetch is no error). Prefetch errors are logged (level INFO) and recorded
in ``prefetch_errors``, never published. A computation that produces other keys' payloads on the
way (one engine call for several classes) hands them to :meth:`offer`, which caches them the same
way.
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.batching import watch
from ..engine.errors import Cancelled

log = logging.getLogger(__name__)

#: least seconds between two ``on_progress`` calls (a pass's end is always reported)
PROGRESS_EVERY = 0.1

Prefetch = Callable[[Hashable, Callable[[], bool]], Mapping[Hashable, Any] | None]


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
    prefetch : optional ``prefetch(key, stop) -> {other_key: payload}``, run on the worker when it is
        idle after publishing a computed ``key`` (see the module docstring). ``stop()`` is True
        once a newer request is pending; returning early (or ``{}``) is always allowed.
    prefetch_after : skip the prefetch when computing ``key`` took longer than this many seconds
        (None: never skip). A plain attribute, may be changed later.
    on_progress : called with the fraction (0..1) of the running pass done, from the worker.
    """

    def __init__(
        self,
        compute: Callable[[Hashable], Any],
        publish: Callable[[Outcome], None],
        on_state: Callable[[str, Hashable], None] | None = None,
        cache_size: int = 64,
        prefetch: Prefetch | None = None,
        prefetch_after: float | None = 3.0,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self._compute = compute
        self._publish = publish
        self._on_state = on_state or (lambda state, key: None)
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()
        self._cache_size = cache_size
        self._prefetch = prefetch
        self.prefetch_after = prefetch_after
        self._prefetching: Hashable | None = None  # the key whose prefetch is running
        self._lock = threading.Condition()
        self._publish_lock = threading.RLock()
        self._seq = 0
        self._pending: tuple[int, Hashable] | None = None
        self._running: tuple[int, Hashable] | None = None
        self._closed = False
        self.computed: list[Hashable] = []  # keys actually computed, in order (for tests and stats)
        self.prefetched: list[Hashable] = []  # keys put in the cache by prefetch, in order
        self.prefetch_errors: list[str] = []  # the last few prefetch failures (never published)
        self.cancelled: list[Hashable] = []  # keys whose computation a newer request stopped
        self._on_progress = on_progress
        self.last: Outcome | None = None
        self._thread = threading.Thread(target=self._loop, name="nbattr-widget-worker", daemon=True)
        self._thread.start()
        _LIVE.add(self)

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

    def pending(self) -> Hashable | None:
        """The key of the request waiting for the worker, if any."""
        with self._lock:
            return None if self._pending is None else self._pending[1]

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

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

    @property
    def prefetching(self) -> bool:
        with self._lock:
            return self._prefetching is not None

    def wait(self, timeout: float = 30.0, prefetch: bool = False) -> bool:
        """Block until no request is pending or running (and, with ``prefetch=True``, no prefetch
        is running either); False on timeout."""
        end = time.monotonic() + timeout
        with self._lock:
            while (self._pending is not None or self._running is not None
                   or (prefetch and self._prefetching is not None)):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, join: float | None = None) -> None:
        """Stop: the worker takes no new request and a running one stops at its next chunk.
        ``join``: wait up to that many seconds for the worker thread to end."""
        with self._lock:
            self._closed = True
            self._pending = None
            self._lock.notify_all()
        if join is not None and self._thread is not threading.current_thread():
            self._thread.join(join)

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

    def _stop_prefetch(self) -> bool:
        with self._lock:
            return self._pending is not None or self._closed

    def _superseded(self, seq: int) -> bool:
        with self._lock:
            return seq != self._seq or self._closed

    def _progress(self) -> Callable[[int, int], None] | None:
        report = self._on_progress
        if report is None:
            return None
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - last[0] < PROGRESS_EVERY:
                return
            last[0] = now
            try:
                report(done / max(total, 1))
            except Exception:  # noqa: BLE001 - a display failure must not stop the computation
                log.info("nbattr widget: progress report failed", exc_info=True)

        return progress

    def _store(self, key: Hashable, payload: Any) -> None:
        # under self._lock
        self._cache[key] = payload
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def offer(self, payloads: Mapping[Hashable, Any]) -> None:
        """Cache payloads of other keys, unpublished, as a prefetch does (from a computation that
        produced them on the way); a key already cached keeps its entry."""
        with self._lock:
            self._store_extra(payloads)

    def _store_extra(self, payloads: Mapping[Hashable, Any]) -> None:
        # under self._lock
        for k, payload in payloads.items():
            if k not in self._cache:  # a computed entry wins over a prefetched one
                self._store(k, payload)
                self.prefetched.append(k)

    def _run_prefetch(self, key: Hashable) -> None:
        try:
            extra = self._prefetch(key, self._stop_prefetch) or {}  # type: ignore[misc]
            err = None
        except Cancelled:  # the prefetch gave way to a request (see Explain._prefetch)
            extra, err = {}, None
        except Exception as e:  # noqa: BLE001 - a background nicety: never shown, never fatal
            extra, err = {}, f"{type(e).__name__}: {e}"
            log.info("nbattr widget: prefetch after %r failed", key, exc_info=True)
        with self._lock:
            try:
                if err is not None:
                    self.prefetch_errors = [*self.prefetch_errors[-9:], err]
                self._store_extra(extra)
                if key in self._cache:  # keep the entry the user looked at the most recent one
                    self._cache.move_to_end(key)
            finally:
                self._prefetching = None
                self._lock.notify_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                seq, key = self._pending
                self._pending = None
                # a prefetch that ran while this request waited may have produced its key
                hit = key in self._cache
                if hit:
                    self._cache.move_to_end(key)
                    payload = self._cache[key]
                self._running = (seq, key)
            if hit:
                self._emit(Outcome(key, seq, payload=payload, cached=True))
                with self._lock:
                    self._running = None
                    self._lock.notify_all()
                continue
            self._on_state("computing", key)
            t0 = time.perf_counter()
            try:
                with watch(progress=self._progress(), cancel=functools.partial(self._superseded, seq)):
                    payload = self._compute(key)
                err = None
            except Cancelled:  # a newer request exists: nothing to store or publish
                with self._lock:
                    self.cancelled.append(key)
                    self._running = None
                    idle = self._pending is None
                    self._lock.notify_all()
                if idle:
                    self._on_state("idle", key)
                continue
            except Exception as e:  # noqa: BLE001 - shown in the widget
                payload, err = None, f"{type(e).__name__}: {e}"
            dt = time.perf_counter() - t0
            with self._lock:
                self.computed.append(key)
                if err is None:
                    self._store(key, payload)
            self._emit(Outcome(key, seq, payload=payload, error=err, seconds=dt))
            with self._lock:
                self._running = None
                idle = self._pending is None
                limit = self.prefetch_after
                prefetch = (idle and err is None and self._prefetch is not None and not self._closed
                            and (limit is None or dt <= limit))
                if prefetch:
                    self._prefetching = key
                self._lock.notify_all()
            if idle:
                self._on_state("idle", key)
            if prefetch:
                self._run_prefetch(key)


#: the controllers whose worker may still run (weakly held)
_LIVE: weakref.WeakSet[Controller] = weakref.WeakSet()

#: seconds the interpreter's exit waits for a worker's chunk in flight
EXIT_JOIN = 10.0


@atexit.register
def _close_all() -> None:
    """At interpreter exit (a script, or a kernel shutting down with a widget still computing):
    stop every worker and wait for it. A daemon thread killed inside a torch call aborts the
    process ("terminate called without an active exception", exit status 134)."""
    for c in list(_LIVE):
        c.close()
    for c in list(_LIVE):
        c.close(join=EXIT_JOIN)
