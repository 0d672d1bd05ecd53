import os

import pytest
import torch


@pytest.fixture
def backend(request, monkeypatch):
    """Force a backend family for the test; the Triton one needs CUDA or the interpreter."""
    name = request.param
    if name == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 set before triton is imported")
    monkeypatch.setenv("BLIP2_FAST_BACKEND", name)
    return name
