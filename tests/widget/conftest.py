import pytest
import torch
from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(16, classes),
        )

    def forward(self, x):
        return self.body(x)


class TinyText(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def image():
    g = torch.Generator().manual_seed(1)
    return torch.rand(3, 16, 16, generator=g)


@pytest.fixture
def text_model():
    torch.manual_seed(0)
    return TinyText().eval()
