"""Several targets per example: one forward per point, K backward passes, a K axis after N."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import nbattr
from nbattr.engine.result import Attribution

from .models import CallCounter, cnn, mlp, register_looped_method, text

pytestmark = pytest.mark.usefixtures("float64")

NATIVE = ("saliency", "gradient_x_input", "integrated_gradients", "interior_gradients", "smoothgrad",
          "deeplift", "deeplift_reveal_cancel", "epsilon_lrp")
PERTURBATION = ("occlusion", "shapley_sampling")  # native too: all K scores from each forward
OPTIONS = {
    "integrated_gradients": {"steps": 8, "keep_path": True},
    "interior_gradients": {"steps": 6, "alpha": 0.5},
    "smoothgrad": {"samples": 5},
    "occlusion": {"window": 2},
    "shapley_sampling": {"permutations": 3},
    "deeplift_reveal_cancel": {"rule": "reveal_cancel"},
}
ALIASES = {"deeplift_reveal_cancel": "deeplift"}
PER_EXAMPLE = ("attributions", "target", "outputs", "baseline_outputs", "delta")


def _same(multi: Attribution, single: Attribution, j: int) -> None:
    one = multi.for_target(j)
    for name in (*PER_EXAMPLE, "path_outputs", "path_gradients", "alphas", "inputs", "baselines"):
        a, b = getattr(one, name), getattr(single, name)
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", NATIVE + PERTURBATION)
def test_multi_target_equals_one_run_per_target(method: str) -> None:
    opts = OPTIONS.get(method, {})
    method = ALIASES.get(method, method)
    m = mlp(3, act=nn.Tanh)
    x = torch.randn(3, 6)
    targets = torch.tensor([[0, 2], [1, 1], [3, 0]])
    r = nbattr.attribute(m, x, method=method, target=targets, baseline=0.1, **opts)
    assert r.multi and r.attributions.shape == (3, 2, 6)
    assert torch.equal(r.target, targets)
    assert r.outputs.shape == (3, 2)
    if r.delta is not None:
        assert r.delta.shape == (3, 2)
        torch.testing.assert_close(r.delta, r.total() - (r.outputs - r.baseline_outputs))
    if r.path_outputs is not None:
        assert r.path_outputs.shape == (len(r.alphas), 3, 2)
    expected = "one forward and 2 backward" if method not in PERTURBATION else "from the same"
    assert expected in r.params["targets"]
    for j in range(2):
        single = nbattr.attribute(m, x, method=method, target=targets[:, j], baseline=0.1, **opts)
        _same(r, single, j)
    parts = r.split()
    assert len(parts) == 2 and not parts[0].multi and "targets" not in parts[0].params


def test_multi_target_on_a_cnn_and_through_a_layer() -> None:
    m = cnn(2)
    x = torch.randn(2, 3, 16, 16)
    r = nbattr.attribute(m, x, target="top3", steps=6)
    assert r.attributions.shape == (2, 3, 3, 16, 16) and r.path_outputs.shape == (6, 2, 3)
    for j in range(3):
        _same(r, nbattr.attribute(m, x, target=r.target[:, j], steps=6), j)

    t = text(0, vocab=10, classes=3)
    ids = torch.tensor([[1, 5, 7], [2, 2, 9]])
    r = nbattr.attribute(t, ids, layer=t.emb, target=[[0, 2], [1, 0]], steps=32)
    assert r.attributions.shape == (2, 2, 3, 4) and r.delta.abs().max() < 1e-8
    _same(r, nbattr.attribute(t, ids, layer=t.emb, target=[2, 0], steps=32), 1)


def test_topk_is_the_k_best_classes_in_order() -> None:
    m = mlp(1)
    x = torch.randn(4, 6)
    r = nbattr.attribute(m, x, method="saliency", target="top3")
    logits = m(x)
    assert torch.equal(r.target, logits.topk(3, 1).indices)
    assert (r.outputs[:, :-1] >= r.outputs[:, 1:]).all()
    torch.testing.assert_close(r.outputs, logits.gather(1, r.target))


def test_k_equal_one_equals_the_single_target() -> None:
    m = mlp(2, act=nn.Sigmoid)
    x = torch.randn(3, 6)
    single = nbattr.attribute(m, x, steps=10)
    r = nbattr.attribute(m, x, steps=10, target=single.target[:, None])
    assert r.multi and r.attributions.shape == (3, 1, 6) and r.delta.shape == (3, 1)
    _same(r, single, 0)
    r1 = nbattr.attribute(m, x, steps=10, target="top1")
    torch.testing.assert_close(r1.attributions[:, 0], single.attributions)
    # numpy (N, K) arrays and lists of lists are read the same way
    a = nbattr.attribute(m, x, method="saliency", target=np.array([[0, 1]] * 3))
    b = nbattr.attribute(m, x, method="saliency", target=[[0, 1]] * 3)
    torch.testing.assert_close(a.attributions, b.attributions)


def test_one_forward_per_point_for_all_targets() -> None:
    m = CallCounter(cnn(1))
    x = torch.randn(2, 3, 16, 16)
    nbattr.attribute(m, x, steps=7, batch_size=1000)
    single_rows = sum(m.calls)
    m.calls.clear()
    r = nbattr.attribute(m, x, steps=7, batch_size=1000, target="top4")
    assert r.attributions.shape[1] == 4
    assert sum(m.calls) == single_rows == 2 + 2 + 7 * 2  # x, baselines, then the path: no repeat per target


def test_deeplift_takes_the_same_passes_for_all_targets() -> None:
    """The multipliers do not depend on the target: one recording (the problem's first forward)
    and one forward at the reference for K targets, then K backward passes."""
    m = CallCounter(cnn(1))
    x = torch.randn(2, 3, 16, 16)
    r = nbattr.attribute(m, x, method="deeplift", target="top4")
    assert m.calls == [2, 2] and r.attributions.shape == (2, 4, 3, 16, 16)
    assert r.delta.abs().max() < 1e-10
    m.calls.clear()
    nbattr.attribute(m, x, method="epsilon_lrp", target="top4")
    assert m.calls == [2, 2]


def test_multi_target_adaptive_steps_meet_the_tolerance_for_every_target() -> None:
    m = mlp(4, act=nn.Tanh)
    x = torch.randn(3, 6) * 3
    r = nbattr.attribute(m, x, steps="auto", tol=1e-4, target="top3")
    gap = (r.outputs - r.baseline_outputs).abs()
    floor = 1e-2 * torch.maximum(r.outputs.abs(), r.baseline_outputs.abs())
    assert (r.delta.abs() <= 1e-4 * torch.maximum(gap, floor) * (1 + 1e-9)).all()
    assert all(r.params["converged"])


class _NumpyBackward(torch.autograd.Function):
    """x -> x^3 whose backward leaves torch (numpy): it has no vmap rule."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        return torch.from_numpy(3 * x.detach().numpy() ** 2 * g.detach().numpy())


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
def test_batched_and_looped_backward_agree(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbattr.engine import problem

    m = cnn(3)
    x = torch.randn(2, 3, 16, 16)
    opts = {"steps": 5} if method == "integrated_gradients" else {"samples": 3}
    monkeypatch.setattr(problem, "BATCHED_BACKWARD_DEVICES", set())
    looped = nbattr.attribute(m, x, method=method, target="top3", **opts)
    monkeypatch.setattr(problem, "BATCHED_BACKWARD_DEVICES", {"cpu", "cuda"})
    batched = nbattr.attribute(m, x, method=method, target="top3", **opts)
    torch.testing.assert_close(batched.attributions, looped.attributions, rtol=1e-12, atol=1e-12)


def test_fallback_loop_when_backward_cannot_be_batched(monkeypatch: pytest.MonkeyPatch) -> None:
    from nbattr.engine import problem

    monkeypatch.setattr(problem, "BATCHED_BACKWARD_DEVICES", {"cpu", "cuda"})  # try the batched path first
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()

    def model(x: torch.Tensor) -> torch.Tensor:
        return lin(_NumpyBackward.apply(x))

    x = torch.randn(2, 4)
    r = nbattr.attribute(model, x, method="saliency", abs=False, target=[[0, 1], [2, 0]])
    for j, t in enumerate(([0, 2], [1, 0])):
        torch.testing.assert_close(r.attributions[:, j], lin.weight[t] * 3 * x**2)


def test_batched_backward_leaves_the_warning_filters_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The widget runs this on a worker thread: swapping the process's filters there (as
    ``warnings.catch_warnings`` does) would swallow the warnings of the user's cells meanwhile."""
    import warnings

    from nbattr.engine import problem

    monkeypatch.setattr(problem, "BATCHED_BACKWARD_DEVICES", {"cpu", "cuda"})
    seen: list[list] = []
    lin = nn.Linear(4, 3).double()

    def model(x: torch.Tensor) -> torch.Tensor:
        h = x * 2.0
        if h.requires_grad:
            h.register_hook(lambda g: seen.append(list(warnings.filters)))
        return lin(h)

    nbattr.attribute(model, torch.randn(2, 4), method="saliency", target="top2")  # lazy imports add filters
    seen.clear()
    before = list(warnings.filters)
    nbattr.attribute(model, torch.randn(2, 4), method="saliency", target="top2")
    assert seen and all(f == before for f in seen)


@pytest.mark.parametrize(
    "target,match",
    [
        (torch.tensor([[0, 1], [1, 2]]), "2 rows of targets for 3 examples"),
        ([[0, 1], [1, 9], [0, 0]], "target 9 is out of range"),
        ([[0, 1], [1], [0, 0]], "same K for every example"),
        (torch.tensor([[0.0, 1.0]] * 3), "integers"),
        (torch.zeros(3, 0, dtype=torch.long), "K = 0"),
        (torch.zeros(3, 2, 1, dtype=torch.long), "shape \\(3, 2, 1\\)"),
        ("top0", "K must lie in 1..4"),
        ("top5", "K must lie in 1..4"),
        ("best2", "not understood"),
    ],
)
def test_bad_targets_raise_target_error(target, match: str) -> None:
    with pytest.raises(nbattr.TargetError, match=match):
        nbattr.attribute(mlp(0), torch.randn(3, 6), method="saliency", target=target)


def test_several_targets_need_class_scores() -> None:
    def scalar(x: torch.Tensor) -> torch.Tensor:
        return x.sum(1)

    with pytest.raises(nbattr.TargetError, match=r"\(N, C\) outputs"):
        nbattr.attribute(scalar, torch.randn(2, 3), target=[[0, 0], [0, 0]])


def test_result_helpers() -> None:
    m = mlp(5)
    x = torch.randn(2, 6)
    r = nbattr.attribute(m, x, steps=4, target="top2")
    assert r.for_target(-1).target.tolist() == r.target[:, 1].tolist()
    with pytest.raises(IndexError, match="out of range for K = 2"):
        r.for_target(2)
    single = r.for_target(0)
    with pytest.raises(ValueError, match="several targets"):
        single.for_target(0)
    back = Attribution.stack(r.split())
    torch.testing.assert_close(back.attributions, r.attributions)
    torch.testing.assert_close(back.delta, r.delta)
    torch.testing.assert_close(back.path_outputs, r.path_outputs)
    assert "2 targets per example" in repr(r) and "delta=" in repr(r)
    # an unbatched example takes N = 1 lists of K targets
    u = nbattr.attribute(m, x[0], method="saliency", target=[[1, 3]])
    assert u.attributions.shape == (1, 2, 6) and u.params["unbatched"]


@pytest.mark.parametrize("method, opts", [("occlusion", {"window": (3, 4, 4)}),
                                          ("shapley_sampling", {"permutations": 4})])
def test_perturbation_methods_take_the_same_forwards_for_all_targets(method: str, opts: dict) -> None:
    """Every forward gives all K scores: top-4 costs the model rows of one target (it was 4x)."""
    m = CallCounter(cnn(1))
    x = torch.randn(2, 3, 16, 16)
    single = nbattr.attribute(m, x, method=method, batch_size=1000, **opts)
    one_target = list(m.calls)
    m.calls.clear()
    r = nbattr.attribute(m, x, method=method, batch_size=1000, target="top4", **opts)
    assert m.calls == one_target and sum(m.calls) > 4  # x, the baselines, the perturbations: once
    assert r.attributions.shape == (2, 4, 3, 16, 16)
    assert "from the same" in r.params["targets"]
    _same(r, single, 0)  # the first of the top 4 is the default target


def test_shapley_stderr_and_per_example_masks_per_target() -> None:
    """stderr is kept per target, and per-example groupings are spread per target, as in single runs."""
    m = mlp(5, act=nn.Tanh)
    x = torch.randn(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1]])
    targets = torch.tensor([[3, 0, 2], [1, 1, 3], [0, 2, 3]])
    for antithetic in (True, False):
        opts = {"permutations": 7, "feature_mask": mask, "seed": 3, "antithetic": antithetic}
        r = nbattr.attribute(m, x, method="shapley_sampling", target=targets, baseline=0.1, **opts)
        assert r.stderr.shape == (3, 3, 6) and r.delta.abs().max() < 1e-10
        for j in range(3):
            single = nbattr.attribute(m, x, method="shapley_sampling", target=targets[:, j], baseline=0.1, **opts)
            _same(r, single, j)
            torch.testing.assert_close(r.for_target(j).stderr, single.stderr, rtol=1e-10, atol=1e-14)


