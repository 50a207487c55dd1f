"""Leave the user's model exactly as it was found, whatever happens during a call."""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

from .errors import InputError

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _hook_keys(m: nn.Module) -> dict[str, set]:
    return {name: set(d) for name in _HOOK_DICTS if (d := getattr(m, name, None))}


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return torch.equal(a, b)
    except (RuntimeError, NotImplementedError):  # no comparison for its layout (sparse): copy back
        return False


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.empty(0)


class _Snapshot:
    """The mutable state of one model, taken when the first guard enters (one walk over the
    modules: a call on a large model should not pay for this more than once)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.hooks = [_hook_keys(m) for m in self.modules]
        self.global_hooks = {name: set(getattr(_module, name, {}).keys()) for name in _GLOBAL_HOOK_DICTS}
        params: dict[int, nn.Parameter] = {}
        buffers: dict[int, torch.Tensor] = {}
        for m in self.modules:
            for v in (*m._parameters.values(), *m._buffers.values()):
                if v is not None and nn.parameter.is_lazy(v):
                    raise _lazy_error(model, v)
            for v in m._parameters.values():
                if v is not None:
                    params.setdefault(id(v), v)
            for v in m._buffers.values():
                if v is not None:
                    buffers.setdefault(id(v), v)
        self.params = list(params.values())
        self.requires = [p.requires_grad for p in self.params]
        self.grads = [p.grad for p in self.params]
        # Buffers by dtype and device, each group saved as one flat copy: restoring compares one
        # tensor per group and only walks a group whose values changed.
        groups: dict[tuple, list[torch.Tensor]] = {}
        for b in buffers.values():  # (a sparse or otherwise unusual buffer: a group of its own)
            key = (b.dtype, b.device) if b.layout == torch.strided and type(b) is torch.Tensor else (id(b),)
            groups.setdefault(key, []).append(b)
        self.buffers = [(group, [tuple(b.shape) for b in group],
                         _flat(group) if len(group) > 1 else group[0].detach().clone())
                        for group in groups.values()]
        self.depth = 0

    def storages(self) -> set[int]:
        """The storages of the model's parameters and buffers (memory that is not per row)."""
        return {t.untyped_storage().data_ptr() for t in (*self.params, *(b for g, _, _ in self.buffers for b in g))}

    def restore(self) -> None:
        for m, t in zip(self.modules, self.training):
            if m.training != t:  # (nn.Module.__setattr__ is slow; most flags never change)
                m.training = t
        for p, r, g in zip(self.params, self.requires, self.grads):
            if p.requires_grad != r:
                p.requires_grad_(r)
            if p.grad is not g:
                p.grad = g
        with torch.no_grad():
            for group, shapes, saved in self.buffers:
                if len(group) == 1:
                    if tuple(group[0].shape) == shapes[0] and not _equal(group[0], saved):
                        group[0].copy_(saved)
                    continue
                if [tuple(b.shape) for b in group] == shapes and torch.equal(_flat(group), saved):
                    continue
                offset = 0
                for b, shape in zip(group, shapes):
                    n = math.prod(shape)
                    if tuple(b.shape) == shape:
                        old = saved[offset:offset + n].view(shape)
                        if not torch.equal(b, old):
                            b.copy_(old)
                    offset += n
        for m, keys in zip(self.modules, self.hooks):
            for name in _HOOK_DICTS:
                d = getattr(m, name, None)
                if not d:
                    continue
                before = keys.get(name, ())
                for k in list(d.keys()):
                    if k not in before:
                        del d[k]
        for name, before in self.global_hooks.items():
            d = getattr(_module, name, None)
            if d is None:
                continue
            for k in list(d.keys()):
                if k not in before:
                    del d[k]


