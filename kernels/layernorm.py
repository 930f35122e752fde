"""Fused LayerNorm over the last dim in Triton, forward and backward.

    y = (x - mean(x)) * rstd * weight + bias,   rstd = 1 / sqrt(var(x) + eps)

`fused_layer_norm(x, weight, bias, eps)` is what `kernels.layer_norm()` calls when Triton is
chosen. x is (..., C) in fp32 / fp16 / bf16; weight and bias are (C,) or None and may have
another dtype than x (under autocast the activations are bf16 and the parameters fp32). y has
x's dtype, dweight / dbias have the parameters' dtypes, and every statistic and sum is fp32.

Layout of the work. Both kernels see the rows as a 2-D (M, C) matrix and handle a tile of
ROWS x BLOCK_C elements at a time (BLOCK_C = next power of two >= C, masked past C). Wide rows
(ViT-g: 1408 -> 2048) get one or two rows per tile; narrow rows get many, so a program never
works on a handful of lanes.

- forward: one program per tile; it stores y and the per-row mean and rstd (fp32) that the
  backward needs, so the backward never recomputes the statistics.
- backward: a fixed grid of G programs, each owning a contiguous run of rows. A program writes
  dx for its rows (fully fused: one read of x and dy, one write of dx) and accumulates
  dweight / dbias for its rows in fp32 registers, then writes ONE fp32 partial row each into
  (G, C) buffers that `torch.sum(0)` reduces afterwards. Why partials and not atomics: the sum
  order is fixed, so gradients are bit-identical from run to run (fp32 atomics are not), no
  locks are needed, and bf16 atomics do not exist in Triton's CPU interpreter anyway. The
  partial buffers are small (G ~ 4 x SMs rows), so the second reduction is cheap.

No @triton.autotune (its benchmarking needs a GPU, so it breaks the interpreter), no block
pointers (removed in Triton 3.9), no libdevice: tile sizes and warps come from `_tile()`.
"""
import torch
import triton
import triton.language as tl

MAX_WIDTH = 8192  # widest row one tile holds without register spills on sm_90 (see _tile)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Every buffer the kernels write is allocated through this name, so tests can swap in an
# allocator that poisons fresh memory and surrounds it with canaries.
_empty = torch.empty


