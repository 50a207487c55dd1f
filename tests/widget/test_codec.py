import numpy as np
import pytest
import torch

from nbattr.widget import codec


def test_round_trip_float32_dtype_shape():
    a = torch.randn(2, 5, 7, dtype=torch.float64)
    wire = codec.encode(a)
    assert wire["dtype"] == "float32" and wire["shape"] == [2, 5, 7]
    assert isinstance(wire["view"], memoryview) and wire["view"].nbytes == 2 * 5 * 7 * 4
    back = codec.decode(wire)
    assert back.dtype == np.float32 and back.shape == (2, 5, 7)
    np.testing.assert_allclose(back, a.numpy().astype(np.float32))


def test_non_contiguous_input_is_made_c_contiguous():
    a = np.arange(12, dtype=np.float64).reshape(3, 4).T  # Fortran-ordered view
    back = codec.decode(codec.encode(a))
    np.testing.assert_array_equal(back, a)


def test_decode_honours_byte_offset():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    wire = codec.encode(a)
    padded = b"\x00" * 8 + bytes(wire["view"])
    back = codec.decode({"view": memoryview(padded), "dtype": "float32", "shape": [2, 3]}, byte_offset=8)
    np.testing.assert_array_equal(back, a)


def test_non_finite_values_become_zero_and_bad_dtype_raises():
    back = codec.decode(codec.encode(np.array([1.0, np.nan, np.inf])))
    np.testing.assert_array_equal(back, [1.0, 0.0, 0.0])
    with pytest.raises(ValueError):
        codec.encode(np.zeros(2), "float64")


def test_frames_one_uint8_buffer_with_per_frame_scales():
    f = np.stack([np.linspace(-3, 3, 20), np.linspace(0, 0.01, 20), np.zeros(20)]).reshape(3, 4, 5)
    wire = codec.encode_frames(f)
    assert wire["dtype"] == "uint8" and wire["shape"] == [3, 4, 5]
    assert wire["view"].nbytes == 60
    assert wire["scales"] == pytest.approx([3.0, 0.01, 0.0])
    back = codec.decode_frames(wire)
    for k in range(3):
        tol = wire["scales"][k] / 127 + 1e-12
        np.testing.assert_allclose(back[k], f[k], atol=tol)


def test_image_encoding_is_rgba_uint8():
    img = torch.rand(3, 8, 6)
    wire = codec.encode_image(img)
    assert wire["dtype"] == "uint8" and wire["shape"] == [8, 6, 4]
    back = codec.decode(wire)
    assert back[..., 3].min() == 255 and back[..., :3].max() == 255 and back[..., :3].min() == 0
    gray = codec.decode(codec.encode_image(np.zeros((5, 5), np.uint8)))
    assert gray.shape == (5, 5, 4)
