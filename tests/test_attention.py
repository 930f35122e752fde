"""Tests for kernels/attention.py, run on CPU in Triton's interpreter (conftest sets TRITON_INTERPRET=1).

Every result is compared with a float64 torch reference computed from the same (rounded) inputs.
Low-precision tolerances are relative to what torch itself gets wrong: our error may be at most
3x torch's own SDPA error in the same dtype (vs float64) plus half an ulp of the output scale.
3x, not the usual 2x, because the interpreter truncates every fp32->bf16 cast (kernels.md A.5).

Masking bugs are invisible to a plain comparison (an unmasked load just reads whatever memory is
next door), so `test_poisoned_buffers` puts every input, dO and every buffer the kernels write
inside larger NaN-filled buffers: a read past N or D turns the result into NaN, an unwritten
element stays NaN, and a write past N or D shows up as a missing NaN in the padding.
"""
import importlib
import json
import math
import os
import subprocess
import sys
import warnings
import zlib

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels

A = importlib.import_module("kernels.attention")  # the module; `kernels.attention` is the dispatch function

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100_SHARED_LIMIT = 227 * 1024  # max dynamic shared memory per block on sm_90


@pytest.fixture(autouse=True)
def _bf16_dot():
    kernels._patch_interpreter_bf16_dot()  # the interpreter's bf16 tl.dot is broken otherwise


def reference(q, k, v, scale):
    """Naive softmax(q k^T * scale) v."""
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


def run(fn, q, k, v, do):
    """o and (dq, dk, dv) of fn on fresh leaves; returns [o, dq, dk, dv]."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))  # detach keeps strided views as they are
    o = fn(q, k, v)
    o.backward(do)
    return [o.detach(), q.grad, k.grad, v.grad]


def randn(shape, dtype, seed, mult=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * mult).to(dtype)


# (B, H, N, D, dtype, q multiplier, scale): covers N in {1, 7, 257, 1025}, D in {40, 88, 128} and
# each dtype; q x6 makes the softmax peaky (score std 6, extremes ~ +-30), which exercises the
# online rescaling and would overflow exp() in fp16 if the statistics were not kept in fp32.
CASES = [
    (1, 3, 1, 40, torch.float16, 1.0, None),
    (2, 1, 7, 128, torch.bfloat16, 1.0, None),
    (1, 2, 7, 88, torch.float32, 1.0, 0.3),
    (1, 2, 257, 88, torch.float32, 1.0, None),
    (2, 2, 257, 88, torch.bfloat16, 1.0, None),
    (1, 1, 257, 128, torch.float16, 1.0, None),
    (1, 1, 257, 40, torch.float16, 6.0, None),
    (1, 1, 1025, 88, torch.bfloat16, 1.0, None),
]


@pytest.mark.parametrize("B,H,N,D,dtype,mult,scale", CASES,
                         ids=[f"B{c[0]}H{c[1]}N{c[2]}D{c[3]}-{str(c[4])[6:]}-x{c[5]:g}" for c in CASES])
def test_matches_float64_reference(B, H, N, D, dtype, mult, scale):
    seed = zlib.crc32(f"{B},{H},{N},{D},{dtype}".encode())  # per case, same every run
    q = randn((B, H, N, D), dtype, seed, mult)
    k, v, do = (randn((B, H, N, D), dtype, seed + i) for i in (1, 2, 3))
    s = D ** -0.5 if scale is None else scale

    ours = run(lambda a, b, c: A.flash_attention(a, b, c, scale), q, k, v, do)
    exact = run(lambda a, b, c: reference(a, b, c, s), q.double(), k.double(), v.double(), do.double())
    torch_same_dtype = run(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=s), q, k, v, do)

    for got in ours:
        assert got.dtype == dtype and got.shape == (B, H, N, D)
    assert_as_close_as_torch(ours, exact, torch_same_dtype, dtype)


def assert_as_close_as_torch(ours, exact, torch_same_dtype, dtype, ulps=0.5):
    """max |ours - exact| <= 3x torch's own max error in this dtype + `ulps` ulps of the scale."""
    eps = torch.finfo(dtype).eps
    for name, got, want, base in zip(("o", "dq", "dk", "dv"), ours, exact, torch_same_dtype):
        err = (got.double() - want).abs().max().item()
        torch_err = (base.double() - want).abs().max().item()
        tol = 3 * torch_err + ulps * eps * max(1.0, want.abs().max().item())
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (torch {dtype} gets {torch_err:.3g})"


