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

Head-dim layouts (`layout()`; tl.arange and tl.dot want power-of-two widths >= 16):
    padded  one tile of BLOCK_D = next power of two >= D, masked: ViT-g's 88 runs as 128, so 45 %
            of every matmul multiplies zeros.
    split   two tiles, 64 + (16 | 32 | 64): 88 runs as 64 + 32 = 96 (9 % waste), each product
            over D a sum of two dots, each output with a D axis two accumulators.
    auto    split for 64 < D <= 96, padded elsewhere (the default). `flash_attention(...,
            variant=)` or the env var INTERN_ATTN_VARIANT forces one, so both can be timed.

Shapes: q, k, v (B, H, N, D) with any B/H/N strides and a unit D stride (a tensor without one
is copied once); o, dq, dk, dv come back as (B, H, N, D) views of (B, N, H, D) buffers, like torch's
flash SDPA, so the model's o -> (B, N, H*D) is free; lse and Delta (B, H, N) fp32 contiguous.
N is masked in both directions (rows past N are never stored, keys past N get score -inf /
probability 0). D is a compile-time constant and ALIGN, the largest power of two (up to 16 bytes)
dividing every stride, is promised to the compiler: with both known, rows of 88 bf16 move as
16-byte loads, stores and cp.async copies instead of one element at a time.

Portability: plain pointer arithmetic only (tl.make_block_ptr is gone in Triton 3.9), no libdevice,
no atomics, no @triton.autotune (the interpreter cannot benchmark). Block sizes come from a fixed
table, `_config()`, so the same code runs on Triton 3.6 on GPUs and in 3.9's CPU interpreter (CI).
`compile_for_sm90()` compiles the kernels for an H100 on a CPU-only machine and reports shared
memory, registers, spills and one-element memory accesses, catching GPU-only problems the
interpreter never sees; `cost()` counts the FLOPs and bytes of a call for `bench.py plan`.
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
def _head(ptr, b, h, stride_b, stride_h, stride_n, ALIGN: tl.constexpr):
    """(pointer to head (b, h), row stride), both promised to be multiples of ALIGN elements.
    The host checks the promise; it is what lets the compiler issue 16-byte loads and stores
    (a head dim of 88 makes the head stride 88, which Triton's launcher does not flag itself)."""
    return ptr + tl.multiple_of(b * stride_b + h * stride_h, ALIGN), tl.multiple_of(stride_n, ALIGN)


