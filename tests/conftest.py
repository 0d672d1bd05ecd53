"""Test session set-up. Triton's interpreter must be chosen before triton is imported:
on a machine without CUDA every Triton kernel test runs under TRITON_INTERPRET=1."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)
