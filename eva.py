"""EVA-01 vision transformer: demo size ... ViT-g/14, with the mask-token input used by MIM.

EVA-01 (Fang et al., 2022) is a plain pre-norm ViT in the BEiT style: a conv patch embedding,
a cls token, a learned absolute position embedding, and blocks whose attention has a bias on
q and v but none on k. EVA's contribution is the recipe (masked image modelling of CLIP
features, see mim.py), not the architecture, so this file stays small.

Parameter names equal timm's `Eva` (`patch_embed.proj`, `cls_token`, `pos_embed`,
`blocks.{i}.{norm1, attn.{qkv, q_bias, v_bias, proj}, norm2, mlp.{fc1, fc2}}`, `norm` /
`fc_norm`, `head`, plus `mask_token` for MIM), so timm and official EVA-01 weights load
with `load_pretrained()` and no mapping table. timm's pooling convention is kept too:

    global_pool='token'  norm = LayerNorm on every token, pooled = token 0 (cls)
    global_pool='avg'    norm = Identity, pooled = fc_norm(mean of the patch tokens)

so for 'avg' models `forward_features` / `forward_tokens` return *un-normalised* tokens
(as in timm); MIM students should be built with global_pool='token' (the official MIM model).

Inputs of another size than `img_size` are accepted when H and W are multiples of the patch
size: the position embedding is then bicubically resized on the fly (cls slot unchanged).

The backbone contract shared with metanet.py (DESIGN.md §4.1): `model(x)`, `forward_levels`,
`num_features`, `img_size`, `level_channels`, `level_strides`, `block_list()`,
`set_grad_checkpointing()`. Attention and LayerNorm go through `kernels` (Triton or torch).
"""
import inspect
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

import kernels


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescale the survivors.
    Shared with metanet.py (`from eva import DropPath`)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # one Bernoulli draw per sample, broadcast over every other dim
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


# ----------------------------------------------------------------------------- building blocks

class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with one strided conv (kernel = stride = patch)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                                   # (B, C, H/p, W/p)
        return rearrange(x, "b c h w -> b (h w) c")        # (B, N, C), row-major patches