@triton.jit
def _load_tile(ptr, idx, stride, N, d0, D, WIDTH: tl.constexpr):
    """(len(idx), WIDTH) tile: rows idx, head-dim columns d0 .. d0+WIDTH-1; zero past N and D."""
    cols = d0 + tl.arange(0, WIDTH)
    mask = (idx[:, None] < N) & (cols[None, :] < D)
    return tl.load(ptr + idx[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, idx, stride, N, d0, D, x, WIDTH: tl.constexpr):
    """Store x (len(idx), WIDTH) at rows idx, columns d0 .. d0+WIDTH-1, nothing past N or D."""
    cols = d0 + tl.arange(0, WIDTH)
    mask = (idx[:, None] < N) & (cols[None, :] < D)
    tl.store(ptr + idx[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


# Every kernel below sees the head dim as one tile of BLOCK_D columns ("padded" layout: D = 88 is
# padded to 128) or, when BLOCK_D2 > 0, as two tiles, columns [0, BLOCK_D) and [BLOCK_D,
# BLOCK_D + BLOCK_D2) ("split" layout: 88 = 64 + 32 padded to 96, 9 % waste instead of 45 %).
# A dot product over D becomes the sum of two dots (the second accumulates into the first); a
# result with a D axis becomes two accumulators. `if BLOCK_D2 > 0` is resolved at compile time,
# so the padded layout compiles to exactly the single-tile kernel.

@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                H, N, qk_scale,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)  # int64: no overflow on big tensors
    Q, sqn = _head(Q, b, h, sqb, sqh, sqn, ALIGN)
    K, skn = _head(K, b, h, skb, skh, skn, ALIGN)
    V, svn = _head(V, b, h, svb, svh, svn, ALIGN)
    O, son = _head(O, b, h, sob, soh, son, ALIGN)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,) query index
    q = _load_tile(Q, rows, sqn, N, 0, D, BLOCK_D)                    # (BM, BD)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                    # running sum of p @ v
    if BLOCK_D2 > 0:
        q2 = _load_tile(Q, rows, sqn, N, BLOCK_D, D, BLOCK_D2)        # (BM, BD2)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)               # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                             # running sum of exp2(s - m_i)
    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)                          # (BN,)
        k = _load_tile(K, keys, skn, N, 0, D, BLOCK_D)                # (BN, BD)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)         # (BM, BN)
        if BLOCK_D2 > 0:
            k2 = _load_tile(K, keys, skn, N, BLOCK_D, D, BLOCK_D2)    # (BN, BD2)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)  # + the tail of the head dim
        s = s * qk_scale                                              # log2 units
        s = tl.where(keys[None, :] < N, s, float("-inf"))             # padded keys get no weight
        # every key block holds at least one real key, so m_new is finite and no NaN appears
        m_new = tl.maximum(m_i, tl.max(s, 1))                         # (BM,)
        alpha = tl.exp2(m_i - m_new)                                  # rescales the old sums
        p = tl.exp2(s - m_new[:, None])                               # (BM, BN)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V, keys, svn, N, 0, D, BLOCK_D)                # (BN, BD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if BLOCK_D2 > 0:
            v2 = _load_tile(V, keys, svn, N, BLOCK_D, D, BLOCK_D2)    # (BN, BD2)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2, input_precision=PRECISION)
        m_i = m_new

    _store_tile(O, rows, son, N, 0, D, acc / l_i[:, None], BLOCK_D)
    if BLOCK_D2 > 0:
        _store_tile(O, rows, son, N, BLOCK_D, D, acc2 / l_i[:, None], BLOCK_D2)
    lse = (m_i + tl.log2(l_i)) * LN2                                  # (BM,) natural-log logsumexp
    tl.store(LSE + pid_bh * N + rows, lse, mask=rows < N)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA,
                      sob, soh, son, sdob, sdoh, sdon,
                      H, N,
                      D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                      ALIGN: tl.constexpr):
    # No matrix work here, so one padded tile in either layout: masked columns cost no bytes.
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,)
    O, son = _head(O, b, h, sob, soh, son, ALIGN)
    DO, sdon = _head(DO, b, h, sdob, sdoh, sdon, ALIGN)
    o = _load_tile(O, rows, son, N, 0, D, BLOCK_D)                    # (BM, BD)
    do = _load_tile(DO, rows, sdon, N, 0, D, BLOCK_D)                 # (BM, BD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)           # (BM,)
    tl.store(DELTA + pid_bh * N + rows, delta, mask=rows < N)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA,
                     sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                     H, N, qk_scale, scale,
                     D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    # Works on transposed tiles (keys x queries) so P^T and dS^T come out of tl.dot directly.
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q, sqn = _head(Q, b, h, sqb, sqh, sqn, ALIGN)
    K, skn = _head(K, b, h, skb, skh, skn, ALIGN)
    V, svn = _head(V, b, h, svb, svh, svn, ALIGN)
    DO, sdon = _head(DO, b, h, sdob, sdoh, sdon, ALIGN)
    DK, sdkn = _head(DK, b, h, sdkb, sdkh, sdkn, ALIGN)
    DV, sdvn = _head(DV, b, h, sdvb, sdvh, sdvn, ALIGN)
    LSE += pid_bh * N
    DELTA += pid_bh * N

    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,)
    k = _load_tile(K, keys, skn, N, 0, D, BLOCK_D)                    # (BN, BD)
    v = _load_tile(V, keys, svn, N, 0, D, BLOCK_D)                    # (BN, BD)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        k2 = _load_tile(K, keys, skn, N, BLOCK_D, D, BLOCK_D2)        # (BN, BD2)
        v2 = _load_tile(V, keys, svn, N, BLOCK_D, D, BLOCK_D2)        # (BN, BD2)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)                          # (BM,)
        q = _load_tile(Q, rows, sqn, N, 0, D, BLOCK_D)                # (BM, BD)
        do = _load_tile(DO, rows, sdon, N, 0, D, BLOCK_D)             # (BM, BD)
        lse2 = tl.load(LSE + rows, mask=rows < N, other=0.0) * LOG2E  # (BM,) log2 units
        delta = tl.load(DELTA + rows, mask=rows < N, other=0.0)       # (BM,)

        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)       # (BN, BM) = S^T / scale
        if BLOCK_D2 > 0:
            q2 = _load_tile(Q, rows, sqn, N, BLOCK_D, D, BLOCK_D2)    # (BM, BD2)
            do2 = _load_tile(DO, rows, sdon, N, BLOCK_D, D, BLOCK_D2)  # (BM, BD2)
            s_t = tl.dot(k2, tl.trans(q2), s_t, input_precision=PRECISION)
        s_t = s_t * qk_scale
        # padding gets P = 0: padded queries carry a filler lse, and a padded key (score 0)
        # would get exp2(-lse2), which overflows when a row's real scores are all below ~ -88
        s_t = tl.where((keys[:, None] < N) & (rows[None, :] < N), s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse2[None, :])                            # (BN, BM) = P^T
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)  # (BN, BD) += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)     # (BN, BM) = (dO V^T)^T
        if BLOCK_D2 > 0:
            dv2 += tl.dot(p_t.to(do2.dtype), do2, input_precision=PRECISION)
            dp_t = tl.dot(v2, tl.trans(do2), dp_t, input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])                          # (BN, BM) = dS^T
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)  # (BN, BD) += dS^T Q
        if BLOCK_D2 > 0:
            dk2 += tl.dot(ds_t.to(q2.dtype), q2, input_precision=PRECISION)

    # S = scale * Q K^T, so dK carries the scale once
    _store_tile(DK, keys, sdkn, N, 0, D, dk * scale, BLOCK_D)
    _store_tile(DV, keys, sdvn, N, 0, D, dv, BLOCK_D)
    if BLOCK_D2 > 0:
        _store_tile(DK, keys, sdkn, N, BLOCK_D, D, dk2 * scale, BLOCK_D2)
        _store_tile(DV, keys, sdvn, N, BLOCK_D, D, dv2, BLOCK_D2)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA,
                   sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   sdob, sdoh, sdon, sdqb, sdqh, sdqn,
                   H, N, qk_scale, scale,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_D2: tl.constexpr, PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    Q, sqn = _head(Q, b, h, sqb, sqh, sqn, ALIGN)
    K, skn = _head(K, b, h, skb, skh, skn, ALIGN)
    V, svn = _head(V, b, h, svb, svh, svn, ALIGN)
    DO, sdon = _head(DO, b, h, sdob, sdoh, sdon, ALIGN)
    DQ, sdqn = _head(DQ, b, h, sdqb, sdqh, sdqn, ALIGN)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # (BM,)
    q = _load_tile(Q, rows, sqn, N, 0, D, BLOCK_D)                    # (BM, BD)
    do = _load_tile(DO, rows, sdon, N, 0, D, BLOCK_D)                 # (BM, BD)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if BLOCK_D2 > 0:
        q2 = _load_tile(Q, rows, sqn, N, BLOCK_D, D, BLOCK_D2)        # (BM, BD2)
        do2 = _load_tile(DO, rows, sdon, N, BLOCK_D, D, BLOCK_D2)     # (BM, BD2)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    lse2 = tl.load(LSE + pid_bh * N + rows, mask=rows < N, other=0.0) * LOG2E      # (BM,)
    delta = tl.load(DELTA + pid_bh * N + rows, mask=rows < N, other=0.0)            # (BM,)

    for start in range(0, N, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)                          # (BN,)
        k = _load_tile(K, keys, skn, N, 0, D, BLOCK_D)                # (BN, BD)
        v = _load_tile(V, keys, svn, N, 0, D, BLOCK_D)                # (BN, BD)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)         # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)       # (BM, BN) = dO V^T
        if BLOCK_D2 > 0:
            k2 = _load_tile(K, keys, skn, N, BLOCK_D, D, BLOCK_D2)    # (BN, BD2)
            v2 = _load_tile(V, keys, svn, N, BLOCK_D, D, BLOCK_D2)    # (BN, BD2)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION)
            dp = tl.dot(do2, tl.trans(v2), dp, input_precision=PRECISION)
        s = s * qk_scale
        # a padded key (score 0) would get exp2(-lse2): inf when a row's real scores are all
        # below ~ -88, and inf * (its zero row of K) = NaN
        s = tl.where(keys[None, :] < N, s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])                                # (BM, BN)
        ds = p * (dp - delta[:, None])                                # (BM, BN) = dS
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)    # (BM, BD) += dS K
        if BLOCK_D2 > 0:
            dq2 += tl.dot(ds.to(k2.dtype), k2, input_precision=PRECISION)

    _store_tile(DQ, rows, sdqn, N, 0, D, dq * scale, BLOCK_D)
    if BLOCK_D2 > 0:
        _store_tile(DQ, rows, sdqn, N, BLOCK_D, D, dq2 * scale, BLOCK_D2)


