"""EVA masked image modelling (MIM): block-wise masks, the frozen teacher, the student and its loss.

EVA-01 pre-trains a plain ViT by asking it to *regress* the patch features of an image-text
aligned teacher (CLIP-L/14 in the paper; here the amateur stage's image tower) at the patches it
cannot see. One training step:

    images (B, 3, H, W) ──► Teacher ──► targets (B, N, D_t)      frozen, no grad, eval mode
       │   mask (B, N) ──► MIMModel ──► pred    (B, N, D_t)      EVA student with a mask token
       └──────────────────────────────► mim_loss(pred, targets, mask)   -cos, masked patches only

Student and teacher see the same pixels (same crop, same flip); only the student sees the mask.
Masks are BEiT's block-wise masks (`block_mask`), 40 % of the patches in a few rectangles.

What lives here (the stage in stages.py wires these into its training loop):
    block_mask, random_masks           BEiT block-wise masks from a numpy Generator
    mask_for_index, masks_for_indices  the same, keyed by (seed, epoch, sample index)
    num_masked_for, default_min_block  mask size and smallest block for a grid
    Teacher                            any `forward_patches` backbone (+ projection) -> per-patch targets
    MIMModel, build_student            the student (`backbone.*`) + `lm_head`; forward_loss. EVA's
                                       is a ViT; a MetaNet student works too (masked at its stem,
                                       scored on its stride-32 grid: see MIMModel)
    mim_loss, patch_cosine             negative cosine over masked patches; per-patch cosine
    RECIPE, scaled_lr                  EVA-01's pre-training hyper-parameters
    show, main                         `python mim.py --show mim.pt --data SPEC --out mim.png`
"""
import argparse
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import eva

# ----------------------------------------------------------------------------- the recipe

# px per mask cell of a MetaNet student or hybrid backbone (MetaNet has no patches): eva_demo's
# patch size, so both demo backbones see the same 8 x 8 grid at 64 px; even, so each stride-2
# stem position lies in one cell.
METANET_MASK_PATCH = 8

# EVA-01's MIM pre-training (README command + run_eva_pretraining.py), as defaults for the stage.
RECIPE = dict(
    lr=1e-3,                 # at `ref_batch` images per step; scale linearly (scaled_lr)
    ref_batch=4096,
    min_lr=1e-5,             # per-step cosine decay ends here
    warmup_epochs=2,         # linear warm-up from 0 (of 150 epochs)
    epochs=150,
    betas=(0.9, 0.98),
    eps=1e-6,
    weight_decay=0.05,       # constant; biases, norms, pos_embed, cls_token are not decayed,
                             # mask_token is (as in BEiT / EVA)
    grad_clip=3.0,
    layer_decay=1.0,         # none in pre-training (EVA uses it only when fine-tuning)
    drop_path=0.1,
    mask_ratio=0.4,          # EVA masks 105 of 256 patches (0.41); num_masked_for() rounds
    min_block=16,            # patches per block at a 16x16 grid (see default_min_block)
)


def scaled_lr(batch_size: int, recipe: dict = RECIPE) -> float:
    """The recipe's learning rate at another total batch size (linear scaling rule)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return recipe["lr"] * batch_size / recipe["ref_batch"]


# ----------------------------------------------------------------------------- masking

MIN_ASPECT = 0.3                  # block aspect ratio h/w lies in [0.3, 1/0.3], log-uniform
MAX_ATTEMPTS = 10                 # tries per block before giving up (so masks can fall short)


def default_min_block(height: int, width: int) -> int:
    """Smallest block in patches: EVA's 16 at a 16x16 grid, scaled with the grid's area so a
    small grid still gets several blocks (8x8 -> 4, 14x14 -> 12, 4x4 -> 1)."""
    return max(1, round(RECIPE["min_block"] * height * width / 256))


def num_masked_for(height: int, width: int, ratio: float = RECIPE["mask_ratio"]) -> int:
    """Patches to mask at `ratio` of a height x width grid, rounded (8x8 at 0.4 -> 26)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * height * width))


