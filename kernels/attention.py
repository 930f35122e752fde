"""Flash attention in Triton: o = softmax(q k^T * scale) v, forward and backward, non-causal.

FlashAttention-2 (Dao 2023) in four small kernels, never materialising the (N, N) score matrix:

    _fwd_kernel        one program per (query block, batch*head): stream over key blocks with an
                       online softmax (running max m, running sum l, fp32 accumulator), write o and
                       the per-row logsumexp lse (fp32, natural log) for the backward.
    _bwd_delta_kernel  Delta = rowsum(dO * O), the "softmax Jacobian" term shared by dK and dQ.
    _bwd_dkdv_kernel   one program per key block: loop over query blocks, rebuild P from lse,
                       accumulate dV = P^T dO and dK = scale * dS^T Q.
    _bwd_dq_kernel     one program per query block: loop over key blocks, dQ = scale * dS K.
                       (Two kernels instead of one with atomics: no fp32 dQ scratch, no atomics,
                       every output written by exactly one program, so it is deterministic.)

Softmax in base 2: scores are multiplied by qk_scale = scale * log2(e) once, so exp() becomes the
cheaper exp2(); lse is converted back to natural log only where it is stored.

Shapes: q, k, v, o (B, H, N, D) with any B/H/N strides and a unit D stride (a tensor without one
is copied once); lse and Delta (B, H, N) fp32 contiguous. D is padded to BLOCK_D = next power of two
(>= 16, what tl.dot needs) and masked; N is masked in both directions (rows past N are never
stored, keys past N get score -inf / probability 0).

Portability: plain pointer arithmetic only (tl.make_block_ptr is gone in Triton 3.9), no libdevice,
no atomics, no @triton.autotune (the interpreter cannot benchmark). Block sizes come from a fixed
table, `_config()`, so the same code runs on Triton 3.6 on GPUs and in 3.9's CPU interpreter (CI).
`compile_for_sm90()` compiles the kernels for an H100 on a CPU-only machine and reports shared
memory, registers and spills, catching GPU-only errors the interpreter never sees.
"""
import contextlib
import io
import os
import re

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln 2
LN2 = tl.constexpr(0.6931471805599453)

