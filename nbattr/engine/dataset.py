"""Attribute a whole data set to files on disk: chunked, resumable, and the same under ``torchrun``.

:func:`attribute_dataset` cuts a data set into chunks of ``chunk_size`` examples, runs
:func:`nbattr.attribute` on each chunk and writes the rows into preallocated ``.npy`` files in
one directory::

    out/
      index.json              what was computed (method, options, shapes, chunks done, version)
      attributions.npy        (N, ...) the attributions (same shape as an example, or the layer's output)
      targets.npy             (N,) the explained class of each example
      outputs.npy             (N,) the target score F(x)
      baseline_outputs.npy    (N,) F(x'), for methods with a baseline
      delta.npy               (N,) the completeness error, for methods that promise completeness
      stderr.npy              (N, ...) the standard error of each attribution, for the sampling
                              estimators (shapley_sampling, smoothgrad)
      param_<name>.npy        (N,) values a method reports per example in ``params`` (e.g.
                              ``steps``, ``converged`` of ``integrated_gradients(steps="auto")``)
      chunks/                 one marker file per finished chunk while a run is going on

With several targets per example (``target="top3"`` or an ``(N, K)`` tensor) the arrays have a K
axis after N, as the :class:`~nbattr.engine.result.Attribution` of one call does.

Numpy and PyTorch read the files directly: ``np.load(out / "attributions.npy", mmap_mode="r")``
and ``torch.from_numpy(np.load(...))``; :func:`load` gathers them with the index.

**Resuming.** A chunk counts as done only after its rows are written (and synced to disk, unless
``fsync=False``) and a marker file for it is then written (atomically); the markers are folded
into ``index.json`` when a run ends. Calling :func:`attribute_dataset` again with the
same settings skips every done chunk, so an interrupted run continues where it stopped. A call
with other settings (method, options, target, number of examples, chunk size, model weights) on
an existing directory raises :class:`~nbattr.engine.errors.InputError`; ``overwrite=True`` starts
afresh.
``batch_size``, ``device``, ``num_workers`` and the number of processes may change between runs.

**Several processes** (``torchrun --nproc_per_node=N script.py``): when ``torch.distributed`` is
initialised, or the environment has ``WORLD_SIZE > 1`` and ``RANK`` (as ``torchrun`` sets them;
the process group is then initialised here with ``nccl`` when the model runs on CUDA and
``gloo`` otherwise, and stays initialised), rank r takes the pending chunks r, r + W, r + 2W, ...
of the W processes. Rank 0 creates the files, every rank writes its own rows into them, and rank
0 writes the index after the last rank has finished. A model on CUDA runs on ``cuda:LOCAL_RANK``
in each process. The same script therefore runs unchanged with ``python script.py``. The output
directory must be one file system seen by every rank (one machine, or a shared file system).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import api, registry
from . import baselines as _baselines
from .errors import InputError, NbattrError
from .guard import modules_of
from .result import PER_EXAMPLE_PARAMS

#: the ``format`` entry of ``index.json``; a directory without it is not written by this module
FORMAT = "nbattr.dataset/1"
#: per-example arrays besides the attributions: Attribution field -> file stem
FIELDS = {"target": "targets", "outputs": "outputs", "baseline_outputs": "baseline_outputs",
          "delta": "delta", "stderr": "stderr"}
#: names of the files this module writes; with ``param_*.npy`` and ``chunks/`` the only ones
#: ``overwrite=True`` removes
_OWN_FILES = ("index.json", "attributions.npy", *(f"{stem}.npy" for stem in FIELDS.values()))
_CHUNKS_DIR = "chunks"
#: file prefix of per-example values a method reports in ``params`` (e.g. adaptive ``steps``)
PARAM_PREFIX = "param_"
#: keys tried, in order, to find the input and the label in a dict item
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "input_ids")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")
#: chunk size used when neither ``chunk_size`` nor a DataLoader's ``batch_size`` gives one
DEFAULT_CHUNK_SIZE = 64

DataSpec = Any  # a Tensor (N, ...), a numpy array, a map-style Dataset or a DataLoader


# -- reading -------------------------------------------------------------------------------------
@dataclass
class DatasetAttributions:
    """The files of an :func:`attribute_dataset` directory, opened read-only (memory-mapped).

    Attributes
    ----------
    path : the directory.
    index : the parsed ``index.json`` (method, settings, shapes, ``complete`` chunks, version).
    attributions : ``(N, ...)`` ``numpy.memmap``; rows of unfinished chunks are zeros.
    target, outputs, baseline_outputs, delta : ``(N,)`` arrays, or None where the method has none.
    stderr : ``(N, ...)`` like ``attributions``, for the sampling estimators; else None.
    done : ``(N,)`` bool, the examples whose chunk is finished.
    per_example : ``params`` entries a method reports per example (e.g. ``steps``, ``converged``
        and ``delta_reached`` of ``integrated_gradients(steps="auto")``), as ``(N,)`` arrays.
    """

    path: Path
    index: dict[str, Any]
    attributions: np.ndarray
    target: np.ndarray
    outputs: np.ndarray
    baseline_outputs: np.ndarray | None = None
    delta: np.ndarray | None = None
    stderr: np.ndarray | None = None
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    per_example: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.index["settings"]["method"]

    @property
    def complete(self) -> bool:
        """Whether every chunk is finished."""
        return bool(self.done.all())

    def __len__(self) -> int:
        return int(self.attributions.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        """Every array as a torch tensor in memory (a copy), by name; absent arrays are left out."""
        out = {}
        for name in ("attributions", *FIELDS):
            a = getattr(self, name)
            if a is not None:
                out[name] = torch.from_numpy(np.array(a))
        return out

    def __repr__(self) -> str:
        n_done = int(self.done.sum())
        return (f"DatasetAttributions(path={str(self.path)!r}, method={self.method!r}, "
                f"shape={tuple(self.attributions.shape)}, dtype={self.attributions.dtype}, "
                f"done={n_done}/{len(self)})")


def load(path: str | os.PathLike) -> DatasetAttributions:
    """Open the output of :func:`attribute_dataset` (memory-mapped, read-only).

    Parameters
    ----------
    path : the directory given as ``out``.

    Returns
    -------
    DatasetAttributions
        Works on a directory whose run is unfinished: ``done`` tells which rows are written.
    """
    path = Path(path)
    index = _read_index(path)
    if index is None:
        raise InputError(f"{path} holds no attribute_dataset output (no index.json with format {FORMAT})")
    arrays = {}
    for name, spec in index["arrays"].items():
        f = path / spec["file"]
        if not f.exists():
            raise InputError(f"{f} is missing; the directory is incomplete (re-run with overwrite=True)")
        arrays[name] = np.load(f, mmap_mode="r")
    complete = _complete_chunks(path, index)
    n, size = index["num_examples"], index["chunk_size"]
    done = np.zeros(n, dtype=bool)
    for k in complete:
        done[k * size:min(n, (k + 1) * size)] = True
    return DatasetAttributions(path=path, index=index, attributions=arrays["attributions"],
                               target=arrays["target"], outputs=arrays["outputs"],
                               baseline_outputs=arrays.get("baseline_outputs"),
                               delta=arrays.get("delta"), stderr=arrays.get("stderr"), done=done,
                               per_example={k[6:]: v for k, v in arrays.items() if k.startswith("param:")})


# -- the data --------------------------------------------------------------------------------------
def default_input(batch: Any) -> Tensor:
    """The model input of a collated batch: the batch itself if it is a tensor, its first element
    if it is a tuple or list (``(x, y)`` items), or the first of :data:`INPUT_KEYS` in a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for k in INPUT_KEYS:
            if k in batch:
                return batch[k]
        raise InputError(f"the data's items are dicts with keys {sorted(batch)}; none is one of "
                         f"{list(INPUT_KEYS)}: pass input_fn=lambda batch: batch[<key>]")
    raise InputError(f"cannot find the model input in a batch of type {type(batch).__name__}: items "
                     "should be x, (x, y, ...) or a dict; or pass input_fn=lambda batch: <the input>")


