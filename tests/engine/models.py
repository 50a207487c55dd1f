"""Small models shared by the engine tests (the seeded ones in float64) and a check on the mode stack."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0, d_in: int = 6, hidden: int = 16, classes: int = 4, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, classes)).double().eval()


class SmallCNN(nn.Module):
    """conv -> relu -> avgpool -> conv -> relu -> global avg -> linear (no nn.Flatten: Captum's LRP rejects it)."""

    def __init__(self, classes: int = 5, channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(8 * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu1(self.conv1(x)))
        h = self.pool(self.relu2(self.conv2(h)))
        return self.fc(h.reshape(h.shape[0], -1))


def cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(classes).double().eval()


class TinyText(nn.Module):
    """embedding -> tanh -> mean over the tokens -> linear."""

    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 4)
        self.fc = nn.Linear(4, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


def text(seed: int = 0, vocab: int = 10, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return TinyText(vocab, classes).double().eval()


class CallCounter(nn.Module):
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.model(x)


def mode_stack_empty() -> bool:
    """No TorchFunctionMode is left active (the rule-based methods push one while they run)."""
    return len(torch.overrides._get_current_function_mode_stack()) == 0


class Flaky(nn.Module):
    """Raises on its n-th call."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.calls, self.fail_on = 0, fail_on
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = torch.sigmoid(self.fc1(x))
        if self.calls == self.fail_on:
            raise RuntimeError("boom")
        return self.fc2(h)


def register_looped_method(monkeypatch, name: str = "plain_gradient") -> str:  # noqa: ANN001
    """Register, for one test, a method without a native multi-target path (every built-in method
    has one): the plain input gradient of the target score, in one chunked gradient pass (which
    reports progress and can be cancelled). Returns its name."""
    from nbattr.engine import registry

    def plain_gradient(p, *, scale: float = 1.0):  # noqa: ANN001, ANN202
        out = torch.empty_like(p.inputs)

        def consume(idx, _rows, _s, g):  # noqa: ANN001, ANN202
            out[idx] = g

        p.gradient_pass(p.n, lambda idx: (p.inputs[idx], idx), consume)
        return p.result(name, scale * out)

    monkeypatch.setitem(registry._METHODS, name, registry.MethodInfo(name, "test", plain_gradient, {"scale": 1.0}))
    return name
