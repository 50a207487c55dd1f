import pytest
import torch


@pytest.fixture
def float64():
    """float64 as the default dtype for one test (closed-form checks need it), restored afterwards so
    that tests of float32 models elsewhere in the run see torch's default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
