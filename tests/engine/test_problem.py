"""Bad input gets a named error; the user's model is left exactly as found."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbattr
from nbattr.engine.batching import PROBE_ROWS, run_chunked
from nbattr.engine.guard import model_guard
from nbattr.engine.problem import Problem

from .models import cnn, mlp

pytestmark = pytest.mark.usefixtures("float64")


def test_non_float_input() -> None:
    with pytest.raises(nbattr.InputError, match="floating-point"):
        nbattr.attribute(mlp(), torch.ones(2, 6, dtype=torch.long))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_input(bad: float) -> None:
    x = torch.randn(2, 6)
    x[1, 3] = bad
    with pytest.raises(nbattr.InputError, match="NaN or Inf"):
        nbattr.attribute(mlp(), x)


def test_wrong_rank_names_shapes() -> None:
    with pytest.raises(nbattr.InputError, match=r"failed on x of shape \(2, 3, 6, 2\).*shapes cannot be multiplied"):
        nbattr.attribute(mlp(), torch.randn(2, 3, 6, 2))
    with pytest.raises(nbattr.InputError, match="0-d"):
        nbattr.attribute(mlp(), torch.tensor(1.0))
    with pytest.raises(nbattr.InputError, match=r"x of shape \(0, 6\) is empty"):
        nbattr.attribute(mlp(), torch.randn(0, 6))
    with pytest.raises(nbattr.InputError, match=r"path\(0\) returned NoneType; path\(alpha\) must return"):
        nbattr.attribute(mlp(), torch.randn(2, 6), path=lambda a: None)

    def three_d(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None]

    with pytest.raises(nbattr.InputError, match=r"expected \(N, C\) or \(N,\)"):
        nbattr.attribute(three_d, torch.randn(2, 6))
    with pytest.raises(nbattr.InputError, match=r"shape \(2, 0\): no scores to attribute"):
        nbattr.attribute(lambda x: x[:, :0], torch.randn(2, 6))


@pytest.mark.parametrize("target", [4, -1, [0, 9]])
def test_target_out_of_range(target) -> None:
    with pytest.raises(nbattr.TargetError, match="out of range"):
        nbattr.attribute(mlp(), torch.randn(2, 6), target=target)


def test_target_wrong_count_and_type() -> None:
    with pytest.raises(nbattr.TargetError, match="3 entries for 2 examples"):
        nbattr.attribute(mlp(), torch.randn(2, 6), target=[0, 1, 2])
    with pytest.raises(nbattr.TargetError, match="integers"):
        nbattr.attribute(mlp(), torch.randn(2, 6), target=torch.tensor([0.5, 1.0]))


def test_no_gradient_path() -> None:
    def constant(x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 3)

    with pytest.raises(nbattr.NoGradientPathError, match="no gradient path"):
        nbattr.attribute(constant, torch.randn(2, 6))

    def detached(x: torch.Tensor) -> torch.Tensor:
        return x.detach() @ torch.ones(6, 2)

    with pytest.raises(nbattr.NoGradientPathError):
        nbattr.attribute(detached, torch.randn(2, 6), method="saliency")


def test_baseline_shape_mismatch() -> None:
    with pytest.raises(nbattr.InputError, match="does not broadcast"):
        nbattr.attribute(mlp(), torch.randn(2, 6), baseline=torch.zeros(5))
    with pytest.raises(nbattr.InputError, match="unknown baseline"):
        nbattr.attribute(mlp(), torch.randn(2, 6), baseline="black")
    with pytest.raises(nbattr.InputError, match="'blur' baseline needs"):
        nbattr.attribute(mlp(), torch.randn(2, 6), baseline="blur")


def test_unbatched_example_rule() -> None:
    m = mlp(1)
    row = torch.randn(6)
    r = nbattr.attribute(m, row)
    assert r.attributions.shape == (1, 6) and r.params["unbatched"] is True
    torch.testing.assert_close(r.attributions, nbattr.attribute(m, row[None]).attributions)
    c = cnn(1)
    img = torch.randn(3, 16, 16)
    r = nbattr.attribute(c, img, method="saliency")
    assert r.attributions.shape == (1, 3, 16, 16) and r.params["unbatched"] is True


def test_scalar_output_models_ignore_target() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return (x**2).sum(1)

    x = torch.randn(3, 4)
    r = nbattr.attribute(f, x, target=7)
    assert (r.target == 0).all()
    torch.testing.assert_close(r.attributions, x**2, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- hygiene
def _state(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                   len(getattr(m, "_backward_pre_hooks", {}))) for m in model.modules()],
    }


def _same(a: dict, b: dict) -> None:
    assert a["training"] == b["training"] and a["requires_grad"] == b["requires_grad"]
    assert a["hooks"] == b["hooks"]
    for u, v in zip(a["grad"], b["grad"]):
        assert (u is None and v is None) or torch.equal(u, v)
    for u, v in zip(a["params"] + a["buffers"], b["params"] + b["buffers"]):
        assert torch.equal(u, v)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)
        self.explode_after = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.explode_after is not None and self.calls > self.explode_after:
            raise RuntimeError("boom")
        return self.out(torch.relu(self.bn(self.fc(x))))


@pytest.mark.filterwarnings("ignore:the model is in training mode")
@pytest.mark.parametrize("method", ["saliency", "gradient_x_input", "integrated_gradients",
                                    "interior_gradients", "smoothgrad"])
@pytest.mark.parametrize("train", [False, True])
def test_model_state_unchanged_after_success(method: str, train: bool) -> None:
    m = BNNet().double().train(train)
    m.out.weight.grad = torch.ones_like(m.out.weight)  # a user's gradient must survive
    m.fc.bias.requires_grad_(False)  # and a user's frozen parameter stays frozen
    before = _state(m)
    layer = m.fc if method == "integrated_gradients" else None
    nbattr.attribute(m, torch.randn(4, 6), method=method, layer=layer, steps=4)
    _same(before, _state(m))


@pytest.mark.filterwarnings("ignore:the model is in training mode")
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad"])
def test_model_state_unchanged_after_model_raises(method: str) -> None:
    m = BNNet().double().train()
    before = _state(m)
    m.explode_after = 2  # the first forwards succeed, the gradient pass raises mid-way
    with pytest.raises(RuntimeError, match="boom"):
        nbattr.attribute(m, torch.randn(4, 6), method=method, steps=4, layer=m.fc, batch_size=2)
    _same(before, _state(m))
    m.explode_after = None
    assert m(torch.randn(4, 6)).shape == (4, 3)


def test_training_mode_warning() -> None:
    m = BNNet().double().train()
    with pytest.warns(nbattr.TrainingModeWarning, match="training mode"):
        nbattr.attribute(m, torch.randn(4, 6), method="saliency")


def test_run_chunked_rejects_bad_batch_size_and_retries_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        run_chunked(3, lambda s: None, batch_size=0)
    seen: list[int] = []

    class FakeOOM(RuntimeError):
        pass

    def work(sl: slice) -> None:
        n = sl.stop - sl.start
        if n > 2:
            raise FakeOOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(n)

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    run_chunked(7, work, batch_size=8, device=torch.device("cuda"))
    assert sum(seen) == 7 and max(seen) <= 2
    with pytest.raises(FakeOOM):  # on CPU nothing is retried
        run_chunked(7, work, batch_size=8)


def test_run_chunked_without_gradients_needs_no_probe_chunk() -> None:
    """Work under no_grad saves nothing for backward: "auto" sizes the chunks at once (a first
    chunk of PROBE_ROWS rows would measure nothing); gradient work still starts with the probe."""
    seen: list[int] = []
    stats: dict = {}
    run_chunked(70, lambda s: seen.append(s.stop - s.start), row_bytes=1000, saves=False, stats=stats)
    assert seen == [32, 32, 6] and stats["chunks"] == seen
    seen.clear()
    run_chunked(70, lambda s: seen.append(s.stop - s.start), row_bytes=1000)
    assert seen[0] == PROBE_ROWS and sum(seen) == 70
    seen.clear()
    run_chunked(10, lambda s: seen.append(s.stop - s.start), row_bytes=2**29, saves=False)
    assert seen == [2] * 5  # a 1 GiB budget at 512 MiB a row


def test_the_probe_chunk_leaves_the_weights_out() -> None:
    """With its weight frozen (as under the guard), a Linear saves the weight for the input's
    gradient, and the ReLU its output: only the output is per row. Counted with the weight, a
    large layer and a small input would make every chunk needlessly small."""
    lin = nn.Linear(256, 256).double().requires_grad_(False)
    x = torch.randn(40, 256, dtype=torch.float64)

    def work(sl: slice) -> None:
        z = x[sl].clone().requires_grad_(True)
        torch.relu(lin(z))

    stats: dict = {}
    run_chunked(40, work, stats=stats, exclude={lin.weight.untyped_storage().data_ptr()})
    assert stats["row_bytes"] == 256 * 8 and stats["chunks"] == [PROBE_ROWS, 32, 4]
    run_chunked(40, work, stats=stats)
    assert stats["row_bytes"] == 256 * 8 + lin.weight.numel() * 8 // PROBE_ROWS


def test_gradient_passes_probe_without_the_weights() -> None:
    """IG on more examples than the first forward measures: the probe chunk of the path leaves
    out the model's weights (the first forward's measure does too)."""
    m = nn.Sequential(nn.Linear(6, 512), nn.ReLU(), nn.Linear(512, 3)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    with model_guard(m):
        p = Problem(m, x, measure=True)
        assert p.saved_row_bytes is None  # > PROBE_ROWS: the path's first chunk measures
        p.gradient_pass(8 * 4, lambda idx: (x[idx // 4], idx // 4), lambda *a: None)
    # the ReLU's output (512 float64, shared with the second Linear), the inputs and the gradient
    # the chunk holds (2 x 6 float64) and the target's indices; not the 41 KB of weights (10 KB a
    # row over the 4 rows of the probe)
    assert 512 * 8 + 2 * 6 * 8 <= p.stats["row_bytes"] <= 512 * 8 + 2 * 6 * 8 + 64


def test_occlusion_runs_its_first_chunk_full() -> None:
    m = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    r = nbattr.attribute(m, torch.rand(2, 3, 4, 4), method="occlusion", window=1, target=0)
    assert r.params["chunks"][0] == 32 and sum(r.params["chunks"]) == 2 * 16


def test_gradient_methods_size_chunks_from_the_first_forward() -> None:
    """IG, interior gradients and SmoothGrad on a few examples: the first forward at x counts the
    bytes autograd saves per example (without the weights, which are not per row), so the path
    runs in full chunks from the start; the result equals a fixed batch size's."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 512), nn.ReLU(), nn.Linear(512, 3)).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    for method, kw in [("integrated_gradients", {"steps": 16}), ("interior_gradients", {"steps": 15}),
                       ("smoothgrad", {"samples": 16, "seed": 1})]:
        r = nbattr.attribute(m, x, method=method, target=0, **kw)
        assert r.params["chunks"] == [32], (method, r.params["chunks"])
        fixed = nbattr.attribute(m, x, method=method, target=0, batch_size=5, **kw)
        torch.testing.assert_close(r.attributions, fixed.attributions)
    with model_guard(m):  # as in attribute(): no parameter needs a gradient
        p = Problem(m, x, measure=True)
    # per example: the ReLU's output, which the second Linear saves too (one storage, 512 float64),
    # not the 512x6 + 3x512 weights (37 KB) that the graph also holds
    assert p.saved_row_bytes == 512 * 8
    assert Problem(m, torch.randn(8, 6, dtype=torch.float64), measure=True).saved_row_bytes is None  # > PROBE_ROWS


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency"])
def test_a_first_forward_with_grad_that_runs_out_of_memory_is_redone_without(method: str) -> None:
    """Measuring (IG) or keeping the graph (saliency) makes the first forward hold activations;
    when that does not fit, the plain forward without grad takes its place."""

    class Tight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.tries = nn.Linear(6, 3), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_grad_enabled() and x.shape[0] == 2 and self.tries == 0:
                self.tries += 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (simulated)")
            return self.fc(x)

    m = Tight()
    x = torch.randn(2, 6)
    r = nbattr.attribute(m, x, method=method, steps=4, target=0)
    assert m.tries == 1
    torch.testing.assert_close(r.attributions, nbattr.attribute(m.fc, x, method=method, steps=4, target=0).attributions)


