"""The widget computes on a worker thread while the kernel keeps using the same model: calls that
overlap in time must neither see each other's hooks nor leave the model changed."""

from __future__ import annotations

import threading

import torch
from torch import nn

import nbattr
from nbattr.engine.guard import model_guard


class Blocking(nn.Module):
    """Embedding + linear whose forward waits on an event when asked (to hold a call open)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)
        self.entered, self.release, self.block = threading.Event(), threading.Event(), False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        if self.block and threading.current_thread().name == "worker":
            self.entered.set()
            assert self.release.wait(30)
        return self.fc(h.mean(1))


def test_overlapping_guards_in_two_threads_restore_requires_grad():
    model = nn.Linear(3, 2)
    inside, leave = threading.Event(), threading.Event()

    def worker():
        with model_guard(model):
            inside.set()
            assert leave.wait(30)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(30)
    with model_guard(model):  # opened while the worker's guard is open...
        assert not model.weight.requires_grad
        leave.set()
        t.join(30)  # ...which closes first
        assert not model.weight.requires_grad  # this call is still running
    assert model.weight.requires_grad and model.bias.requires_grad


def test_layer_attribution_on_a_worker_does_not_touch_the_users_forward():
    model = Blocking().eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = model(ids).clone()
    model.block = True
    out: dict = {}

    def worker():
        out["r"] = nbattr.attribute(model, ids, method="saliency", layer=model.embedding, batch_size=1)

    t = threading.Thread(target=worker, name="worker")
    t.start()
    try:
        assert model.entered.wait(30)  # the worker is inside a forward with its layer hooks active
        with torch.no_grad():
            seen = model(torch.tensor([[5, 6, 7, 8]]))
            again = model(ids)
        torch.testing.assert_close(again, expected)  # the worker's replaced layer output stayed its own
        assert seen.shape == (1, 3)
    finally:
        model.release.set()
        t.join(30)
    assert out["r"].attributions.shape == (1, 4, 4)
    assert all(p.requires_grad for p in model.parameters())
    assert not model.embedding._forward_hooks
