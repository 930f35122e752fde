"""MetaNet: INTERN's general-vision backbone family (GV-A), the two released configurations.

MetaNet is a searched hybrid network: a conv stem, six stages of residual blocks -- convolutional
(Fused-MBConv, MBConv with squeeze-excitation) at high resolution, transformer (MHSA or XCA) at
strides 16 and 32 -- and a 1x1 conv head to a 1280-d feature. The search itself is out of scope:
this file ships the searched configurations MN-B4 and MN-B15 of INTERN's official gv-benchmark
code, plus a CPU-sized `metanet_demo` for the pipeline (DESIGN.md §5.3, reference/intern.md §2).

    x (B,3,H,W)
    stem   conv3x3 s2 -> BN -> GELU                         stride 2
    stage0 op0 x depth0, stride 1, expansion 1              stride 2
    stage1 op1 x depth1, stride 2, expansion 4              stride 4   -> level 0
    stage2 op2 x depth2, stride 2, expansion 6              stride 8   -> level 1
    stage3 op3 x depth3, stride 2, expansion 3              stride 16
    stage4 op4 x depth4, stride 1, expansion 2              stride 16  -> level 2
    stage5 op5 x depth5, stride 2, expansion 5              stride 32  -> level 3
    head   conv1x1 -> 1280 -> BN -> GELU  (forward_features / forward_patches: the head map)
    global average pool -> (B, 1280)      (-> optional Linear classifier `fc`)

Only the first block of a stage changes stride / width. Every block keeps the (B,C,H,W) layout at
its boundary (transformer blocks flatten to tokens inside), so any block can be checkpointed,
FSDP-wrapped or given its own learning rate through `block_list()`.

Backbone contract (DESIGN §4.1, same as eva.py): `build(name, **overrides)`, `model(x)`,
`forward_features`, `forward_head`, `forward_levels(x, inject)`, `forward_patches`, and the
attributes `num_features`, `img_size`, `level_channels`, `level_strides`. Inputs must have sides
that are multiples of 32 (the total stride): 64, 96, 224, 256, ... . For masked image modelling,
`build(..., use_mask_token=True)` adds a learned `mask_token`, and `forward_levels(x, mask=...)`
hides patches behind it at the stem (`MetaNet._stem`; used by stages.py --stage hybrid).

Parameter names mirror the official code (`stem.0`, `blocks.{i}.{residual.1, b1, b2}`,
`blocks.{i}.{pos_embed, norm1, attn.{qkv, proj, temperature}, gamma_1, norm2, mlp.{fc1, fc2},
gamma_2}`, `head.0`, `head.1`); the classifier is `fc` as in mmcls's linear head.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import kernels
from eva import DropPath

STRIDES = (1, 2, 2, 2, 1, 2)      # per stage; the stem adds another x2
EXPANSIONS = (1, 4, 6, 3, 2, 5)   # per stage; kept fixed by the search when scaling the family
OUT_STAGES = (1, 2, 4, 5)         # stage ends that feed the dense heads: strides 4, 8, 16, 32
NUM_FEATURES = 1280


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to a multiple of `divisor`, never more than 10 % below v (MobileNet convention)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def conv_shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """Shortcut of a block that changes shape: max-pool 3x3 (pad 1) then a 1x1 conv with bias.
    The official code pools even when only the width changes (stride 1), so do we."""
    return nn.Sequential(nn.MaxPool2d(3, stride, padding=1), nn.Conv2d(c_in, c_out, 1))


# ------------------------------------------------------------------------------------------------
# Convolutional blocks
# ------------------------------------------------------------------------------------------------

class SqueezeExcitation(nn.Module):
    """Channel gate: global average -> 1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid."""

    def __init__(self, channels: int):
        super().__init__()
        squeeze = make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)                      # (B, C, 1, 1)
        s = self.fc2(F.relu(self.fc1(s)))
        return x * F.hardsigmoid(s)


class ConvResidual(nn.Module):
    """What MBConv and Fused-MBConv share: x -> shortcut(x) + drop_path(b2(b1(x))), where b1 (the
    expansion, absent when there is nothing to expand) and b2 are set by the subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        y = self.b1(x) if self.b1 is not None else x
        return self.residual(x) + self.drop_path(self.b2(y))


