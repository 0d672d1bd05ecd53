"""blip2_fast.kernels: functions only (DESIGN.md §4); nn.Modules live in blip2_fast/.

Each op file holds its Triton kernels, launcher, autograd.Function and a plain-torch
reference; the entry points below dispatch per call by the rule in `dispatch.py`.
"""
from .dispatch import BackendRefused, explain, forced_backend  # noqa: F401