def _names(code: types.CodeType) -> set[str]:
    """The global names a code object (and the lambdas, comprehensions and functions in it) uses."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names(c)
    return names


def modules_of(model: Any) -> list[nn.Module]:
    """The modules that make up ``model``: itself when it is an ``nn.Module``; for another callable
    (``lambda x: net(x).logits``, a function, a bound method, a ``functools.partial``, an object
    with ``__call__``) the modules it reaches by name: its closure, defaults, the globals its
    code names, the attributes of its object, the items of a small list, tuple or dict among
    those, two levels deep. Only the outermost (a module inside another one found is covered by
    it), in the order found."""
    found: list[nn.Module] = []
    seen: set[int] = set()

    def visit(v: Any, depth: int) -> None:
        if id(v) in seen or isinstance(v, (type, types.ModuleType, str, bytes, int, float, torch.Tensor)):
            return
        seen.add(id(v))
        if isinstance(v, nn.Module):
            found.append(v)
            return
        if depth > 2:
            return
        if isinstance(v, (list, tuple, dict)):  # an ensemble: models[0](x); a small container only
            items = list(v.values()) if isinstance(v, dict) else list(v)
            for w in items if len(items) <= 64 else ():
                visit(w, depth + 1)
        elif isinstance(v, functools.partial):
            for w in (v.func, *v.args, *v.keywords.values()):
                visit(w, depth + 1)
        elif isinstance(v, types.MethodType):
            visit(v.__self__, depth + 1)
            visit(v.__func__, depth + 1)
        elif isinstance(v, types.FunctionType):
            for cell in v.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    visit(cell.cell_contents, depth + 1)
            for w in (*(v.__defaults__ or ()), *(v.__kwdefaults__ or {}).values()):
                visit(w, depth + 1)
            g = v.__globals__
            for name in sorted(_names(v.__code__)):
                if name in g:
                    visit(g[name], depth + 1)
        elif callable(v) and hasattr(v, "__dict__"):  # an object with __call__
            for w in vars(v).values():
                visit(w, depth + 1)
            visit(getattr(type(v).__call__, "__func__", type(v).__call__), depth + 1)

    visit(model, 0)
    if len(found) > 1:
        inner = {id(m) for f in found for m in f.modules() if m is not f}
        found = [m for m in found if id(m) not in inner]
    return found


# One snapshot per model while any guard on it is open, in any thread: the widget computes on a
# worker thread while the kernel may call nbattr on the same model, and a second snapshot taken
# inside the first would see (and later restore) the first one's requires_grad=False.
_LOCK = threading.Lock()
_OPEN: dict[int, _Snapshot] = {}


def _lazy_error(model: nn.Module, t: torch.Tensor) -> InputError:
    """A parameter or buffer not yet created (``nn.LazyLinear`` before its first forward) cannot be
    snapshotted: the error names it (looked up only then) rather than failing inside torch."""
    name = next((n for n, v in (*model.named_parameters(), *model.named_buffers()) if v is t), "?")
    return InputError(f"the model's {name!r} is not initialised yet (a lazy module, e.g. nn.LazyLinear): "
                      "run the model once on an example (model(x)) before attributing")


@contextlib.contextmanager
def model_guard(model: Any) -> Iterator[None]:
    """Snapshot a model's mutable state and restore it on exit, also after an exception.

    Inside the block the parameters have ``requires_grad=False`` (so no parameter gradient is
    ever computed: only gradients with respect to inputs are needed). On exit: training flags,
    ``requires_grad``, ``.grad`` of every parameter, buffer values (batch-norm running statistics
    of a model left in training mode) and the hook dictionaries are as before.

    Guards on the same model nest, also across threads: the state is taken by the first to enter
    and restored by the last to leave. Hooks added while any guard is open are removed then
    (including one a user registers from another thread meanwhile: register hooks between calls).

    A model that is not an ``nn.Module`` (``lambda x: net(x).logits``) guards the modules it
    reaches (:func:`modules_of`).
    """
    if not isinstance(model, nn.Module):
        with contextlib.ExitStack() as stack:
            for m in modules_of(model):
                stack.enter_context(model_guard(m))
            yield
        return
    with _LOCK:
        snap = _OPEN.get(id(model))
        if snap is None:
            snap = _Snapshot(model)  # (refuses a lazy model before changing anything)
            try:
                for p in snap.params:
                    p.requires_grad_(False)
            except BaseException:  # (registered only once taken: no stale snapshot is left behind)
                snap.restore()
                raise
            _OPEN[id(model)] = snap
        snap.depth += 1
    try:
        yield
    finally:
        with _LOCK:
            snap.depth -= 1
            if snap.depth == 0:
                del _OPEN[id(model)]
                snap.restore()


def model_storages(model: Any) -> set[int]:
    """The storages of a model's parameters and buffers (from the open guard's snapshot when
    there is one: no second walk over the modules)."""
    if not isinstance(model, nn.Module):
        return set().union(*(model_storages(m) for m in modules_of(model)))
    with _LOCK:
        snap = _OPEN.get(id(model))
    if snap is not None:
        return snap.storages()
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def thread_hook(module: nn.Module, hook: Callable[..., Any]) -> Any:
    """``module.register_forward_hook(hook)`` acting only on calls from the registering thread, so
    an attribution running on the widget's worker thread never touches a forward the user runs
    meanwhile (and vice versa). Returns the removable handle."""
    owner = threading.get_ident()

    def bound(m: nn.Module, inp: Any, out: Any) -> Any:
        if threading.get_ident() == owner:
            return hook(m, inp, out)
        return None

    return module.register_forward_hook(bound)
