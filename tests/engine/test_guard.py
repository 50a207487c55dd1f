"""The guard restores a model whatever happens inside it (parts not covered by the method tests)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nbattr.engine.guard import model_guard, model_storages
from nbattr.engine.rules import _bound_argument


class Mixed(nn.Module):
    """Buffers of three dtypes (one non-contiguous), a tied parameter, a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied: one parameter, two modules
        self.a.bias.requires_grad_(False)
        self.register_buffer("f32", torch.arange(6.0))
        self.register_buffer("i64", torch.tensor([1, 2, 3]))
        self.register_buffer("t", torch.arange(6.0).reshape(2, 3).t())  # non-contiguous
        self.register_buffer("h", torch.ones(2, dtype=torch.float16))
        self.register_buffer("none", None)


def _snapshot(m: nn.Module) -> list:
    return ([x.training for x in m.modules()], [p.requires_grad for p in m.parameters()],
            [p.grad for p in m.parameters()], [b.clone() for b in m.buffers()],
            [len(x._forward_hooks) for x in m.modules()])


def _equal(u: list, v: list) -> bool:
    return (u[0] == v[0] and u[1] == v[1] and all(a is b for a, b in zip(u[2], v[2], strict=True))
            and all(torch.equal(a, b) for a, b in zip(u[3], v[3], strict=True)) and u[4] == v[4])


@pytest.mark.parametrize("raises", [False, True])
def test_every_change_is_undone(raises: bool) -> None:
    m = Mixed().train()
    m.b.training = False
    before = _snapshot(m)
    global_before = set(nn.modules.module._global_forward_hooks)
    stride = m.t.stride()
    with pytest.raises(RuntimeError, match="boom") if raises else torch.no_grad():
        with model_guard(m):
            assert not any(p.requires_grad for p in m.parameters())
            m.f32.add_(1)
            m.i64[0] = 7
            m.t.mul_(2)  # written through its strides
            m.h.fill_(3)
            m.eval()
            m.a.weight.grad = torch.ones(3, 3)
            m.a.register_forward_hook(lambda *a: None)
            nn.modules.module.register_module_forward_hook(lambda *a: None)
            if raises:
                raise RuntimeError("boom")
    assert _equal(before, _snapshot(m))
    assert m.t.stride() == stride  # restored in place, not replaced
    assert set(nn.modules.module._global_forward_hooks) == global_before


def test_unchanged_buffers_stay_the_same_tensors() -> None:
    m = Mixed()
    ids = [id(b) for b in m.buffers()]
    versions = [b._version for b in m.buffers()]
    with model_guard(m):
        pass
    assert [id(b) for b in m.buffers()] == ids
    assert [b._version for b in m.buffers()] == versions  # nothing copied back


def test_a_resized_buffer_is_left_and_the_others_restored() -> None:
    m = Mixed()
    with model_guard(m):
        m.f32.resize_(2)
        m.i64.zero_()
        m.t.zero_()
    assert m.f32.shape == (2,)  # nothing to copy into (a model that resizes owns its buffer)
    assert torch.equal(m.i64, torch.tensor([1, 2, 3]))
    assert torch.equal(m.t, torch.arange(6.0).reshape(2, 3).t())


def test_a_sparse_buffer_is_restored() -> None:
    m = nn.Linear(3, 3)
    m.register_buffer("s", torch.eye(3).to_sparse())  # torch.equal has no sparse kernel
    with model_guard(m):
        m.s.mul_(2)
    assert torch.equal(m.s.to_dense(), torch.eye(3))


def test_model_storages_inside_and_outside_a_guard() -> None:
    m = Mixed()
    outside = model_storages(m)
    with model_guard(m):
        assert model_storages(m) == outside
    assert m.a.weight.untyped_storage().data_ptr() in outside and model_storages(object()) == set()


def _f(x: torch.Tensor, lo: float = -1.0, *rest: int, hi: float = 1.0, flag: bool = False) -> None:
    pass