# Both head-dim layouts where they differ: D = 88 (padded 128 / split 64 + 32) and D = 72 (padded
# 128 / split 64 + 16), in bf16 and fp32; N = 200 makes the 128-row interpreter tiles loop twice.
VARIANT_CASES = [(D, dtype, variant) for D in (88, 72) for dtype in (torch.bfloat16, torch.float32)
                 for variant in ("padded", "split")]


@pytest.mark.parametrize("D,dtype,variant", VARIANT_CASES,
                         ids=[f"D{c[0]}-{str(c[1])[6:]}-{c[2]}" for c in VARIANT_CASES])
def test_variants_match_float64_reference(D, dtype, variant):
    B, H, N = 1, 2, 200
    seed = zlib.crc32(f"variant,{D},{dtype}".encode())  # both variants get the same inputs
    q, k, v, do = (randn((B, H, N, D), dtype, seed + i) for i in range(4))
    ours = run(lambda a, b, c: A.flash_attention(a, b, c, variant=variant), q, k, v, do)
    exact = run(lambda a, b, c: reference(a, b, c, D ** -0.5), q.double(), k.double(), v.double(), do.double())
    torch_same_dtype = run(F.scaled_dot_product_attention, q, k, v, do)
    # fp32: torch's error is one sample of summation-order noise, which for the N-term sums of
    # o and the gradients is ~sqrt(N) ulps (17 ulps on dv seen here), so allow that much too
    ulps = math.sqrt(N) if dtype == torch.float32 else 0.5
    assert_as_close_as_torch(ours, exact, torch_same_dtype, dtype, ulps)
    # o lives in (B, N, H, D) order, like torch's flash SDPA: o -> (B, N, H*D) is a view
    assert ours[0].transpose(1, 2).is_contiguous()


def test_layouts():
    """Known tilings: split where it pads less (65..96), padded elsewhere; forcing works both ways."""
    assert A.layout(88) == (64, 32) and A.layout(72) == (64, 16) and A.layout(96) == (64, 32)
    assert A.layout(65) == (64, 16) and A.layout(97) == (128, 0) and A.layout(40) == (64, 0)
    assert A.layout(8) == (16, 0)  # tl.dot needs K >= 16
    assert A.layout(88, "padded") == (128, 0) and A.layout(128, "split") == (64, 64)
    for D in range(1, A.MAX_HEAD_DIM + 1):
        block_d, block_d2 = A.layout(D)
        assert block_d + block_d2 >= D and block_d + block_d2 <= max(16, 2 * D)
        assert block_d + block_d2 <= A._block_d(D)  # auto never pads more than the plain layout
    with pytest.raises(ValueError, match="split layout needs 64 < head dim"):
        A.layout(40, "split")
    with pytest.raises(ValueError, match="'auto', 'padded', 'split'"):
        A.layout(88, "fast")


def test_variant_from_argument_and_env(monkeypatch):
    """variant= wins over INTERN_ATTN_VARIANT, which wins over auto; both reach the launch."""
    seen = []
    forward = A._forward

    def spy(q, k, v, scale, tiles):
        seen.append(tiles)
        return forward(q, k, v, scale, tiles)
    monkeypatch.setattr(A, "_forward", spy)
    x = torch.randn(1, 1, 5, 88)
    A.flash_attention(x, x, x)
    monkeypatch.setenv(A.VARIANT_ENV, "padded")
    A.flash_attention(x, x, x)
    A.flash_attention(x, x, x, variant="split")
    assert seen == [(64, 32), (128, 0), (64, 32)]
    monkeypatch.setenv(A.VARIANT_ENV, "fastest")
    with pytest.raises(ValueError, match="INTERN_ATTN_VARIANT"):
        A.flash_attention(x, x, x)