def _add_block(mask: np.ndarray, max_new: int, min_block: int, rng: np.random.Generator) -> int:
    """Mask one random rectangle in place, adding between 1 and `max_new` new patches.
    Returns how many were added; 0 when all attempts failed."""
    H, W = mask.shape
    lo, hi = sorted((min_block, max_new))            # BEiT draws area ~ U(min_block, max_new)
    log_lo, log_hi = math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT)
    for _ in range(MAX_ATTEMPTS):
        area = rng.uniform(lo, hi)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (1 <= h < H and 1 <= w < W):         # BEiT keeps blocks strictly inside the grid
            continue
        top = int(rng.integers(0, H - h + 1))
        left = int(rng.integers(0, W - w + 1))
        window = mask[top:top + h, left:left + w]    # a view: writing it writes `mask`
        new = h * w - int(window.sum())
        if 0 < new <= max_new:
            window[...] = True
            return new
    return 0


def block_mask(height: int, width: int, num_masked: int, rng: np.random.Generator,
               min_block: int | None = None) -> np.ndarray:
    """BEiT / EVA block-wise mask: bool (height, width), True = masked.

    Rectangles of at least `min_block` patches (default `default_min_block`: 16 at 16x16) with
    aspect ratio in [0.3, 1/0.3] are added until `num_masked` patches are masked. A block may
    overlap earlier ones; it is accepted only if it adds 1..remaining new patches, and after 10
    failed attempts masking stops, so a mask never exceeds `num_masked` but may fall a little short
    (16x16 with 105: about 104.4 on average). `rng` is a numpy Generator: no global RNG is used.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    if height < 2 or width < 2:
        raise ValueError(f"block masking needs a grid of at least 2x2 patches, got {height}x{width}: "
                         f"use a smaller patch size or a larger image")
    if not 0 <= num_masked <= height * width:
        raise ValueError(f"num_masked={num_masked} must be in [0, {height * width}] for a "
                         f"{height}x{width} grid")
    min_block = default_min_block(height, width) if min_block is None else int(min_block)
    if min_block < 1:
        raise ValueError(f"min_block must be >= 1, got {min_block}")
    mask = np.zeros((height, width), dtype=bool)
    count = 0
    while count < num_masked:
        added = _add_block(mask, num_masked - count, min_block, rng)
        if added == 0:
            break
        count += added
    return mask


def random_masks(batch_size: int, grid_h: int, grid_w: int, num_masked: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` independent block masks from one Generator -> bool (B, grid_h*grid_w),
    flattened row-major like the patch tokens."""
    masks = np.stack([block_mask(grid_h, grid_w, num_masked, rng) for _ in range(batch_size)])
    return torch.from_numpy(masks.reshape(batch_size, grid_h * grid_w))     # (B, N)


def _grid_hw(grid) -> tuple:
    h, w = (grid, grid) if isinstance(grid, int) else tuple(grid)
    return int(h), int(w)


def mask_for_index(grid, num_masked: int, seed: int, epoch: int, index: int) -> torch.Tensor:
    """The mask of dataset sample `index` in `epoch`: bool (N,), a pure function of
    (seed, epoch, index). The stage keys masks by sample, not by rank or batch position, so a run
    on 2 ranks masks exactly like a run on 1 rank. `grid` is an int or (h, w)."""
    h, w = _grid_hw(grid)
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    rng = np.random.default_rng([int(seed), int(epoch), int(index)])   # one stream per key
    return torch.from_numpy(block_mask(h, w, num_masked, rng).reshape(h * w))


def masks_for_indices(grid, num_masked: int, seed: int, epoch: int, indices) -> torch.Tensor:
    """`mask_for_index` for a batch of dataset indices -> bool (B, N)."""
    indices = indices.tolist() if torch.is_tensor(indices) else list(indices)
    return torch.stack([mask_for_index(grid, num_masked, seed, epoch, i) for i in indices])


# ----------------------------------------------------------------------------- teacher