def test_layer_attribution_sizes_chunks_from_the_first_forward() -> None:
    """With ``layer`` the first forward differentiates by the layer's output (a hook hands the rest
    of the model a leaf that requires grad) and counts what is saved after it."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 16)
    m = nn.Sequential(emb, nn.Flatten(), nn.Linear(5 * 16, 64), nn.Tanh(), nn.Linear(64, 3))
    ids = torch.randint(0, 20, (2, 5))
    r = nbattr.attribute(m, ids, layer=emb, steps=16, target=0)
    assert r.params["chunks"] == [32]
    fixed = nbattr.attribute(m, ids, layer=emb, steps=16, target=0, batch_size=7)
    torch.testing.assert_close(r.attributions, fixed.attributions)
    assert r.delta.abs().max() < 1e-4
    with model_guard(m):
        p = Problem(m, ids, layer=emb, measure=True)
    # per row: tanh's output (64 values; the Linears, whose weights need no gradient, save no input)
    assert p.saved_row_bytes == 64 * emb.weight.element_size()
    assert not p.inputs.requires_grad and p.logits.grad_fn is None


def test_a_model_error_on_the_batch_is_not_hidden_by_the_unbatched_retry() -> None:
    class FailsOnce(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.calls = nn.Linear(6, 3), 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("boom")
            return self.fc(x)  # x[None] would give (1, 2, 3)

    with pytest.raises(RuntimeError, match="boom"):
        nbattr.attribute(FailsOnce(), torch.rand(2, 6), method="saliency")


class InPlaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.relu_()
        return self.fc(x)


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "deeplift", "epsilon_lrp",
                                    "occlusion", "shapley_sampling"])
def test_a_model_working_in_place_on_its_input_leaves_the_callers_x_alone(method):
    torch.manual_seed(0)
    model = InPlaceOnInput().eval()
    x = torch.randn(3, 4)
    before = x.clone()
    r = nbattr.attribute(model, x, method=method)
    assert torch.equal(x, before)
    assert torch.equal(r.inputs, before)
    torch.testing.assert_close(r.outputs, model(before.clone()).gather(1, r.target[:, None])[:, 0])


class ViewsItsInput(nn.Module):
    """A CNN that flattens a convolution's output with ``view``: impossible on a channels-last
    tensor (its strides do not allow it), so it needs the usual layout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "deeplift", "occlusion"])
