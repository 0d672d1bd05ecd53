"""The Q-Former on our Triton kernels (forced, under Triton's interpreter on the CPU) against the
torch path: same outputs and same gradients for every mask mode, with text padding."""
import os

import pytest
import torch

from blip2_fast.config import QFormerConfig
from blip2_fast.kernels import explain
from blip2_fast.models.qformer import QFormerModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)")


def _run(model, hidden, num_query, mode, pad, image, backend, monkeypatch):
    monkeypatch.setenv("BLIP2_FAST_BACKEND", backend)
    model.zero_grad()
    hidden = hidden.detach().clone().requires_grad_(True)
    image = image.detach().clone().requires_grad_(True)
    out = model(hidden, num_query, mode, key_padding_mask=pad, image_embeds=image)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), hidden.grad, image.grad, grads, explain("qformer_attention")["chosen"]


@pytest.mark.parametrize("mode", ["unimodal", "causal", "bidirectional"])
def test_triton_qformer_equals_torch_path(mode, monkeypatch):
    torch.manual_seed(0)
    cfg = QFormerConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=64,
                        encoder_hidden_size=40, use_qformer_text_input=True, cross_attention_frequency=1,
                        hidden_dropout_prob=0.0)
    model = QFormerModel(cfg).train()
    num_query, text = 5, 6
    hidden = torch.randn(3, num_query + text, 48)
    image = torch.randn(3, 9, 40)
    pad = torch.ones(3, num_query + text, dtype=torch.long)
    pad[1, num_query + 4:] = 0
    pad[2, num_query:] = 0  # a row whose text is all padding
    ref = _run(model, hidden, num_query, mode, pad, image, "torch", monkeypatch)
    got = _run(model, hidden, num_query, mode, pad, image, "triton", monkeypatch)
    assert ref[4] == "torch" and got[4].startswith("triton")
    real = pad.bool()
    assert (ref[0] - got[0])[real].abs().max() <= 1e-4
    for a, b in ((ref[1], got[1]), (ref[2], got[2])):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    assert ref[3].keys() == got[3].keys()
    for name, g in ref[3].items():
        assert (g - got[3][name]).norm() <= 1e-4 * max(g.norm(), 1.0), name