def default_label(batch: Any) -> Tensor:
    """The labels of a collated batch (``target="label"``): the second element of a tuple or list,
    or the first of :data:`LABEL_KEYS` in a dict."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return torch.as_tensor(batch[1])
    if isinstance(batch, dict):
        for k in LABEL_KEYS:
            if k in batch:
                return torch.as_tensor(batch[k])
        raise InputError(f"target='label' but the items are dicts with keys {sorted(batch)}, none of "
                         f"them one of {list(LABEL_KEYS)}: pass target=lambda batch: batch[<key>]")
    raise InputError("target='label' needs items (x, y, ...) or dicts with a label; these items carry "
                     "no label (a plain tensor data set): pass target=None, an int or N ints")


class _Source:
    """A data set as N examples read chunk by chunk (in any order of chunks)."""

    def __init__(self, data: DataSpec, chunk_size: int | None, num_workers: int | None) -> None:
        from torch.utils.data import (
            BatchSampler,
            DataLoader,
            Dataset,
            IterableDataset,
            SequentialSampler,
            default_collate,
        )

        self.tensor: Tensor | None = None
        self.loader_kwargs: dict[str, Any] = {}
        loader_batch = None
        if isinstance(data, np.ndarray):
            data = torch.from_numpy(data)
        if isinstance(data, Tensor):
            if data.dim() < 2:
                raise InputError(f"a tensor data set has shape (N, ...) with at least one feature "
                                 f"dimension; got shape {tuple(data.shape)}")
            self.tensor, self.n, self.kind = data, data.shape[0], "tensor"
        elif isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise InputError("a DataLoader over an IterableDataset cannot be split into resumable "
                                 "chunks; give a map-style Dataset (len and indexing)")
            if data.batch_size is None:
                raise InputError("DataLoader(batch_size=None) yields unbatched items; give a batching "
                                 "DataLoader or the Dataset itself")
            if not isinstance(data.batch_sampler, BatchSampler) or not isinstance(
                    data.sampler, SequentialSampler):
                raise InputError(
                    "the DataLoader shuffles or has its own sampler: rows would not match the examples "
                    "and a run could not resume. Use shuffle=False and no sampler; attribute_dataset "
                    "splits the work over processes itself")
            self.dataset, self.n, self.kind = data.dataset, len(data.dataset), "dataloader"
            self.collate = data.collate_fn
            loader_batch = data.batch_size
            self.loader_kwargs = {"num_workers": data.num_workers, "pin_memory": data.pin_memory,
                                  "worker_init_fn": data.worker_init_fn, "timeout": data.timeout,
                                  "multiprocessing_context": data.multiprocessing_context}
            if data.num_workers > 0:
                self.loader_kwargs["prefetch_factor"] = data.prefetch_factor
        elif isinstance(data, IterableDataset):
            raise InputError("an IterableDataset cannot be split into resumable chunks; give a map-style "
                             "Dataset (len and indexing), a DataLoader over one, or a tensor")
        elif isinstance(data, str | bytes):
            raise InputError(f"data must be a tensor, a Dataset or a DataLoader; got {type(data).__name__}")
        elif isinstance(data, (Dataset, Sequence)) or (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
            self.dataset, self.n, self.kind = data, len(data), "dataset"
            self.collate = default_collate
        else:
            raise InputError(f"data must be a tensor (N, ...), a map-style Dataset or a DataLoader; got "
                             f"{type(data).__name__}")
        if num_workers is not None:
            self.loader_kwargs["num_workers"] = num_workers
            if num_workers == 0:
                self.loader_kwargs.pop("prefetch_factor", None)
        if self.n == 0:
            raise InputError("the data set has no examples")
        size = chunk_size if chunk_size is not None else (loader_batch or DEFAULT_CHUNK_SIZE)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InputError(f"chunk_size must be a positive int, got {size!r}")
        self.chunk_size = size
        self.num_chunks = math.ceil(self.n / size)
        self._DataLoader = DataLoader

    def rows(self, k: int) -> tuple[int, int]:
        return k * self.chunk_size, min(self.n, (k + 1) * self.chunk_size)

    def batches(self, chunks: Sequence[int]) -> Iterator[tuple[int, Any]]:
        """``(k, batch)`` for each chunk k in ``chunks``, in that order."""
        if self.tensor is not None:
            for k in chunks:
                a, b = self.rows(k)
                yield k, self.tensor[a:b]
            return
        if not chunks:
            return
        index_lists = [list(range(*self.rows(k))) for k in chunks]
        loader = self._DataLoader(self.dataset, batch_sampler=index_lists, collate_fn=self.collate,
                                  **self.loader_kwargs)
        yield from zip(chunks, loader)


# -- settings and their fingerprint ------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    """A JSON value standing for ``v`` (tensors by shape, dtype and a hash of their bytes)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (np.ndarray, np.generic)):
        v = torch.as_tensor(v)
    if isinstance(v, Tensor):
        t = v.detach().cpu().contiguous()
        if t.numel() == 1:
            return {"tensor": list(t.shape), "dtype": str(t.dtype), "value": t.item()}
        raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]
        return {"tensor": list(t.shape), "dtype": str(t.dtype), "sha256": digest}
    if isinstance(v, torch.dtype | torch.device):
        return str(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, nn.Module):
        return f"module:{type(v).__name__}"
    if callable(v):
        return f"callable:{getattr(v, '__module__', '?')}.{getattr(v, '__qualname__', type(v).__name__)}"
    return repr(v)