class MBConv(ConvResidual):
    """Inverted residual: [BN -> 1x1 expand -> BN -> GELU] -> 3x3 depthwise (stride) -> BN -> GELU
    -> SE -> 1x1 project (bias) -> BN. The last BN starts at zero, so the block starts as its
    shortcut. The expansion is skipped only when it would be the identity (e = 1, stride 1)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: float, drop_path: float = 0.0):
        super().__init__()
        hidden = int(c_in * expansion)
        changes_shape = stride != 1 or c_in != c_out
        self.residual = conv_shortcut(c_in, c_out, stride) if changes_shape else nn.Identity()
        self.b1 = None
        if hidden != c_in or stride != 1:
            # the leading BN normalises the raw residual stream before it is expanded
            self.b1 = nn.Sequential(nn.BatchNorm2d(c_in), nn.Conv2d(c_in, hidden, 1, bias=False),
                                    nn.BatchNorm2d(hidden), nn.GELU())
        self.b2 = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.GELU(),
            SqueezeExcitation(hidden),
            nn.Conv2d(hidden, c_out, 1), nn.BatchNorm2d(c_out))
        nn.init.zeros_(self.b2[-1].weight)
        self.drop_path = DropPath(drop_path)


class FusedMBConv(ConvResidual):
    """MBConv with expand + depthwise fused into one dense 3x3 conv (cheaper at high resolution):
    BN -> 3x3 conv (stride) -> BN -> GELU -> SE -> 1x1 project (bias) -> BN.
    With expansion 1 there is nothing to expand: SE -> 3x3 conv (stride, bias) -> BN."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: float, drop_path: float = 0.0):
        super().__init__()
        hidden = int(c_in * expansion)
        changes_shape = stride != 1 or c_in != c_out
        self.residual = conv_shortcut(c_in, c_out, stride) if changes_shape else nn.Identity()
        self.b1 = None
        if hidden != c_in:
            self.b1 = nn.Sequential(nn.BatchNorm2d(c_in),
                                    nn.Conv2d(c_in, hidden, 3, stride, padding=1, bias=False),
                                    nn.BatchNorm2d(hidden), nn.GELU())
            self.b2 = nn.Sequential(SqueezeExcitation(hidden), nn.Conv2d(hidden, c_out, 1),
                                    nn.BatchNorm2d(c_out))
        else:
            self.b2 = nn.Sequential(SqueezeExcitation(hidden), nn.Conv2d(hidden, c_out, 3, stride, padding=1),
                                    nn.BatchNorm2d(c_out))
        nn.init.zeros_(self.b2[-1].weight)
        self.drop_path = DropPath(drop_path)


# ------------------------------------------------------------------------------------------------
# Transformer blocks
# ------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention over tokens; `proj` may change the width (down-sampling blocks)."""

    def __init__(self, dim: int, out_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, N, C) -> (B, N, Cout)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)     # each (B, H, N, D)
        o = kernels.attention(q, k, v, scale=q.shape[-1] ** -0.5)   # (B, H, N, D)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class XCA(nn.Module):
    """Cross-covariance attention (XCiT): each head attends over its D channels instead of its N
    tokens. q, k are L2-normalised along the token axis, the D x D map is scaled by a learned
    per-head temperature (no head_dim^-0.5), so the cost is linear in N.

    Plain torch ops, not kernels.attention: mapped onto (B, H, N, D) attention, the channels would
    be the "tokens" and the N image tokens the "head dim" -- N is 196 at 224 px, beyond the flash
    kernel's head dim limit of 128 -- and the temperature is a learned per-head tensor, not the
    kernel's float scale. The D x D map is tiny, so there is nothing for a flash kernel to save."""

    def __init__(self, dim: int, out_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, N, C) -> (B, N, Cout)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 4, 1).unbind(0)     # each (B, H, D, N)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.temperature  # (B, H, D, D)
        o = attn.softmax(dim=-1) @ v                         # (B, H, D, N)
        return self.proj(o.permute(0, 3, 1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block on a (B, C, H, W) map; `attn_type` "mhsa" or "xca".

    A depthwise 3x3 conv adds a (conditional) position encoding before every block; LayerScale
    (init 1e-6) keeps a fresh block close to the identity. A block that changes stride or width
    has no MLP: its attention runs on max-pooled tokens and projects to the new width, and is added
    to the pooled 1x1-conv shortcut (official code: no drop path on this branch)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: float, head_dim: int,
                 attn_type: str = "mhsa", drop_path: float = 0.0, layer_scale: float = 1e-6):
        super().__init__()
        self.downsample = stride != 1 or c_in != c_out
        num_heads = max(1, c_in // head_dim)
        if c_in % num_heads:
            raise ValueError(f"width {c_in} does not split into {num_heads} heads of ~{head_dim} "
                             f"channels; choose widths that are multiples of head_dim={head_dim}")
        self.pos_embed = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in)
        self.norm1 = kernels.LayerNorm(c_in)
        self.attn = {"mhsa": Attention, "xca": XCA}[attn_type](c_in, c_out, num_heads)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(c_out))
        if self.downsample:
            self.ds = nn.MaxPool2d(3, stride, padding=1)
            self.residual = conv_shortcut(c_in, c_out, stride)
        else:
            self.norm2 = kernels.LayerNorm(c_in)
            self.mlp = Mlp(c_in, int(c_in * expansion))
            self.gamma_2 = nn.Parameter(layer_scale * torch.ones(c_out))
            self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        x = x + self.pos_embed(x)
        if self.downsample:
            r = self.residual(x)                                          # (B, Cout, Ho, Wo)
            t = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)    # LN over C, (B, Cin, H, W)
            t = self.ds(t)                                                # (B, Cin, Ho, Wo)
            B, _, Ho, Wo = t.shape
            t = self.attn(t.flatten(2).transpose(1, 2))                   # (B, Ho*Wo, Cout)
            return r + (self.gamma_1 * t).transpose(1, 2).reshape(B, -1, Ho, Wo)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)                                  # (B, N, C)
        t = t + self.drop_path(self.gamma_1 * self.attn(self.norm1(t)))
        t = t + self.drop_path(self.gamma_2 * self.mlp(self.norm2(t)))
        return t.transpose(1, 2).reshape(B, C, H, W)


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------