def test_alignment_promise():
    """ALIGN (elements) must divide every stride, up to 16 bytes: 8 for 16-bit, 4 for fp32."""
    assert A._align([4224, 88, 1408], 2) == 8            # ViT-g: qkv rows, head offset 88
    assert A._align([4224, 44, 1408], 2) == 4
    assert A._align([4224, 88, 0], 4) == 4               # stride 0 (broadcast) divides by anything
    assert A._align([65, 3], 2) == 1
    for _ in range(20):
        strides = torch.randint(0, 5000, (6,)).tolist()
        a = A._align(strides, 2)
        assert all(s % a == 0 for s in strides) and (a == 8 or any(s % (2 * a) for s in strides))


def test_cost_counts():
    """The work model against counts done by hand for tile-aligned shapes."""
    B, H, N = 2, 3, 256                                   # a multiple of every GPU tile
    c = A.cost(B, H, N, 64, "padded")
    assert c["executed_fwd"] == c["useful_fwd"] == 4 * B * H * N * N * 64
    assert c["executed_bwd"] * 5 == c["useful_bwd"] * 7  # 7 matmuls where the convention counts 5
    c88 = {v: A.cost(B, H, N, 88, v) for v in ("padded", "split")}
    assert c88["padded"]["executed_fwd"] * 88 == c88["padded"]["useful_fwd"] * 128
    assert c88["split"]["executed_fwd"] * 88 == c88["split"]["useful_fwd"] * 96
    assert c88["split"]["bytes_fwd"] == 4 * B * H * N * 88 * 2 + B * H * N * 4
    c257 = A.cost(B, H, 257, 88, "split")                 # 257 rows -> 3 x 128 query tiles, 5 x 64 key tiles
    assert c257["executed_fwd"] == 2 * 2 * B * H * 384 * 320 * 96


def test_strided_and_broadcast_inputs():
    """q/k/v sliced out of one qkv tensor (arbitrary B/H/N strides), k with a non-unit D stride
    (copied), v broadcast over heads (H stride 0) and dO = expanded ones from o.sum()."""
    B, H, N, D = 2, 3, 33, 64
    qkv = randn((B, N, 3, H, D), torch.float32, 1)
    q = qkv[:, :, 0].permute(0, 2, 1, 3)                               # (B, H, N, D), strides (N*3*H*D, D, 3*H*D, 1)
    k = randn((B, H, D, N), torch.float32, 2).transpose(-1, -2)        # (B, H, N, D), D stride N
    v1 = randn((B, 1, N, D), torch.float32, 3)
    assert q.stride(-1) == 1 and not q.is_contiguous() and k.stride(-1) != 1

    def loss_and_grads(fn, q, k, v1):
        q, k, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v1))
        o = fn(q, k, v1.expand(B, H, N, D))
        o.sum().backward()
        return [o.detach(), q.grad, k.grad, v1.grad]

    ours = loss_and_grads(A.flash_attention, q, k, v1)
    exact = loss_and_grads(lambda a, b, c: reference(a, b, c, D ** -0.5), q.double(), k.double(), v1.double())
    for name, got, want in zip(("o", "dq", "dk", "dv"), ours, exact):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5, msg=name)