def _model_fingerprint(model: Any) -> dict[str, Any]:
    """Class, parameter count and a weighted checksum of the weights (catches a changed model).
    For a callable that is not a module (``lambda x: net(x).logits``) the weights are those of the
    modules it closes over (:func:`~nbattr.engine.guard.modules_of`)."""
    fp: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    modules = modules_of(model)
    if modules:
        params = [t for m in modules for t in m.parameters()]
        tensors = [t.detach() for t in (*params, *(b for m in modules for b in m.buffers()))]
        fp["parameters"] = sum(t.numel() for t in params)
        if tensors:
            with torch.no_grad():
                s = sum((k + 1) * float(t.sum(dtype=torch.float64)) for k, t in enumerate(tensors))
                a = sum((k + 1) * float(t.abs().sum(dtype=torch.float64)) for k, t in enumerate(tensors))
            fp["checksum"], fp["scale"] = s, a
    return fp


def _layer_name(model: Any, layer: nn.Module | None) -> str | None:
    if layer is None:
        return None
    tops = modules_of(model)
    for k, top in enumerate(tops):  # the layer's path in the model (in the k-th module a callable reaches)
        for name, m in top.named_modules():
            if m is layer:
                return name if isinstance(model, nn.Module) else f"{k}:{name}"
    return f"module:{type(layer).__name__}"


