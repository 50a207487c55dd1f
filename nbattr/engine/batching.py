"""The one place that chunks work (examples x path points) to fit memory.

``batch_size="auto"`` measures what one row costs while running the first (small) chunk: the
bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``; the model's
weights, which it saves too, are not per row and are left out) plus the chunk's own tensors. The
rest is then cut into chunks that fit a budget: a share of the free GPU memory
(``torch.cuda.mem_get_info``) on CUDA, a bounded amount (and at most ``CPU_MAX_ROWS`` rows) on
CPU. On a CUDA out-of-memory error the chunk is halved and retried, so a user never has to guess
a size.

:func:`watch` lets a caller follow and stop that work: every chunked pass run inside the block (in
this thread) reports ``progress(done, total)`` rows after each chunk and asks ``cancel()`` before
each, raising :class:`~nbattr.engine.errors.Cancelled` when it says yes.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import Cancelled, InputError, NbattrWarning, user_stacklevel

BatchSize = int | str

#: bytes a chunk may use on CPU with ``batch_size="auto"``
CPU_BUDGET_BYTES = 1 << 30
#: share of free GPU memory a chunk may use with ``batch_size="auto"``
GPU_FREE_FRACTION = 0.5
#: most rows a chunk has on CPU with ``batch_size="auto"``: beyond a few dozen rows the
#: activations leave the caches and a CPU gets slower per row; a GPU takes as many rows as fit
#: its budget
CPU_MAX_ROWS = 32
#: fewest rows the cache bound below leaves a CPU chunk (smaller chunks pay the per-call costs)
CPU_MIN_ROWS = 4


#: rows of the first, measuring chunk
PROBE_ROWS = 4


def _last_level_cache() -> int:
    """Bytes of the CPU's largest cache (Linux sysfs), else 32 MiB."""
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


#: on CPU, ``batch_size="auto"`` keeps a chunk's largest activation within this many bytes (the
#: last-level cache): EfficientNet-Lite0 at 224 x 224 holds 4.8 MB per row in its widest layer, and
#: on a 32 MiB L3 its IG and occlusion ran 1.4x and 2.1x faster in chunks of 6 rows than of 12-32
CPU_CACHE_BYTES = _last_level_cache()