def _tile(C: int, tile: int, per_thread: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps): ROWS x BLOCK_C ~ `tile` elements, ~`per_thread` per thread.

    Big tiles give each program enough bytes in flight to hide memory latency on a GPU (and
    make the interpreter fast: it pays per program, not per element). The per-thread count
    sets the registers: the forward (x and y per element) runs at 16 and stays under 128
    registers; the backward (x, dy, dx and two fp32 accumulators per element) needs 8 to do
    the same. Both measured with `compile_for_sm90` for widths 1..8192 (no spills anywhere;
    the backward spills at 16384 even with 16 warps, hence MAX_WIDTH).
    """
    block_c = max(16, triton.next_power_of_2(C))  # >= 16 keeps tiny widths to <= 256 rows a tile
    rows = max(1, tile // block_c)
    num_warps = min(16, max(1, rows * block_c // (32 * per_thread)))
    return block_c, rows, num_warps


def _fwd_tile(C: int):
    return _tile(C, tile=4096, per_thread=16)   # 1408 -> (2048, 2 rows, 8 warps)


def _bwd_tile(C: int):
    return _tile(C, tile=2048, per_thread=8)    # 1408 -> (2048, 1 row, 8 warps)


@triton.jit
def _ln_fwd(X, W, B, Y, Mean, Rstd, M, C, stride_x, stride_y, eps,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)        # (ROWS,)
    cols = tl.arange(0, BLOCK_C)                                # (BLOCK_C,)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]                    # (ROWS, BLOCK_C)
    r64 = rows.to(tl.int64)[:, None]  # row * stride may pass 2**31 for big activations

    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C                                # (ROWS,)
    xc = tl.where(mask, x - mean[:, None], 0.0)  # padding would otherwise add mean^2 to var
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / C + eps)          # (ROWS,)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd(X, W, DY, DX, Mean, Rstd, DW, DB, M, C, stride_x, stride_dy, stride_dx, rows_per_prog,
            HAS_W: tl.constexpr, HAS_B: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # With xh = (x - mean) * rstd and g = weight * dy, per row:
    #   dx = rstd * (g - xh * mean(g * xh) - mean(g)),  dweight += dy * xh,  dbias += dy
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]   # (1, BLOCK_C)
    # 2-D accumulators: the cross-row sum happens once, after the loop, not once per tile
    dw = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    db = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    # a while loop, not range(): Triton 3.6's interpreter turns a runtime range() bound into
    # int(1-element array), which NumPy >= 2.4 refuses. Costs nothing on sm_90: a for loop over
    # these plain loads is not software-pipelined either (no cp.async in its PTX).
    r0 = row_start
    while r0 < row_end:
        rows = r0 + tl.arange(0, ROWS)                          # (ROWS,)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]                # (ROWS, BLOCK_C)
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xh = (x - mean[:, None]) * rstd[:, None]  # junk in the padding, but dy = 0 there
        g = dy
        if HAS_W:
            g = dy * w
        c1 = tl.sum(g * xh, axis=1) / C                         # (ROWS,)
        c2 = tl.sum(g, axis=1) / C                              # (ROWS,)
        dx = (g - xh * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += dy * xh
        if HAS_B:
            db += dy
        r0 += ROWS
    # one fp32 partial row per program; the host sums the G rows
    if HAS_W:
        tl.store(DW + pid * C + cols, tl.sum(dw, axis=0), mask=col_ok)
    if HAS_B:
        tl.store(DB + pid * C + cols, tl.sum(db, axis=0), mask=col_ok)


def _bwd_programs(n_tiles: int, device: torch.device) -> int:
    """How many programs share the backward: ~4 per SM keeps every SM busy while the (G, C)
    partials stay small. The interpreter runs programs one by one, so there a few suffice."""
    if device.type == "cuda":
        return min(n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_tiles, 8)


def _rows_2d(t: torch.Tensor, C: int) -> torch.Tensor:
    """(..., C) -> (M, C) with unit column stride; a view whenever the layout allows one."""
    t = t.reshape(-1, C)
    return t if t.stride(1) == 1 else t.contiguous()


def _check(x, weight, bias):
    if x.dtype not in DTYPES:
        raise ValueError(f"fused_layer_norm: x has dtype {x.dtype}; use one of {DTYPES}")
    if x.dim() == 0 or not 1 <= x.shape[-1] <= MAX_WIDTH:
        raise ValueError(f"fused_layer_norm: last dim of x{tuple(x.shape)} must be in 1..{MAX_WIDTH}; "
                         "use INTERN_KERNELS=torch for wider rows")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (x.shape[-1],):
            raise ValueError(f"fused_layer_norm: {name} has shape {tuple(p.shape)}, expected ({x.shape[-1]},)")
        if p.dtype not in DTYPES or p.device != x.device:
            raise ValueError(f"fused_layer_norm: {name} is {p.dtype} on {p.device}; it must be one of "
                             f"{DTYPES} on x's device {x.device}")


class _FusedLayerNorm(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        C = x.shape[-1]
        x2 = _rows_2d(x, C)                                     # (M, C)
        M = x2.shape[0]
        block_c, rows, warps = _fwd_tile(C)
        y = _empty((M, C), dtype=x.dtype, device=x.device)
        mean = _empty((M,), dtype=torch.float32, device=x.device)
        rstd = _empty((M,), dtype=torch.float32, device=x.device)
        if M > 0:
            _ln_fwd[(triton.cdiv(M, rows),)](
                x2, weight if weight is not None else x2, bias if bias is not None else x2,
                y, mean, rstd, M, C, x2.stride(0), y.stride(0), eps,
                HAS_W=weight is not None, HAS_B=bias is not None, ROWS=rows, BLOCK_C=block_c,
                num_warps=warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.has_bias, ctx.bias_dtype, ctx.x_shape = bias is not None, getattr(bias, "dtype", None), x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        M, C = x2.shape
        dy2 = _rows_2d(dy, C)                                   # (M, C); may have row stride 0
        block_c, rows, warps = _bwd_tile(C)
        n_tiles = triton.cdiv(M, rows)
        rows_per_prog = triton.cdiv(n_tiles, max(1, _bwd_programs(n_tiles, x2.device))) * rows  # whole tiles
        G = triton.cdiv(M, rows_per_prog) if M > 0 else 0       # no program gets zero rows
        has_w, has_b = weight is not None, ctx.has_bias
        dx = _empty((M, C), dtype=x2.dtype, device=x2.device)
        dw_part = _empty((G, C), dtype=torch.float32, device=x2.device) if has_w else None
        db_part = _empty((G, C), dtype=torch.float32, device=x2.device) if has_b else None
        if G > 0:
            _ln_bwd[(G,)](
                x2, weight if has_w else x2, dy2, dx, mean, rstd,
                dw_part if has_w else mean, db_part if has_b else mean,
                M, C, x2.stride(0), dy2.stride(0), dx.stride(0), rows_per_prog,
                HAS_W=has_w, HAS_B=has_b, ROWS=rows, BLOCK_C=block_c, num_warps=warps)
        # second reduction over the G partial rows: fixed order, hence deterministic
        dw = dw_part.sum(0).to(weight.dtype) if has_w else None
        db = db_part.sum(0).to(ctx.bias_dtype) if has_b else None
        return dx.view(ctx.x_shape), dw, db, None


def fused_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x (..., C) over its last dim with optional weight/bias (C,). Differentiable.
    Returns y (..., C) in x's dtype; statistics in fp32."""
    _check(x, weight, bias)
    return _FusedLayerNorm.apply(x, weight, bias, float(eps))