def _settings(model: Any, method: str, n: int, chunk_size: int, target: Any, input_fn: Callable | None,
              kwargs: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides the numbers written, with :func:`attribute`'s defaults filled in."""
    info = registry.get(method)
    unknown = set(kwargs) - set(info.options) - set(_attribute_defaults()) - {"layer"}
    if unknown:
        valid = ", ".join(sorted(set(info.options) | set(_attribute_defaults()))) or "none"
        raise InputError(f"{method} has no option(s) {sorted(unknown)}; valid: {valid}")
    # attribute() gives path methods its own steps and rule; other methods keep their own defaults
    defaults = ({**info.options, **_attribute_defaults()} if info.path
                else {**_attribute_defaults(), **info.options})
    options = {**defaults, **kwargs}
    options["layer"] = _layer_name(model, kwargs.get("layer"))
    return {
        "method": method,
        "options": _jsonable(options),
        "target": _jsonable(target),
        "input_fn": _jsonable(input_fn),
        "num_examples": n,
        "chunk_size": chunk_size,
        "model": _model_fingerprint(model),
    }


def _attribute_defaults() -> dict[str, Any]:
    """The defaults of :func:`nbattr.attribute`'s own parameters (read at call time)."""
    skip = {"model", "x", "method", "target", "batch_size", "layer"}
    return {p.name: p.default for p in inspect.signature(api.attribute).parameters.values()
            if p.name not in skip and p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            and p.default is not inspect.Parameter.empty}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable list of the settings that differ (model checksum compared with a tolerance)."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            model = [f"model {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in ("class", "parameters")
                     if a.get(k) != b.get(k)]
            if not model and ("checksum" in a) != ("checksum" in b):
                model.append("model weights")
            elif not model and "checksum" in a:
                tol = 1e-9 * max(abs(a["scale"]), abs(b["scale"]), 1e-300)
                if abs(a["checksum"] - b["checksum"]) > tol or abs(a["scale"] - b["scale"]) > tol:
                    model.append("model weights (their checksum differs)")
            diffs += model
        elif key == "options" and isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    diffs.append(f"{k}: {a.get(k)!r} -> {b.get(k)!r}")
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


# -- files ---------------------------------------------------------------------------------------
def _read_index(path: Path) -> dict[str, Any] | None:
    f = path / "index.json"
    if not f.exists():
        return None
    try:
        index = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{f} cannot be read ({e}); remove it or pass overwrite=True") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InputError(f"{f} was not written by nbattr.attribute_dataset; choose another directory")
    return index


def _write_json(f: Path, obj: Any, sync: bool = True) -> None:
    """Write JSON atomically (a temporary file, synced if ``sync``, then renamed over ``f``)."""
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())
    os.replace(tmp, f)


def _marker(path: Path, k: int) -> Path:
    return path / _CHUNKS_DIR / f"{k:07d}.json"


def _complete_chunks(path: Path, index: dict[str, Any]) -> list[int]:
    """Chunks listed in the index or marked by a marker file (the marker is written last)."""
    done = set(index.get("complete", []))
    d = path / _CHUNKS_DIR
    if d.is_dir():
        for f in d.iterdir():
            if f.suffix == ".json" and f.stem.isdigit():
                done.add(int(f.stem))
    return sorted(k for k in done if 0 <= k < index["num_chunks"])


def _remove_own(path: Path) -> None:
    for name in _OWN_FILES:
        (path / name).unlink(missing_ok=True)
    for f in path.glob(f"{PARAM_PREFIX}*.npy"):
        f.unlink()
    shutil.rmtree(path / _CHUNKS_DIR, ignore_errors=True)


def _np_dtype(t: Tensor) -> np.dtype:
    if t.dtype == torch.bfloat16:
        return np.dtype(np.float32)  # numpy has no bfloat16
    return torch.empty(0, dtype=t.dtype).numpy().dtype


def _per_example(name: str, v: Any, rows: int) -> bool:
    """Whether a ``params`` value is one number per example (adaptive IG's ``steps``): only the
    names in :data:`PER_EXAMPLE_PARAMS`, so that a setting which happens to have as many entries as
    a chunk has rows (occlusion's ``window`` (3, 8, 8) beside a 3-row last chunk) stays a setting."""
    if name not in PER_EXAMPLE_PARAMS:
        return False
    if isinstance(v, Tensor):
        return v.dim() == 1 and v.shape[0] == rows
    return (isinstance(v, (list, tuple)) and len(v) == rows
            and all(isinstance(e, (bool, int, float)) for e in v))


def _arrays_of(r: Any) -> dict[str, Tensor]:
    """The per-example arrays of a chunk's result: the fields, and ``params`` lists of one value
    per example under ``"param:<name>"``."""
    out = {"attributions": r.attributions}
    for name in FIELDS:
        v = getattr(r, name)
        if v is not None:
            out[name] = v
    rows = r.attributions.shape[0]
    for name, v in r.params.items():
        if _per_example(name, v, rows):
            out[f"param:{name}"] = torch.as_tensor(v)
    return out


def _file_of(name: str) -> str:
    if name == "attributions":
        return "attributions.npy"
    if name.startswith("param:"):
        return f"{PARAM_PREFIX}{name[6:]}.npy"
    return f"{FIELDS[name]}.npy"


def _create_arrays(path: Path, n: int, first: dict[str, Tensor]) -> dict[str, Any]:
    """Preallocate ``(N, ...)`` ``.npy`` files for the arrays of the first chunk's result."""
    specs = {}
    for name, t in first.items():
        fname = _file_of(name)
        shape = (n, *t.shape[1:])
        dtype = _np_dtype(t)
        mm = np.lib.format.open_memmap(path / fname, mode="w+", dtype=dtype, shape=shape)
        mm.flush()
        del mm
        specs[name] = {"file": fname, "shape": list(shape), "dtype": dtype.str,
                       "torch_dtype": str(t.dtype)}
    return specs