OPS = ("fmb", "mb", "mhsa", "xca")


def _freeze_bn_stats(block: nn.Module):
    """Context for the recomputation of a checkpointed block: momentum 0 leaves the BN running
    statistics as the first forward pass left them (else training with checkpointing would
    update them twice per step)."""
    @contextlib.contextmanager
    def ctx():
        bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]
        for m in bns:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, count) in zip(bns, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)
    return ctx()


class MetaNet(nn.Module):
    """Stem, 6 stages of `ops` ("fmb", "mb", "mhsa", "xca") with the given depths and widths, a
    1x1 head to 1280 channels and an optional classifier. See the module docstring for the layout
    and `PRESETS` for the released configurations."""

    def __init__(self, stem_dim: int, depths, widths, ops, head_dim: int,
                 expansions=EXPANSIONS, strides=STRIDES, num_classes: int = 0,
                 drop_path_rate: float = 0.0, layer_scale: float = 1e-6, img_size: int = 224,
                 use_mask_token: bool = False):
        super().__init__()
        if not (len(depths) == len(widths) == len(ops) == len(expansions) == len(strides) == 6):
            raise ValueError("MetaNet has 6 stages: depths, widths, ops, expansions and strides "
                             "need 6 entries each")
        bad = [op for op in ops if op not in OPS]
        if bad:
            raise ValueError(f"unknown MetaNet op(s) {bad}; valid ops are {OPS}")
        if img_size % 32:
            raise ValueError(f"img_size={img_size} must be a multiple of 32 (MetaNet's total stride)")
        self.num_classes = num_classes
        self.num_features = NUM_FEATURES
        self.img_size = img_size
        self.level_channels = [widths[s] for s in OUT_STAGES]
        self.level_strides = [2 * _prod(strides[:s + 1]) for s in OUT_STAGES]   # [4, 8, 16, 32]
        self.grad_checkpointing = False

        self.stem = nn.Sequential(nn.Conv2d(3, stem_dim, 3, 2, padding=1, bias=False),
                                  nn.BatchNorm2d(stem_dim), nn.GELU())
        # masked image modelling (stages.py --stage hybrid): one learned stem-output vector stands
        # in for every stem position inside a masked patch (see _stem). Off by default, so plain
        # models keep their parameter set (and official weights their names).
        self.mask_token = nn.Parameter(torch.zeros(1, stem_dim, 1, 1)) if use_mask_token else None

        # stochastic depth grows linearly with depth over all blocks (plain Python: works on meta)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        blocks, c_in = [], stem_dim
        self.level_blocks = []                     # index of the block that ends each level
        for s in range(6):
            for i in range(depths[s]):
                stride = strides[s] if i == 0 else 1
                kw = dict(drop_path=dpr[len(blocks)])
                if ops[s] == "mb":
                    blk = MBConv(c_in, widths[s], stride, expansions[s], **kw)
                elif ops[s] == "fmb":
                    blk = FusedMBConv(c_in, widths[s], stride, expansions[s], **kw)
                else:
                    blk = TransformerBlock(c_in, widths[s], stride, expansions[s], head_dim,
                                           attn_type=ops[s], layer_scale=layer_scale, **kw)
                blocks.append(blk)
                c_in = widths[s]
            if s in OUT_STAGES:
                self.level_blocks.append(len(blocks) - 1)
        self.blocks = nn.Sequential(*blocks)

        self.head = nn.Sequential(nn.Conv2d(c_in, NUM_FEATURES, 1, bias=False),
                                  nn.BatchNorm2d(NUM_FEATURES), nn.GELU())
        self.fc = nn.Linear(NUM_FEATURES, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        if self.mask_token is not None:
            # small random init, as EVA's / SimMIM's mask token; drawn last, so every other weight
            # equals that of a plain model built from the same seed
            nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)

    @staticmethod
    def _init_weights(m: nn.Module):
        # convs keep PyTorch's default init (as the official code); BN starts at (1, 0) except the
        # zero-initialised last BN of each conv branch, set in the block constructors
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # -- contract helpers --------------------------------------------------------------------------
    def block_list(self) -> list:
        """Every residual block in forward order (FSDP units, checkpointing, layer-wise lr decay)."""
        return list(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        """XCA temperatures (3-d, so a `ndim <= 1` rule would miss them) skip weight decay."""
        return {n for n, _ in self.named_parameters() if n.endswith("temperature")}

    def _check_input(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"MetaNet expects images (B, 3, H, W), got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % 32 or W % 32:
            raise ValueError(
                f"MetaNet needs image sides that are multiples of 32 (its total stride), got {H}x{W}; "
                f"resize or pad to e.g. {max(32, round(H / 32) * 32)}x{max(32, round(W / 32) * 32)} "
                f"(valid sides: 32, 64, ..., 224, 256, ...)")

    def _stem(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Stem, with masked patches hidden when `mask` is given: bool (B, h, w) on a patch grid
        of the image (patch = H / h, an even number of pixels, so every stride-2 stem position
        lies in one patch). Masked pixels are zeroed first (the mean colour after
        data.normalize): the 3x3 window of a visible position at a patch border would otherwise
        see one row of its masked neighbour. Then every stem position inside a masked patch is
        replaced by `mask_token` (the conv analogue of EVA's token swap), before any block."""
        if mask is None:
            return self.stem(x)                                # (B, stem, H/2, W/2)
        if self.mask_token is None:
            raise ValueError("a mask was given but this model has no mask_token: build it with "
                             "use_mask_token=True")
        B, _, H, W = x.shape
        if mask.dtype != torch.bool or mask.ndim != 3 or mask.shape[0] != B:
            raise ValueError(f"mask must be bool (B, h, w) = ({B}, h, w) on a patch grid, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        h, w = mask.shape[1:]
        if H % h or W % w or H // h != W // w or (H // h) % 2:
            raise ValueError(f"a {h}x{w} mask does not tile a {H}x{W} image into square patches of "
                             f"an even number of pixels: use a grid of (H/p, W/p) with p even, "
                             f"e.g. {H // 8}x{W // 8} for p = 8")
        p = H // h
        pix = mask.repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None]   # (B, 1, H, W)
        x = self.stem(x.masked_fill(pix, 0.0))                              # (B, stem, H/2, W/2)
        cell = pix[:, :, ::2, ::2]                 # (B, 1, H/2, W/2): each stem position's patch
        return torch.where(cell, self.mask_token.to(x.dtype), x)

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False,
                              context_fn=lambda: (contextlib.nullcontext(), _freeze_bn_stats(blk)))
        return blk(x)

    # -- forward passes ------------------------------------------------------------------------------
    def forward_levels(self, x: torch.Tensor, inject=None, mask: torch.Tensor | None = None):
        """x (B,3,H,W) -> (levels, pooled): levels = 4 maps (B, C_k, H/s_k, W/s_k) at strides
        4, 8, 16, 32 (ends of stages 1, 2, 4, 5); pooled (B, 1280).
        `inject(k, fmap) -> fmap` is called after level k; its result replaces the level and is
        what the rest of the network sees (how the generalist's KTMs enter the main stream).
        `mask` bool (B, h, w): hide those patches behind `mask_token` at the stem (see _stem)."""
        self._check_input(x)
        x = self._stem(x, mask)                              # (B, stem, H/2, W/2)
        levels = []
        for i, blk in enumerate(self.blocks):
            x = self._run_block(blk, x)
            if i in self.level_blocks:
                if inject is not None:
                    x = inject(len(levels), x)
                levels.append(x)
        return levels, self.forward_head(self.head(x), pre_logits=True)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,3,H,W) -> unpooled head map (B, 1280, H/32, W/32). `mask`: as forward_levels."""
        self._check_input(x)
        x = self._stem(x, mask)
        for blk in self.blocks:
            x = self._run_block(blk, x)
        return self.head(x)

    def forward_patches(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-location final features (B, 1280, H/32, W/32); their mean is the pooled feature.
        With `mask` (B, h, w) this is what a MIM student predicts from (stages.py --stage mim)."""
        return self.forward_features(x, mask)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))                               # (B, 1280, h, w) -> (B, 1280)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) when built with num_classes > 0, else the pooled (B, 1280)."""
        return self.forward_head(self.forward_features(x))