def test_a_method_without_a_native_path_runs_once_per_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered method not marked ``multi_target`` (a user's own) is looped over the targets."""
    method = register_looped_method(monkeypatch)
    m = mlp(3)
    x = torch.randn(2, 6)
    r = nbattr.attribute(m, x, method=method, target=[[0, 2], [1, 0]])
    assert "one run per target" in r.params["targets"] and r.attributions.shape == (2, 2, 6)
    for j, t in enumerate(([0, 1], [2, 0])):
        want = nbattr.attribute(m, x, method="saliency", abs=False, target=t).attributions
        torch.testing.assert_close(r.attributions[:, j], want)


@pytest.mark.parametrize("method, opts", [("occlusion", {}), ("shapley_sampling", {"permutations": 4})])
def test_perturbation_methods_several_targets_through_a_layer(method: str, opts: dict) -> None:
    """Token ids attributed over the embedding layer: per-token windows/groups, K targets at once."""
    t = text(0, vocab=10, classes=3)
    ids = torch.tensor([[1, 5, 7], [2, 2, 9]])
    r = nbattr.attribute(t, ids, layer=t.emb, method=method, target=[[0, 2], [1, 0]], **opts)
    assert r.attributions.shape == (2, 2, 3, 4)
    for j, tj in enumerate(([0, 1], [2, 0])):
        _same(r, nbattr.attribute(t, ids, layer=t.emb, method=method, target=tj, **opts), j)