def _write_rows(path: Path, specs: dict[str, Any], start: int, arrays: dict[str, Tensor], k: int,
                sync: bool) -> None:
    """Write a chunk's rows in place (positioned writes; then fsync if ``sync``)."""
    if set(arrays) != set(specs):
        raise InputError(f"chunk {k} returned the arrays {sorted(arrays)} but the files hold "
                         f"{sorted(specs)}")
    for name, t in arrays.items():
        spec = specs[name]
        a = np.ascontiguousarray(t.detach().cpu().float().numpy() if t.dtype == torch.bfloat16
                                 else t.detach().cpu().numpy(), dtype=np.dtype(spec["dtype"]))
        if list(a.shape[1:]) != spec["shape"][1:]:
            raise InputError(
                f"chunk {k}: {name} has shape {tuple(a.shape)} but the file holds rows of shape "
                f"{tuple(spec['shape'][1:])}; every example must give the same shape (pad inputs "
                "to one length)")
        f = path / spec["file"]
        if "offset" not in spec:  # where the data starts after the .npy header (read once)
            spec["offset"] = int(np.load(f, mmap_mode="r").offset)
        offset = spec["offset"]
        row_bytes = a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
        with open(f, "r+b") as fh:
            fh.seek(offset + start * row_bytes)
            fh.write(a.tobytes())
            fh.flush()
            if sync:
                os.fsync(fh.fileno())


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("nbattr")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


def _uniform_rows(a: int, b: int) -> Callable[[Tensor], Tensor]:
    """The ``"uniform"`` baseline of the chunk holding examples ``a..b-1``: each example's noise
    drawn for its row number in the data set (:func:`nbattr.engine.baselines.uniform`)."""

    def uniform(x: Tensor) -> Tensor:
        return _baselines.uniform(x, rows=range(a, b))

    return uniform


# -- processes -----------------------------------------------------------------------------------
def _destroy_own_group() -> None:
    """At exit, end the default process group that :class:`_Dist` started (a script run unchanged
    under torchrun never ends it): a gloo group left to the interpreter's teardown aborted the
    process now and then ("terminate called without an active exception", exit status 1 from
    torchrun) after every file was written."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Dist:
    """Rank, world size and the collectives used to coordinate (a no-op for one process)."""

    def __init__(self, device_type: str) -> None:
        self.rank, self.world, self.group, self.own_group = 0, 1, None, False
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.initialised_here = False
        if not torch.distributed.is_available():
            return
        dist = torch.distributed
        if not dist.is_initialized():
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if world <= 1 or "RANK" not in os.environ:
                return
            backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend=backend)
            self.initialised_here = True
            atexit.register(_destroy_own_group)  # kept for later calls; ended before the interpreter
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world > 1 and dist.get_backend() != "gloo":
            self.group, self.own_group = dist.new_group(backend="gloo"), True  # CPU objects only

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        if self.own_group:
            torch.distributed.destroy_process_group(self.group)


def _resolve_device(model: Any, device: str | torch.device | None, dist_env: bool) -> torch.device | None:
    """Where the model runs: ``device`` (``"cuda"`` is ``cuda:LOCAL_RANK`` under several processes),
    else ``cuda:LOCAL_RANK`` for a CUDA model under several processes, else None (the model stays
    where it is)."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            index = int(os.environ.get("LOCAL_RANK", "0")) if dist_env else torch.cuda.current_device()
            device = torch.device("cuda", index)
        return device
    if dist_env and isinstance(model, nn.Module):
        devs = {t.device for t in (*model.parameters(), *model.buffers())}
        if len(devs) == 1 and next(iter(devs)).type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return None


@contextlib.contextmanager
def _placed(model: Any, device: torch.device | None) -> Iterator[None]:
    """Move a single-device model to ``device`` for the block and back afterwards."""
    if device is None or not isinstance(model, nn.Module):
        yield
        return
    devs = {t.device for t in (*model.parameters(), *model.buffers())}
    if len(devs) != 1 or next(iter(devs)) == device:
        yield
        return
    (before,) = devs
    model.to(device)
    try:
        yield
    finally:
        model.to(before)


