"""The two kernels the models call: `attention()` and `layer_norm()`.

Model code imports only these two functions and never Triton itself. Which implementation
runs is chosen per call by the environment variable INTERN_KERNELS:

    auto   (default) our Triton kernels when the tensors live on CUDA, the torch reference otherwise
    triton force the Triton kernels; on CPU this needs TRITON_INTERPRET=1 set before this
           package is imported (that is how CI runs them, slowly, in Triton's interpreter)
    torch  force the torch reference (F.scaled_dot_product_attention, F.layer_norm)

Decorating the Triton kernels needs no GPU, so a CPU user imports them at no cost but ~0.5 s.
"""
import os

import torch
import torch.nn.functional as F

# Imported before the functions below are defined, on purpose: importing a submodule binds it as
# an attribute of this package, so `kernels.attention` (the file) would otherwise shadow
# `attention()` (the function). Defined afterwards, the function wins, and later imports of
# kernels.attention find the module in sys.modules and leave the package untouched. Decorating
# Triton kernels needs no GPU; TRITON_INTERPRET is read here, so set it before this import.
from . import attention as _attention_kernels  # noqa: E402
from . import layernorm as _layernorm_kernels  # noqa: E402

MODES = ("auto", "triton", "torch")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def mode() -> str:
    m = os.environ.get("INTERN_KERNELS", "auto").strip().lower()
    if m not in MODES:
        raise ValueError(f"INTERN_KERNELS={m!r} is not a valid choice; use one of {MODES}")
    return m


def use_triton(x: torch.Tensor) -> bool:
    """True when a call on tensor `x` should go to our Triton kernels."""
    m = mode()
    if m == "torch":
        return False
    if m == "auto":
        return x.is_cuda
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(
            "INTERN_KERNELS=triton was asked for on CPU tensors, but Triton can only run them in "
            "its interpreter: export TRITON_INTERPRET=1 before starting Python (or use "
            "INTERN_KERNELS=auto to fall back to the torch reference on CPU)")
    _patch_interpreter_bf16_dot()
    return True


_PATCHED = False


def _patch_interpreter_bf16_dot():
    """Triton's CPU interpreter multiplies bf16 operands of tl.dot as raw uint16 bit patterns
    (triton-lang/triton#11584). bf16 x bf16 products are exact in fp32, so widening the
    operands first gives what the GPU's tensor cores compute. Only touches the interpreter."""
    global _PATCHED
    if _PATCHED or not _interpreting():
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    original = ti.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, *rest):
        return original(self, widen(a), widen(b), *rest)

    ti.InterpreterBuilder.create_dot = create_dot
    _PATCHED = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention. q, k, v: (B, H, N, D) -> o: (B, H, N, D). Differentiable."""
    if use_triton(q):
        return _attention_kernels.flash_attention(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim of x (..., C) with affine weight/bias (C,). Differentiable."""
    if use_triton(x):
        return _layernorm_kernels.fused_layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


class LayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm whose forward goes through `layer_norm()`; same parameters and state-dict
    keys (weight, bias) as torch's, so timm/official checkpoints load unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)