def test_all_scores_very_negative():
    """Softmax is shift invariant, so rows whose scores are all ~ -200 are fine in fp64, and must be
    in the kernel too: a padded key (score 0 there) must not get weight exp(+200) = inf."""
    B, H, N, D = 1, 2, 70, 40
    k = randn((B, H, N, D), torch.float32, 30).abs() + 1.0             # every entry >= 1
    q = -(randn((B, H, N, D), torch.float32, 31).abs() + 1.0) * 15.0   # every entry <= -15
    v, do = (randn((B, H, N, D), torch.float32, 32 + i) for i in range(2))
    assert (q.double() @ k.double().transpose(-1, -2) * D ** -0.5).max() < -100
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy overflow/invalid inside the interpreter
        ours = run(A.flash_attention, q, k, v, do)
    exact = run(lambda a, b, c: reference(a, b, c, D ** -0.5), q.double(), k.double(), v.double(), do.double())
    torch_fp32 = run(F.scaled_dot_product_attention, q, k, v, do)
    assert_as_close_as_torch(ours, exact, torch_fp32, torch.float32)


class NaNPadded:
    """Replacement for kernels.attention._empty: every buffer is a view into a larger NaN buffer,
    with room past N and past BLOCK_D for any row or column a masking bug could touch."""

    def __init__(self):
        self.buffers = []  # (whole buffer, bool mask of the elements the caller may see)

    def __call__(self, shape, dtype, device):
        buf, view, inside = padded_view(shape, dtype, rows_dim=1)  # 4-D outputs are (B, N, H, D) buffers
        self.buffers.append((buf, inside))
        return view

    def assert_padding_untouched(self):
        for buf, inside in self.buffers:
            outside = buf[~inside]
            assert torch.isnan(outside.float()).all(), f"a kernel wrote outside its {tuple(buf.shape)} buffer view"


def padded_view(shape, dtype, rows_dim=2):
    """NaN buffer + the (shape) view the kernels get + mask of that view inside the buffer.
    4-D: room past any row block in dim `rows_dim` (the N dim) and past any BLOCK_D."""
    if len(shape) == 4:
        big = list(shape)
        big[rows_dim] += 128
        big[3] = 128 + 8
        B, S1, S2, D = shape

        def cut(t):
            return t[:, :S1, :S2, :D]
    else:  # lse / Delta: the kernels index them as contiguous (B*H*N,), so pad only at the end
        n = math.prod(shape)
        big = (n + 128,)

        def cut(t):
            return t[:n].view(shape)
    buf = torch.full(big, float("nan"), dtype=dtype)
    inside = torch.zeros(big, dtype=torch.bool)
    cut(inside).fill_(True)
    return buf, cut(buf), inside


def nan_padded_copy(x):
    buf, view, _ = padded_view(x.shape, x.dtype)
    view.copy_(x)
    return view


# launch configs: the interpreter table (128x128 tiles) and the GPU tables, whose smaller tiles
# make the loops run several partial/full iterations; both head-dim layouts, the split one with
# a 32-wide (D = 88) and a 16-wide (D = 72) second tile
POISON_CASES = [
    ("interpreter", "auto", 2, 2, 257, 40, torch.float32),
    ("gpu", "padded", 1, 2, 257, 88, torch.bfloat16),
    ("gpu", "split", 1, 2, 257, 88, torch.bfloat16),
    ("gpu", "auto", 1, 1, 130, 40, torch.float16),
    ("gpu", "padded", 1, 1, 70, 88, torch.float32),
    ("gpu", "split", 1, 1, 70, 72, torch.float32),
    ("interpreter", "split", 1, 1, 200, 72, torch.bfloat16),
]


@pytest.mark.parametrize("config,variant,B,H,N,D,dtype", POISON_CASES,
                         ids=[f"{c[0]}-{c[1]}-N{c[4]}D{c[5]}-{str(c[6])[6:]}" for c in POISON_CASES])