def test_images_go_to_the_model_channels_last_with_the_same_result(method, monkeypatch):
    from nbattr.engine import problem

    model = cnn(0)
    seen: list[bool] = []
    model.register_forward_pre_hook(lambda _m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(3, 3, 16, 16)
    opts = {"steps": 8} if method == "integrated_gradients" else {"window": 2} if method == "occlusion" else {}
    r = nbattr.attribute(model, x, method=method, **opts)
    assert r.params.get("channels_last") is True and seen and all(seen)
    monkeypatch.setattr(problem, "CHANNELS_LAST_DEVICES", set())
    seen.clear()
    plain = nbattr.attribute(model, x, method=method, **opts)
    assert "channels_last" not in plain.params and not any(seen)
    torch.testing.assert_close(r.attributions, plain.attributions, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.outputs, plain.outputs, rtol=1e-12, atol=1e-12)


def test_a_model_that_needs_the_usual_layout_gets_it():
    model = ViewsItsInput().eval()
    x = torch.randn(2, 3, 8, 8)
    r = nbattr.attribute(model, x, method="integrated_gradients", steps=6)
    assert model.layouts[0] and not any(model.layouts[1:])  # tried once, then the usual layout
    assert "channels_last" not in r.params
    assert r.delta.abs().max() < 1e-2
    model.layouts.clear()
    nbattr.attribute(model, x, method="saliency")
    assert model.layouts and not any(model.layouts)  # remembered: not tried again on this model


@pytest.mark.parametrize("method", ["saliency", "gradient_x_input"])
def test_a_few_rows_take_one_forward_for_the_gradient_at_x(method):
    """Up to PROBE_ROWS examples the problem's first forward keeps its graph: one forward and one
    backward in all, and the same result as the chunked pass."""
    from .models import CallCounter

    model = CallCounter(cnn(1))
    x = torch.randn(3, 3, 16, 16)
    r = nbattr.attribute(model, x, method=method, target="top2")
    assert model.calls == [3]
    model.calls.clear()
    chunked = nbattr.attribute(model, x, method=method, target="top2", batch_size=1)
    assert model.calls == [3, 1, 1, 1]  # untaped first forward, then one chunk per row
    torch.testing.assert_close(r.attributions, chunked.attributions, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.outputs, chunked.outputs, rtol=1e-12, atol=1e-14)
    assert r.params["chunks"] == [3]
    model.calls.clear()
    nbattr.attribute(model, torch.randn(9, 3, 16, 16), method=method)
    assert model.calls == [9, 4, 5]  # more rows: the first forward keeps no graph


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad"])
def test_non_finite_attributions_are_not_handed_over_silently(method: str) -> None:
    """The inputs are checked finite, but a model's gradient can still be inf or NaN (sqrt at 0):
    the result warns, naming the method and the count, at the caller's line."""
    def model(x):
        return torch.sqrt(x).sum(1)

    x = torch.tensor([[0.0, 1.0, 4.0]])
    with pytest.warns(nbattr.NonFiniteWarning, match=rf"{method}: 1 of 3 attributions are not finite") as seen:
        kw = {"samples": 2, "noise_level": 0.0} if method == "smoothgrad" else {}
        nbattr.attribute(model, x, method=method, **kw)
    assert all(w.filename == __file__ for w in seen)


class _WithLogits:
    """Like a Hugging Face ``ModelOutput``: scores under ``.logits``."""

    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize(("wrap", "hint"), [
    (lambda s: (s, s * 2), r"tuple: pass `lambda x: model\(x\)\[0\]` as the model"),
    (lambda s: {"scores": s}, r"dict: pass `lambda x: model\(x\)\['scores'\]` as the model"),
    (_WithLogits, r"_WithLogits: pass `lambda x: model\(x\).logits` as the model"),
    (lambda s: None, r"returned NoneType$"),
])
@pytest.mark.parametrize("shape", [(2, 4), (1, 3, 4, 4)])  # the second tries channels-last first
def test_a_model_returning_no_tensor_is_told_how_to_get_the_scores(wrap, hint, shape) -> None:
    lin = nn.Linear(shape[-1], 3)

    def model(x):
        return wrap(lin(x).flatten(1))

    for method in ("saliency", "integrated_gradients", "deeplift"):
        with pytest.raises(nbattr.InputError, match=hint):
            nbattr.attribute(model, torch.randn(shape), method=method)


class SharedEmbedding(nn.Module):
    """As Hugging Face's T5 and BART: ``shared`` holds the weight, the encoder calls its own module."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(10, 4)
        self.encoder = nn.ModuleDict({"embed_tokens": nn.Embedding(10, 4)})
        self.encoder["embed_tokens"].weight = self.shared.weight
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder["embed_tokens"](ids).mean(1))


def test_a_layer_the_model_does_not_call_names_the_modules_sharing_its_weight() -> None:
    m = SharedEmbedding().double().eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(nbattr.InputError, match=r"not called .* shares its weight with encoder.embed_tokens"):
        nbattr.attribute(m, ids, layer=m.shared)
    r = nbattr.attribute(m, ids, layer=m.encoder["embed_tokens"], steps=8)
    assert r.attributions.shape == (2, 3, 4)
    with pytest.raises(nbattr.InputError, match=r"not called by the model's forward; pass a module that the model "
                                                r"uses$"):
        nbattr.attribute(m, ids, layer=nn.Embedding(10, 4))  # no sharing: no hint


def test_cpu_chunks_keep_the_widest_activation_within_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """batch_size='auto' on CPU: at most CPU_MAX_ROWS rows, fewer where a row's widest saved
    activation would not let the chunk's fit CPU_CACHE_BYTES, never below CPU_MIN_ROWS."""
    from nbattr.engine import batching

    monkeypatch.setattr(batching, "CPU_CACHE_BYTES", 1 << 20)
    assert batching.cpu_row_cap(None) == batching.CPU_MAX_ROWS
    assert batching.cpu_row_cap(1 << 10) == batching.CPU_MAX_ROWS
    assert batching.cpu_row_cap(100 << 10) == 10
    assert batching.cpu_row_cap(1 << 20) == batching.CPU_MIN_ROWS

    def wide(width: int) -> nn.Module:  # one activation of `width` floats per row
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3)).double().eval()

    x = torch.randn(3, 6)
    narrow = nbattr.attribute(wide(16), x, steps=40)
    assert max(narrow.params["chunks"]) == batching.CPU_MAX_ROWS  # 128 bytes per row
    r = nbattr.attribute(wide(12800), x, steps=40)  # 100 KiB per row: 10 rows per chunk
    assert max(r.params["chunks"]) == 10, r.params["chunks"]
    occ = nbattr.attribute(wide(12800), x, method="occlusion", window=1)  # no gradients: the first forward measured it
    assert max(occ.params["chunks"]) == 10, occ.params["chunks"]
    big = nbattr.attribute(wide(12800), torch.randn(8, 6), steps=40)  # > PROBE_ROWS examples: the probe chunk measures
    assert max(big.params["chunks"]) == 10, big.params["chunks"]
    torch.testing.assert_close(r.attributions, nbattr.attribute(wide(12800), x, steps=40, batch_size=120).attributions)