# --------------------------------------------------------------------------------------------
# Head-dim layout and launch configuration: a fixed table instead of @triton.autotune (which
# needs a GPU to time).
# --------------------------------------------------------------------------------------------

# Head-dim layouts: how the D columns of q, k, v, o are tiled (see the note above the kernels).
VARIANTS = ("auto", "padded", "split")
VARIANT_ENV = "INTERN_ATTN_VARIANT"   # forces a layout for every call (bench.py compares them)
SPLIT_MAIN = 64                       # width of the first tile of the split layout


def layout(head_dim: int, variant: str = "auto") -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2) for a head dim: BLOCK_D2 == 0 is one padded tile, > 0 two tiles.

    padded: BLOCK_D = next power of two >= max(D, 16) (tl.arange and tl.dot need powers of two,
            K >= 16): 88 -> 128, 45 % of the tensor-core work on zeros.
    split:  64 + next power of two >= max(D - 64, 16), for 64 < D <= 128: 88 -> 64 + 32 = 96,
            72 -> 64 + 16 = 80. Same result, one more (narrower) dot per product.
    auto:   split where it pads less (65..96), padded everywhere else.
    """
    if variant not in VARIANTS:
        raise ValueError(f"attention variant {variant!r} is not one of {VARIANTS} "
                         f"(argument `variant=` or env {VARIANT_ENV})")
    if variant == "auto":
        variant = "split" if SPLIT_MAIN < head_dim <= 96 else "padded"
    if variant == "padded":
        return _block_d(head_dim), 0
    if not SPLIT_MAIN < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the split layout needs {SPLIT_MAIN} < head dim <= {MAX_HEAD_DIM}, got {head_dim}; "
                         f"use variant='padded' or 'auto'")
    return SPLIT_MAIN, _block_d(head_dim - SPLIT_MAIN)


# kernel -> (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M runs over queries, BLOCK_N over keys.
# First guesses for an H100 that compile_for_sm90() shows fit shared memory without register
# spills for fp16/bf16 (sm_90, Triton 3.6 and 3.9); real tuning on a GPU is a later job.
_GPU_CONFIGS = {
    # one tile, BLOCK_D <= 64
    "small": {"fwd": (128, 64, 4, 3), "dkdv": (64, 64, 4, 2), "dq": (64, 64, 4, 2), "delta": (64, 0, 8, 1)},
    # one tile, BLOCK_D == 128 (head dims 65..128 padded); dK/dV holds two fp32 accumulators per
    # key block: 32x64 tiles on 8 warps are the largest that do not spill (3.6 and 3.9)
    "large": {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 4, 2), "delta": (64, 0, 8, 1)},
    # two tiles, 64 + 16..64 (e.g. 88 -> 64 + 32): a quarter fewer accumulator registers than
    # "large" at D = 88
    "split": {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 4, 2), "delta": (64, 0, 8, 1)},
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


def _config(tiles: tuple[int, int], dtype: torch.dtype, interpreter: bool | None = None) -> dict:
    """Block sizes and launch options for every kernel, by head-dim layout, dtype and backend."""
    if interpreter is None:
        interpreter = _interpreting()
    if interpreter:
        return dict(_INTERPRETER_CONFIG)
    if dtype == torch.float32:
        return dict(_GPU_CONFIGS["fp32"])
    block_d, block_d2 = tiles
    return dict(_GPU_CONFIGS["split" if block_d2 else "small" if block_d <= 64 else "large"])


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


def _align(strides, elem_bytes: int) -> int:
    """Largest power of two, up to 16 bytes' worth of elements, dividing every stride: the
    promise the kernels pass to tl.multiple_of (ALIGN) so that rows load 16 bytes at a time."""
    align = max(1, 16 // elem_bytes)
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


def _empty_bnhd(B, H, N, D, dtype, device) -> torch.Tensor:
    """(B, H, N, D) view of a (B, N, H, D) buffer, the layout torch's flash SDPA returns too: the
    model's next step, o -> (B, N, H*D), is then a free view instead of a copy, and every row
    stride is H*D (1408 for ViT-g, a multiple of 16) rather than D (88)."""
    return _empty((B, N, H, D), dtype, device).permute(0, 2, 1, 3)


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


def _forward(q, k, v, scale, tiles):
    """q, k, v (B, H, N, D) with unit D stride -> o (B, H, N, D) in q.dtype, lse (B, H, N) fp32.
    tiles = layout(D, variant), the (BLOCK_D, BLOCK_D2) head-dim tiling."""
    B, H, N, D = q.shape
    cfg = _config(tiles, q.dtype)
    o = _empty_bnhd(B, H, N, D, q.dtype, q.device)
    lse = _empty((B, H, N), torch.float32, q.device)
    align = _align([s for t in (q, k, v, o) for s in _strides(t)], q.element_size())
    bm, bn, warps, stages = cfg["fwd"]
    grid = (triton.cdiv(N, bm), B * H)
    _fwd_kernel[grid](q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                      H, N, scale * LOG2E.value,
                      D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=tiles[0], BLOCK_D2=tiles[1],
                      PRECISION=_precision(q.dtype), ALIGN=align, num_warps=warps, num_stages=stages)
    return o, lse


def _backward(q, k, v, o, lse, do, scale, tiles):
    """Gradients (dq, dk, dv), each (B, H, N, D) in q.dtype."""
    B, H, N, D = q.shape
    cfg = _config(tiles, q.dtype)
    precision = _precision(q.dtype)
    dq, dk, dv = (_empty_bnhd(B, H, N, D, q.dtype, q.device) for _ in range(3))
    align = _align([s for t in (q, k, v, o, do, dq, dk, dv) for s in _strides(t)], q.element_size())

    delta = _empty((B, H, N), torch.float32, q.device)            # rowsum(dO * O)
    bm, _, warps, stages = cfg["delta"]
    _bwd_delta_kernel[(triton.cdiv(N, bm), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, N,
        D=D, BLOCK_M=bm, BLOCK_D=_block_d(D), ALIGN=align, num_warps=warps, num_stages=stages)

    bm, bn, warps, stages = cfg["dkdv"]
    _bwd_dkdv_kernel[(triton.cdiv(N, bn), B * H)](
        q, k, v, do, dk, dv, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv),
        H, N, scale * LOG2E.value, scale,
        D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=tiles[0], BLOCK_D2=tiles[1], PRECISION=precision,
        ALIGN=align, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = cfg["dq"]
    _bwd_dq_kernel[(triton.cdiv(N, bm), B * H)](
        q, k, v, do, dq, lse, delta,
        *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
        H, N, scale * LOG2E.value, scale,
        D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=tiles[0], BLOCK_D2=tiles[1], PRECISION=precision,
        ALIGN=align, num_warps=warps, num_stages=stages)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, tiles):
        q, k, v = _unit_stride_d(q), _unit_stride_d(k), _unit_stride_d(v)
        o, lse = _forward(q, k, v, scale, tiles)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.tiles = scale, tiles
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error, not a wrong one
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _unit_stride_d(do), ctx.scale, ctx.tiles)
        return dq, dk, dv, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                    variant: str | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for q, k, v of shape (B, H, N, D); differentiable.

    Any N >= 1, D <= 128, dtype fp32 / fp16 / bf16 (all three alike); the output has q's dtype.
    scale defaults to D ** -0.5. Softmax statistics and all accumulators are fp32.
    variant: head-dim layout, "auto" (default), "padded" or "split" (see `layout`); None reads
    the env var INTERN_ATTN_VARIANT, so a benchmark can force one through kernels.attention().
    """
    _check_inputs(q, k, v)
    if variant is None:
        variant = os.environ.get(VARIANT_ENV, "auto").strip().lower() or "auto"
    tiles = layout(q.shape[-1], variant)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FlashAttention.apply(q, k, v, scale, tiles)