def _prod(xs) -> int:
    p = 1
    for v in xs:
        p *= v
    return p


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------

PRESETS = {
    # CPU-sized for the 64 px demo pipeline. It keeps the template (6 stages, strides, expansions)
    # and uses all four ops of the family: Fused-MBConv, MBConv, MHSA (stage 4, 4x4 tokens at
    # 64 px), XCA (stage 5). Stage 4 widens 48 -> 64, so both transformer stages open with the
    # down-sampling variant (pooled attention, no MLP), as MN-B4/B15's last stage does. ~0.45 M params.
    "metanet_demo": dict(stem_dim=16, depths=(1, 1, 2, 2, 2, 2), widths=(16, 24, 32, 48, 64, 96),
                         ops=("fmb", "fmb", "mb", "mb", "mhsa", "xca"), head_dim=16, img_size=64),
    # MN-B4: 31.7 M params with a 1000-way classifier, 3.17 GMACs at 224 (INTERN model zoo)
    "mn_b4": dict(stem_dim=32, depths=(2, 3, 6, 6, 6, 12), widths=(32, 64, 128, 192, 192, 384),
                  ops=("mb",) * 4 + ("mhsa",) * 2, head_dim=48, img_size=224),
    # MN-B15: ~1.0 B params, 137.7 GMACs at 224; drop path 0.3 as released
    "mn_b15": dict(stem_dim=96, depths=(4, 6, 12, 12, 12, 24), widths=(128, 256, 512, 768, 768, 1536),
                   ops=("fmb",) * 2 + ("mb",) * 2 + ("xca",) * 2, head_dim=64, drop_path_rate=0.3,
                   img_size=224),
}

