"""Tests of mim.py: block masks, teacher targets, the student's mask token, the loss, a short fit.

References are independent: a BFS for connected components, a float64 loop for the loss, a
float64 separable triangle-filter resize for the teacher grid, plain eva calls for the student.
"""
import argparse
import random
from collections import deque

import numpy as np
import pytest
import torch
import torch.nn as nn
from einops import rearrange

import eva
import mim


def fresh_seed() -> int:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed {seed}")   # shown by pytest when a test fails
    return seed


def components(mask: np.ndarray) -> list:
    """Sizes of the 4-connected components of a bool grid (BFS)."""
    H, W = mask.shape
    seen = np.zeros_like(mask)
    sizes = []
    for i in range(H):
        for j in range(W):
            if mask[i, j] and not seen[i, j]:
                queue, seen[i, j], size = deque([(i, j)]), True, 0
                while queue:
                    a, b = queue.popleft()
                    size += 1
                    for x, y in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                        if 0 <= x < H and 0 <= y < W and mask[x, y] and not seen[x, y]:
                            seen[x, y] = True
                            queue.append((x, y))
                sizes.append(size)
    return sizes


class ConvTower(nn.Module):
    """A stand-in teacher backbone: conv 'patches' + BatchNorm + dropout (both must be frozen)."""

    def __init__(self, channels: int = 12, stride: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, stride, stride)
        self.bn = nn.BatchNorm2d(channels)
        self.drop = nn.Dropout(0.5)
        self.num_features = channels

    def forward_patches(self, x):                       # (B, 3, H, W) -> (B, C, H/s, W/s)
        return self.drop(torch.tanh(self.bn(self.conv(x))))


# ----------------------------------------------------------------------------- masks

def test_block_mask_statistics_eva_setting():
    rng = np.random.default_rng(fresh_seed())
    masks = [mim.block_mask(16, 16, 105, rng) for _ in range(600)]
    counts = np.array([m.sum() for m in masks])
    assert all(m.shape == (16, 16) and m.dtype == bool for m in masks)
    assert counts.max() <= 105
    assert 100 <= counts.mean() <= 105, counts.mean()      # official: about 104.4
    comps = np.array([len(components(m)) for m in masks[:300]])
    # a few contiguous blocks; uniformly scattered 105 patches give ~30 components
    assert comps.mean() <= 3 and comps.max() <= 8, (comps.mean(), comps.max())
    assert len({m.tobytes() for m in masks}) > 590         # masks are actually random


def test_block_mask_small_grid_and_min_block():
    assert mim.default_min_block(16, 16) == 16
    assert mim.default_min_block(8, 8) == 4
    assert mim.default_min_block(4, 4) == 1
    assert mim.num_masked_for(8, 8, 0.4) == 26
    rng = np.random.default_rng(fresh_seed())
    counts = np.array([mim.block_mask(8, 8, 26, rng).sum() for _ in range(500)])
    assert counts.max() <= 26 and counts.mean() >= 24, counts.mean()
    # num_masked = min_block = 16: the first block alone covers 16 patches up to rounding
    # (e.g. 2x6 at aspect ~0.39), so the largest component always has >= 12; with
    # min_block=1 small first blocks are common.
    big16 = [max(components(mim.block_mask(16, 16, 16, rng, min_block=16))) for _ in range(300)]
    big1 = [max(components(mim.block_mask(16, 16, 16, rng, min_block=1))) for _ in range(300)]
    assert min(big16) >= 12
    assert np.mean(np.array(big1) < 9) > 0.1


def test_block_mask_never_exceeds_and_validates():
    rng = np.random.default_rng(fresh_seed())
    for _ in range(300):
        h, w = rng.integers(2, 21, size=2)
        n = int(rng.integers(0, h * w + 1))
        mb = int(rng.integers(1, 25))
        m = mim.block_mask(int(h), int(w), n, rng, min_block=mb)
        assert m.shape == (h, w) and m.sum() <= n
    assert mim.block_mask(16, 16, 0, rng).sum() == 0
    with pytest.raises(TypeError, match="Generator"):
        mim.block_mask(16, 16, 10, random.Random(0))
    with pytest.raises(ValueError, match="num_masked"):
        mim.block_mask(4, 4, 17, rng)
    with pytest.raises(ValueError, match="2x2"):
        mim.block_mask(1, 16, 4, rng)


