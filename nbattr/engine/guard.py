"""Leave the user's model exactly as it was found, whatever happens during a call."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module

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
    return {name: set(getattr(m, name, {}).keys()) for name in _HOOK_DICTS}


class _Snapshot:
    """The mutable state of one model, taken when the first guard enters."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.training = [m.training for m in self.modules]
        self.hooks = [_hook_keys(m) for m in self.modules]
        self.global_hooks = {name: set(getattr(_module, name, {}).keys()) for name in _GLOBAL_HOOK_DICTS}
        self.params = list(model.parameters())
        self.requires = [p.requires_grad for p in self.params]
        self.grads = [p.grad for p in self.params]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.depth = 0

    def restore(self) -> None:
        for m, t in zip(self.modules, self.training):
            m.training = t
        for p, r, g in zip(self.params, self.requires, self.grads):
            p.requires_grad_(r)
            if p.grad is not g:
                p.grad = g
        with torch.no_grad():
            for b, saved in self.buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)
        for m, keys in zip(self.modules, self.hooks):
            for name, before in keys.items():
                d = getattr(m, name, None)
                if d is None:
                    continue
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


# One snapshot per model while any guard on it is open, in any thread: the widget computes on a
# worker thread while the kernel may call nbattr on the same model, and a second snapshot taken
# inside the first would see (and later restore) the first one's requires_grad=False.
_LOCK = threading.Lock()
_OPEN: dict[int, _Snapshot] = {}


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
    """
    if not isinstance(model, nn.Module):
        yield
        return
    with _LOCK:
        snap = _OPEN.get(id(model))
        if snap is None:
            snap = _OPEN[id(model)] = _Snapshot(model)
            for p in snap.params:
                p.requires_grad_(False)
        snap.depth += 1
    try:
        yield
    finally:
        with _LOCK:
            snap.depth -= 1
            if snap.depth == 0:
                del _OPEN[id(model)]
                snap.restore()


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
