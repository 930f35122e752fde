"""Test-process set-up. Runs before any test module imports torch, numpy or our kernels.

- TRITON_INTERPRET=1: Triton reads it when a kernel is decorated, so it must be set before
  `kernels.attention` / `kernels.layernorm` are imported; CI has no GPU, so every Triton test
  runs in the interpreter.
- One BLAS/OpenMP thread: the interpreter issues many tiny numpy ops, which run 3-4x faster
  single-threaded on a 2-core machine.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(1)