def test_masks_deterministic_and_keyed_by_sample():
    seed = fresh_seed()
    a = [mim.block_mask(16, 16, 105, np.random.default_rng(seed)) for _ in range(2)]
    assert np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], mim.block_mask(16, 16, 105, np.random.default_rng(seed + 1)))

    # random_masks: B masks from one stream, flattened row-major (non-square grid)
    batch = mim.random_masks(3, 6, 10, 24, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    ref = [mim.block_mask(6, 10, 24, rng) for _ in range(3)]
    assert batch.dtype == torch.bool and batch.shape == (3, 60)
    for row, m in zip(batch, ref):
        assert torch.equal(row, torch.from_numpy(m).flatten())

    # per-sample masks neither read nor advance any global RNG
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    m = mim.mask_for_index((8, 8), 26, seed, 3, 17)
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    random.random(), np.random.rand(), torch.rand(1)         # move the global RNGs
    assert torch.equal(m, mim.mask_for_index(8, 26, seed, 3, 17))
    assert m.shape == (64,) and m.dtype == torch.bool and 0 < m.sum() <= 26
    others = [mim.mask_for_index(8, 26, seed, 4, 17), mim.mask_for_index(8, 26, seed, 3, 18),
              mim.mask_for_index(8, 26, seed + 1, 3, 17)]
    assert sum(torch.equal(m, o) for o in others) <= 1
    # a 2-rank split sees the same masks as the 1-rank batch
    full = mim.masks_for_indices(8, 26, seed, 3, [5, 9, 2, 7])
    assert torch.equal(full[1::2], mim.masks_for_indices(8, 26, seed, 3, torch.tensor([9, 7])))


# ----------------------------------------------------------------------------- student

@torch.no_grad()
def test_mask_token_is_the_only_path_for_masked_patches():
    torch.manual_seed(fresh_seed())
    model = mim.build_student("eva_demo", target_dim=16).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = mim.random_masks(2, 8, 8, 26, np.random.default_rng(0))
    pred = model(x, mask)
    assert pred.shape == (2, 64, 16)
    # independent recomputation through the backbone's own calls
    ref = model.lm_head(model.backbone.forward_tokens(x, mask)[:, 1:])
    torch.testing.assert_close(pred, ref)

    # noise in the pixels of masked patches: the output must not move
    pix = rearrange(mask, "b (h w) -> b h w", h=8).repeat_interleave(8, 1).repeat_interleave(8, 2)
    noisy = torch.where(pix[:, None], torch.randn_like(x) * 3, x)
    torch.testing.assert_close(model(noisy, mask), pred, atol=1e-5, rtol=1e-5)
    # ... while without the mask the same noise does change it, and the token is used
    assert (model(noisy, mask & False) - model(x, mask & False)).abs().max() > 1e-3
    with torch.no_grad():
        # a random change (a constant shift would be cancelled by the LayerNorms)
        model.backbone.mask_token.add_(torch.randn_like(model.backbone.mask_token))
    assert (model(x, mask) - pred).abs().max() > 1e-3


def test_student_validation_and_backbone_names(tmp_path):
    with pytest.raises(ValueError, match="use_mask_token"):
        mim.MIMModel(eva.build("eva_demo"), 16)
    teacher = mim.Teacher(ConvTower(), nn.Linear(12, 16), patch_size=16)
    with pytest.raises(ValueError, match="patch_size=8"):
        mim.build_student("eva_demo", 16, teacher=teacher)
    with pytest.raises(ValueError, match="target_dim"):
        mim.build_student("eva_demo", 7, teacher=mim.Teacher(ConvTower(), nn.Linear(12, 16), 8))

    teacher = mim.Teacher(ConvTower(), nn.Linear(12, 16), patch_size=8)
    model = mim.build_student("eva_demo", 16, teacher=teacher)
    keys = set(model.state_dict())
    assert {"lm_head.weight", "lm_head.bias", "backbone.mask_token", "teacher.proj.weight"} <= keys
    assert all(k.split(".")[0] in ("backbone", "lm_head", "teacher") for k in keys)
    # `backbone.*` loads as a plain eva backbone (avg pooling, no mask token) via eva.load_pretrained
    path = tmp_path / "mim_backbone.pt"
    sd = {k[len("backbone."):]: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": sd}, path)
    plain = eva.build("eva_demo")
    eva.load_pretrained(plain, path)
    torch.testing.assert_close(plain.blocks[3].mlp.fc1.weight, model.backbone.blocks[3].mlp.fc1.weight)
    torch.testing.assert_close(plain.fc_norm.weight, model.backbone.norm.weight)
    assert model.no_weight_decay() == {"backbone.pos_embed", "backbone.cls_token"}


# ----------------------------------------------------------------------------- loss

def test_loss_matches_float64_loop():
    g = torch.Generator().manual_seed(fresh_seed())
    B, N, D = 3, 10, 7
    pred, target = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    mask = torch.rand(B, N, generator=g) < 0.4
    mask[0, 0] = True
    total, count = 0.0, 0
    for b in range(B):
        for n in range(N):
            if mask[b, n]:
                p, t = pred[b, n].double(), target[b, n].double()
                total += -(p @ t / (p.norm() * t.norm())).item()
                count += 1
    loss = mim.mim_loss(pred, target, mask)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - total / count) < 1e-6
    assert abs(mim.mim_loss(pred, target, mask, denom=B * 4).item() - total / (B * 4)) < 1e-6
    # half-precision inputs are scored in fp32
    lb = mim.mim_loss(pred.bfloat16(), target.bfloat16(), mask)
    assert lb.dtype == torch.float32 and abs(lb.item() - total / count) < 2e-2
    # sign: a perfect prediction (any positive scale) gives -1
    assert abs(mim.mim_loss(2.5 * target, target, mask).item() + 1) < 1e-6


def test_loss_ignores_unmasked_positions():
    g = torch.Generator().manual_seed(fresh_seed())
    pred = torch.randn(2, 12, 5, generator=g, requires_grad=True)
    target = torch.randn(2, 12, 5, generator=g)
    mask = torch.rand(2, 12, generator=g) < 0.5
    mask[:, 0], mask[:, 1] = True, False
    loss = mim.mim_loss(pred, target, mask)
    loss.backward()
    assert torch.all(pred.grad[~mask] == 0) and pred.grad[mask].abs().sum() > 0
    keep = mask[..., None]
    other = mim.mim_loss(torch.where(keep, pred, torch.randn_like(pred)),
                         torch.where(keep, target, torch.randn_like(target)), mask)
    assert other.item() == loss.item()
    with pytest.raises(ValueError, match="no masked patch"):
        mim.mim_loss(pred, target, mask & False)
    with pytest.raises(ValueError, match="bool"):
        mim.mim_loss(pred, target, mask.long())
    with pytest.raises(ValueError, match="patch_size"):
        mim.mim_loss(pred, target[:, :6], mask)


def test_weighted_loss_matches_float64_loop():
    """Float weights (a MetaNet student's masked share per target cell): sum(w * -cos) / sum(w)."""
    g = torch.Generator().manual_seed(fresh_seed())
    B, N, D = 3, 4, 6
    pred, target = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    w = torch.rand(B, N, generator=g) * (torch.rand(B, N, generator=g) < 0.7)
    w[0, 0] = 0.25
    total = sum(-w[b, n].double() * (pred[b, n].double() @ target[b, n].double())
                / (pred[b, n].double().norm() * target[b, n].double().norm())
                for b in range(B) for n in range(N))
    assert abs(mim.mim_loss(pred, target, w).item() - (total / w.double().sum()).item()) < 1e-6
    assert abs(mim.mim_loss(pred, target, w, denom=2.0).item() - total.item() / 2) < 1e-6
    # 0/1 weights are the bool mask
    m = torch.rand(B, N, generator=g) < 0.5
    m[0, 0] = True
    assert abs(mim.mim_loss(pred, target, m.float()).item() - mim.mim_loss(pred, target, m).item()) < 1e-6
    with pytest.raises(ValueError, match="all zero"):
        mim.mim_loss(pred, target, w * 0)


@torch.no_grad()
def test_metanet_student_weights_and_hidden_pixels():
    torch.manual_seed(fresh_seed())
    model = mim.build_student("metanet_demo", target_dim=16).eval()
    assert (model.mask_patch, model.target_patch) == (mim.METANET_MASK_PATCH, 32)
    x = torch.randn(3, 3, 64, 64)
    mask = mim.random_masks(3, 8, 8, 26, np.random.default_rng(fresh_seed()))          # (3, 64)
    pred = model(x, mask)
    assert pred.shape == (3, 4, 16)                                # 2 x 2 cells at stride 32
    # each target cell's weight = the share of its 4 x 4 mask cells that are masked (loop)
    w = model.target_weights(mask)
    grid = mask.view(3, 8, 8)
    for b in range(3):
        for r in range(2):
            for c in range(2):
                share = grid[b, 4 * r:4 * r + 4, 4 * c:4 * c + 4].float().mean().item()
                assert abs(w[b, r * 2 + c].item() - share) < 1e-7
    assert torch.allclose(w.sum(1), mask.sum(1) / 16.0)
    # noise in the masked pixels does not reach the prediction; outside them it does
    pix = mask.view(3, 8, 8).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    noisy = torch.where(pix, torch.randn_like(x) * 3, x)
    torch.testing.assert_close(model(noisy, mask), pred, atol=1e-5, rtol=1e-5)
    assert (model(torch.where(pix, x, torch.randn_like(x)), mask) - pred).abs().max() > 1e-3
    # and the masked stage loss follows the weights: a teacher is needed for targets
    teacher = mim.Teacher(ConvTower(), nn.Linear(12, 16), patch_size=32)
    student = mim.MIMModel(model.backbone, 16, teacher)
    loss, _ = student.forward_loss(x, mask)
    want = mim.mim_loss(student.predict(x, mask), teacher(x), w)
    assert abs(loss.item() - want.item()) < 1e-6
    with pytest.raises(ValueError, match="patch_size=32"):
        mim.MIMModel(model.backbone, 16, mim.Teacher(ConvTower(), nn.Linear(12, 16), patch_size=8))


# ----------------------------------------------------------------------------- teacher

def test_teacher_frozen_eval_and_no_grad():
    torch.manual_seed(fresh_seed())
    teacher = mim.Teacher(ConvTower(), nn.Linear(12, 16), patch_size=8)
    model = mim.build_student("eva_demo", 16, teacher=teacher)
    model.train()
    assert model.training and model.backbone.training
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    bn = teacher.backbone.bn
    stats = bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    mask = mim.random_masks(2, 8, 8, 26, np.random.default_rng(0))
    loss, terms = model.forward_loss(x, mask)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.lm_head.weight.grad is not None and model.backbone.mask_token.grad is not None
    assert torch.equal(bn.running_mean, stats)                  # BatchNorm did not update
    assert "cos_visible" in terms and -1 <= terms["cos_visible"].item() <= 1
    # eval mode -> dropout off: the targets are deterministic, and equal the plain calls
    t1, t2 = teacher(x), teacher(x)
    assert not t1.requires_grad and torch.equal(t1, t2)
    with torch.no_grad():
        bn.eval()
        ref = teacher.proj(rearrange(torch.tanh(bn(teacher.backbone.conv(x))), "b c h w -> b (h w) c"))
    torch.testing.assert_close(t1, ref)


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of a bilinear (triangle) resize with half-pixel centres,
    the filter widened by the shrink factor when shrinking (antialiasing)."""
    scale = n_in / n_out
    support = max(1.0, scale)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        for j in range(n_in):
            w[i, j] = max(0.0, 1 - abs(j + 0.5 - centre) / support)
    return w / w.sum(1, keepdims=True)


@pytest.mark.parametrize("teacher_stride,student_patch", [(32, 8), (8, 16), (8, 8)])
def test_teacher_resizes_to_student_grid(teacher_stride, student_patch):
    torch.manual_seed(fresh_seed())
    tower = ConvTower(channels=6, stride=teacher_stride)
    teacher = mim.Teacher(tower, None, patch_size=student_patch)
    assert teacher.out_dim == 6
    x = torch.randn(2, 3, 64, 96)
    out = teacher(x)
    gh, gw = 64 // student_patch, 96 // student_patch
    assert out.shape == (2, gh * gw, 6)
    with torch.no_grad():
        f = tower.forward_patches(x).double().numpy()          # (B, C, h, w) teacher grid
    ref = np.einsum("oi,bcij,pj->bopc", _triangle_weights(f.shape[2], gh), f,
                    _triangle_weights(f.shape[3], gw)).reshape(2, gh * gw, 6)   # row-major
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-5)


def test_teacher_from_state_dict_round_trip():
    torch.manual_seed(fresh_seed())
    teacher = mim.Teacher(ConvTower(), nn.Linear(12, 16), patch_size=8)
    model = mim.build_student("eva_demo", 16, teacher=teacher)
    sd = model.state_dict()
    fresh = mim.Teacher.from_state_dict(ConvTower(), sd, "teacher.backbone.", nn.Linear(12, 16),
                                        "teacher.proj.", patch_size=8)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(fresh(x), model.teacher(x))
    with pytest.raises(ValueError, match="no keys start with"):
        mim.Teacher.from_state_dict(ConvTower(), sd, "amateur.backbone.")
    with pytest.raises(ValueError, match="do not fit"):
        mim.Teacher.from_state_dict(ConvTower(channels=8), sd, "teacher.backbone.")
    with pytest.raises(TypeError, match="forward_patches"):
        mim.Teacher(nn.Linear(3, 3))


# ----------------------------------------------------------------------------- training

def test_short_mim_fit_lowers_the_loss():
    torch.manual_seed(fresh_seed())
    teacher = mim.Teacher(ConvTower(channels=24), nn.Linear(24, 32), patch_size=8)
    model = mim.build_student("eva_demo", 32, teacher=teacher).train()
    x = torch.randn(2, 3, 64, 64)
    mask = mim.random_masks(2, 8, 8, 26, np.random.default_rng(0))
    r = mim.RECIPE
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            betas=r["betas"], eps=r["eps"], weight_decay=r["weight_decay"])
    losses = []
    for _ in range(25):
        loss, _ = model.forward_loss(x, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.4, losses


def test_recipe_and_show(tmp_path):
    assert mim.RECIPE["betas"] == (0.9, 0.98) and mim.RECIPE["layer_decay"] == 1.0
    assert abs(mim.scaled_lr(256) - 1e-3 * 256 / 4096) < 1e-15
    torch.manual_seed(fresh_seed())
    teacher = mim.Teacher(ConvTower(), nn.Linear(12, 16), patch_size=8)
    model = mim.build_student("eva_demo", 16, teacher=teacher).train()
    x = torch.rand(3, 3, 64, 64)
    mask = mim.random_masks(3, 8, 8, 26, np.random.default_rng(0))
    path = mim.show(model, teacher, x, mask, str(tmp_path / "mim.png"))
    from PIL import Image
    img = Image.open(path)
    assert img.width > 3 * 128 and img.height >= 3 * 128
    assert model.training                                        # mode restored


def test_show_command_reads_a_stage_checkpoint(tmp_path):
    stages = pytest.importorskip("stages")
    torch.manual_seed(fresh_seed())
    cfg = vars(stages.parse_args(["--stage", "mim", "--arch", "eva_demo", "--no-eval"]))
    cfg.update(teacher_arch="eva_demo", teacher_dim=24)     # what a mim run saves in its config
    model = stages.STAGES["mim"](argparse.Namespace(**cfg), with_data=False).model
    with torch.no_grad():                                   # nonzero weights everywhere
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = str(tmp_path / "mim.pt")
    torch.save({"model": model.state_dict(), "config": cfg, "step": 0}, path)
    loaded, _ = stages.load_stage_model(path, expect_stage="mim")
    x = torch.randn(2, 3, 64, 64)
    mask = mim.random_masks(2, 8, 8, 26, np.random.default_rng(0))
    model.eval()
    torch.testing.assert_close(loaded.predict(x, mask), model.predict(x, mask))
    torch.testing.assert_close(loaded.teacher(x), model.teacher(x))
    out = tmp_path / "mim.png"                              # the command line, end to end
    mim.main(["--show", path, "--data", "gvd/caption", "--out", str(out), "--num", "2"])
    assert out.stat().st_size > 0
    cfg["stage"] = "amateur"
    torch.save({"model": model.state_dict(), "config": cfg}, path)
    with pytest.raises(stages.CheckpointError, match="mim"):
        mim.main(["--show", path, "--out", str(out)])