# --------------------------------------------------------------------------------------------
# Work model: what one call costs on a GPU (bench.py plan turns it into predicted times)
# --------------------------------------------------------------------------------------------

def cost(B: int, H: int, N: int, D: int, variant: str = "auto", dtype: torch.dtype = torch.bfloat16,
         configs: dict | None = None) -> dict:
    """FLOPs and HBM bytes of one forward and one backward at (B, H, N, D) with the GPU tiles
    (`configs` overrides table entries, as in compile_for_sm90, to count a candidate first).

    useful_fwd / useful_bwd: the convention of published TFLOP/s figures, 4 B H N^2 D for
        Q K^T and P V (2 FLOPs per multiply-add) and 2.5x that for the backward (5 matmuls).
    executed_fwd / executed_bwd: the tensor-core work these kernels issue: whole tiles, so N is
        rounded up to each kernel's BLOCK_M and BLOCK_N and D to the layout's width; the
        backward runs 7 matmuls, not 5 (the dQ kernel recomputes S and dP instead of using atomics).
    bytes_fwd / bytes_bwd: HBM traffic, each kernel reading its inputs and writing its outputs
        once (re-reads of K, V, Q, dO by later tiles of the same head are assumed to hit L2:
        one head's K and V are 2 N D bytes each, < 0.4 MB at N = 1025).
    """
    tiles = layout(D, variant)
    cfg = {**_config(tiles, dtype, interpreter=False), **(configs or {})}
    width = tiles[0] + tiles[1]                                  # columns the dots multiply
    e = torch.finfo(dtype).bits // 8

    def pad(n, block):
        return triton.cdiv(n, block) * block

    def dots(kernel, count):                                     # `count` matmuls of (M x N_keys x width)
        bm, bn = cfg[kernel][:2]
        return count * 2 * B * H * pad(N, bm) * pad(N, bn) * width

    x = B * H * N * D * e                                        # bytes of one (B, H, N, D) tensor
    r = B * H * N * 4                                            # bytes of one fp32 (B, H, N) row stat
    return {
        "tiles": tiles, "config": cfg,
        "useful_fwd": 4 * B * H * N * N * D, "useful_bwd": 10 * B * H * N * N * D,
        "executed_fwd": dots("fwd", 2), "executed_bwd": dots("dkdv", 4) + dots("dq", 3),
        "bytes_fwd": 4 * x + r,                                  # q, k, v -> o, lse
        # Delta: o, dO -> Delta;  dK/dV: q, k, v, dO, lse, Delta -> dk, dv;  dQ: same -> dq
        "bytes_bwd": (2 * x + r) + (6 * x + 2 * r) + (5 * x + 2 * r),
    }