def test_bound_argument_by_keyword_position_and_default() -> None:
    t = torch.zeros(1)
    assert _bound_argument(_f, (t, 0.5), {}, None, "lo", None) == 0.5
    assert _bound_argument(_f, (t,), {}, None, "lo", None) == -1.0
    assert _bound_argument(_f, (t, 0.5, 9), {}, 2, "hi", None) == 1.0  # keyword-only: never positional
    assert _bound_argument(_f, (t,), {"hi": 2.0}, None, "hi", None) == 2.0
    assert _bound_argument(_f, (), {}, None, "x", "none") == "none"  # no default, not given
    assert _bound_argument(torch.nn.functional.hardtanh, (t, -2.0), {}, 1, "min_val", -1.0) == -2.0
    assert _bound_argument(torch.nn.functional.relu6, (t, True), {}, None, "inplace", False) is True


# -- callables that are not modules ---------------------------------------------------------------
NET = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _uses_global(x):
    return NET(x)


class _Wrapper:
    """Not a module: an object whose __call__ uses the module it holds."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x) * 2


def _callables(net):
    import functools

    head, child = nn.Linear(3, 2), net[2]
    members = [net, head]
    return {
        "lambda over a closure": (lambda x: net(x)[:, :2], [net]),
        "lambda over a global": (lambda x: NET(x), [NET]),
        "function over a global": (_uses_global, [NET]),
        "partial": (functools.partial(lambda m, x: m(x), net), [net]),
        "bound method": (net.forward, [net]),
        "object with __call__": (_Wrapper(net), [net]),
        "two modules": (lambda x: head(net(x)), [head, net]),
        "an ensemble in a list": (lambda x: sum(m(x) for m in members), [net, head]),
        "a module and its child": (lambda x: child(net(x)), [net]),  # the child is covered
    }


@pytest.mark.parametrize("name", list(_callables(NET)))
def test_modules_of_a_callable(name):
    from nbattr.engine.guard import modules_of

    fn, expected = _callables(NET)[name]
    assert {id(m) for m in modules_of(fn)} == {id(m) for m in expected}


@pytest.mark.parametrize("method", ["integrated_gradients", "deeplift", "saliency"])
def test_a_callable_model_is_guarded_like_a_module(method):
    """``lambda x: net(x)[0]``-style models: their modules' parameters are frozen during the call
    (so DeepLIFT sees a Linear's weight as the constant it is, not a second varying operand) and
    restored after it, also when the call raises."""
    import nbattr

    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    net[2].bias.requires_grad_(False)  # a mixed state to restore
    seen = []
    net.register_forward_hook(lambda m, i, o: seen.append([p.requires_grad for p in m.parameters()]))
    before = _snapshot(net)
    r = nbattr.attribute(lambda x: net(x) + 0, torch.randn(3, 4), method=method, baseline="zeros")
    assert seen and all(not any(s) for s in seen)
    assert r.unsupported == {} if method == "deeplift" else True
    assert _equal(_snapshot(net), before)

    def boom(x):
        net(x)
        raise RuntimeError("boom")

    with pytest.raises(Exception, match="boom"):
        nbattr.attribute(boom, torch.randn(3, 4), method=method)
    assert _equal(_snapshot(net), before)


def test_a_lazy_model_is_refused_and_left_as_found() -> None:
    """An uninitialised lazy module failed inside the guard's setup after freezing the parameters
    before it, and left a stale snapshot that later calls restored (training flag, statistics)."""
    import nbattr

    m = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), nn.LazyLinear(3)).eval()
    with pytest.raises(nbattr.InputError, match="'2.weight' is not initialised yet"):
        nbattr.attribute(m, torch.randn(4, 5))
    assert m[0].weight.requires_grad and m[1].weight.requires_grad
    from nbattr.engine.guard import _OPEN

    assert id(m) not in _OPEN
    m(torch.randn(4, 5))  # initialised now
    m.train()
    m(torch.randn(8, 5))  # statistics move
    stats = m[1].running_mean.clone()
    with pytest.warns(nbattr.TrainingModeWarning):
        nbattr.attribute(m, torch.randn(4, 5), method="saliency")
    assert m.training and torch.equal(m[1].running_mean, stats)


def test_a_failure_while_freezing_leaves_no_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbattr.engine import guard

    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    calls = []
    real = torch.Tensor.requires_grad_

    def flaky(self, flag=True):  # noqa: ANN001, ANN202
        calls.append(flag)
        if len(calls) == 3:
            raise RuntimeError("simulated")
        return real(self, flag)

    monkeypatch.setattr(torch.Tensor, "requires_grad_", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        with guard.model_guard(m):
            pass
    monkeypatch.undo()
    assert all(p.requires_grad for p in m.parameters()) and id(m) not in guard._OPEN