MAX_HEAD_DIM = 128
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N, D, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)  # int64: no overflow on big tensors
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    O += b * sob + h * soh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,) query index
    dims = tl.arange(0, BLOCK_D)                                      # (BD,) head-dim index
    q_mask = (rows[:, None] < N) & (dims[None, :] < D)                # (BM, BD)
    q = tl.load(Q + rows[:, None] * sqn + dims[None, :], mask=q_mask, other=0.0)  # (BM, BD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)               # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                             # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                    # running sum of p @ v
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)                          # (BN,)
        kv_mask = (keys[:, None] < N) & (dims[None, :] < D)           # (BN, BD)
        k = tl.load(K + keys[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(V + keys[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0)  # (BN, BD)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN), log2 units
        s = tl.where(keys[None, :] < N, s, float("-inf"))             # padded keys get no weight
        # every key block holds at least one real key, so m_new is finite and no NaN appears
        m_new = tl.maximum(m_i, tl.max(s, 1))                         # (BM,)
        alpha = tl.exp2(m_i - m_new)                                  # rescales the old sums
        p = tl.exp2(s - m_new[:, None])                               # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]                                            # (BM, BD)
    tl.store(O + rows[:, None] * son + dims[None, :], o.to(O.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) * LN2                                  # (BM,) natural-log logsumexp
    tl.store(LSE + pid_bh * N + rows, lse, mask=rows < N)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA,
                      sob, soh, son, sdob, sdoh, sdon,
                      H, N, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,)
    dims = tl.arange(0, BLOCK_D)                                      # (BD,)
    mask = (rows[:, None] < N) & (dims[None, :] < D)
    o = tl.load(O + b * sob + h * soh + rows[:, None] * son + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdon + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)           # (BM,)
    tl.store(DELTA + pid_bh * N + rows, delta, mask=rows < N)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     H, N, D, qk_scale, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    # Works on transposed tiles (keys x queries) so P^T and dS^T come out of tl.dot directly.
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DK += b * sdkb + h * sdkh
    DV += b * sdvb + h * sdvh
    LSE += pid_bh * N
    DELTA += pid_bh * N

    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,)
    dims = tl.arange(0, BLOCK_D)                                      # (BD,)
    kv_mask = (keys[:, None] < N) & (dims[None, :] < D)               # (BN, BD)
    k = tl.load(K + keys[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
    v = tl.load(V + keys[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0)  # (BN, BD)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)                          # (BM,)
        q_mask = (rows[:, None] < N) & (dims[None, :] < D)            # (BM, BD)
        q = tl.load(Q + rows[:, None] * sqn + dims[None, :], mask=q_mask, other=0.0)    # (BM, BD)
        do = tl.load(DO + rows[:, None] * sdon + dims[None, :], mask=q_mask, other=0.0)  # (BM, BD)
        lse2 = tl.load(LSE + rows, mask=rows < N, other=0.0) * LOG2E  # (BM,) log2 units
        delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)       # (BM,)

        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BN, BM) = S^T
        # padding gets P = 0: padded queries carry a filler lse, and a padded key (score 0)
        # would get exp2(-lse2), which overflows when a row's real scores are all below ~ -88
        s_t = tl.where((keys[:, None] < N) & (rows[None, :] < N), s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse2[None, :])                            # (BN, BM) = P^T
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # (BN, BD) += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)     # (BN, BM) = (dO V^T)^T
        ds_t = p_t * (dp_t - delta[None, :])                          # (BN, BM) = dS^T
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # (BN, BD) += dS^T Q

    dk = dk * scale                                                   # S = scale * Q K^T
    tl.store(DK + keys[:, None] * sdkn + dims[None, :], dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + keys[:, None] * sdvn + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   sdob, sdoh, sdon, sdqb, sdqh, sdqn,
                   H, N, D, qk_scale, scale,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q += b * sqb + h * sqh
    K += b * skb + h * skh
    V += b * svb + h * svh
    DO += b * sdob + h * sdoh
    DQ += b * sdqb + h * sdqh

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,)
    dims = tl.arange(0, BLOCK_D)                                      # (BD,)
    q_mask = (rows[:, None] < N) & (dims[None, :] < D)                # (BM, BD)
    q = tl.load(Q + rows[:, None] * sqn + dims[None, :], mask=q_mask, other=0.0)    # (BM, BD)
    do = tl.load(DO + rows[:, None] * sdon + dims[None, :], mask=q_mask, other=0.0)  # (BM, BD)
    lse2 = tl.load(LSE + pid_bh * N + rows, mask=rows < N, other=0.0) * LOG2E      # (BM,)
    delta = tl.load(DELTA + pid_bh * N + rows, mask=rows < N, other=0.0)            # (BM,)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)                          # (BN,)
        kv_mask = (keys[:, None] < N) & (dims[None, :] < D)           # (BN, BD)
        k = tl.load(K + keys[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0)  # (BN, BD)
        v = tl.load(V + keys[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0)  # (BN, BD)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN)
        # a padded key (score 0) would get exp2(-lse2): inf when a row's real scores are all
        # below ~ -88, and inf * (its zero row of K) = NaN
        s = tl.where(keys[None, :] < N, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])                                # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)       # (BM, BN) = dO V^T
        ds = p * (dp - delta[:, None])                                # (BM, BN) = dS
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)    # (BM, BD) += dS K

    dq = dq * scale
    tl.store(DQ + rows[:, None] * sdqn + dims[None, :], dq.to(DQ.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# Launch configuration: a fixed table instead of @triton.autotune (which needs a GPU to time).
# --------------------------------------------------------------------------------------------

# kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M runs over queries, BLOCK_N over keys.
# First guesses for an H100 that compile_for_sm90() shows fit shared memory without register
# spills for fp16/bf16 (sm_90, Triton 3.6 and 3.9); real tuning on a GPU is a later job.
_GPU_CONFIGS = {
    # BLOCK_D <= 64
    "small": {"fwd": (128, 64, 4, 3), "dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "delta": (64, 0, 8, 1)},
    # BLOCK_D == 128 (head dims 65..128, e.g. 88 for ViT-g); dK/dV holds two fp32 accumulators
    # per key block: 32x64 tiles on 8 warps are the largest that do not spill (3.6 and 3.9)
    "large": {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 4, 2), "delta": (64, 0, 8, 1)},
    # fp32 inputs (exact "ieee" dots run on CUDA cores, not tensor cores): small tiles keep the
    # spills modest; fp32 on a GPU is a correctness path, train in bf16
    "fp32": {"fwd": (32, 32, 4, 2), "dkdv": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "delta": (64, 0, 8, 1)},
}
# The interpreter costs ~5 ms per (program x loop iteration) almost regardless of tile size, so
# the biggest tiles are the cheapest there.
_INTERPRETER_CONFIG = {"fwd": (128, 128, 4, 1), "dkdv": (128, 128, 4, 1), "dq": (128, 128, 4, 1),
                       "delta": (128, 0, 4, 1)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _config(head_dim: int, dtype: torch.dtype, interpreter: bool | None = None) -> dict:
    """Block sizes and launch options for every kernel, chosen by head dim, dtype and backend."""
    if interpreter is None:
        interpreter = _interpreting()
    if interpreter:
        return dict(_INTERPRETER_CONFIG)
    if dtype == torch.float32:
        return dict(_GPU_CONFIGS["fp32"])
    return dict(_GPU_CONFIGS["small" if _block_d(head_dim) <= 64 else "large"])


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting (exact by default); 16-bit inputs ignore it.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes is allocated here: tests replace it to poison the memory."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_stride_d(x: torch.Tensor) -> torch.Tensor:
    # The kernels take any B/H/N strides (e.g. q, k, v sliced out of one qkv tensor) but assume
    # the head dim is contiguous; expanded gradients (stride 0) and transposes get one copy.
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)  # (b, h, n); the d stride is 1


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be 4-D (B, H, N, D), got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"flash_attention: q, k, v must have the same shape (B, H, N, D) (self-attention "
                         f"only), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                         f"cast them (e.g. .to(q.dtype)) first")
    if q.dtype not in DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported; use one of {DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, N, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head dim {D} > {MAX_HEAD_DIM} is not supported; use more heads "
                         f"or the torch reference (INTERN_KERNELS=torch)")
    if min(B, H, N, D) < 1:
        raise ValueError(f"flash_attention: every dim of (B, H, N, D) must be >= 1, got {tuple(q.shape)}")
    if q.is_cuda and B * H > 65535:  # B*H is grid axis 1, which CUDA caps at 65535
        raise ValueError(f"flash_attention: B*H = {B * H} > 65535 programs on grid axis 1; split the batch")


def _forward(q, k, v, scale):
    """q, k, v (B, H, N, D) with unit D stride -> o (B, H, N, D) in q.dtype, lse (B, H, N) fp32."""
    B, H, N, D = q.shape
    cfg = _config(D, q.dtype)
    o = _empty((B, H, N, D), q.dtype, q.device)
    lse = _empty((B, H, N), torch.float32, q.device)
    bm, bn, warps, stages = cfg["fwd"]
    grid = (triton.cdiv(N, bm), B * H)
    _fwd_kernel[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                      H, N, D, scale * LOG2E.value,
                      BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), PRECISION=_precision(q.dtype),
                      num_warps=warps, num_stages=stages)
    return o, lse


def _backward(q, k, v, o, lse, do, scale):
    """Gradients (dq, dk, dv), each (B, H, N, D) in q.dtype."""
    B, H, N, D = q.shape
    cfg = _config(D, q.dtype)
    BLOCK_D, precision = _block_d(D), _precision(q.dtype)

    delta = _empty((B, H, N), torch.float32, q.device)            # rowsum(dO * O)
    bm, _, warps, stages = cfg["delta"]
    _bwd_delta_kernel[(triton.cdiv(N, bm), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, N, D,
        BLOCK_M=bm, BLOCK_D=BLOCK_D, num_warps=warps, num_stages=stages)

    dq, dk, dv = (_empty((B, H, N, D), q.dtype, q.device) for _ in range(3))
    bm, bn, warps, stages = cfg["dkdv"]
    _bwd_dkdv_kernel[(triton.cdiv(N, bn), B * H)](
        q, k, v, do, dk, dv, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, N, D, scale * LOG2E.value, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BLOCK_D, PRECISION=precision, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = cfg["dq"]
    _bwd_dq_kernel[(triton.cdiv(N, bm), B * H)](
        q, k, v, do, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, N, D, scale * LOG2E.value, scale,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BLOCK_D, PRECISION=precision, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = _unit_stride_d(q), _unit_stride_d(k), _unit_stride_d(v)
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error, not a wrong one
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _unit_stride_d(do), ctx.scale)
        return dq, dk, dv, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v of shape (B, H, N, D); differentiable.

    Any N >= 1, D <= 128, dtype fp32 / fp16 / bf16 (all three alike); the output has q's dtype.
    scale defaults to D ** -0.5. Softmax statistics and all accumulators are fp32.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, scale)


# --------------------------------------------------------------------------------------------
# Compile check for H100 (sm_90) on a machine without a GPU
# --------------------------------------------------------------------------------------------

_TRITON_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_POINTER_ARGS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA")
_FLOAT_ARGS = ("qk_scale", "scale")


def compile_for_sm90(dtype: str = "bf16", head_dim: int = 88) -> dict:
    """Compile every kernel for sm_90 with the launch config a GPU run would use (no GPU needed).

    Returns {kernel name: {"shared": bytes, "registers": n, "spill_stores": bytes,
    "spill_loads": bytes, "wgmma": bool, "config": (BLOCK_M, BLOCK_N, num_warps, num_stages)}}.
    Needs TRITON_INTERPRET unset/0 when this module was imported (interpreted kernels cannot be
    compiled) and the ptxas that ships inside the triton wheel.
    """
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"compile_for_sm90: dtype {dtype!r} is not one of {tuple(_TRITON_DTYPES)}")
    if not isinstance(_fwd_kernel, triton.runtime.JITFunction) or _interpreting():
        raise RuntimeError("compile_for_sm90 needs a process started with TRITON_INTERPRET unset or 0 "
                           "(e.g. `env TRITON_INTERPRET=0 python -c ...`): interpreted kernels cannot be compiled")
    try:  # moved around between Triton releases; keep the module importable everywhere
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        raise RuntimeError(f"compile_for_sm90: this Triton ({triton.__version__}) lacks ASTSource/GPUTarget: {e}")

    cfg = _config(head_dim, _TRITON_DTYPES[dtype], interpreter=False)
    precision = _precision(_TRITON_DTYPES[dtype])
    kernels = {"fwd": _fwd_kernel, "delta": _bwd_delta_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
    report = {}
    for name, kernel in kernels.items():
        bm, bn, warps, stages = cfg[name]
        constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": _block_d(head_dim), "PRECISION": precision}
        constexprs = {a: c for a, c in constexprs.items() if a in kernel.arg_names}
        signature, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in _POINTER_ARGS:  # torch allocations are 16-byte aligned
                signature[arg] = "*fp32" if arg in ("LSE", "DELTA") else f"*{dtype}"
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "fp32" if arg in _FLOAT_ARGS else "i32"
        src = ASTSource(kernel, signature, constexprs, attrs)
        log = io.StringIO()
        knobs = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}  # log goes to stdout
        saved = {key: os.environ.get(key) for key in knobs}
        os.environ.update(knobs)
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": warps, "num_stages": stages})
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        text = log.getvalue()

        def grab(pattern):
            m = re.search(pattern, text)
            return int(m.group(1)) if m else None

        report[name] = {"shared": compiled.metadata.shared,
                        "registers": grab(r"Used (\d+) registers"),
                        "spill_stores": grab(r"(\d+) bytes spill stores"),
                        "spill_loads": grab(r"(\d+) bytes spill loads"),
                        "wgmma": "wgmma" in compiled.asm.get("ptx", ""),
                        "config": cfg[name]}
    return report