class _Progress:
    """tqdm on rank 0 when it is importable, else a counter on stderr; silent when disabled."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar, self.enabled, self.total, self.desc = None, enabled, total, desc
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="ex", file=sys.stderr)
        except ImportError:
            self.show(initial)

    def show(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        else:
            pct = 100.0 * done / max(1, self.total)
            print(f"\r{self.desc}: {done}/{self.total} examples ({pct:.0f}%)", end="", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        else:
            print(file=sys.stderr, flush=True)


# -- the entry point --------------------------------------------------------------------------------
def attribute_dataset(
    model: Callable[[Tensor], Tensor],
    data: DataSpec,
    method: str = "integrated_gradients",
    out: str | os.PathLike | None = None,
    *,
    chunk_size: int | None = None,
    batch_size: int | str = "auto",
    target: Any = None,
    input_fn: Callable[[Any], Tensor] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    fsync: bool = True,
    **attribute_kwargs: Any,
) -> DatasetAttributions:
    """Attribute every example of a data set and write the results to ``out`` (resumable).

    Parameters
    ----------
    model : as for :func:`nbattr.attribute` (left exactly as found).
    data : the examples, in a fixed order:

        - a tensor or numpy array ``(N, ...)``: row i is example i;
        - a map-style ``Dataset`` (``len`` and indexing; also a list): items are collated with
          ``torch.utils.data.default_collate``;
        - a ``DataLoader`` over a map-style dataset without shuffling: its dataset is read in chunks
          with its ``collate_fn``, ``num_workers`` and ``pin_memory``; its ``batch_size`` is the
          default ``chunk_size``.

        An item is ``x``, a tuple ``(x, y, ...)`` or a dict; the model input of a collated chunk is
        found by ``input_fn`` (default :func:`default_input`: the tensor, its first element, or
        the first of the keys ``x``, ``input``, ``inputs``, ``image``, ``images``,
        ``pixel_values``, ``input_ids``). An ``IterableDataset`` is refused (no length, no resume).
    method : a name from :func:`nbattr.methods`.
    out : the output directory (created if needed). Required.
    chunk_size : examples per :func:`nbattr.attribute` call, the unit of resuming and of the work
        split over processes. Default: the DataLoader's ``batch_size``, else 64.
    batch_size : rows per model call inside a chunk, passed to :func:`nbattr.attribute` (a chunk
        of n examples of integrated gradients with s steps has n * s rows); ``"auto"`` sizes it
        from memory. May differ between runs of one directory.
    target : None (argmax), an int, N ints or ``(N, K)`` ints (one row per example of the whole
        data set, sliced per chunk), ``"label"`` (the label of each item: the second element of
        ``(x, y)``, or the first of the keys ``y``, ``label``, ``labels``, ``target``, ``targets``
        of a dict), a callable ``batch -> ints`` applied to each collated chunk, or anything else
        :func:`nbattr.attribute` takes per chunk (e.g. ``"top3"``).
    input_fn : ``batch -> Tensor``, the model input of a collated chunk (see ``data``).
    overwrite : start afresh, discarding an earlier run in ``out`` (only the files this function
        writes are removed). Without it, a run with the same settings is resumed and one with other
        settings raises ``InputError``.
    progress : show a progress bar over examples (tqdm when importable, else a counter on
        stderr); only rank 0 shows it.
    device : run the model there (a single-device model is moved for the call and moved back);
        under several processes ``"cuda"`` means ``cuda:LOCAL_RANK``. Default: where the model is;
        under several processes a CUDA model runs on ``cuda:LOCAL_RANK``.
    num_workers : DataLoader workers that read a Dataset (default: the DataLoader's, else 0).
    fsync : sync each chunk's rows to disk before marking the chunk done, so that a finished
        chunk survives a machine crash or power loss. ``False`` saves a disk flush per file and
        chunk (milliseconds; it matters for cheap methods with small chunks); a killed process
        still loses nothing marked done, as the written rows are in the operating system's hands.
    **attribute_kwargs : passed to :func:`nbattr.attribute` (``baseline``, ``steps``, ``rule``,
        ``layer``, method options). A tensor ``baseline`` of shape ``(N, ...)`` (one per example of
        the whole data set) is sliced per chunk; any other must broadcast against a chunk. With
        ``layer=``, the baseline is in the layer's output space: one of two or more dimensions
        whose first is N is taken as one row per example (give a shared one a leading 1,
        ``(1, L, E)``).
        ``forward_kwargs`` (keyword arguments of the model) is a dict, whose tensors with one row
        per example of the whole data set are sliced per chunk, or a callable ``batch -> dict``
        applied to each collated chunk (``lambda b: {"attention_mask": b["attention_mask"]}``).

    Returns
    -------
    DatasetAttributions
        :func:`load` of ``out`` (on every rank, after all ranks have finished).

    Raises
    ------
    InputError
        Bad data, options, or ``out`` holding a run with other settings (without ``overwrite``).

    Notes
    -----
    See the module docstring for the files, resuming and ``torchrun``. A chunk is marked finished
    only after its rows are synced to disk, so killing a run loses at most the chunks in progress.
    Numbers equal :func:`nbattr.attribute` on the whole tensor up to the rounding of a different
    chunking (the same up to rounding for any ``chunk_size``, ``batch_size`` and process count).
    Methods that draw random numbers (``smoothgrad``, ``shapley_sampling``) draw them per chunk:
    with a ``seed`` a run is reproducible (and resumes to the same numbers) for one ``chunk_size``,
    but does not equal one call on the whole tensor.

    Examples
    --------
    A script that runs as ``python explain.py`` and as ``torchrun --nproc_per_node=4 explain.py``
    (the model, kept on the CPU by the script, runs on each process's own GPU)::

        loader = DataLoader(val_set, batch_size=32, num_workers=4)   # (image, label) items
        r = nbattr.attribute_dataset(model.eval(), loader, out="ig_val", device="cuda",
                                     target="label", baseline="blur", steps=32)
        maps = np.load("ig_val/attributions.npy", mmap_mode="r")     # (N, 3, H, W)
    """
    if out is None:
        raise InputError("out= is required: the directory the attributions are written to")
    path = Path(out)
    source = _Source(data, chunk_size, num_workers)
    if target is not None and not isinstance(target, (int, str)) and not callable(target):
        t = torch.as_tensor(target)
        if t.dim() == 0:
            target = int(t)
        elif t.shape[0] != source.n:
            raise InputError(f"target has {t.shape[0]} entries for a data set of {source.n} examples; "
                             "give one per example, an int, 'label' or a callable")
        else:
            target = t
    settings = _settings(model, method, source.n, source.chunk_size, target, input_fn, attribute_kwargs)
    dist_env = (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ)
    run_device = _resolve_device(model, device, dist_env)
    dev_type = run_device.type if run_device is not None else _model_device_type(model)
    comm = _Dist(dev_type)
    try:
        with _placed(model, run_device):
            _run(model, source, method, path, settings, comm, run_device, target=target,
                 input_fn=input_fn or default_input, batch_size=batch_size, overwrite=overwrite,
                 progress=progress, fsync=fsync, kwargs=attribute_kwargs)
    finally:
        comm.close()
    return load(path)


def _model_device_type(model: Any) -> str:
    if isinstance(model, nn.Module):
        for t in (*model.parameters(), *model.buffers()):
            return t.device.type
    return "cpu"


def _chunk_call(model: Any, source: _Source, k: int, batch: Any, method: str, target: Any,
                input_fn: Callable[[Any], Tensor], batch_size: int | str, kwargs: dict[str, Any],
                device: torch.device | None) -> Any:
    """One :func:`attribute` call on chunk ``k``."""
    a, b = source.rows(k)
    x = input_fn(batch)
    if not isinstance(x, Tensor):
        raise InputError(f"input_fn returned {type(x).__name__}; it must return a tensor")
    if x.dim() < 1 or x.shape[0] != b - a:
        raise InputError(f"chunk {k} has {b - a} examples but its input has shape {tuple(x.shape)}; "
                         "input_fn must return a batch (n, ...)")
    if device is not None and not isinstance(model, nn.Module):
        x = x.to(device)
    if target == "label":
        t = default_label(batch)
    elif callable(target):
        t = target(batch)
    elif isinstance(target, Tensor):
        t = target[a:b]
    else:
        t = target
    kw = dict(kwargs)
    base = kw.get("baseline")
    if isinstance(base, str) and base == "uniform":  # each example's noise as in one call on the whole data set
        kw["baseline"] = _uniform_rows(a, b)
    if isinstance(base, Tensor) and tuple(base.shape[:1]) == (source.n,) and source.n > 1:
        # (N, ...): one row per example, sliced. In the input space its rank is x's; a layer's
        # output has its own rank, unknown before the call: there, two or more dimensions.
        if (base.dim() >= 2) if kw.get("layer") is not None else (base.dim() == x.dim()):
            kw["baseline"] = base[a:b]
    fk = kw.get("forward_kwargs")
    if callable(fk):
        kw["forward_kwargs"] = fk(batch)
    elif isinstance(fk, dict) and source.n > 1:  # one row per example of the data set: this chunk's
        kw["forward_kwargs"] = {name: v[a:b] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == source.n
                                else v for name, v in fk.items()}
    r = api.attribute(model, x, method=method, target=t, batch_size=batch_size, **kw)
    if r.params.get("unbatched") or r.attributions.shape[0] != b - a:
        raise InputError(f"the model did not take chunk {k} of shape {tuple(x.shape)} as a batch of "
                         f"{b - a} examples; the examples must be batchable (N, ...)")
    return r


def _run(model: Any, source: _Source, method: str, path: Path, settings: dict[str, Any], comm: _Dist,
         device: torch.device | None, *, target: Any, input_fn: Callable[[Any], Tensor],
         batch_size: int | str, overwrite: bool, progress: bool, fsync: bool, kwargs: dict[str, Any]) -> None:
    def compute(k: int, batch: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        t0 = time.perf_counter()
        r = _chunk_call(model, source, k, batch, method, target, input_fn, batch_size, kwargs, device)
        arrays = _arrays_of(r)
        params = {k2: v for k2, v in r.params.items() if k2 != "chunks" and f"param:{k2}" not in arrays}
        info = {"rank": comm.rank, "unsupported": dict(r.unsupported), "params": _jsonable(params)}
        return arrays, {**info, "seconds": time.perf_counter() - t0}

    def finish(k: int, arrays: dict[str, Tensor], info: dict[str, Any], specs: dict[str, Any]) -> None:
        _write_rows(path, specs, source.rows(k)[0], arrays, k, fsync)
        # The marker needs no fsync of its own: the rows are durable before it exists, and a
        # marker lost in a machine crash only means the chunk is computed again.
        _write_json(_marker(path, k), {"chunk": k, "rows": list(source.rows(k)), **info}, sync=False)

    # Rank 0 checks or creates the directory; the others learn the outcome (or the error).
    plan: dict[str, Any] | None = None
    error: BaseException | None = None
    bar = None
    if comm.rank == 0:
        try:
            plan = _prepare(path, source, settings, overwrite)
            bar = _Progress(progress, source.n, _rows_done(source, plan["complete"]),
                            f"{method} -> {path.name}")
            if plan["specs"] is None:  # a fresh directory: the first chunk tells the shapes
                k = plan["pending"][0]
                ((_, batch),) = list(source.batches([k]))
                arrays, info = compute(k, batch)
                plan["specs"] = _create_arrays(path, source.n, arrays)
                index = _new_index(settings, source, plan["specs"], info)
                _write_json(path / "index.json", index)
                finish(k, arrays, info, plan["specs"])
                plan["first_done"] = k
                bar.show(_rows_done(source, [k]))
        except BaseException as e:  # noqa: BLE001 - told to the other ranks, then re-raised
            error = e
    msg = comm.broadcast({"plan": plan, "error": None if error is None else f"{type(error).__name__}: {error}"})
    if error is not None:
        if bar is not None:
            bar.close()
        raise error
    if msg["error"] is not None:
        raise NbattrError(f"rank 0 failed while preparing {path}: {msg['error']}")
    plan = msg["plan"]
    specs = {name: dict(spec) for name, spec in plan["specs"].items()}  # offsets are cached here
    mine = [k for k in plan["pending"][comm.rank::comm.world] if k != plan.get("first_done")]

    seen = set(plan["complete"]) | ({plan["first_done"]} if "first_done" in plan else set())
    listed = time.monotonic()
    try:
        for k, batch in source.batches(mine):
            arrays, info = compute(k, batch)
            finish(k, arrays, info, specs)
            seen.add(k)
            if bar is not None:
                if comm.world > 1 and time.monotonic() - listed > 2.0:  # the other ranks' chunks
                    seen.update(_marked(path))
                    listed = time.monotonic()
                bar.show(_rows_done(source, seen))
    except BaseException as e:  # noqa: BLE001 - every rank must reach the gather below
        error = e
    failures = comm.gather(None if error is None else f"{type(error).__name__}: {error}")
    if bar is not None:
        bar.close()
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(failures) if m is not None]
    if bad:
        raise NbattrError("; ".join(f"rank {r} failed: {m}" for r, m in bad))
    if comm.rank == 0:
        _consolidate(path)
    comm.gather(None)  # a barrier: the index is written before any rank returns


def _rows_done(source: _Source, chunks: Iterable[int]) -> int:
    return sum(b - a for a, b in (source.rows(k) for k in set(chunks)))


def _marked(path: Path) -> list[int]:
    d = path / _CHUNKS_DIR
    return [int(f.stem) for f in d.iterdir() if f.suffix == ".json" and f.stem.isdigit()] if d.is_dir() else []


def _new_index(settings: dict[str, Any], source: _Source, specs: dict[str, Any],
               first: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "nbattr_version": _version(),
        "torch_version": torch.__version__,
        "settings": settings,
        "method": settings["method"],
        "num_examples": source.n,
        "chunk_size": source.chunk_size,
        "num_chunks": source.num_chunks,
        "data": source.kind,
        "arrays": specs,
        "params": first["params"],  # as reported for the first chunk; per-example ones are files
        "complete": [],
        "chunk_rank": [None] * source.num_chunks,
        "unsupported": {},
        "seconds": 0.0,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _prepare(path: Path, source: _Source, settings: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Check (or reset) ``path``; the chunks still to do and the array specs if the files exist."""
    path.mkdir(parents=True, exist_ok=True)
    index = _read_index(path)
    if index is not None:
        diffs = _differences(index["settings"], settings)
        if diffs and not overwrite:
            raise InputError(f"{path} holds attributions computed with other settings ("
                             + "; ".join(diffs) + "): pass overwrite=True to recompute, or another out=")
        if overwrite:
            index = None
        else:
            missing = [s["file"] for s in index["arrays"].values() if not (path / s["file"]).exists()]
            if missing:
                raise InputError(f"{path} lacks {missing}; pass overwrite=True to recompute")
    if index is None:  # fresh start; with no index no chunk can count as done
        _remove_own(path)
        (path / _CHUNKS_DIR).mkdir()
        return {"specs": None, "complete": [], "pending": list(range(source.num_chunks))}
    (path / _CHUNKS_DIR).mkdir(exist_ok=True)
    complete = _complete_chunks(path, index)
    done = set(complete)
    return {"specs": index["arrays"], "complete": complete,
            "pending": [k for k in range(source.num_chunks) if k not in done]}


def _consolidate(path: Path) -> None:
    """Fold the marker files into ``index.json`` (atomically), then remove them."""
    index = _read_index(path)
    markers = sorted(_marker(path, k) for k in _marked(path))
    unsupported = dict(index.get("unsupported", {}))
    seconds = float(index.get("seconds", 0.0))
    ranks = list(index.get("chunk_rank") or [None] * index["num_chunks"])
    for f in markers:
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):  # a marker emptied by a machine crash: the chunk is still done
            continue
        ranks[int(info["chunk"])] = info.get("rank")
        for op, c in info.get("unsupported", {}).items():
            unsupported[op] = unsupported.get(op, 0) + int(c)
        seconds += float(info.get("seconds", 0.0))
    index["complete"] = _complete_chunks(path, index)
    index["unsupported"] = unsupported
    index["seconds"] = seconds
    index["chunk_rank"] = ranks
    index["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _write_json(path / "index.json", index)
    for f in markers:
        f.unlink(missing_ok=True)
