"""Tests for kernels/layernorm.py: the Triton LayerNorm, run in Triton's CPU interpreter.

Every check compares against a float64 LayerNorm written out by hand (mean, biased variance,
autograd for the gradients) on fresh random inputs with a non-zero mean and non-unit scale.
bf16 gradients are never compared with torch's CPU bf16 LayerNorm, whose dW/dB reduction is
far less accurate than ours. Buffers the kernels write are poisoned with NaN and fenced by
canaries, so an element left unwritten or a write past the end fails a test.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import layernorm as ln

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Max error allowed, relative to the largest |reference| value: output rounding dominates
# (the interpreter truncates to bf16, up to 1 ulp = 2**-7), fp32 sums over <= 100 rows add ~1e-6.
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_inputs(shape, dtype, param_dtype, seed):
    """x with per-row offsets and scales (the mean/variance path matters), affine params, dy."""
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    offset = 4 * torch.randn(*shape[:-1], 1, generator=g)
    scale = 0.5 + 3 * torch.rand(*shape[:-1], 1, generator=g)
    x = (offset + scale * torch.randn(shape, generator=g)).to(dtype)
    w = b = None
    if param_dtype is not None:
        w = (1 + 0.5 * torch.randn(C, generator=g)).to(param_dtype)
        b = torch.randn(C, generator=g).to(param_dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, b, dy


def reference(x, w, b, dy, eps):
    """float64 LayerNorm by its definition; returns y, dx, dw, db (None where no param)."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    xd, wd, bd = leaves
    mu = xd.mean(-1, keepdim=True)
    var = ((xd - mu) ** 2).mean(-1, keepdim=True)
    y = (xd - mu) / torch.sqrt(var + eps)
    if wd is not None:
        y = y * wd
    if bd is not None:
        y = y + bd
    y.backward(dy.double())
    return (y.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def run_kernel(x, w, b, dy, eps):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = ln.fused_layer_norm(*leaves, eps)
    y.backward(dy)
    return (y.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def assert_close(name, out, ref, tol):
    assert out is not None and ref is not None, name
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out.double() - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= tol * scale + 1e-12, f"{name}: max error {err:.3g} > {tol} x max|ref| {scale:.3g}"


def check_against_reference(x, w, b, dy, eps=1e-5):
    out = run_kernel(x, w, b, dy, eps)
    ref = reference(x, w, b, dy, eps)
    tol = TOL[x.dtype]
    assert out[0].dtype == x.dtype and out[1].dtype == x.dtype
    for name, o, r, p in zip(("y", "dx", "dweight", "dbias"), out, ref, (x, x, w, b)):
        if p is None:
            assert o is None and r is None
            continue
        assert o.dtype == p.dtype, f"{name} has dtype {o.dtype}, expected {p.dtype}"
        assert_close(name, o, r, tol)


# (shape, x dtype, param dtype): widths 1, 7, 88, 1000, 1408, 8192; 0 to 3 leading dims;
# bf16 x with fp32 params is what autocast training feeds the ViT's LayerNorms.
CASES = [
    ((96, 1408), torch.float32, torch.float32),
    ((2, 3, 7), torch.float32, torch.float32),
    ((1000,), torch.float32, torch.float32),
    ((2, 3, 4, 88), torch.bfloat16, torch.float32),
    ((5, 1), torch.float32, torch.float32),
    ((4, 16, 88), torch.float16, torch.float16),
    ((37, 1000), torch.float16, torch.float32),
    ((40, 1408), torch.bfloat16, torch.bfloat16),
    ((2, 33, 1408), torch.bfloat16, torch.float32),
    ((6, 8192), torch.float32, torch.float32),
    ((3, 8192), torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("shape,dtype,param_dtype", CASES,
                         ids=[f"{'x'.join(map(str, s))}-{str(d)[6:]}-{str(p)[6:]}" for s, d, p in CASES])
def test_matches_float64_reference(shape, dtype, param_dtype):
    seed = CASES.index((shape, dtype, param_dtype))
    check_against_reference(*make_inputs(shape, dtype, param_dtype, seed))


@pytest.mark.parametrize("shape,dtype", [((3, 50, 88), torch.float32), ((24, 1408), torch.bfloat16)])
def test_no_affine(shape, dtype):
    x, _, _, dy = make_inputs(shape, dtype, None, seed=1)
    check_against_reference(x, None, None, dy)


@pytest.mark.parametrize("which", ["weight_only", "bias_only"])
def test_weight_or_bias_alone(which):
    x, w, b, dy = make_inputs((20, 88), torch.float32, torch.float32, seed=2)
    check_against_reference(x, w if which == "weight_only" else None, b if which == "bias_only" else None, dy)


class PoisonAllocator:
    """Stand-in for `layernorm._empty`: NaN-filled buffers with NaN canaries on both sides, so an
    unwritten element shows up as NaN and a stray write replaces a canary."""
    PAD = 4096  # elements each side; keeps the buffer 16-byte aligned like a fresh allocation

    def __init__(self):
        self.buffers = []

    def __call__(self, shape, dtype, device):
        n = math.prod(shape)
        big = torch.full((n + 2 * self.PAD,), float("nan"), dtype=dtype, device=device)
        self.buffers.append((big, n))
        return big[self.PAD:self.PAD + n].view(shape)

    def assert_canaries_intact(self):
        assert self.buffers, "the kernels allocated nothing through layernorm._empty"
        for big, n in self.buffers:
            assert torch.isnan(big[:self.PAD]).all() and torch.isnan(big[self.PAD + n:]).all(), \
                f"a kernel wrote outside its {n}-element buffer"


def fenced_view(t, pad=3):
    """Copy of t (M.., C) living in columns pad..pad+C of rows padded with NaN on both sides:
    a non-contiguous view (row stride C + 2 pad) that reads NaN if a load strays off its row."""
    big = torch.full((*t.shape[:-1], t.shape[-1] + 2 * pad), float("nan"), dtype=t.dtype)
    big[..., pad:pad + t.shape[-1]] = t
    return big, big[..., pad:pad + t.shape[-1]]


# row counts that leave the last tile partial and the backward programs uneven
@pytest.mark.parametrize("shape,dtype", [((3, 23, 88), torch.float32), ((19, 1408), torch.bfloat16),
                                         ((7, 3), torch.float16)])
def test_poisoned_buffers_and_strided_inputs(monkeypatch, shape, dtype):
    alloc = PoisonAllocator()
    monkeypatch.setattr(ln, "_empty", alloc)
    x, w, b, dy = make_inputs(shape, dtype, torch.float32, seed=3)
    x_big, x_view = fenced_view(x)
    dy_big, dy_view = fenced_view(dy)
    assert not x_view.is_contiguous()
    x_before, dy_before = x_big.clone(), dy_big.clone()

    out = run_kernel(x_view, w, b, dy_view, 1e-5)
    for name, o in zip(("y", "dx", "dweight", "dbias"), out):
        assert torch.isfinite(o).all(), f"{name} has unwritten (NaN) elements"
    alloc.assert_canaries_intact()
    assert len(alloc.buffers) == 6  # y, mean, rstd, dx, dW partials, dB partials
    assert torch.equal(x_big.nan_to_num(), x_before.nan_to_num()), "x was modified"
    assert torch.equal(dy_big.nan_to_num(), dy_before.nan_to_num()), "dy was modified"
    ref = reference(x, w, b, dy, 1e-5)
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), out, ref):
        assert_close(name, o, r, TOL[dtype])


def test_column_major_input_and_stride_zero_grads():
    """x whose last dim is not contiguous, and dy with stride-0 rows (a broadcast) or stride 0
    everywhere (what y.sum().backward() sends back)."""
    x, w, b, _ = make_inputs((24, 88), torch.float32, torch.float32, seed=4)
    x_cm = x.t().contiguous().t()                               # same values, column stride 24
    dy = torch.linspace(-1, 1, 88).expand(24, 88)               # strides (0, 1)
    out = run_kernel(x_cm, w, b, dy, 1e-5)
    ref = reference(x, w, b, dy, 1e-5)
    for name, o, r in zip(("y", "dx", "dweight", "dbias"), out, ref):
        assert_close(name, o, r, TOL[torch.float32])

    leaves = [t.clone().requires_grad_() for t in (x_cm, w, b)]
    ln.fused_layer_norm(*leaves).sum().backward()               # dy strides (0, 0)
    ref = reference(x, w, b, torch.ones(24, 88), 1e-5)
    for name, o, r in zip(("dx", "dweight", "dbias"), [t.grad for t in leaves], ref[1:]):
        assert_close(f"{name} (y.sum())", o, r, TOL[torch.float32])


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="dtype"):
        ln.fused_layer_norm(x.double(), None, None)
    with pytest.raises(ValueError, match="last dim"):
        ln.fused_layer_norm(torch.randn(2, ln.MAX_WIDTH + 1), None, None)
    with pytest.raises(ValueError, match="weight has shape"):
        ln.fused_layer_norm(x, torch.ones(15), None)


def _run_both_modes(monkeypatch, fn, *tensors):
    """fn(*leaves) under INTERN_KERNELS=triton and =torch; returns (outputs, grads) per mode
    and how often the Triton path was taken."""
    calls = []
    real = ln.fused_layer_norm
    monkeypatch.setattr(ln, "fused_layer_norm", lambda *a: calls.append(1) or real(*a))
    results = {}
    for mode in ("triton", "torch"):
        monkeypatch.setenv("INTERN_KERNELS", mode)
        leaves = [t.clone().requires_grad_() for t in tensors]
        y, params = fn(*leaves)
        y.backward(torch.ones_like(y) + torch.arange(y.shape[-1]) / y.shape[-1])
        results[mode] = [y.detach()] + [t.grad for t in leaves] + [p.grad for p in params]
        if mode == "triton":
            assert len(calls) == 1, "INTERN_KERNELS=triton did not reach fused_layer_norm"
    assert len(calls) == 1, "INTERN_KERNELS=torch reached fused_layer_norm"
    return results


def test_dispatch_layer_norm_triton_equals_torch(monkeypatch):
    x, w, b, _ = make_inputs((2, 9, 88), torch.float32, torch.float32, seed=5)
    res = _run_both_modes(monkeypatch, lambda x, w, b: (kernels.layer_norm(x, w, b, 1e-6), []), x, w, b)
    for name, t, r in zip(("y", "dx", "dweight", "dbias"), res["triton"], res["torch"]):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-5, msg=name)


