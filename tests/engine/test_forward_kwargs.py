"""``forward_kwargs``: keyword arguments of every model call, per-example tensors indexed with the
rows (Captum's ``additional_forward_args``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nbattr

from .models import text

pytestmark = pytest.mark.usefixtures("float64")


class Scaled(nn.Module):
    """F(x)_c = sum_f w_cf x_f s_f + shift: linear in x with per-example scales s (N, F)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(3, 5))

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        assert scale.shape == x.shape, (scale.shape, x.shape)
        return (x * scale) @ self.w.T + shift


METHODS = {
    "integrated_gradients": {"steps": 7},
    "integrated_gradients_auto": {"steps": "auto"},
    "gradient_x_input": {},
    "deeplift": {},
    "epsilon_lrp": {},
    "occlusion": {"window": 1},
    "shapley_sampling": {"permutations": 2},
}


@pytest.mark.parametrize("method", list(METHODS))
def test_per_example_tensors_follow_their_rows(method: str) -> None:
    """Linear model: every method gives w_tf s_f (x_f - x'_f) exactly, with the example's own s."""
    model = Scaled().eval()
    x, scale = torch.randn(4, 5), torch.rand(4, 5) + 0.5
    r = nbattr.attribute(model, x, method=method.removesuffix("_auto"), target=[0, 1, 2, 1],
                         baseline="zeros", forward_kwargs={"scale": scale, "shift": 2.0},
                         **METHODS[method])
    expected = model.w.detach()[r.target] * scale * x
    torch.testing.assert_close(r.attributions, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.outputs, model(x, scale, 2.0)[torch.arange(4), r.target])


def test_per_example_tensors_with_several_targets_and_small_chunks() -> None:
    model = Scaled().eval()
    x, scale = torch.randn(3, 5), torch.rand(3, 5) + 0.5
    r = nbattr.attribute(model, x, target="top2", steps=9, batch_size=4, forward_kwargs={"scale": scale})
    for j in range(2):
        expected = model.w.detach()[r.target[:, j]] * scale * x
        torch.testing.assert_close(r.attributions[:, j], expected, rtol=1e-9, atol=1e-12)


def test_other_arguments_are_passed_as_they_are() -> None:
    """A tensor without one row per example (here (1, F), broadcast) and numbers are not indexed."""

    def model(x: torch.Tensor, w: torch.Tensor, p: int) -> torch.Tensor:
        assert w.shape == (1, 5)
        return (x * w).pow(p).sum(-1, keepdim=True)

    x, w = torch.rand(4, 5) + 0.1, torch.rand(1, 5)
    r = nbattr.attribute(model, x, forward_kwargs={"w": w, "p": 2}, steps=40)
    torch.testing.assert_close(r.attributions, (x * w) ** 2, rtol=1e-6, atol=1e-9)  # IG of a square


def test_a_text_model_with_a_padding_mask_over_its_embeddings() -> None:
    """A mask (N, L) with layer=: the same attributions as one example at a time."""
    model = text(3)

    def masked(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(model.emb(ids)) * mask[..., None]
        return model.fc(h.sum(1) / mask.sum(1, keepdim=True))

    ids = torch.tensor([[1, 4, 2, 7], [3, 3, 0, 0], [5, 1, 6, 0]])
    mask = (ids != 0).to(torch.get_default_dtype())
    for method in ("integrated_gradients", "deeplift", "occlusion"):
        opts = {"window": 1} if method == "occlusion" else {}
        r = nbattr.attribute(masked, ids, method=method, layer=model.emb, forward_kwargs={"mask": mask}, **opts)
        for i in range(3):
            one = nbattr.attribute(masked, ids[i:i + 1], method=method, layer=model.emb, target=r.target[i:i + 1],
                                   forward_kwargs={"mask": mask[i:i + 1]}, **opts)
            torch.testing.assert_close(r.attributions[i:i + 1], one.attributions, rtol=1e-9, atol=1e-12)
        assert r.attributions[1, 2:].abs().max() == 0  # masked positions get nothing
        # one example without its batch dimension, its mask too (the mask stayed (L,) and the model
        # failed with its own IndexError)
        single = nbattr.attribute(masked, ids[1], method=method, layer=model.emb, target=int(r.target[1]),
                                  forward_kwargs={"mask": mask[1]}, **opts)
        torch.testing.assert_close(single.attributions, r.attributions[1:2], rtol=1e-9, atol=1e-12)


def test_a_closed_over_per_example_tensor_gets_a_hint() -> None:
    model = Scaled().eval()
    x, scale = torch.randn(2, 5), torch.rand(2, 5)
    with pytest.raises(AssertionError) as info:
        nbattr.attribute(lambda z: model(z, scale), x, steps=8)
    assert any("forward_kwargs=" in n and "failed on a batch of 16 rows" in n
               for n in getattr(info.value, "__notes__", [])), getattr(info.value, "__notes__", None)


@pytest.mark.parametrize("bad", [[1, 2], {1: "a"}, "mask"])
def test_forward_kwargs_must_be_a_dict_of_names(bad) -> None:
    with pytest.raises(nbattr.InputError, match="forward_kwargs must be a dict"):
        nbattr.attribute(Scaled(), torch.randn(2, 5), forward_kwargs=bad)