# ---------------------------------------------------------------------------------------------
# Work model for `bench.py plan`: the bytes a call moves through HBM on a GPU

def cost(M: int, C: int, dtype: torch.dtype = torch.bfloat16, param_dtype: torch.dtype = torch.float32,
         sms: int = 132) -> dict:
    """HBM bytes of one forward and one backward over M rows of width C (weight and bias given),
    each kernel reading its inputs and writing its outputs once, on a GPU with `sms` SMs
    (132 = H100 SXM). LayerNorm does ~10 FLOPs per byte less than the H100's ~300 FLOP/byte
    ridge point, so these bytes are its whole cost model.

    bytes_fwd: x -> y, plus mean and rstd (fp32 per row) and the parameters.
    bytes_bwd: x, dy, mean, rstd, weight -> dx, plus the (G, C) fp32 dweight / dbias partials
        written by the G programs and read back by the host-side sum.
    min_bytes_fwd / min_bytes_bwd: the unavoidable part, x -> y and x, dy -> dx (what the
        usual GB/s figures, and bench.py kernels, count).
    """
    e, p = torch.finfo(dtype).bits // 8, torch.finfo(param_dtype).bits // 8
    rows = _bwd_tile(C)[1]
    n_tiles = triton.cdiv(M, rows)
    rows_per_prog = triton.cdiv(n_tiles, min(n_tiles, 4 * sms)) * rows  # as the backward splits them
    G = triton.cdiv(M, rows_per_prog)
    row_stats = 2 * M * 4                                       # mean and rstd, fp32
    return {
        "programs_bwd": G,
        "min_bytes_fwd": 2 * M * C * e, "min_bytes_bwd": 3 * M * C * e,
        "bytes_fwd": 2 * M * C * e + row_stats + 2 * C * p,
        "bytes_bwd": 3 * M * C * e + row_stats + C * p + 2 * (2 * G * C * 4) + 2 * C * p,
    }