class Teacher(nn.Module):
    """A frozen image tower that turns images into per-patch regression targets.

    backbone: any module with `forward_patches(x) -> (B, C, h, w)`, its final per-location
        features after its final norm (eva.EVA and metanet.MetaNet both have it).
    proj: optional module applied to each location's C-vector (the tower's image-text
        projection, e.g. nn.Linear(C, D_t)); None = the features themselves are the targets.
    patch_size: the *student's* patch size. Targets are resized to the student's grid
        (H // patch_size, W // patch_size) when the teacher's grid differs (a MetaNet sees
        64 px as 2x2, an eva_demo student as 8x8). Resizing is bilinear (align_corners=False,
        antialiased when shrinking): bicubic can overshoot, inventing feature values the
        teacher never produced. None keeps the teacher's own grid.
    out_dim: target width D_t; by default proj.out_features, else backbone.num_features.

    Always in eval mode (BatchNorm statistics and dropout of the teacher must not move) with
    requires_grad False; forward runs under torch.no_grad.
    """

    def __init__(self, backbone: nn.Module, proj: nn.Module | None = None,
                 patch_size: int | None = None, out_dim: int | None = None):
        super().__init__()
        if not callable(getattr(backbone, "forward_patches", None)):
            raise TypeError(f"the teacher backbone ({type(backbone).__name__}) has no "
                            f"forward_patches(x) -> (B, C, h, w); use an eva or metanet model")
        self.backbone = backbone
        self.proj = proj
        self.patch_size = patch_size
        if out_dim is None:
            out_dim = getattr(proj, "out_features", None) if proj is not None else \
                getattr(backbone, "num_features", None)
        if out_dim is None:
            raise ValueError("cannot tell the teacher's output width: pass out_dim=")
        self.out_dim = int(out_dim)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True):
        # A parent's .train() reaches here too: the teacher stays in eval mode regardless.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> targets (B, h*w, D_t), row-major over the (student) grid."""
        f = self.backbone.forward_patches(images)                        # (B, C, h, w)
        if self.proj is not None:
            f = rearrange(f, "b c h w -> b h w c")
            f = rearrange(self.proj(f), "b h w d -> b d h w")             # (B, D_t, h, w)
        if self.patch_size is not None:
            size = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
            if tuple(f.shape[-2:]) != size:
                f = F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False,
                                  antialias=True).to(f.dtype)            # (B, D_t, h', w')
        return rearrange(f, "b d h w -> b (h w) d")                      # (B, N, D_t)

    @classmethod
    def from_state_dict(cls, backbone: nn.Module, state_dict: dict, backbone_prefix: str,
                        proj: nn.Module | None = None, proj_prefix: str | None = None,
                        patch_size: int | None = None) -> "Teacher":
        """Fill freshly built `backbone` (and `proj`) from the keys of `state_dict` under the
        given prefixes, strictly, then wrap them. E.g. a MIM checkpoint's own teacher:
        `Teacher.from_state_dict(tower, sd, "teacher.backbone.", nn.Linear(C, D), "teacher.proj.")`;
        an amateur checkpoint: whatever prefixes stages.py stores its image tower under."""
        parts = [(backbone, backbone_prefix)] + ([(proj, proj_prefix)] if proj is not None else [])
        for module, prefix in parts:
            if prefix is None:
                raise ValueError("a proj module was given without proj_prefix")
            sub = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            if not sub:
                heads = sorted({k.split(".")[0] + "." for k in state_dict})
                raise ValueError(f"no keys start with {prefix!r}; the state dict's top-level "
                                 f"prefixes are {heads}")
            try:
                missing, unexpected = module.load_state_dict(sub, strict=False)
            except RuntimeError as e:                      # a tensor of another shape
                raise ValueError(f"weights under {prefix!r} do not fit {type(module).__name__} "
                                 f"(another preset or width?): {e}") from e
            if missing or unexpected:
                raise ValueError(f"weights under {prefix!r} do not fit {type(module).__name__} "
                                 f"(another preset?): missing {missing}, unexpected {unexpected}")
        return cls(backbone, proj, patch_size=patch_size)


# ----------------------------------------------------------------------------- student

def is_vit(backbone: nn.Module) -> bool:
    """A backbone with tokens (eva.py) rather than feature maps (metanet.py)."""
    return callable(getattr(backbone, "forward_tokens", None))


def mask_grid(backbone: nn.Module) -> tuple:
    """-> (mask cell px, target cell px) of a masked backbone (a MIM student, the hybrid's
    backbone). A ViT is masked and predicts on its patches; a MetaNet is masked on
    METANET_MASK_PATCH cells at its stem and predicts on its total stride."""
    if is_vit(backbone):
        return backbone.patch_size, backbone.patch_size
    return METANET_MASK_PATCH, backbone.level_strides[-1]