def test_poisoned_buffers(monkeypatch, config, variant, B, H, N, D, dtype):
    alloc = NaNPadded()
    monkeypatch.setattr(A, "_empty", alloc)
    if config == "gpu":
        table = A._config
        monkeypatch.setattr(A, "_config", lambda t, dt, interpreter=None: table(t, dt, interpreter=False))
    q, k, v, do = (randn((B, H, N, D), dtype, 10 + i) for i in range(4))

    inputs = [nan_padded_copy(t) for t in (q, k, v, do)]
    assert all(t.stride(-2) == 136 for t in inputs)  # really views into the NaN buffers
    ours = run(lambda a, b, c: A.flash_attention(a, b, c, variant=variant), *inputs)
    exact = run(lambda a, b, c: reference(a, b, c, D ** -0.5), q.double(), k.double(), v.double(), do.double())
    _, lse = A._forward(*(nan_padded_copy(t) for t in (q, k, v)), D ** -0.5, A.layout(D, variant))

    alloc.assert_padding_untouched()
    assert len(alloc.buffers) == 2 + 4 + 2  # o, lse; Delta, dq, dk, dv; o, lse again
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    for name, got, want in zip(("o", "dq", "dk", "dv"), ours, exact):
        assert torch.isfinite(got).all(), f"{name}: NaN leaked in (unmasked read or unwritten element)"
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol, msg=name)
    scores = q.double() @ k.double().transpose(-1, -2) * D ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=1e-5, atol=tol)


def test_dispatch_triton_equals_torch(monkeypatch):
    q, k, v, do = (randn((2, 2, 33, 64), torch.float32, 20 + i) for i in range(4))
    monkeypatch.setenv("INTERN_KERNELS", "triton")
    out_triton = run(kernels.attention, q, k, v, do)
    o = kernels.attention(q.requires_grad_(), k, v)
    assert "FlashAttention" in o.grad_fn.name(), "INTERN_KERNELS=triton did not reach flash_attention"
    monkeypatch.setenv("INTERN_KERNELS", "torch")
    out_torch = run(kernels.attention, q, k, v, do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), out_triton, out_torch):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def _bundled_ptxas():
    path = os.environ.get("TRITON_PTXAS_PATH") or os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.isfile(path) else None


@pytest.mark.parametrize("variant", ["padded", "split"])
def test_compiles_for_h100_sm90(variant):
    if _bundled_ptxas() is None:
        pytest.skip("triton has no CUDA toolchain (ptxas) here, cannot compile for sm_90")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=ROOT)
    code = ("import json; from kernels.attention import compile_for_sm90; "
            f"print(json.dumps(compile_for_sm90(dtype='bf16', head_dim=88, variant='{variant}')))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(report) == {"fwd", "delta", "dkdv", "dq"}
    for name, r in report.items():
        print(f"sm_90 bf16 D=88 {variant} {name}: {r}")
        assert 0 < r["shared"] <= H100_SHARED_LIMIT, f"{name} needs {r['shared']} B of shared memory"
        assert r["registers"] is not None, f"{name}: no ptxas register count in the log"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{name}: register spills with {r['config']}"
        # every q/k/v/o row moves in 16-byte pieces (D and the alignment are compile-time facts)
        assert r["scalar_accesses"] == 0, f"{name}: {r['scalar_accesses']} one-element global accesses"
        if name != "delta":
            assert r["wgmma"], f"{name}: expected Hopper wgmma tensor-core instructions in the PTX"
            assert tuple(r["tiles"]) == A.layout(88, variant)


def test_clear_errors():
    x = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="head dim 144"):
        A.flash_attention(*(torch.randn(1, 2, 5, 144),) * 3)
    with pytest.raises(ValueError, match="same shape"):
        A.flash_attention(x, x, torch.randn(1, 2, 6, 16))
    with pytest.raises(ValueError, match="one dtype"):
        A.flash_attention(x, x.half(), x)
    with pytest.raises(ValueError, match="one device"):
        A.flash_attention(x, x, x.to("meta"))
    with pytest.raises(ValueError, match="4-D"):
        A.flash_attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="not supported"):
        A.flash_attention(x.double(), x.double(), x.double())
    with pytest.raises(ValueError, match="variant 'wide'"):
        A.flash_attention(x, x, x, variant="wide")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        A.compile_for_sm90()  # interpreted kernels cannot be compiled