def test_dispatch_layernorm_module_triton_equals_torch(monkeypatch):
    torch.manual_seed(6)
    m = kernels.LayerNorm(40, eps=1e-6)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.5)
        m.bias.normal_()
    x = 3 + 2 * torch.randn(3, 5, 40)

    def fn(x):
        m.zero_grad(set_to_none=True)
        return m(x), [m.weight, m.bias]

    res = _run_both_modes(monkeypatch, fn, x)
    for name, t, r in zip(("y", "dx", "dweight", "dbias"), res["triton"], res["torch"]):
        torch.testing.assert_close(t, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("M,C", [(50, 1408), (333, 40)])
def test_cost_counts_what_the_kernels_allocate(monkeypatch, M, C):
    """bytes = x, y (fwd) / x, dy, dx (bwd) + fp32 row stats + params + the (G, C) partials, with
    G the number of programs the backward really launches (CPU: 8 = 4 per SM of a 2-SM GPU)."""
    shapes = []
    monkeypatch.setattr(ln, "_empty", lambda shape, **kw: shapes.append(tuple(shape)) or torch.empty(shape, **kw))
    x, w, b, dy = make_inputs((M, C), torch.bfloat16, torch.float32, 3)
    run_kernel(x, w, b, dy, 1e-6)
    G = shapes[-1][0]                                            # rows of the dbias partials
    assert shapes[-2:] == [(G, C), (G, C)]
    c = ln.cost(M, C, torch.bfloat16, torch.float32, sms=2)
    assert c["programs_bwd"] == G
    assert c["bytes_fwd"] == 2 * M * C * 2 + 8 * M + 2 * C * 4
    assert c["bytes_bwd"] == 3 * M * C * 2 + 8 * M + 3 * C * 4 + 4 * G * C * 4
    # ViT-g, B = 32 on an H100: 8224 rows, <= 4 x 132 programs -> 16 rows each -> 514 programs
    assert ln.cost(8224, 1408)["programs_bwd"] == 514


def test_sm90_compile_no_spills():
    """Compile fwd and bwd for H100 (sm_90a) with Triton's bundled ptxas, in a fresh process
    (the kernels must not be interpreter functions there). Skips only without the toolchain."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
    except Exception as e:  # no NVIDIA backend or no bundled ptxas in this Triton build
        pytest.skip(f"no sm_90 toolchain: {e}")
    if not ptxas or not os.path.exists(ptxas):
        pytest.skip("no ptxas in this Triton install")
    code = ("import json; from kernels.layernorm import compile_for_sm90 as c; "
            "print(json.dumps({f'{d}/{p}/{w}': c(d, w, p) for d, p, w in "
            "[('bf16', None, 1408), ('bf16', None, 8192)]}))")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 2
    for config, kernels_info in report.items():
        assert set(kernels_info) == {"fwd", "bwd"}
        for name, info in kernels_info.items():
            where = f"{config} {name}: {info}"
            assert info["registers"] is not None and 0 < info["registers"] <= 255, where
            assert info["spill_bytes"] == 0, where
            assert info["shared_bytes"] <= 227 * 1024, where