# ---------------------------------------------------------------------------------------------
# sm_90 (H100) compile check without a GPU

_TL_NAMES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16",
             "bf16": "bf16", "bfloat16": "bf16"}


def compile_for_sm90(dtype: str = "bf16", width: int = 1408, param_dtype: str | None = None) -> dict:
    """Compile both kernels for sm_90a on a machine without a GPU, with Triton's bundled ptxas.

    Returns {"fwd": info, "bwd": info}, info = {registers, spill_bytes, shared_bytes, num_warps,
    BLOCK_C, ROWS}. Catches what the CPU interpreter lets through (GPU-only compile errors,
    register spills, too much shared memory). Needs TRITON_INTERPRET unset or 0 when this module
    was imported (only then are the kernels compilable JITFunctions): run it in its own process.
    """
    import re
    import subprocess
    import tempfile

    if dtype not in _TL_NAMES or (param_dtype or dtype) not in _TL_NAMES:
        raise ValueError(f"compile_for_sm90: dtype {dtype!r} / param_dtype {param_dtype!r}; "
                         f"use one of {sorted(_TL_NAMES)}")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"compile_for_sm90: width {width} must be in 1..{MAX_WIDTH}")
    if not isinstance(_ln_fwd, triton.runtime.JITFunction):
        raise RuntimeError("compile_for_sm90: kernels.layernorm was imported with TRITON_INTERPRET=1; "
                           "run it in a fresh process with TRITON_INTERPRET=0")
    # version-specific locations, imported here so the module itself imports on any Triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    t, p = _TL_NAMES[dtype], _TL_NAMES[param_dtype or dtype]
    fwd_sig = {"X": f"*{t}", "W": f"*{p}", "B": f"*{p}", "Y": f"*{t}", "Mean": "*fp32", "Rstd": "*fp32",
               "M": "i32", "C": "i32", "stride_x": "i32", "stride_y": "i32", "eps": "fp32"}
    bwd_sig = {"X": f"*{t}", "W": f"*{p}", "DY": f"*{t}", "DX": f"*{t}", "Mean": "*fp32", "Rstd": "*fp32",
               "DW": "*fp32", "DB": "*fp32", "M": "i32", "C": "i32", "stride_x": "i32", "stride_dy": "i32",
               "stride_dx": "i32", "rows_per_prog": "i32"}
    kernels = {"fwd": (_ln_fwd, fwd_sig, _fwd_tile(width)), "bwd": (_ln_bwd, bwd_sig, _bwd_tile(width))}
    out = {}
    for name, (fn, sig, (block_c, rows, warps)) in kernels.items():
        consts = {"HAS_W": True, "HAS_B": True, "ROWS": rows, "BLOCK_C": block_c}
        # mirror the launch-time specialisation: torch buffers are 16-byte aligned, and C and the
        # row strides are flagged divisible by 16 when they are (that enables vector loads)
        div16 = [n for n in sig if sig[n].startswith("*") or (width % 16 == 0 and (n == "C" or n.startswith("stride")))]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
        sig = {**sig, **{k: "constexpr" for k in consts}}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        # ptxas -v on the generated PTX reports registers and spills (Triton only prints its log)
        with tempfile.TemporaryDirectory() as tmp:
            with open(f"{tmp}/k.ptx", "w") as f:
                f.write(kernel.asm["ptx"])
            log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", f"{tmp}/k.ptx",
                                  "-o", f"{tmp}/k.cubin"], capture_output=True, text=True, check=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
        out[name] = {"registers": int(regs.group(1)) if regs else None, "spill_bytes": sum(spills),
                     "shared_bytes": kernel.metadata.shared, "num_warps": warps,
                     "BLOCK_C": block_c, "ROWS": rows}
    return out