_OVERRIDES = ("num_classes", "drop_path_rate", "img_size", "layer_scale", "stem_dim", "depths",
              "widths", "ops", "head_dim", "expansions", "strides", "use_mask_token")


def build(name: str, **overrides) -> MetaNet:
    """Build a preset; overrides (num_classes, drop_path_rate, img_size, ...) replace its values.
    Works under `with torch.device("meta"):` (MN-B15's billion parameters without memory)."""
    if name not in PRESETS:
        raise ValueError(f"unknown MetaNet preset {name!r}; valid names: {sorted(PRESETS)}")
    bad = sorted(set(overrides) - set(_OVERRIDES))
    if bad:
        raise ValueError(f"unknown MetaNet override(s) {bad}; valid ones: {list(_OVERRIDES)}")
    return MetaNet(**{**PRESETS[name], **overrides})


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build("metanet_demo").eval()
    x = torch.randn(2, 3, model.img_size, model.img_size)
    with torch.no_grad():
        levels, pooled = model.forward_levels(x)
    n = sum(p.numel() for p in model.parameters())
    print(f"metanet_demo: {n / 1e6:.3f} M parameters, {len(model.block_list())} blocks, "
          f"input {tuple(x.shape)}")
    for k, (f, s) in enumerate(zip(levels, model.level_strides)):
        print(f"  level {k}: stride {s:2d}  {tuple(f.shape)}")
    print(f"  pooled : {tuple(pooled.shape)}")
