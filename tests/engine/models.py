"""Small seeded float64 models shared by the engine tests."""

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
