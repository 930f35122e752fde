"""kernels/__init__.py: the INTERN_KERNELS dispatch. The kernels themselves are tested in
test_attention.py and test_layernorm.py."""
import os
import subprocess
import sys

import pytest
import torch

import kernels


def _naive_attention(q, k, v, scale):
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * scale, dim=-1)
    return p @ v.double()


def test_torch_path_matches_float64_reference(monkeypatch):
    monkeypatch.setenv("INTERN_KERNELS", "torch")
    q, k, v = (torch.randn(2, 3, 11, 40) for _ in range(3))
    out = kernels.attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out.double(), _naive_attention(q, k, v, 0.3), atol=1e-5, rtol=1e-5)
    x, w, b = torch.randn(4, 5, 33) * 3 + 1, torch.randn(33), torch.randn(33)
    ref = (x.double() - x.double().mean(-1, keepdim=True)) / torch.sqrt(x.double().var(-1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(kernels.layer_norm(x, w, b, 1e-6).double(), ref * w.double() + b.double(),
                               atol=1e-5, rtol=1e-5)


def test_auto_uses_torch_on_cpu(monkeypatch):
    monkeypatch.setenv("INTERN_KERNELS", "auto")
    assert not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("INTERN_KERNELS", "torch")
    assert not kernels.use_triton(torch.zeros(1))


def test_invalid_mode_names_the_choices(monkeypatch):
    monkeypatch.setenv("INTERN_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto.*triton.*torch"):
        kernels.attention(*(torch.randn(1, 1, 2, 8) for _ in range(3)))


def test_forcing_triton_on_cpu_without_interpreter_says_how_to_fix():
    env = dict(os.environ, INTERN_KERNELS="triton", TRITON_INTERPRET="0")
    code = "import torch, kernels; kernels.layer_norm(torch.randn(2, 8), None, None)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "TRITON_INTERPRET=1" in r.stderr


def test_layernorm_module_keeps_torch_state_dict_names():
    ln = kernels.LayerNorm(16, eps=1e-6)
    assert set(ln.state_dict()) == {"weight", "bias"}
    x = torch.randn(3, 16)
    torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, 1e-6))


def test_importing_the_kernel_files_does_not_shadow_the_functions():
    import importlib
    importlib.import_module("kernels.attention")
    importlib.import_module("kernels.layernorm")
    from kernels.attention import flash_attention  # noqa: F401  (what bench.py does)
    assert callable(kernels.attention) and kernels.attention.__module__ == "kernels"
    assert callable(kernels.layer_norm)
