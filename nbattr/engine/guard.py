"""Leave the user's model exactly as it was found, whatever happens during a call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def model_guard(model: Any) -> Iterator[None]:
    """Snapshot a model's mutable state and restore it on exit, also after an exception.

    Inside the block the parameters have ``requires_grad=False`` (so no parameter gradient is
    ever computed: only gradients with respect to inputs are needed). On exit: training flags,
    ``requires_grad``, ``.grad`` of every parameter, buffer values (batch-norm running statistics
    of a model left in training mode) and the hook dictionaries are as before.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [_hook_keys(m) for m in modules]
    global_hooks = {name: set(getattr(_module, name, {}).keys()) for name in _GLOBAL_HOOK_DICTS}
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for m, t in zip(modules, training):
            m.training = t
        for p, r, g in zip(params, requires, grads):
            p.requires_grad_(r)
            if p.grad is not g:
                p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)
        for m, keys in zip(modules, hooks):
            for name, before in keys.items():
                d = getattr(m, name, None)
                if d is None:
                    continue
                for k in list(d.keys()):
                    if k not in before:
                        del d[k]
        for name, before in global_hooks.items():
            d = getattr(_module, name, None)
            if d is None:
                continue
            for k in list(d.keys()):
                if k not in before:
                    del d[k]