def cpu_row_cap(largest_row: int | None) -> int:
    """Most rows of a CPU chunk: :data:`CPU_MAX_ROWS`, fewer where the largest activation per row
    (``largest_row`` bytes, when measured) would not let the chunk's fit :data:`CPU_CACHE_BYTES`,
    but not below :data:`CPU_MIN_ROWS`."""
    if not largest_row:
        return CPU_MAX_ROWS
    return max(CPU_MIN_ROWS, min(CPU_MAX_ROWS, CPU_CACHE_BYTES // largest_row))


class StorageBytes:
    """Counts the bytes of the tensors given to :meth:`pack` (each storage once, none of the
    storages in ``exclude``): as a ``saved_tensors_hooks`` pair, what autograd saves for backward."""

    def __init__(self, exclude: Iterable[int] = ()) -> None:
        self.bytes = 0
        #: bytes of the largest storage counted (the widest activation)
        self.largest = 0
        self._seen: set[int] = set(exclude)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        # (autograd may call this inside a mode of the rules: counting is not the model's work)
        with torch._C.DisableTorchFunction():
            try:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen:
                    self._seen.add(key)
                    self.bytes += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
            except (RuntimeError, NotImplementedError):
                self.bytes += t.numel() * t.element_size()
                self.largest = max(self.largest, t.numel() * t.element_size())
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def memory_budget(device: torch.device) -> int:
    """Bytes one chunk may use on ``device``."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * GPU_FREE_FRACTION)
    return CPU_BUDGET_BYTES


@dataclass(frozen=True)
class _Watch:
    progress: Callable[[int, int], None] | None
    cancel: Callable[[], bool] | None
    warn: Callable[[NbattrWarning], None] | None = None


_WATCH: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar("nbattr_watch", default=None)


@contextlib.contextmanager
def watch(progress: Callable[[int, int], None] | None = None,
          cancel: Callable[[], bool] | None = None,
          warn: Callable[[NbattrWarning], None] | None = None) -> Iterator[None]:
    """Follow and stop the engine's work inside the block (this thread or context only).

    Parameters
    ----------
    progress : called as ``progress(done, total)`` after each chunk of every chunked pass (rows:
        examples x path points, samples or perturbations); a method may run several passes
        (``steps="auto"`` one per refinement round), each counting from 0 to its own total.
    cancel : asked before each chunk; when it returns True the call raises
        :class:`~nbattr.engine.errors.Cancelled` (the model is restored as after any error).
    warn : called as ``warn(w)`` with each of the engine's warnings, an instance of a
        :class:`~nbattr.engine.errors.NbattrWarning` subclass (training mode, a missing rule,
        non-finite attributions, a coarse delta, ``steps="auto"`` at ``max_steps``, a jump at the
        baseline; ``str(w)`` is the message), instead of ``warnings.warn``: a front end shows them
        in its own UI (the widget's receipt), and a worker thread's warnings do not land in
        whatever notebook cell ran last.

    Blocks nest: a block's own arguments are in effect, the ones it leaves out (None) are the
    enclosing block's. Under ``torchrun`` (:func:`nbattr.attribute_dataset`)
    cancel every rank alike: a rank that stops alone leaves the others waiting for it.

    Examples
    --------
    >>> with nbattr.watch(progress=lambda d, t: print(f"{d}/{t}")):
    ...     r = nbattr.attribute(model, x, method="integrated_gradients")
    """
    outer = _WATCH.get()
    if outer is not None:
        progress = outer.progress if progress is None else progress
        cancel = outer.cancel if cancel is None else cancel
        warn = outer.warn if warn is None else warn
    token = _WATCH.set(_Watch(progress, cancel, warn))
    try:
        yield
    finally:
        _WATCH.reset(token)


def warn(message: str, category: type[NbattrWarning] = NbattrWarning) -> None:
    """An engine warning of kind ``category``: to the ``warn`` of the :func:`watch` in effect (as
    ``category(message)``), else ``warnings.warn`` pointing at the user's line."""
    w = _WATCH.get()
    if w is not None and w.warn is not None:
        w.warn(category(message))
        return
    warnings.warn(message, category, stacklevel=user_stacklevel())


def _check_cancel(w: _Watch | None) -> None:
    if w is not None and w.cancel is not None and w.cancel():
        raise Cancelled("the computation was cancelled (nbattr.watch: cancel() returned True)")


def check_cancelled() -> None:
    """Raise :class:`~nbattr.engine.errors.Cancelled` if the :func:`watch` in effect says so
    (called where work starts, besides before every chunk)."""
    _check_cancel(_WATCH.get())


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (torch's type, or its message)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def run_chunked(
    total: int,
    fn: Callable[[slice], None],
    *,
    batch_size: BatchSize = "auto",
    device: torch.device | None = None,
    row_bytes: int = 0,
    stats: dict | None = None,
    per_row: int | None = None,
    saves: bool = True,
    exclude: Iterable[int] = (),
    largest_row: int | None = None,
) -> None:
    """Call ``fn(rows)`` on consecutive slices covering ``range(total)``.

    Parameters
    ----------
    total : number of rows.
    fn : does the work for a slice of rows and accumulates its results itself. It must be safe
        to call again on the same slice after it raised (a CUDA out-of-memory retry). It may
        return the bytes it held besides what autograd saved (DeepLIFT's tape of activations),
        which ``"auto"`` then counts too.
    batch_size : rows per chunk, or ``"auto"`` (measured, see the module docstring).
    device : where the work runs (budget and out-of-memory handling).
    row_bytes : bytes a row needs besides what autograd saves (inputs, gradients).
    stats : if given, filled with ``chunks`` (sizes used) and ``row_bytes`` (measured).
    per_row : bytes per row measured by an earlier call on the same kind of rows (its
        ``stats["row_bytes"]``): with ``"auto"``, size the chunks from it without a probe chunk
        (``steps="auto"`` runs one pass per refinement round).
    saves : False for work without gradients (forward passes under ``no_grad``): autograd saves
        nothing, so ``"auto"`` sizes every chunk from ``row_bytes`` at once (a probe chunk would
        measure nothing).
    exclude : storages the probe chunk does not count (the model's parameters and buffers, see
        :func:`~nbattr.engine.guard.model_storages`): autograd saves the weights too, but they
        are not per row, so counting them would shrink every chunk (the most for a large model
        and a small input).
    largest_row : bytes per row of the widest activation, measured by an earlier pass (the probe
        chunk measures it too): on CPU it bounds the chunk (:func:`cpu_row_cap`).
    """
    if total <= 0:
        return
    device = device or torch.device("cpu")
    auto = batch_size == "auto"
    if not auto:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int or 'auto', got {batch_size!r}")
        size = batch_size
    else:
        size = min(total, PROBE_ROWS)
    sizes: list[int] = []
    start = 0
    measured = False
    w = _WATCH.get()
    if auto and not saves:
        per_row = per_row or max(1, row_bytes)
    if auto and per_row:
        cap = cpu_row_cap(largest_row) if device.type == "cpu" else total
        size = max(1, min(total, cap, memory_budget(device) // per_row))
        measured = True
    while start < total:
        n = min(size, total - start)
        rows = slice(start, start + n)
        _check_cancel(w)
        try:
            if auto and not measured:
                counter = StorageBytes(exclude)
                with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                    held = fn(rows)
                per_row = max(1, (counter.bytes + int(held or 0) + row_bytes * n) // n)
                cap = cpu_row_cap(counter.largest // n) if device.type == "cpu" else total
                size = max(1, min(total, cap, memory_budget(device) // per_row))
                measured = True
                if stats is not None:
                    stats["row_bytes"] = per_row
                    stats["largest_row"] = counter.largest // n
            else:
                fn(rows)
        except Exception as err:  # noqa: BLE001 - re-raised unless it is a CUDA OOM we can halve
            if device.type == "cuda" and is_oom(err) and n > 1:
                torch.cuda.empty_cache()
                size = max(1, n // 2)
                continue
            raise
        sizes.append(n)
        start += n
        if w is not None and w.progress is not None:
            w.progress(start, total)
    if stats is not None:
        stats["chunks"] = sizes