class Attention(nn.Module):
    """Multi-head self-attention with BEiT/EVA biases: q and v have one, k has none.
    The bias lives in two separate parameters (q_bias, v_bias) next to a bias-free qkv
    Linear, which is exactly how official and timm EVA-01 checkpoints store it."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # k's bias is a constant zero: a bias on k adds the same value to every logit of a
        # query row, which softmax cancels, so it would be a parameter that never learns.
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)                               # (B, N, 3C)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        o = kernels.attention(q, k, v, self.scale)                             # (B, H, N, D)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))                 # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form, as EVA-01 (not the tanh approximation)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; no layer scale (EVA-g trains without it)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float):
        super().__init__()
        self.norm1 = kernels.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = kernels.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def resize_pos_embed(pos_embed: torch.Tensor, new_grid, num_prefix: int = 1) -> torch.Tensor:
    """Bicubically resize a square grid of position embeddings, prefix (cls) slots unchanged.

    pos_embed: (1, num_prefix + g*g, C); new_grid: int or (h, w) -> (1, num_prefix + h*w, C).
    Computed in float32 (bicubic in half precision is coarse), returned in the input dtype.
    """
    h, w = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n = pos_embed.shape[1] - num_prefix
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"pos_embed has {n} patch positions after {num_prefix} prefix slot(s), "
                         f"which is not a square grid; pass the right num_prefix")
    if (g, g) == (h, w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = rearrange(grid.float(), "1 (h w) c -> 1 c h w", h=g)                  # (1, C, g, g)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)  # (1, C, h, w)
    grid = rearrange(grid, "1 c h w -> 1 (h w) c").to(pos_embed.dtype)            # (1, h*w, C)
    return torch.cat([prefix, grid], dim=1)


# ----------------------------------------------------------------------------- the model

class EVA(nn.Module):
    """EVA-01 ViT. Argument names follow timm's `Eva` so `build(name, **overrides)` reads alike.

    img_size: default (square) input size; other multiples of patch_size also work.
    global_pool: 'avg' (mean of patch tokens, then fc_norm) or 'token' (cls after norm).
    num_classes: 0 -> model(x) returns the pooled feature (B, embed_dim).
    use_mask_token: add the MIM `mask_token` (1, 1, C) used by forward_tokens(x, mask).
    head_init_scale: the head's initial weights are multiplied by this (timm / official: 1e-3).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 0, global_pool: str = "avg", embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, use_mask_token: bool = False,
                 head_init_scale: float = 1e-3):
        super().__init__()
        if global_pool not in ("avg", "token"):
            raise ValueError(f"global_pool={global_pool!r}; use 'avg' or 'token'")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.num_classes, self.global_pool, self.depth = num_classes, global_pool, depth
        self.num_features = self.embed_dim = embed_dim
        self.level_channels = [embed_dim] * 4
        self.level_strides = [patch_size] * 4
        self.grad_checkpointing = False
        grid = img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        # stochastic depth grows linearly with depth: early blocks are kept more often
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        hidden = int(round(embed_dim * mlp_ratio))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, hidden, r) for r in rates])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else kernels.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = kernels.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(head_init_scale)

    @torch.no_grad()
    def _init_weights(self, head_init_scale: float):
        # Only in-place ops, so this also runs under `with torch.device("meta")`.
        # std 0.02 truncated at 2 std (timm / MAE); the official giant used std 0.015 cut at 1 std.
        def tn(t):
            nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04)
        for p in (self.pos_embed, self.cls_token, self.mask_token):
            if p is not None:
                tn(p)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                tn(m.weight)
                if m.bias is not None:
                    m.bias.zero_()
        if isinstance(self.head, nn.Linear):
            self.head.weight.mul_(head_init_scale)
        # Each block adds to the residual stream; shrinking the outputs of the deeper ones keeps
        # the stream's variance from growing with depth (the BEiT/EVA "fix_init_weight").
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    # -- small helpers ------------------------------------------------------------------------

    def block_list(self) -> list:
        """The residual blocks in order (FSDP wrapping, grad checkpointing, layer-wise lr decay)."""
        return list(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}  # mask_token is decayed, as in BEiT / EVA

    def _block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            # non-reentrant checkpoint also replays the RNG, so DropPath masks match on recompute
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _grid(self, x: torch.Tensor):
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not a multiple of patch_size={p}: use H and W "
                             f"in {{{p}, {2 * p}, ..., {self.img_size} (default), ...}}")
        return H // p, W // p

    def _embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) -> tokens (B, 1+N, C) with cls and position embedding added."""
        h, w = self._grid(x)
        x = self.patch_embed(x)                                            # (B, N, C)
        if mask is not None:
            if self.mask_token is None:
                raise ValueError("a mask was given but this model has no mask_token: "
                                 "build it with use_mask_token=True")
            if mask.shape != x.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"mask must be bool of shape {tuple(x.shape[:2])} (B, N), got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            # BEiT/EVA: masked patches are swapped for the learned token *before* the position
            # embedding is added, so the model still knows where each masked patch sits.
            x = torch.where(mask[..., None], self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + resize_pos_embed(self.pos_embed, (h, w))                # (B, 1+N, C)

    # -- forwards -----------------------------------------------------------------------------

    def forward_tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W), optional bool mask (B, N) -> tokens (B, 1+N, C) after `norm`."""
        x = self._embed(x, mask)
        for blk in self.blocks:
            x = self._block(blk, x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """timm name: (B, 3, H, W) -> (B, 1+N, C) after the final `norm` (Identity for 'avg')."""
        return self.forward_tokens(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, 1+N, C) from forward_features -> pooled (B, C) or logits (B, classes)."""
        x = x[:, 1:].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final per-location features (B, C, H/p, W/p) (MIM teacher targets).
        For 'avg' models fc_norm is applied per token (norm is Identity there), for 'token'
        models norm is; either way every location is normalised once."""
        h, _ = self._grid(x)
        t = self.fc_norm(self.forward_tokens(x)[:, 1:])                    # (B, N, C)
        return rearrange(t, "b (h w) c -> b c h w", h=h)

    def forward_levels(self, x: torch.Tensor, inject=None):
        """(B, 3, H, W) -> (levels, pooled). levels: 4 maps (B, C, H/p, W/p), the patch tokens
        after blocks depth/4, depth/2, 3depth/4, depth (before the final norm).
        `inject(k, fmap) -> fmap` runs after level k; its result replaces the level and is what
        the following blocks (and the pooling, after the last level) see. cls is kept aside."""
        if self.depth < 4:
            raise ValueError(f"forward_levels needs depth >= 4 (4 levels), this model has {self.depth}")
        ends = [(k + 1) * self.depth // 4 for k in range(4)]   # blocks finished at each level
        h, w = self._grid(x)
        x = self._embed(x)
        levels = []
        for i, blk in enumerate(self.blocks):
            x = self._block(blk, x)
            if i + 1 not in ends:
                continue
            k = len(levels)
            fmap = rearrange(x[:, 1:], "b (h w) c -> b c h w", h=h)        # (B, C, h, w)
            if inject is not None:
                new = inject(k, fmap)
                if new.shape != fmap.shape:
                    raise ValueError(f"inject({k}, fmap) must keep the shape {tuple(fmap.shape)}, "
                                     f"it returned {tuple(new.shape)}")
                fmap = new
                x = torch.cat([x[:, :1], rearrange(fmap, "b c h w -> b (h w) c")], dim=1)
            levels.append(fmap)
        pooled = self.forward_head(self.norm(x), pre_logits=True)          # (B, C)
        return levels, pooled


# ----------------------------------------------------------------------------- presets

PRESETS = {
    # CPU demo: 64 px, patch 8 -> 8x8 grid + cls = 65 tokens, width 128, depth 8 (levels after
    # blocks 2/4/6/8), 4 heads of 32. ~1.6 M parameters: a pipeline stage trains in minutes.
    "eva_demo": dict(img_size=64, patch_size=8, embed_dim=128, depth=8, num_heads=4, mlp_ratio=4.0),
    "eva_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "eva_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "eva_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "eva_large_patch14_224": dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    # ViT-g/14 of the paper: head dim 88, MLP 6144; 1,011,146,112 parameters without a head.
    "eva_giant_patch14_224": dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16,
                                  mlp_ratio=6144 / 1408),
}


def build(name: str, **overrides) -> EVA:
    """EVA from a preset; overrides use timm's argument names (img_size, num_classes, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown EVA preset {name!r}; choose one of {sorted(PRESETS)}")
    valid = [p for p in inspect.signature(EVA.__init__).parameters if p != "self"]
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise ValueError(f"unknown override(s) {bad} for {name}; valid names: {valid}")
    return EVA(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- checkpoints

def _read_state_dict(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, not a torch file, pickled code, ...
        raise ValueError(f"could not read checkpoint {path!r}: it is corrupt, truncated or not "
                         f"a torch.save file of tensors ({type(e).__name__}: {e})") from e
    # unwrap {"model": ...} (ours / official EVA), {"module": ...} (DeepSpeed), {"state_dict": ...}
    while isinstance(obj, dict):
        inner = next((obj[k] for k in ("model", "module", "state_dict")
                      if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)} if isinstance(obj, dict) else {}
    if not sd:
        keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"no state dict of tensors found in {path!r} (top level: {keys})")
    for prefix in ("module.", "_orig_mod."):   # DDP / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_pretrained(model: EVA, path, strict: bool = True) -> dict:
    """Load an EVA-01 checkpoint (ours, timm, official MIM or fine-tune) into `model`.

    Conversions, each listed in the returned report: nesting under model/module/state_dict is
    unwrapped; `mask_token` / `lm_head.*` are dropped when the model has none; a MIM `norm` becomes
    `fc_norm` for 'avg' models (timm's rule); a fused `attn.qkv.bias` is split into q_bias/v_bias;
    `pos_embed` is resized bicubically to the model's grid (cls slot kept). A checkpoint without
    `head` leaves the model's fresh head in place (fine-tuning from MIM). strict=True raises on
    any other missing or unexpected key and on a head of another size; strict=False skips them.
    Returns {"path", "dropped", "renamed", "resized", "missing", "unexpected"}.
    """
    path = os.fspath(path)
    sd = _read_state_dict(path)
    own = model.state_dict()
    rep = dict(path=path, dropped=[], renamed=[], resized=[], missing=[], unexpected=[])

    for k in [k for k in sd if k.endswith("attn.qkv.bias")]:
        q, kb, v = sd.pop(k).chunk(3)
        if kb.abs().max() > 0:
            raise ValueError(f"{path}: {k} has a non-zero k bias, which EVA's attention cannot hold")
        sd[k.replace("qkv.bias", "q_bias")], sd[k.replace("qkv.bias", "v_bias")] = q, v
        rep["renamed"].append(f"{k} -> q_bias, v_bias")
    for k in list(sd):
        if (k == "mask_token" or k.startswith("lm_head.")) and k not in own:
            sd.pop(k)
            rep["dropped"].append(k)
        elif k.startswith("head.") and not isinstance(model.head, nn.Linear):
            sd.pop(k)   # num_classes=0: the caller wants the backbone only
            rep["dropped"].append(k)
    # a MIM encoder's final norm plays the role of fc_norm in an 'avg' model (timm's rule)
    if ("norm.weight" in sd and "norm.weight" not in own
            and "fc_norm.weight" in own and "fc_norm.weight" not in sd):
        for s in ("weight", "bias"):
            sd[f"fc_norm.{s}"] = sd.pop(f"norm.{s}")
        rep["renamed"].append("norm -> fc_norm")

    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        old = tuple(sd["pos_embed"].shape)
        g = model.img_size // model.patch_size
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], g)
        rep["resized"].append(f"pos_embed {old} -> {tuple(sd['pos_embed'].shape)}")

    if "head.weight" in sd and sd["head.weight"].shape != own["head.weight"].shape:
        n = sd["head.weight"].shape[0]
        if strict:
            raise ValueError(f"{path} has a {n}-way head but the model has {own['head.weight'].shape[0]} "
                             f"classes: build with num_classes={n} to use it, num_classes=0 for the "
                             f"backbone only, or pass strict=False to keep the model's fresh head")
        for s in ("weight", "bias"):
            rep["dropped"].append(f"head.{s}")
            sd.pop(f"head.{s}", None)

    bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path} does not fit this model (another preset, patch_size or width?):\n  "
                         + "\n  ".join(bad))
    rep["missing"] = [k for k in own if k not in sd]
    rep["unexpected"] = [k for k in sd if k not in own]
    serious = [k for k in rep["missing"] if not k.startswith("head.")] + rep["unexpected"]
    if strict and serious:
        hint = " (the checkpoint's pooling differs: try global_pool='avg' or 'token')" \
            if any("norm" in k for k in serious) else ""
        raise ValueError(f"{path} does not match the model{hint}: missing {rep['missing']}, "
                         f"unexpected {rep['unexpected']}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return rep


if __name__ == "__main__":
    torch.manual_seed(0)
    model = build("eva_demo", num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, model.img_size, model.img_size)
    logits = model(x)
    loss = F.cross_entropy(logits, torch.tensor([3, 7]))
    loss.backward()
    levels, pooled = model.forward_levels(x)
    with_grad = sum(p.grad is not None for p in model.parameters())
    print(f"eva_demo: {n:,} parameters; input {tuple(x.shape)} -> logits {tuple(logits.shape)}, "
          f"loss {loss.item():.4f}, {with_grad}/{len(list(model.parameters()))} tensors got grads")
    print(f"  tokens {tuple(model.forward_features(x).shape)}, pooled {tuple(pooled.shape)}, "
          f"levels {[tuple(f.shape) for f in levels]}, patches {tuple(model.forward_patches(x).shape)}")
