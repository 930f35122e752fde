"""Tests for eva.py: exact sizes, timm naming, a float64 reference forward written here with
plain tensor ops, the level/inject and mask-token contracts, checkpoints, and the Triton path."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eva

# a small config that still has 4 levels (depth 4) and more than one head
SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0)


def small(seed=0, **kw):
    """eva_demo shrunk to SMALL, with every parameter perturbed so that biases, LayerNorm
    affines and the mask token all carry signal (fresh init has many zeros and ones)."""
    torch.manual_seed(seed)
    m = eva.build("eva_demo", **{**SMALL, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- independent reference

def ref_forward(sd, x, heads, patch, pool, mask=None, inject=None, depth=None):
    """EVA forward from a state dict with plain ops. Returns (levels, pooled, final tokens)."""
    B, _, H, W = x.shape
    h, w = H // patch, W // patch
    Wp = sd["patch_embed.proj.weight"]
    C = Wp.shape[0]
    # patchify by hand: (B, 3, h, p, w, p) -> (B, h*w, 3*p*p), ordered like the conv kernel
    pt = x.reshape(B, 3, h, patch, w, patch).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, -1)
    t = pt @ Wp.reshape(C, -1).T + sd["patch_embed.proj.bias"]
    if mask is not None:
        t = t * (~mask)[..., None] + sd["mask_token"] * mask[..., None]
    pos = sd["pos_embed"]
    g = math.isqrt(pos.shape[1] - 1)
    if g != h or g != w:
        grid = pos[:, 1:].reshape(1, g, g, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, C)], 1)
    t = torch.cat([sd["cls_token"].expand(B, 1, C), t], 1) + pos

    def ln(z, pre):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-6) * sd[pre + ".weight"] + sd[pre + ".bias"]

    D = C // heads
    nblocks = depth
    ends = [(k + 1) * nblocks // 4 for k in range(4)]
    levels = []
    for i in range(nblocks):
        b = f"blocks.{i}."
        z = ln(t, b + "norm1")
        Wqkv = sd[b + "attn.qkv.weight"]
        q = z @ Wqkv[:C].T + sd[b + "attn.q_bias"]
        k = z @ Wqkv[C:2 * C].T
        v = z @ Wqkv[2 * C:].T + sd[b + "attn.v_bias"]
        q, k, v = (a.reshape(B, -1, heads, D).transpose(1, 2) for a in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, -1, C)
        t = t + o @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        z = ln(t, b + "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"]
        z = 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
        t = t + z @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        if i + 1 in ends:
            fmap = t[:, 1:].reshape(B, h, w, C).permute(0, 3, 1, 2)
            if inject is not None:
                fmap = inject(len(levels), fmap)
                t = torch.cat([t[:, :1], fmap.permute(0, 2, 3, 1).reshape(B, h * w, C)], 1)
            levels.append(fmap)
    if pool == "token":
        t = ln(t, "norm")
        pooled = t[:, 0]
    else:
        pooled = ln(t[:, 1:].mean(1), "fc_norm")
    return levels, pooled, t


# ----------------------------------------------------------------------------- sizes and names

def test_giant_parameter_count_on_meta():
    with torch.device("meta"):
        m = eva.build("eva_giant_patch14_224")
        mim = eva.build("eva_giant_patch14_224", use_mask_token=True)
        lm_head = nn.Linear(1408, 768)
    assert all(p.is_meta for p in m.parameters())
    assert n_params(m) == 1_011_146_112
    assert m.blocks[0].mlp.fc1.out_features == 6144 and m.blocks[0].attn.scale == 88 ** -0.5
    assert n_params(mim) + n_params(lm_head) == 1_012_229_632


@pytest.mark.parametrize("name", sorted(eva.PRESETS))
def test_preset_counts_match_formula(name):
    with torch.device("meta"):
        m = eva.build(name, num_classes=7)
    cfg = {**dict(img_size=224), **eva.PRESETS[name]}
    C, p, d = cfg["embed_dim"], cfg["patch_size"], cfg["depth"]
    hid = round(C * cfg.get("mlp_ratio", 4.0))
    N = (cfg["img_size"] // p) ** 2
    block = 4 * C + 3 * C * C + 2 * C + C * C + C + 2 * C * hid + hid + C
    expected = 3 * p * p * C + C + C + (1 + N) * C + d * block + 2 * C + 7 * C + 7
    assert n_params(m) == expected
    assert m.num_features == C and m.level_channels == [C] * 4 and m.level_strides == [p] * 4
    assert len(m.block_list()) == d and m.img_size == cfg["img_size"] and m.patch_size == p


def test_state_dict_keys_are_timm_names():
    C, p = 16, 4
    per_block = [
        ("norm1.weight", (C,)), ("norm1.bias", (C,)),
        ("attn.q_bias", (C,)), ("attn.v_bias", (C,)), ("attn.qkv.weight", (3 * C, C)),
        ("attn.proj.weight", (C, C)), ("attn.proj.bias", (C,)),
        ("norm2.weight", (C,)), ("norm2.bias", (C,)),
        ("mlp.fc1.weight", (4 * C, C)), ("mlp.fc1.bias", (4 * C,)),
        ("mlp.fc2.weight", (C, 4 * C)), ("mlp.fc2.bias", (C,)),
    ]
    common = {"cls_token": (1, 1, C), "pos_embed": (1, 1 + 4, C),
              "patch_embed.proj.weight": (C, 3, p, p), "patch_embed.proj.bias": (C,),
              "head.weight": (3, C), "head.bias": (3,)}
    common.update({f"blocks.{i}.{k}": s for i in range(2) for k, s in per_block})
    for pool, final in (("avg", "fc_norm"), ("token", "norm")):
        for mask_token in (False, True):
            m = eva.build("eva_demo", img_size=8, patch_size=p, embed_dim=C, depth=2, num_heads=2,
                          mlp_ratio=4.0, num_classes=3, global_pool=pool, use_mask_token=mask_token)
            want = {**common, f"{final}.weight": (C,), f"{final}.bias": (C,)}
            if mask_token:
                want["mask_token"] = (1, 1, C)
            got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
            assert got == want


def test_build_errors():
    with pytest.raises(ValueError, match="eva_demo"):
        eva.build("eva_huge")
    with pytest.raises(ValueError, match="img_size"):
        eva.build("eva_demo", image_size=32)
    with pytest.raises(ValueError, match="'avg' or 'token'"):
        eva.build("eva_demo", global_pool="max")


def test_init():
    torch.manual_seed(0)
    m = eva.build("eva_demo", embed_dim=256, depth=4, num_classes=10)
    d = len(m.blocks)
    for i, blk in enumerate(m.blocks):
        base = blk.attn.qkv.weight.std()
        # truncated at +-2 std: std 0.02 * 0.8796
        assert abs(base.item() - 0.02 * 0.8796) < 0.02 * 0.03
        for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
            assert abs(w.std() / base - 1 / math.sqrt(2 * (i + 1))) < 0.03
        assert blk.attn.q_bias.abs().sum() == 0 and blk.mlp.fc1.bias.abs().sum() == 0
        assert torch.equal(blk.norm1.weight, torch.ones(256)) and isinstance(blk.norm1, eva.kernels.LayerNorm)
    assert abs(m.pos_embed.std().item() - 0.02 * 0.8796) < 0.02 * 0.05
    assert d == 4 and m.head.weight.abs().max() <= 0.04 * 1e-3 + 1e-12


# ----------------------------------------------------------------------------- forward semantics

@pytest.mark.parametrize("pool", ["avg", "token"])
def test_forward_matches_float64_reference(pool):
    m = small(global_pool=pool, num_classes=5).double().eval()
    sd = m.state_dict()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    levels, pooled, tokens = ref_forward(sd, x, 4, 8, pool, depth=4)
    logits = pooled @ sd["head.weight"].T + sd["head.bias"]
    torch.testing.assert_close(m(x), logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.forward_head(m.forward_features(x), pre_logits=True), pooled)
    got_levels, got_pooled = m.forward_levels(x)
    torch.testing.assert_close(got_pooled, pooled)
    for a, b in zip(got_levels, levels):
        torch.testing.assert_close(a, b)
    # forward_patches: every location normalised once (by norm or by fc_norm)
    final = tokens[:, 1:]
    if pool == "avg":
        mu, var = final.mean(-1, keepdim=True), final.var(-1, unbiased=False, keepdim=True)
        final = (final - mu) / torch.sqrt(var + 1e-6) * sd["fc_norm.weight"] + sd["fc_norm.bias"]
    patches = m.forward_patches(x)
    assert patches.shape == (2, 32, 4, 4)
    torch.testing.assert_close(patches.flatten(2).transpose(1, 2), final)
    # another resolution: position embedding bicubically resized on the fly
    x48 = torch.randn(1, 3, 48, 40, dtype=torch.float64)
    _, pooled48, _ = ref_forward(sd, x48, 4, 8, pool, depth=4)
    torch.testing.assert_close(m.forward_head(m.forward_features(x48), pre_logits=True), pooled48)


def test_bad_input_sizes():
    m = small()
    with pytest.raises(ValueError, match="multiple of patch_size=8"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.randn(1, 1, 32, 32))


def test_levels_and_inject():
    m = small().double().eval()
    sd = m.state_dict()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    levels, pooled = m.forward_levels(x)
    torch.testing.assert_close(pooled, m(x))   # num_classes=0: model(x) is the pooled feature
    same, pooled_id = m.forward_levels(x, inject=lambda k, f: f)
    torch.testing.assert_close(pooled_id, pooled, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(same, levels))
    calls = []
    # a per-channel scale: LayerNorm would undo a uniform affine change, and a flip of the map
    # (not an elementwise op) makes a wrong token <-> map layout show
    scale = torch.linspace(0.5, 2.0, 32, dtype=torch.float64).view(1, -1, 1, 1)
    for k in range(4):
        def inj(j, f, k=k):
            calls.append(j)
            return f.flip(-1) * scale + 0.1 if j == k else f
        got, got_pooled = m.forward_levels(x, inject=inj)
        ref_levels, ref_pooled, _ = ref_forward(sd, x, 4, 8, "avg", inject=inj, depth=4)
        torch.testing.assert_close(got_pooled, ref_pooled)
        for j in range(4):
            torch.testing.assert_close(got[j], ref_levels[j])
            if j < k:
                assert torch.equal(got[j], levels[j])
            elif j == k:
                torch.testing.assert_close(got[j], levels[j].flip(-1) * scale + 0.1)
            else:
                assert not torch.allclose(got[j], levels[j])
        assert not torch.allclose(got_pooled, pooled)
    assert calls[:4] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keep the shape"):
        m.forward_levels(x, inject=lambda k, f: f[:, :3])


def test_mask_token():
    m = small(use_mask_token=True, global_pool="token").double().eval()
    sd = m.state_dict()
    B, h = 2, 4
    x = torch.randn(B, 3, 32, 32, dtype=torch.float64)
    mask = torch.rand(B, h * h) < 0.4
    mask[:, 0], mask[:, 1] = True, False
    out = m.forward_tokens(x, mask)
    torch.testing.assert_close(out, ref_forward(sd, x, 4, 8, "token", mask=mask, depth=4)[2])
    # pixels under masked patches do not matter ...
    pix = mask.reshape(B, 1, h, 1, h, 1).expand(B, 3, h, 8, h, 8).reshape(B, 3, 32, 32)
    noisy = torch.where(pix, torch.randn_like(x), x)
    torch.testing.assert_close(m.forward_tokens(noisy, mask), out, rtol=0, atol=1e-12)
    # ... unmasked ones and the mask token do
    assert not torch.allclose(m.forward_tokens(torch.where(pix, x, torch.randn_like(x)), mask), out)
    assert not torch.allclose(m.forward_tokens(x), out)
    with torch.no_grad():   # (a constant shift would be invisible: every LayerNorm removes it)
        m.mask_token.add_(torch.randn_like(m.mask_token))
    assert not torch.allclose(m.forward_tokens(x, mask), out)
    with pytest.raises(ValueError, match="use_mask_token=True"):
        small().forward_tokens(x.float(), mask)
    with pytest.raises(ValueError, match=r"\(2, 16\)"):
        m.forward_tokens(x, mask[:, :8])


def test_drop_path():
    torch.manual_seed(0)
    dp = eva.DropPath(0.3).train()
    y = dp(torch.ones(20000, 3))
    kept = y[:, 0] != 0
    assert torch.all(y[kept] == 1 / 0.7) and torch.all(y[~kept] == 0)
    assert abs(kept.float().mean().item() - 0.7) < 0.02
    assert torch.equal(dp.eval()(y), y)
    m = small(drop_path_rate=0.3)
    rates = [b.drop_path1.drop_prob for b in m.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 4).tolist())
    x = torch.randn(4, 3, 32, 32)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_grad_checkpointing_same_grads(monkeypatch):
    m = small(drop_path_rate=0.2, num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    used = []
    real = eva.checkpoint
    monkeypatch.setattr(eva, "checkpoint", lambda *a, **k: used.append(k) or real(*a, **k))

    def grads(ckpt):
        m.zero_grad()
        m.set_grad_checkpointing(ckpt)
        torch.manual_seed(1)
        levels, pooled = m.forward_levels(x)
        (m.head(pooled).square().sum() + levels[1].mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    a = grads(False)
    assert used == []
    b = grads(True)
    assert used == [dict(use_reentrant=False)] * 4   # once per block
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_autocast():
    m = small(use_mask_token=True)
    x = torch.randn(2, 3, 32, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        levels, _ = m.forward_levels(x)
        t = m.forward_tokens(x, torch.rand(2, 16) < 0.5)
    y.float().square().sum().backward()
    assert t.shape == (2, 17, 32) and levels[0].shape == (2, 32, 4, 4)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for n, p in m.named_parameters() if n != "mask_token")
    assert (y.float() - ref).norm() / ref.norm() < 0.05


# ----------------------------------------------------------------------------- checkpoints

def test_resize_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    out = eva.resize_pos_embed(pos, (6, 3))
    grid = pos[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 18, 8))
    assert torch.equal(out[:, 0], pos[:, 0]) and eva.resize_pos_embed(pos, 4) is pos
    with pytest.raises(ValueError, match="square"):
        eva.resize_pos_embed(pos[:, :-1], 4)


def test_load_pretrained_round_trip_and_nesting(tmp_path):
    a = small(global_pool="token", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    sd = a.state_dict()
    wraps = {
        "ours.pt": {"model": sd, "config": {"arch": "eva_demo", "lr": 1e-3}, "step": 3},
        "deepspeed.pt": {"module": sd, "epoch": 1},
        "ddp.pt": {"state_dict": {"module." + k: v for k, v in sd.items()}},
        "half.pt": {"model": {k: v.half() for k, v in sd.items()}},
    }
    for name, obj in wraps.items():
        torch.save(obj, tmp_path / name)
        b = small(seed=1, global_pool="token", num_classes=5).eval()
        rep = eva.load_pretrained(b, tmp_path / name)
        assert rep["missing"] == rep["unexpected"] == rep["dropped"] == rep["resized"] == []
        tol = dict(rtol=2e-2, atol=2e-3) if name == "half.pt" else dict(rtol=0, atol=0)
        torch.testing.assert_close(b(x), a(x), **tol)
    # a timm/BEiT-style fused qkv bias (k part zero) is split back into q_bias / v_bias
    fused = dict(sd)
    for i in range(4):
        q, v = fused.pop(f"blocks.{i}.attn.q_bias"), fused.pop(f"blocks.{i}.attn.v_bias")
        fused[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    torch.save(fused, tmp_path / "fused.pt")
    b = small(seed=1, global_pool="token", num_classes=5).eval()
    eva.load_pretrained(b, tmp_path / "fused.pt")
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    fused["blocks.0.attn.qkv.bias"][40] = 1.0
    torch.save(fused, tmp_path / "fused_k.pt")
    with pytest.raises(ValueError, match="non-zero k bias"):
        eva.load_pretrained(b, tmp_path / "fused_k.pt")


def test_load_pretrained_other_resolution(tmp_path):
    a = small(num_classes=5).eval()               # 32 px: 4x4 grid
    torch.save({"model": a.state_dict()}, tmp_path / "a.pt")
    b = small(seed=1, num_classes=5, img_size=48).eval()   # 6x6 grid
    rep = eva.load_pretrained(b, tmp_path / "a.pt")
    assert rep["resized"] and b.pos_embed.shape == (1, 37, 32)
    grid = a.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(b.pos_embed[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 36, 32))
    assert torch.equal(b.pos_embed[:, 0], a.pos_embed[:, 0])
    # loading at 48 px == running the 32 px model on 48 px input (on-the-fly resize)
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(b(x), a(x))


def test_load_official_mim_checkpoint(tmp_path):
    # official MIM layout: {"model": ...} with mask_token, the final `norm`, and lm_head
    a = small(global_pool="token", use_mask_token=True).eval()
    sd = {**a.state_dict(), "lm_head.weight": torch.randn(24, 32), "lm_head.bias": torch.randn(24)}
    torch.save({"model": sd, "epoch": 149}, tmp_path / "eva_mim.pt")
    b = small(seed=1, global_pool="avg", num_classes=10).eval()
    rep = eva.load_pretrained(b, tmp_path / "eva_mim.pt")
    assert sorted(rep["dropped"]) == ["lm_head.bias", "lm_head.weight", "mask_token"]
    assert rep["renamed"] == ["norm -> fc_norm"] and rep["missing"] == ["head.weight", "head.bias"]
    assert torch.equal(b.fc_norm.weight, a.norm.weight)
    x = torch.randn(2, 3, 32, 32)
    # avg model's per-location features == the MIM encoder's normed patch tokens
    torch.testing.assert_close(b.forward_patches(x).flatten(2).transpose(1, 2), a.forward_tokens(x)[:, 1:])
    # a backbone-only model drops a checkpoint's head
    torch.save({"model": small(num_classes=10).state_dict()}, tmp_path / "cls.pt")
    assert eva.load_pretrained(small(seed=2), tmp_path / "cls.pt")["dropped"] == ["head.weight", "head.bias"]


def test_load_pretrained_errors(tmp_path):
    torch.save({"model": small(num_classes=10).state_dict()}, tmp_path / "in10.pt")
    m = small(seed=1, num_classes=5)
    head = m.head.weight.clone()
    with pytest.raises(ValueError, match="num_classes=10"):
        eva.load_pretrained(m, tmp_path / "in10.pt")
    rep = eva.load_pretrained(m, tmp_path / "in10.pt", strict=False)
    assert "head.weight" in rep["dropped"] and torch.equal(m.head.weight, head)
    with pytest.raises(ValueError, match="embed_dim|width"):
        eva.load_pretrained(small(embed_dim=64), tmp_path / "in10.pt")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        eva.load_pretrained(m, tmp_path / "nothere.pt")
    (tmp_path / "junk.pt").write_bytes(torch.randint(0, 256, (1000,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ValueError, match="junk.pt"):
        eva.load_pretrained(m, tmp_path / "junk.pt")
    data = (tmp_path / "in10.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt"):
        eva.load_pretrained(m, tmp_path / "cut.pt")
    sd = small(num_classes=5).state_dict()
    sd["blocks.0.attn.relative_position_bias_table"] = torch.zeros(3, 4)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        eva.load_pretrained(m, tmp_path / "extra.pt")


# ----------------------------------------------------------------------------- Triton kernels

def test_triton_path_matches_torch(monkeypatch):
    pytest.importorskip("kernels.attention")
    pytest.importorskip("kernels.layernorm")
    assert callable(eva.kernels.attention), (
        "importing the submodule kernels/attention.py replaced the dispatch function "
        "kernels.attention with the module: kernels/__init__.py must keep the function bound")
    torch.manual_seed(0)
    m = eva.build("eva_demo", num_classes=4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 64)

    def run(mode):
        monkeypatch.setenv("INTERN_KERNELS", mode)
        m.zero_grad()
        levels, pooled = m.forward_levels(x)
        out = m.head(pooled)
        (out.square().sum() + levels[1].square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    out_t, g_t = run("torch")
    out_k, g_k = run("triton")
    torch.testing.assert_close(out_k, out_t, rtol=1e-4, atol=1e-5)
    for n in g_t:
        torch.testing.assert_close(g_k[n], g_t[n], rtol=1e-4, atol=1e-6, msg=n)
