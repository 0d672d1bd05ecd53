"""Helpers shared by the attention kernel tests: forward + backward of leaf copies, and the
two-tier tolerance (error against an fp64 reference at most twice plain PyTorch's error in the
same precision, plus a floor of a few ulps of the dtype at the reference's scale)."""
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# a few units in the last place at magnitude 1 (gradients cancel terms of magnitude ~ sqrt(D), hence
# more than one ulp in fp32); scaled by the reference's magnitude
FLOOR = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NAMES = ("out", "dq", "dk", "dv")


def fwd_bwd(fn, q, k, v, dout, *args):
    """Output and (dq, dk, dv) of fn(q, k, v, *args) for leaf copies of q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, *args)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def assert_two_tier(names, tested, eager, ref, dtype):
    """Each tested tensor: finite, and max error vs the fp64 ref <= 2 x eager's error + floor."""
    for name, t, e, r in zip(names, tested, eager, ref):
        assert torch.isfinite(t).all(), f"{name}: NaN or inf"
        if r.numel() == 0:
            continue
        err = (t.double() - r).abs().max().item()
        err_eager = (e.double() - r).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert err <= 2 * err_eager + floor, \
            f"{name}: max error {err:.3e} > 2 x eager's {err_eager:.3e} + floor {floor:.1e}"