class MIMModel(nn.Module):
    """The student: `backbone` with a mask token + `lm_head` Linear(C -> D_t).

    EVA (the paper's student): the head is EVA's, the backbone's final norm (inside
    forward_tokens) and one Linear, no decoder; masks, predictions and targets share the patch grid.
    MetaNet (INTERN's backbone; a CNN has no tokens): the mask lives on a grid of `mask_patch` px
    (METANET_MASK_PATCH, as the hybrid stage: `mask_grid`), hidden at the stem; predictions come from the head
    map (its BN is the final norm) at the total stride, and the teacher's targets are resized to
    that coarser grid. A target cell then counts by the share of it that was masked
    (`target_weights`), which for EVA is exactly the 0/1 mask.
    State-dict names are `backbone.*` (a plain backbone state dict once the prefix is stripped),
    `lm_head.*`, and `teacher.*` when a teacher is attached.

    teacher: optional Teacher kept as a child so checkpoints carry it and .to(device) moves it.
        forward(images, mask) does not call it; forward_loss does. Under FSDP2 keep its
        parameters out of the sharding (fully_shard(..., ignored_params=...)).
    """

    def __init__(self, backbone: nn.Module, target_dim: int, teacher: Teacher | None = None):
        super().__init__()
        if getattr(backbone, "mask_token", None) is None:
            raise ValueError("the student needs a mask token: build it with use_mask_token=True "
                             "(eva.build or metanet.build; or use build_student)")
        self.is_vit = is_vit(backbone)
        # mask grid and target grid, in pixels per cell; equal for a ViT
        self.mask_patch, self.target_patch = mask_grid(backbone)
        if self.target_patch % self.mask_patch:
            raise ValueError(f"mask_patch {self.mask_patch} must divide the student's stride "
                             f"{self.target_patch}")
        if teacher is not None and teacher.out_dim != target_dim:
            raise ValueError(f"target_dim={target_dim} but the teacher produces {teacher.out_dim}-d targets")
        if teacher is not None and teacher.patch_size != self.target_patch:
            raise ValueError(f"the teacher resizes targets for patch_size={teacher.patch_size} but the "
                             f"student predicts on a grid of {self.target_patch} px: build Teacher(..., "
                             f"patch_size={self.target_patch})")
        self.backbone = backbone
        width = backbone.embed_dim if self.is_vit else backbone.num_features
        self.lm_head = nn.Linear(width, target_dim)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.lm_head.bias)
        self.teacher = teacher

    def target_weights(self, mask: torch.Tensor) -> torch.Tensor:
        """mask bool (B, N) on the mask grid -> the loss's mask on the target grid: the same bool
        mask for a ViT; for MetaNet the float share (B, N_t) of each target cell that is masked."""
        if self.is_vit:
            return mask
        r = self.target_patch // self.mask_patch
        B, N = mask.shape
        g = math.isqrt(N)
        cells = rearrange(mask.float(), "b (h r w s) -> b (h w) (r s)", h=g // r, r=r, s=r)
        return cells.mean(-1)                                         # (B, N_t) in [0, 1]

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), mask bool (B, N) -> predictions (B, N_t, D_t) at every target
        cell (the loss picks the masked ones)."""
        if not self.is_vit:
            B, _, H, W = images.shape
            grid = mask.view(B, H // self.mask_patch, W // self.mask_patch)
            fmap = self.backbone.forward_patches(images, mask=grid)     # (B, C, H/32, W/32)
            return self.lm_head(rearrange(fmap, "b c h w -> b (h w) c"))
        x = self.backbone.forward_tokens(images, mask)[:, 1:]        # (B, N, C), cls dropped
        # 'token' students are normed inside forward_tokens (fc_norm is Identity); an 'avg'
        # student's norm is fc_norm, applied per token here. Either way: one norm per token.
        x = self.backbone.fc_norm(x)
        return self.lm_head(x)                                       # (B, N, D_t)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # forward_loss calls predict(), so a stage may subclass and override forward(batch)
        return self.predict(images, mask)

    def forward_loss(self, images: torch.Tensor, mask: torch.Tensor, denom=None):
        """One MIM step with the attached teacher -> (loss, terms). terms holds detached
        diagnostics: cos_visible, the mean cosine at the patches the student saw."""
        if self.teacher is None:
            raise ValueError("forward_loss needs a teacher: MIMModel(backbone, dim, teacher=Teacher(...))")
        target = self.teacher(images)                                # (B, N_t, D_t), no grad
        pred = self.predict(images, mask)                            # (B, N_t, D_t)
        weights = self.target_weights(mask)
        loss = mim_loss(pred, target, weights, denom)
        with torch.no_grad():
            cos = patch_cosine(pred, target)                         # (B, N_t)
            seen = 1.0 - weights.float()                             # no host sync (unlike .any())
            visible = (cos * seen).sum() / seen.sum().clamp(min=1)
        return loss, {"cos_visible": visible}

    def no_weight_decay(self) -> set:
        return {f"backbone.{n}" for n in getattr(self.backbone, "no_weight_decay", set)()}


def build_student(name: str, target_dim: int, teacher: Teacher | None = None, **overrides) -> MIMModel:
    """MIMModel around the eva preset `name` with a mask token and cls/'token' pooling (the
    official MIM model: the final norm covers every token), or around the metanet preset `name`
    with a mask token. `overrides` go to eva.build / metanet.build."""
    import metanet
    if name in metanet.PRESETS:
        return MIMModel(metanet.build(name, **{"use_mask_token": True, **overrides}), target_dim, teacher)
    overrides = {"use_mask_token": True, "global_pool": "token", **overrides}
    return MIMModel(eva.build(name, **overrides), target_dim, teacher)


# ----------------------------------------------------------------------------- loss

def _check_loss_inputs(pred, target, mask):
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(f"pred and target must both be (B, N, D), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}: is the teacher's patch_size the student's?")
    if mask.shape != pred.shape[:2] or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"mask must be bool (or float weights) (B, N) = {tuple(pred.shape[:2])}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")


def patch_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per patch in fp32: (B, N, D), (B, N, D) -> (B, N)."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1)


def mim_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             denom: float | torch.Tensor | None = None) -> torch.Tensor:
    """EVA's loss: negative cosine similarity between prediction and target, averaged over the
    masked patches only (in [-1, 1]; lower is better), computed in fp32.

    denom: divide the summed -cos by this instead of the number of masked patches present.
    Block masks differ in size (94..105 of 105), so a mean per rank / micro-batch, averaged again
    by DDP and accumulation, weighs patches unevenly and a 2-rank run drifts from a 1-rank run.
    denom = B * num_masked (the *nominal* count of this micro-batch) makes every patch weigh the
    same however the batch is split, with no communication; it differs from EVA's mean by the
    actual/nominal ratio (about 0.995).

    A float `mask` holds weights in [0, 1] (MIMModel.target_weights of a MetaNet student): the
    weighted sum of -cos over the weight total (or over denom).
    """
    _check_loss_inputs(pred, target, mask)
    if mask.is_floating_point():
        total = (patch_cosine(pred, target) * mask.float()).sum()
        if denom is None:
            if not mask.sum() > 0:
                raise ValueError("mim_loss got weights that are all zero: raise num_masked / mask_ratio")
            denom = mask.float().sum()
        return -total / denom
    cos = F.cosine_similarity(pred[mask].float(), target[mask].float(), dim=-1)   # (M,)
    if denom is None:
        if cos.numel() == 0:
            raise ValueError("mim_loss got a mask with no masked patch: raise num_masked / mask_ratio")
        return -cos.mean()
    return -cos.sum() / denom


# ----------------------------------------------------------------------------- picture

def _colour(c: float) -> tuple:
    """Diverging map for a cosine in [-1, 1]: blue (-1) -> white (0) -> red (+1)."""
    c = max(-1.0, min(1.0, c))
    lo, hi = (np.array([49, 54, 149]), np.array([165, 0, 38]))
    end = hi if c >= 0 else lo
    rgb = np.array([255, 255, 255]) * (1 - abs(c)) + end * abs(c)
    return tuple(int(v) for v in rgb)


def _to_pil(img: torch.Tensor, scale: int):
    from PIL import Image
    x = img.detach().float().cpu()
    lo, hi = x.amin(), x.amax()                           # per-image min/max: any normalisation
    x = ((x - lo) / (hi - lo + 1e-8) * 255).round().byte()
    arr = rearrange(x, "c h w -> h w c").numpy()
    if arr.shape[-1] == 1:
        arr = arr[..., 0]
    pil = Image.fromarray(arr).convert("RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)


@torch.no_grad()
def show(model: MIMModel, teacher: Teacher, images: torch.Tensor, masks: torch.Tensor, path: str):
    """Save a PNG: one row per image with the image, what the student sees (masked patches grey)
    and the per-patch cosine between prediction and target (red = agrees; masked patches, the
    ones the loss trains, are outlined). `images` in [0, 1] as data.py renders them; the models
    see them normalised, as in training. Needs only pillow."""
    import data
    from PIL import Image, ImageDraw
    was_training = model.training
    model.eval()
    x = data.normalize(images)
    try:
        pred = model.predict(x, masks)                                   # (B, N, D_t)
    finally:
        model.train(was_training)
    cos = patch_cosine(pred, teacher(x)).cpu()                           # (B, N_t)
    weights = model.target_weights(masks).float().cpu()                  # (B, N_t)
    B, _, H, W = images.shape
    p, t = model.mask_patch, model.target_patch      # mask cells and target cells (equal for EVA)
    gh, gw, th, tw = H // p, W // p, H // t, W // t
    scale = max(1, 128 // max(H, W))
    cell = p * scale
    pad, top = 8, 28
    panel_w, panel_h = W * scale, H * scale
    canvas = Image.new("RGB", (pad + 3 * (panel_w + pad) + 170, top + B * (panel_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    titles = ["image", "student input", "cos(pred, target)", "red +1, white 0, blue -1\n"
              "outlined: masked (trained)"]
    for j, title in enumerate(titles):
        draw.text((pad + j * (panel_w + pad), 2), title, fill="black")
    m = masks.view(B, gh, gw).cpu()
    for i in range(B):
        y = top + i * (panel_h + pad)
        img = _to_pil(images[i], scale)
        canvas.paste(img, (pad, y))
        seen = img.copy()
        seen_draw = ImageDraw.Draw(seen)
        heat = Image.new("RGB", (panel_w, panel_h), "white")
        heat_draw = ImageDraw.Draw(heat)
        for r in range(th):
            for c in range(tw):
                box = [c * t * scale, r * t * scale, (c + 1) * t * scale - 1, (r + 1) * t * scale - 1]
                heat_draw.rectangle(box, fill=_colour(float(cos[i, r * tw + c])))
        for r in range(gh):
            for c in range(gw):
                box = [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1]
                if m[i, r, c]:
                    seen_draw.rectangle(box, fill=(128, 128, 128))
                    heat_draw.rectangle(box, outline="black")
        canvas.paste(seen, (pad + panel_w + pad, y))
        canvas.paste(heat, (pad + 2 * (panel_w + pad), y))
        w = weights[i]          # share of each target cell that is masked (0/1 for EVA)
        masked = (cos[i] * w).sum() / w.sum().clamp(min=1e-6)
        visible = (cos[i] * (1 - w)).sum() / (1 - w).sum().clamp(min=1e-6)
        text = f"masked  {masked:+.3f}\nvisible {visible:+.3f}"
        draw.text((pad + 3 * (panel_w + pad), y + 4), text, fill="black")
    canvas.save(path)
    return path


def _images(spec: str, n: int, img_size: int, seed: int) -> torch.Tensor:
    import data  # lazily, like stages
    ds = data.build_dataset(spec, "test", img_size=img_size, seed=seed)
    if len(ds) == 0:
        raise ValueError(f"--data {spec} has no test images")
    return torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])    # (n, 3, H, W)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Look at a MIM checkpoint: block masks and how well "
                                 "the student predicts the teacher's patch features.")
    ap.add_argument("--show", required=True, metavar="CKPT", help="a mim.pt of stages.py --stage mim")
    ap.add_argument("--data", default=None, metavar="SPEC",
                    help="data spec (data.py); default: the checkpoint's first training source")
    ap.add_argument("--out", default="mim.png", help="PNG to write")
    ap.add_argument("--num", type=int, default=6, help="images to show")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the masks")
    args = ap.parse_args(argv)

    import stages  # lazily: only this command-line path needs the stage runner
    # stages.py rebuilds any stage's model from the config saved with it (student, lm_head, teacher)
    model, cfg = stages.load_stage_model(args.show, expect_stage="mim")
    spec = args.data or (cfg.get("data") or "gvd/caption").split(",")[0]
    images = _images(spec, args.num, cfg["img_size"], args.seed)
    gh, gw = (s // model.mask_patch for s in images.shape[-2:])
    num = num_masked_for(gh, gw, cfg.get("mask_ratio", RECIPE["mask_ratio"]))
    masks = random_masks(len(images), gh, gw, num, np.random.default_rng(args.seed))
    print(f"wrote {show(model, model.teacher, images, masks, args.out)}")


if __name__ == "__main__":
    main()