class _EmbedShift(nn.Module):
    """Token ids -> embedding, shifted by 0.5 (in place, as ``e += pos``, or not) -> tanh -> mean -> linear."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc, self.in_place = nn.Embedding(10, 4), nn.Linear(4, 3), in_place

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.emb(ids)
        if self.in_place:
            e += 0.5
        else:
            e = e + 0.5
        return self.fc(torch.tanh(e).mean(1))


@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "smoothgrad", "occlusion",
                                    "shapley_sampling", "deeplift", "epsilon_lrp"])
def test_a_layer_output_changed_in_place_afterwards(method: str) -> None:
    """The attributed values are the layer's output as it left the layer, whatever the model does to
    that tensor next: in place, the first forward's capture crashed (a leaf changed in place) or
    kept the changed values (DeepLIFT's delta 0.22, r.inputs off by 0.5)."""
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    a, b = _EmbedShift(True).double(), _EmbedShift(False).double()
    ra = nbattr.attribute(a, ids, layer=a.emb, method=method)
    rb = nbattr.attribute(b, ids, layer=b.emb, method=method)
    torch.testing.assert_close(ra.inputs, rb.inputs)
    torch.testing.assert_close(ra.attributions, rb.attributions)
    if ra.delta is not None and method != "integrated_gradients":
        assert float(ra.delta.abs().max()) < 1e-10


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "lime"}, "unknown attribution method 'lime'"),
    ({"steps": 0}, r"steps must be a positive int \(or 'auto'"),
    ({"steps": "Auto"}, r"or 'auto'"),
    ({"rule": "simpson"}, "unknown quadrature rule 'simpson'"),
    ({"batch_size": True}, "batch_size must be a positive int"),
    ({"method": "smoothgrad", "noise_level": float("nan")}, "noise_level must be a finite number"),
    ({"method": "smoothgrad", "noise_level": float("inf")}, "noise_level must be a finite number"),
    ({"method": "smoothgrad", "samples": True}, "samples must be a positive int"),
])
def test_bad_options_are_named_input_errors(kwargs: dict, match: str) -> None:
    """nbattr's own InputError (still a ValueError) naming the option: they were bare ValueErrors,
    and NaN/inf noise or True as a count went through."""
    with pytest.raises(nbattr.InputError, match=match):
        nbattr.attribute(mlp(0), torch.randn(2, 6, dtype=torch.float64), **kwargs)


def test_an_infinite_score_at_the_baseline_is_warned() -> None:
    """log(sum(x^2)) with a zero baseline: F(x') = -inf, delta = -inf; no relative check of delta
    catches inf, so the scores are checked themselves."""

    class LogNorm(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log((x * x).sum(1))

    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(nbattr.NonFiniteWarning, match="score at the baseline is not finite for 2 of 2"):
        r = nbattr.attribute(LogNorm(), x, steps=8)
    assert torch.isinf(r.baseline_outputs).all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", nbattr.NonFiniteWarning)
        nbattr.attribute(LogNorm(), x, steps=8, baseline=0.5)  # a finite baseline: no such warning
