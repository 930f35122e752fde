"""Tests for metanet.py: released configurations (params / MACs against an independent analytic
count), the backbone contract (levels, inject, heads), training behaviour (BN, drop path, grad
checkpointing, bf16) and the attention maths against naive float64 references."""
import copy
import math
import runpy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import metanet

# ------------------------------------------------------------------------------------------------
# Independent analytic count (re-derived from the module structure of INTERN's released code, as
# in reference/intern.md Appendix A) -- params include BN/LN affine; MACs count convs, linears and
# attention matmuls. Configs of the released models are spelled out here, not read from PRESETS.
# ------------------------------------------------------------------------------------------------

RELEASED = {
    "mn_b4": dict(stem=32, depths=[2, 3, 6, 6, 6, 12], widths=[32, 64, 128, 192, 192, 384],
                  ops=["mb"] * 4 + ["mhsa"] * 2, hd=48),
    "mn_b15": dict(stem=96, depths=[4, 6, 12, 12, 12, 24], widths=[128, 256, 512, 768, 768, 1536],
                   ops=["fmb"] * 2 + ["mb"] * 2 + ["xca"] * 2, hd=64),
}


def _round8(v):
    r = max(8, int(v + 4) // 8 * 8)
    return r + 8 if r < 0.9 * v else r


def _block_cost(op, ci, co, stride, e, H, W, hd):
    """(params, MACs, Ho, Wo) of one block."""
    Ho, Wo = -(-H // stride), -(-W // stride)
    change = stride != 1 or ci != co
    p = m = 0
    if change:                                   # max-pool + 1x1 conv (bias) shortcut
        p += ci * co + co
        m += Ho * Wo * ci * co
    if op in ("mb", "fmb"):
        h = int(ci * e)
        sq = _round8(h // 4)
        se_p, se_m = 2 * h * sq + sq + h, 2 * h * sq
        if op == "mb":
            if h != ci or stride != 1:           # BN, 1x1 expand, BN
                p += 2 * ci + ci * h + 2 * h
                m += H * W * ci * h
            p += 9 * h + 2 * h + se_p + h * co + co + 2 * co
            m += Ho * Wo * 9 * h + se_m + Ho * Wo * h * co
        elif h != ci:                            # BN, 3x3 expand (strided), BN, SE, 1x1 project, BN
            p += 2 * ci + 9 * ci * h + 2 * h + se_p + h * co + co + 2 * co
            m += Ho * Wo * 9 * ci * h + se_m + Ho * Wo * h * co
        else:                                    # SE, 3x3 conv (strided, bias), BN
            p += se_p + 9 * h * co + co + 2 * co
            m += se_m + Ho * Wo * 9 * h * co
        return p, m, Ho, Wo
    heads = ci // hd
    d = ci // heads
    p += 10 * ci + 2 * ci + 3 * ci * ci + 3 * ci + ci * co + co + co   # pos conv, LN1, qkv, proj, gamma_1
    p += heads if op == "xca" else 0
    m += H * W * 9 * ci
    n = Ho * Wo if change else H * W             # attention runs on pooled tokens when shape changes
    m += n * 3 * ci * ci + n * ci * co
    m += 2 * n * ci * d if op == "xca" else 2 * n * n * ci
    if not change:                               # LN2, MLP, gamma_2
        hid = int(ci * e)
        p += 2 * ci + 2 * ci * hid + hid + ci + co
        m += 2 * H * W * ci * hid
    return p, m, Ho, Wo


def analytic(stem, depths, widths, ops, hd, H=224, W=224, num_classes=0):
    strides, exps = [1, 2, 2, 2, 1, 2], [1, 4, 6, 3, 2, 5]
    H, W = -(-H // 2), -(-W // 2)
    P, M = 27 * stem + 2 * stem, H * W * 27 * stem
    ci = stem
    for s in range(6):
        for i in range(depths[s]):
            p, m, H, W = _block_cost(ops[s], ci, widths[s], strides[s] if i == 0 else 1, exps[s], H, W, hd)
            P, M, ci = P + p, M + m, widths[s]
    P, M = P + ci * 1280 + 2 * 1280, M + H * W * ci * 1280
    if num_classes:
        P, M = P + 1280 * num_classes + num_classes, M + 1280 * num_classes
    return P, M


def _demo_cfg():
    c = metanet.PRESETS["metanet_demo"]
    return dict(stem=c["stem_dim"], depths=c["depths"], widths=c["widths"], ops=c["ops"], hd=c["head_dim"])


def nparams(model):
    return sum(p.numel() for p in model.parameters())


def macs(model, x):
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2


def randomized(model, seed=0):
    """Replace the identity-making inits (zero BN, LayerScale 1e-6) and BN statistics by random
    values, so every branch contributes and a wrong wiring shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.1)
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
        for name, p in model.named_parameters():
            if "gamma" in name or "temperature" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def demo(**kw):
    torch.manual_seed(0)
    return randomized(metanet.build("metanet_demo", **kw))


# ------------------------------------------------------------------------------------------------
# Released configurations
# ------------------------------------------------------------------------------------------------

def test_mn_b4_params_and_macs():
    with torch.device("meta"):
        model = metanet.build("mn_b4", num_classes=1000).eval()
        got_p = nparams(model)
        got_m = macs(model, torch.empty(1, 3, 224, 224))
    want_p, want_m = analytic(**RELEASED["mn_b4"], num_classes=1000)
    assert got_p == want_p
    assert got_m == pytest.approx(want_m, rel=1e-6)
    # INTERN model zoo: 31.7 M params, 3.17 GFLOPs (= MACs) at 224 with a 1000-way classifier
    assert got_p == pytest.approx(31.7e6, rel=5e-3)
    assert got_m == pytest.approx(3.17e9, rel=5e-3)
    assert model.level_channels == [64, 128, 192, 384] and model.level_strides == [4, 8, 16, 32]


def test_mn_b15_params_on_meta():
    with torch.device("meta"):
        model = metanet.build("mn_b15")
    assert all(p.is_meta for p in model.parameters())
    got = nparams(model)
    assert got == analytic(**RELEASED["mn_b15"])[0]
    assert got == pytest.approx(1.00e9, rel=1e-2)
    assert model.level_channels == [256, 512, 768, 1536]
    assert len(model.no_weight_decay()) == 36               # one XCA temperature per block


def test_demo_params_and_macs_non_square():
    # on meta: FlopCounterMode does not see torch's CPU flash-attention kernel (torch 2.13)
    with torch.device("meta"):
        model = metanet.build("metanet_demo").eval()
        got_m = macs(model, torch.empty(1, 3, 64, 96))
    want_p, want_m = analytic(**_demo_cfg(), H=64, W=96)
    assert nparams(model) == want_p
    assert got_m == pytest.approx(want_m, rel=1e-6)
    assert set(metanet.PRESETS["metanet_demo"]["ops"]) == set(metanet.OPS)   # every op type


def test_drop_path_schedule():
    with torch.device("meta"):
        model = metanet.build("mn_b15")
    blocks = model.block_list()
    assert len(blocks) == 70 and blocks == list(model.blocks)
    want = torch.linspace(0, 0.3, 70)
    for i, blk in enumerate(blocks):
        if hasattr(blk, "drop_path"):
            assert blk.drop_path.drop_prob == pytest.approx(want[i].item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Contract: shapes, heads, inject
# ------------------------------------------------------------------------------------------------

def test_levels_and_heads_non_square():
    model = demo(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        levels, pooled = model.forward_levels(x)
        patches = model.forward_patches(x)
        feats = model.forward_features(x)
        logits = model(x)
    assert model.level_strides == [4, 8, 16, 32] and model.num_features == 1280
    assert model.img_size == 64
    for f, c, s in zip(levels, model.level_channels, model.level_strides):
        assert f.shape == (2, c, 64 // s, 96 // s)
    assert patches.shape == feats.shape == (2, 1280, 2, 3)
    torch.testing.assert_close(pooled, patches.mean(dim=(2, 3)))
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), pooled)
    torch.testing.assert_close(logits, pooled @ model.fc.weight.T + model.fc.bias)
    assert logits.shape == (2, 7)
    # without classifier the model returns the pooled feature
    bare = metanet.build("metanet_demo")
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")})
    with torch.no_grad():
        torch.testing.assert_close(bare.eval()(x), pooled)
    # level shapes of MN-B4 on meta (no compute)
    with torch.device("meta"):
        b4 = metanet.build("mn_b4")
        lv, pm = b4.forward_levels(torch.empty(1, 3, 96, 64))
    assert [tuple(f.shape) for f in lv] == [(1, 64, 24, 16), (1, 128, 12, 8), (1, 192, 6, 4), (1, 384, 3, 2)]
    assert tuple(pm.shape) == (1, 1280)


def test_inject():
    model = demo().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref_levels, ref_pooled = model.forward_levels(x)
        seen = []
        levels, pooled = model.forward_levels(x, inject=lambda k, f: (seen.append((k, f.shape)), f)[1])
        assert [k for k, _ in seen] == [0, 1, 2, 3]
        assert [s for _, s in seen] == [f.shape for f in ref_levels]
        for a, b in zip(levels, ref_levels):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
        for k in range(4):
            delta = torch.randn_like(ref_levels[k])
            lv, pl = model.forward_levels(x, inject=lambda j, f: f + delta if j == k else f)
            for j in range(4):
                if j < k:
                    torch.testing.assert_close(lv[j], ref_levels[j], rtol=0, atol=0)
                else:
                    assert (lv[j] - ref_levels[j]).abs().max() > 1e-4, (k, j)
            torch.testing.assert_close(lv[k], ref_levels[k] + delta)   # the result replaces the level
            assert (pl - ref_pooled).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------------
# Attention maths against naive float64 references
# ------------------------------------------------------------------------------------------------

def _naive_heads(x, qkv, heads):
    B, N, C = x.shape
    d = C // heads
    q, k, v = (x @ qkv.weight.T + qkv.bias).split(C, dim=-1)
    cut = lambda t, h: t[..., h * d:(h + 1) * d]             # noqa: E731
    return [(cut(q, h), cut(k, h), cut(v, h)) for h in range(heads)]


def test_mhsa_and_xca_match_naive_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    mhsa = metanet.Attention(32, 48, num_heads=4).double()
    xca = metanet.XCA(32, 48, num_heads=4).double()
    with torch.no_grad():
        xca.temperature.copy_(torch.rand(4, 1, 1) + 0.5)
    outs_m, outs_x = [], []
    for h, (q, k, v) in enumerate(_naive_heads(x, mhsa.qkv, 4)):   # (B, N, d) each
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)   # token x token
        outs_m.append(a @ v)
    for h, (q, k, v) in enumerate(_naive_heads(x, xca.qkv, 4)):
        qn = q / q.norm(dim=1, keepdim=True)                 # unit norm over the tokens
        kn = k / k.norm(dim=1, keepdim=True)
        a = torch.softmax(qn.transpose(1, 2) @ kn * xca.temperature[h], dim=-1)    # channel x channel (d, d)
        outs_x.append(v @ a.transpose(1, 2))                 # (B, N, d)
    want_m = torch.cat(outs_m, -1) @ mhsa.proj.weight.T + mhsa.proj.bias
    want_x = torch.cat(outs_x, -1) @ xca.proj.weight.T + xca.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(mhsa(x), want_m)
        torch.testing.assert_close(xca(x), want_x)


def _bn(x, bn):                                           # eval-mode batch norm by hand
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def test_mbconv_and_downsampling_transformer_block_by_hand():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 10, dtype=torch.float64)
    # MBConv, stride 2, 8 -> 12 channels, expansion 3
    blk = randomized(metanet.MBConv(8, 12, stride=2, expansion=3)).double().eval()
    bn0, conv1, bn1, _ = blk.b1
    dw, bn2, _, se, proj, bn3 = blk.b2
    y = F.gelu(_bn(F.conv2d(_bn(x, bn0), conv1.weight), bn1))
    y = F.gelu(_bn(F.conv2d(y, dw.weight, stride=2, padding=1, groups=24), bn2))
    gate = F.conv2d(F.relu(F.conv2d(y.mean(dim=(2, 3), keepdim=True), se.fc1.weight, se.fc1.bias)),
                    se.fc2.weight, se.fc2.bias)
    y = y * torch.clamp(gate / 6 + 0.5, 0, 1)               # hard-sigmoid
    y = _bn(F.conv2d(y, proj.weight, proj.bias), bn3)
    sc = F.conv2d(F.max_pool2d(x, 3, 2, 1), blk.residual[1].weight, blk.residual[1].bias)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), sc + y)
    # down-sampling MHSA block, stride 2, 8 -> 16 channels: pooled attention, no MLP
    blk = randomized(metanet.TransformerBlock(8, 16, stride=2, expansion=2, head_dim=4)).double().eval()
    assert not hasattr(blk, "mlp")
    x1 = x + F.conv2d(x, blk.pos_embed.weight, blk.pos_embed.bias, padding=1, groups=8)
    sc = F.conv2d(F.max_pool2d(x1, 3, 2, 1), blk.residual[1].weight, blk.residual[1].bias)
    t = F.layer_norm(x1.permute(0, 2, 3, 1), (8,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    t = F.max_pool2d(t.permute(0, 3, 1, 2), 3, 2, 1).flatten(2).transpose(1, 2)    # (B, 15, 8)
    heads = []
    for q, k, v in _naive_heads(t, blk.attn.qkv, 2):
        heads.append(torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v)
    t = (torch.cat(heads, -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias) * blk.gamma_1
    with torch.no_grad():
        torch.testing.assert_close(blk(x), sc + t.transpose(1, 2).reshape(2, 16, 3, 5))


def test_routes_through_our_kernels(monkeypatch):
    import kernels
    calls = {"attention": 0, "layer_norm": 0}

    def counting(name, fn):
        def wrapped(*args, **kw):
            calls[name] += 1
            return fn(*args, **kw)
        return wrapped

    model = demo().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        monkeypatch.setattr(kernels, "attention", counting("attention", kernels.attention))
        monkeypatch.setattr(kernels, "layer_norm", counting("layer_norm", kernels.layer_norm))
        model(x)
        # 2 MHSA blocks (XCA uses torch ops); 2 down-sampling blocks with 1 LN, 2 regular with 2
        assert calls == {"attention": 2, "layer_norm": 2 * 1 + 2 * 2}
        # the Triton kernels (interpreter on CPU) give the same features
        monkeypatch.setenv("INTERN_KERNELS", "triton")
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Training behaviour
# ------------------------------------------------------------------------------------------------

def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    for model in (metanet.build("metanet_demo", num_classes=5), demo(num_classes=5)):
        model.train()
        x = torch.randn(3, 3, 64, 64)
        levels, _ = model.forward_levels(x)
        loss = model(x).square().sum() + sum(f.mean() for f in levels)
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    # with the zero-inits replaced, every tensor actually influences the loss
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, name


def test_batchnorm_train_vs_eval():
    model = demo()
    x = torch.randn(4, 3, 64, 64)
    stem_bn = model.stem[1]
    # eval: running statistics, so a sample's output does not depend on its batch-mates
    model.eval()
    rm = stem_bn.running_mean.clone()
    with torch.no_grad():
        full = model(x)
        torch.testing.assert_close(model(x[:1]), full[:1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(x), full, rtol=0, atol=0)
    assert torch.equal(stem_bn.running_mean, rm)
    # train: batch statistics (checked on the stem against a by-hand batch norm), running stats move
    model.train()
    with torch.no_grad():
        conv = model.stem[0](x)
        mu = conv.mean(dim=(0, 2, 3), keepdim=True)
        var = conv.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        want = (conv - mu) / torch.sqrt(var + stem_bn.eps)
        want = want * stem_bn.weight[:, None, None] + stem_bn.bias[:, None, None]
        torch.testing.assert_close(model.stem[1](conv), want, rtol=1e-4, atol=1e-5)
        assert not torch.equal(stem_bn.running_mean, rm)
        y_full, y_half = model(x), model(x[:2])
    assert (y_full[:2] - y_half).abs().max() > 1e-3


def test_drop_path_only_in_train():
    x = torch.randn(2, 3, 64, 64)
    model = demo(drop_path_rate=0.5)

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(x)

    model.eval()
    torch.testing.assert_close(run(0), run(1), rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)      # BN in train mode is deterministic
    assert (run(0) - run(1)).abs().max() > 1e-3                      # so this is drop path
    model = demo(drop_path_rate=0.0).train()
    torch.testing.assert_close(run(0), run(1), rtol=0, atol=0)


def test_grad_checkpointing_same_grads_and_bn_stats():
    torch.manual_seed(0)
    a = demo(drop_path_rate=0.2).train()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    w = torch.randn(1280)
    for model in (a, b):
        torch.manual_seed(1)                                         # same drop-path masks
        levels, pooled = model.forward_levels(x)
        ((pooled * w).sum() + levels[1].square().mean()).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, ba), bb in zip(a.named_buffers(), b.buffers()):       # BN stats updated once, not twice
        torch.testing.assert_close(bb, ba, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_autocast():
    model = demo().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref_levels, ref = model.forward_levels(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            levels, out = model.forward_levels(x)
    assert out.shape == ref.shape and torch.isfinite(out.float()).all()
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    assert [f.shape for f in levels] == [f.shape for f in ref_levels]


# ------------------------------------------------------------------------------------------------
# Errors and the demo entry point
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise():
    model = metanet.build("metanet_demo")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 64, 80))
    with pytest.raises(ValueError, match="multiples of 32"):
        model.forward_levels(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="mn_b15"):
        metanet.build("mn_b5")
    with pytest.raises(ValueError, match="num_classes"):
        metanet.build("metanet_demo", n_classes=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        metanet.build("metanet_demo", img_size=100)


def test_main_demo_runs(capsys):
    runpy.run_path(metanet.__file__, run_name="__main__")
    out = capsys.readouterr().out
    assert "level 3" in out and "(2, 96, 2, 2)" in out


# ------------------------------------------------------------------------------------------------
# Mask token: masked image modelling at the stem (stages.py --stage hybrid)
# ------------------------------------------------------------------------------------------------

def _patch_mask(B, h, w, seed=0):
    """A random bool (B, h, w) patch mask with at least one masked and one visible patch each."""
    m = torch.rand(B, h, w, generator=torch.Generator().manual_seed(seed)) < 0.4
    m[:, 0, 0], m[:, -1, -1] = True, False
    return m


def _pixels(mask, p):
    """(B, h, w) patch mask -> (B, 1, h*p, w*p) pixel mask, by loops (independent of the model's)."""
    B, h, w = mask.shape
    out = torch.zeros(B, 1, h * p, w * p, dtype=torch.bool)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                out[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = mask[b, i, j]
    return out


def test_mask_token_is_opt_in_and_inert_without_a_mask():
    plain = metanet.build("metanet_demo")
    assert plain.mask_token is None and "mask_token" not in plain.state_dict()
    with pytest.raises(ValueError, match="use_mask_token"):
        plain.forward_levels(torch.randn(1, 3, 64, 64), mask=torch.ones(1, 8, 8, dtype=torch.bool))
    torch.manual_seed(3)
    a = metanet.build("metanet_demo")
    torch.manual_seed(3)
    b = metanet.build("metanet_demo", use_mask_token=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sb) - set(sa) == {"mask_token"} and b.mask_token.shape == (1, 16, 1, 1)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)     # drawn last: the same weights otherwise
    assert 0 < b.mask_token.abs().max() <= 0.04             # small init, like EVA's
    # a masked model given no mask (or an empty one) is exactly the plain model
    b = demo(use_mask_token=True).eval()
    a.load_state_dict({k: v for k, v in b.state_dict().items() if k != "mask_token"})
    a.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref_levels, ref_pooled = a.forward_levels(x)
        for mask in (None, torch.zeros(2, 8, 12, dtype=torch.bool)):
            levels, pooled = b.forward_levels(x, mask=mask)
            torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
            for f, g in zip(levels, ref_levels):
                torch.testing.assert_close(f, g, rtol=0, atol=0)


def test_masked_stem_matches_hand_reference():
    """Zero the masked 8x8 pixel blocks, run the stem, overwrite the 4x4 stem cells of each masked
    patch with the token, run the blocks: the same levels and pooled feature as forward_levels."""
    model = demo(use_mask_token=True).eval()
    with torch.no_grad():
        model.mask_token.normal_()                        # clearly not zero
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    model.double()
    mask = _patch_mask(2, 8, 12)
    with torch.no_grad():
        levels, pooled = model.forward_levels(x, mask=mask)
        s = model.stem(x.masked_fill(_pixels(mask, 8), 0.0))          # (2, 16, 32, 48)
        for b, i, j in mask.nonzero().tolist():
            s[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = model.mask_token[0]
        ref = []
        for k, blk in enumerate(model.blocks):
            s = blk(s)
            if k in model.level_blocks:
                ref.append(s)
        ref_pooled = model.head(s).mean(dim=(2, 3))
    for f, g in zip(levels, ref):
        torch.testing.assert_close(f, g, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("train", [False, True])
def test_masked_pixels_reach_the_output_only_through_the_token(train):
    model = demo(use_mask_token=True).train(train)
    x = torch.randn(2, 3, 64, 64)
    mask = _patch_mask(2, 4, 4, seed=1)                   # 16 px patches this time
    pix = _pixels(mask, 16)
    noise = torch.randn_like(x)
    with torch.no_grad():
        ref_levels, ref_pooled = model.forward_levels(x, mask=mask)
        # anything inside masked patches: no effect at all, on every level (BN batch stats included)
        levels, pooled = model.forward_levels(torch.where(pix, noise * 5, x), mask=mask)
        torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=0)
        for f, g in zip(levels, ref_levels):
            torch.testing.assert_close(f, g, rtol=0, atol=0)
        # a visible pixel does reach the output, and so does the token
        _, pooled = model.forward_levels(torch.where(pix, x, x + noise), mask=mask)
        assert (pooled - ref_pooled).abs().max() > 1e-4
        model.mask_token.add_(0.5)
        _, pooled = model.forward_levels(x, mask=mask)
        assert (pooled - ref_pooled).abs().max() > 1e-4
    _, pooled = model.forward_levels(x, mask=mask)
    pooled.square().sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_bad_masks_raise():
    model = metanet.build("metanet_demo", use_mask_token=True)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="bool"):
        model.forward_levels(x, mask=torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="bool"):
        model.forward_levels(x, mask=torch.ones(2, 64, dtype=torch.bool))      # flat (B, N)
    with pytest.raises(ValueError, match="even number of pixels"):
        model.forward_levels(x, mask=torch.ones(2, 3, 3, dtype=torch.bool))    # does not tile
    with pytest.raises(ValueError, match="even number of pixels"):
        model.forward_levels(x, mask=torch.ones(2, 64, 64, dtype=torch.bool))  # 1 px patches