# --------------------------------------------------------------------------------------------
# Compile check for H100 (sm_90) on a machine without a GPU
# --------------------------------------------------------------------------------------------

_TRITON_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_POINTER_ARGS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA")
_FLOAT_ARGS = ("qk_scale", "scale")


def _launch_ints(head_dim: int, B: int = 32, H: int = 16, N: int = 257) -> dict:
    """The integer arguments of a ViT-style launch: q, k, v sliced out of one qkv activation
    (B, N, 3, H, D), dO a view of the (B, N, H*D) gradient, outputs in (B, N, H, D) order."""
    C = H * head_dim
    qkv = {"b": N * 3 * C, "h": head_dim, "n": 3 * C}
    bnhd = {"b": N * C, "h": head_dim, "n": C}
    ints = {"H": H, "N": N, "D": head_dim}
    for prefix in ("sq", "sk", "sv"):
        ints.update({prefix + a: s for a, s in qkv.items()})
    for prefix in ("so", "sdo", "sdq", "sdk", "sdv"):
        ints.update({prefix + a: s for a, s in bnhd.items()})
    return ints


def compile_for_sm90(dtype: str = "bf16", head_dim: int = 88, variant: str = "auto",
                     configs: dict | None = None) -> dict:
    """Compile every kernel for sm_90 with the launch config a GPU run would use (no GPU needed).

    variant: head-dim layout as in flash_attention; configs: {kernel: (BLOCK_M, BLOCK_N,
    num_warps, num_stages)} overriding the table (to try tiles before putting them there).
    Integer arguments get the divisibility-by-16 hints Triton's launcher would give them at a
    ViT-g launch (`_launch_ints`), so the load widths match the real kernel.
    Returns {kernel name: {"shared": bytes, "registers": n, "spill_stores": bytes,
    "spill_loads": bytes, "wgmma": bool, "scalar_accesses": number of one-element (2-byte)
    global loads/stores in the PTX, 0 when every row moves in 16-byte pieces,
    "config": (BLOCK_M, BLOCK_N, num_warps, num_stages), "tiles": (BLOCK_D, BLOCK_D2)}}.
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

    tiles = layout(head_dim, variant)
    cfg = {**_config(tiles, _TRITON_DTYPES[dtype], interpreter=False), **(configs or {})}
    precision = _precision(_TRITON_DTYPES[dtype])
    ints = _launch_ints(head_dim)
    align = _align([s for a, s in ints.items() if a.startswith("s")], _TRITON_DTYPES[dtype].itemsize)
    kernels = {"fwd": _fwd_kernel, "delta": _bwd_delta_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
    report = {}
    for name, kernel in kernels.items():
        bm, bn, warps, stages = cfg[name]
        block_d, block_d2 = tiles if name != "delta" else (_block_d(head_dim), 0)
        constexprs = {"D": head_dim, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": block_d, "BLOCK_D2": block_d2,
                      "PRECISION": precision, "ALIGN": align}
        constexprs = {a: c for a, c in constexprs.items() if a in kernel.arg_names}
        signature, attrs = {}, {}
        for i, arg in enumerate(kernel.arg_names):
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in _POINTER_ARGS:  # torch allocations are 16-byte aligned
                signature[arg] = "*fp32" if arg in ("LSE", "DELTA") else f"*{dtype}"
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif arg in _FLOAT_ARGS:
                signature[arg] = "fp32"
            else:
                signature[arg] = "i32"
                if ints[arg] % 16 == 0:  # what the launcher specialises on
                    attrs[(i,)] = [["tt.divisibility", 16]]
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

        ptx = compiled.asm.get("ptx", "")
        report[name] = {"shared": compiled.metadata.shared,
                        "registers": grab(r"Used (\d+) registers"),
                        "spill_stores": grab(r"(\d+) bytes spill stores"),
                        "spill_loads": grab(r"(\d+) bytes spill loads"),
                        "wgmma": "wgmma" in ptx,
                        # one-element loads/stores of q, k, v, o and their gradients (0 = all vectorised)
                        "scalar_accesses": len(re.findall(r"(?:ld|st)\.global(?:\.[a-z]+\d*)*\.b16\b", ptx)),
                        "config": tuple(cfg[name]), "tiles": (block_d, block_d2)}
    return report
