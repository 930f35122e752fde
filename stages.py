"""The training engine every stage runs on, and the stage recipes (Up-A, MIM, Up-E, Up-G, hybrid).

    python stages.py --stage amateur                     # eva_demo, 150 steps of 32: ~100 s on 2 CPU cores
    python stages.py --stage mim --teacher runs/amateur/last.pt
    python stages.py --stage expert --task det --init runs/mim/last.pt      # cls | det | seg
    python stages.py --stage generalist --main cls \
        --experts cls=runs/expert_cls/last.pt,det=runs/expert_det/last.pt,seg=runs/expert_seg/last.pt
    torchrun --nproc_per_node=8 stages.py --stage amateur --arch eva_base_patch16_224 \\
        --img-size 224 --batch-size 4096 --precision bf16 --zero        # a GPU node

One loop serves every stage. A stage is a small setup function in STAGES that returns a
`Stage`: its model (an nn.Module that keeps its backbone at `.backbone` and whose
`forward(batch)` returns `(loss, {name: term})`), its training set (already augmented) and
an optional end-of-run evaluation. The engine does the rest:

- AdamW with decoupled weight decay (none on norms, biases, tokens, position embeddings),
  linear warm-up then cosine decay, gradient clipping, autocast (bf16 / fp16 + GradScaler),
  gradient accumulation;
- torch.distributed from the torchrun environment: DDP by default, `--zero` =
  ZeroRedundancyOptimizer (EVA's ZeRO-1), `--fsdp` = FSDP2 `fully_shard` per block then the
  root; NCCL on CUDA, gloo on CPU; rank 0 logs and saves;
- its own data order: a seeded permutation per epoch, cut into global batches, each rank
  taking every world-th sample of a global batch. So global batch k holds the same samples on
  1 rank or on 8, and `--resume` restarts mid-epoch at exactly the right batch;
- checkpoints (DESIGN §4.3) written atomically every `--ckpt-every` steps and at the end:
  model, optimizer, scheduler, grad scaler, every rank's RNG, data position, metrics.

Up-A (DESIGN §5.5, DeCLIP-style): an image tower (any eva.py / metanet.py preset), a small
transformer over UTF-8 bytes, projections into a joint space. Each sample brings two
augmented views and two caption variants; the loss is 0.4 * image-text InfoNCE over the
2 x 2 view x caption pairs + 0.2 * SimSiam between the views + 0.2 * masked-byte prediction.
Contrastive negatives and the SimSiam heads' BatchNorm statistics come from every rank
(all-gather with gradient), every other term is per sample, so the result does not depend on
how the global batch is split over ranks (for BN-free backbones: MetaNet's BatchNorm normalises
over each rank's share, as DDP always does). At the end the run classifies gvd/attr and
gvd/shape test images by prompts ("a photo of a {class}"), logged as zeroshot_attr /
zeroshot_shape with their chance levels. Colour and fill align first; shape, the hardest cue
of GV-D-mini, needs a conv tower and several hundred steps (README: `--arch metanet_demo
--steps 720`). `--lock-image` (LiT) freezes the image tower, random or from `--init` (any stage's
checkpoint of the same arch), and trains the text side alone: how much of the tower's shape
knowledge the prompts can reach.

MIM (DESIGN §5.2): an EVA student with a mask token regresses the amateur image tower's
patch features (after its image-text projection) at ~40 % block-masked patches; -cos loss over
the nominal masked count (split-invariant); masks and crops come from each sample's own RNG.
A MetaNet student (INTERN's backbone) is masked on 8 px cells at its stem and predicts the
targets on its stride-32 grid, each cell weighted by its masked share (mim.MIMModel).
The teacher is frozen: no optimizer state, no FSDP sharding. load_backbone() turns the student
into a plain 'avg' backbone (final norm -> fc_norm, mask token dropped) for experts and probes.

Up-E (DESIGN §5.6): a backbone (from --init: amateur or mim; none = supervised from scratch)
and one tasks.py head per source (cls: gvd/shape + gvd/attr, two label spaces; det: gvd/det;
seg: gvd/seg). Batches mix the sources at random; see TaskModel for how losses add up. At the
end each source's test metric (top-1 / AP50 / mIoU) goes to metrics as "SOURCE METRIC".

Up-G (DESIGN §5.4): the experts rebuilt from their files, frozen, joined by ktm.Generalist
(main stream = --main); the KTMs and every expert's heads (started from the experts') train
on the sum of all the experts' task losses. The checkpoint rebuilds from itself alone, and
load_backbone() returns the Generalist (a backbone by the same contract) for probe.py.

Hybrid (seed 003, a peer of the staged recipe): one backbone, three losses summed with equal
weights: multi-label BCE on gvd/shape's multi-hot `labels`, pixel MIM (L1 to per-patch
normalised pixels of block-masked patches; EVA masks with its mask token, MetaNet with a
learned embedding at the stem) and image-image InfoNCE between two views, negatives from
every rank. See the hybrid section for the choices the seed paper leaves open.

--reuse: an OUT/last.pt that is a complete run of the same options is kept (exit 0); one of
other options is an error naming them. Derived facts (teacher_arch, num_classes, the experts'
configs) are written into the config.

Outputs in --out: last.pt (the checkpoint), log.jsonl (one JSON line per logged step, then
one for the evaluation), summary.json (what bench.py / the pipeline read).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import kernels
import ktm
import mim
import tasks

STAGE_NAMES = ("amateur", "mim", "expert", "generalist", "hybrid")
MIN_LR_RATIO = 0.01   # cosine decays to 1 % of the peak lr (EVA: 1e-3 -> 1e-5)


# ----------------------------------------------------------------------------- command line

def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train one stage of the INTERN / EVA pipeline.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", default="amateur", choices=STAGE_NAMES)
    p.add_argument("--task", default=None, choices=["cls", "det", "seg"], help="expert stage only")
    p.add_argument("--arch", default="eva_demo", help="any preset of eva.py or metanet.py")
    p.add_argument("--data", default=None,
                   help="comma-separated data specs (data.py); default: the stage's own")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="global batch, split over ranks")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate; default: the stage's (STAGE_DEFAULTS). ViTs trained "
                        "from scratch on a contrastive loss collapse above ~5e-4 at batch 32 (every "
                        "embedding the same, the loss stuck at ln(batch)); metanet_demo takes 1e-3")
    p.add_argument("--wd", type=float, default=0.05, help="decoupled weight decay (AdamW)")
    p.add_argument("--warmup", type=int, default=15, help="linear warm-up steps")
    p.add_argument("--clip-grad", type=float, default=None,
                   help="max grad norm (0 = off); default: the stage's (STAGE_DEFAULTS)")
    p.add_argument("--drop-path", type=float, default=0.0, help="backbone stochastic depth")
    p.add_argument("--out", default=None, help="run folder (default runs/<stage>)")
    p.add_argument("--init", default=None, help="checkpoint whose backbone initialises ours")
    p.add_argument("--teacher", default=None, help="mim: the amateur checkpoint whose image tower "
                   "gives the regression targets")
    p.add_argument("--lock-image", action="store_true",
                   help="amateur: freeze the image tower (random, or from --init) in eval mode and train "
                        "only the text tower and the heads (LiT, locked-image tuning): what the text "
                        "side makes of a given tower")
    p.add_argument("--mask-ratio", type=float, default=0.4, help="mim / hybrid: share of patches masked")
    p.add_argument("--experts", default=None, metavar="TASK=CKPT,...",
                   help="generalist: the expert checkpoints, e.g. cls=runs/expert_cls/last.pt,det=...")
    p.add_argument("--main", default="cls", help="generalist: the expert whose stream is the output")
    p.add_argument("--train-main", action="store_true", help="generalist: also train the main stream")
    p.add_argument("--ktm-init", default="all", choices=["all", "last"],
                   help="generalist: KTM zero-init (ktm.py); 'all' is the released code's")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    p.add_argument("--reuse", action="store_true",
                   help="if OUT/last.pt is a complete run of this very config, keep it and exit")
    p.add_argument("--ckpt-every", type=int, default=50, help="also save every N steps (0: end only)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--zero", action="store_true", help="ZeroRedundancyOptimizer (ZeRO-1)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2: fully_shard each block, then the root")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dist-timeout", type=float, default=600,
                   help="seconds a rank waits for the others in one collective before it gives up "
                        "(a rank that died or hangs); raise it if saving a checkpoint takes longer")
    p.add_argument("--no-eval", action="store_true", help="skip the end-of-run evaluation")
    return p


# --lr / --clip-grad when not given, for the demo (batch 32, 150 steps, CPU). mim: EVA's clip 3.0;
# EVA's lr 1e-3 is at batch 4096, but a 150-step demo needs far more (3e-4 .. 3e-3 end alike)
STAGE_DEFAULTS = {
    "amateur": dict(lr=1e-3, clip_grad=1.0),
    "mim": dict(lr=1e-3, clip_grad=3.0),
    "expert": dict(lr=5e-4, clip_grad=1.0),
    "generalist": dict(lr=1e-3, clip_grad=1.0),
    "hybrid": dict(lr=2e-4, clip_grad=1.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    args = get_parser().parse_args(argv)
    for key, value in STAGE_DEFAULTS[args.stage].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("runs", args.stage if args.stage != "expert" or not args.task
                                else f"expert_{args.task}")
    if args.stage == "generalist":
        # the generalist's geometry is its main expert's: --arch / --img-size follow the files
        experts = parse_experts(args.experts, args.main)
        cfgs = {n: load_checkpoint(p, expect_stage="expert")["config"] for n, p in experts.items()}
        sizes = {n: c["img_size"] for n, c in cfgs.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"--experts were trained at different --img-size {sizes}: a generalist "
                             f"runs them on the same image; retrain them at one size")
        args.arch, args.img_size = cfgs[args.main]["arch"], cfgs[args.main]["img_size"]
    if args.steps < 1 or args.batch_size < 1 or args.accum < 1:
        raise ValueError("--steps, --batch-size and --accum must be >= 1")
    if args.lock_image and args.stage != "amateur":
        raise ValueError("--lock-image is for --stage amateur (it freezes the amateur's image tower)")
    if args.zero and args.fsdp:
        raise ValueError("--zero and --fsdp are alternatives (FSDP already shards the optimizer "
                         "state): pick one")
    return args


# ----------------------------------------------------------------------------- backbones

def _backbone_files():
    import eva
    import metanet
    return eva, metanet


def valid_archs() -> list:
    return sorted(a for m in _backbone_files() for a in m.PRESETS)


def build_backbone(arch: str, **overrides) -> nn.Module:
    """Any preset of eva.py or metanet.py, by name; overrides go to that file's build()."""
    for module in _backbone_files():
        if arch in module.PRESETS:
            return module.build(arch, **overrides)
    raise ValueError(f"unknown --arch {arch!r}; valid archs: {', '.join(valid_archs())}")


# ----------------------------------------------------------------------------- checkpoints

class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable, truncated, foreign or of another stage."""


def save_checkpoint(path: str, obj: dict):
    """Atomic write: a temp file in the same folder, fsync, then os.replace. A crash at any
    moment leaves either the old checkpoint or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):   # make the rename itself durable (POSIX)
        dfd = os.open(folder, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)


def load_checkpoint(path: str, expect_stage=None) -> dict:
    """Read a stage checkpoint with weights_only=True (no arbitrary unpickling).
    expect_stage: a stage name or a tuple of them; anything else raises CheckpointError."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist: check the path, or run the "
                              f"stage that writes it first")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes): the run that wrote it was "
                              f"killed; re-run that stage")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code objects, ...
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}); the file is corrupt, truncated or "
                              f"not a torch checkpoint: re-run the stage that writes it") from e
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path!r} is not a stages.py checkpoint (it needs 'model' and "
                              f"'config', it has {keys}); plain backbone weights go through "
                              f"eva.load_pretrained instead")
    if expect_stage is not None:
        wanted = (expect_stage,) if isinstance(expect_stage, str) else tuple(expect_stage)
        stage = ckpt["config"].get("stage")
        if stage not in wanted:
            raise CheckpointError(f"{path!r} is a {stage!r} checkpoint, but a "
                                  f"{' or '.join(map(repr, wanted))} checkpoint was expected")
    return ckpt


def backbone_state(model_state: dict) -> dict:
    """The `backbone.*` entries of a stage model's state dict, prefix removed."""
    return {k[len("backbone."):]: v for k, v in model_state.items() if k.startswith("backbone.")}


def fit_backbone_state(state: dict, backbone: nn.Module) -> dict:
    """A stage's backbone weights (prefix removed) -> the names of a plain `backbone`, by
    eva.load_pretrained's rules: a MIM student's `mask_token` is dropped and its final `norm`
    (cls-token pooling, applied to every token) becomes the `fc_norm` of an 'avg' backbone."""
    own = backbone.state_dict()
    sd = {k: v for k, v in state.items() if k != "mask_token" or k in own}
    if "mask_token" in own and "mask_token" not in sd:
        sd["mask_token"] = own["mask_token"]       # e.g. hybrid --init from a stage without one
    if "norm.weight" in sd and "norm.weight" not in own and "fc_norm.weight" in own:
        for s in ("weight", "bias"):
            sd[f"fc_norm.{s}"] = sd.pop(f"norm.{s}")
    return sd


def load_backbone(path: str):
    """Rebuild the backbone of any stage checkpoint -> (backbone, config). Eval mode, on CPU.
    A generalist checkpoint gives its ktm.Generalist (a backbone by the same contract)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    if cfg["stage"] == "generalist":
        model, cfg = load_stage_model(path)
        return model.backbone.eval(), cfg
    backbone = build_backbone(cfg["arch"], img_size=cfg["img_size"], num_classes=0)
    backbone.load_state_dict(fit_backbone_state(backbone_state(ckpt["model"]), backbone))
    return backbone.eval(), cfg


def load_stage_model(path: str, expect_stage=None):
    """Rebuild a whole stage model (e.g. the amateur as MIM teacher) -> (model, config)."""
    ckpt = load_checkpoint(path, expect_stage)
    cfg = ckpt["config"]
    model = STAGES[cfg["stage"]](argparse.Namespace(**cfg), with_data=False).model
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg


# ----------------------------------------------------------------------------- text tower

# Byte-level text: no vocabulary file, any language. ids 0..255 are the UTF-8 bytes.
PAD, BOS, EOS, MASK = 256, 257, 258, 259
VOCAB = 260
TEXT_CONTEXT = 64


def encode_text(text: str, context: int = TEXT_CONTEXT) -> torch.Tensor:
    """str -> (context,) long: BOS, the UTF-8 bytes (truncated), EOS, then PAD. A fixed length
    keeps every caption's embedding independent of the other captions in its batch."""
    body = list(text.encode("utf-8"))[: context - 2]
    ids = [BOS] + body + [EOS] + [PAD] * (context - 2 - len(body))
    return torch.tensor(ids, dtype=torch.long)


def mask_bytes(ids: torch.Tensor, rng: np.random.Generator, p: float = 0.15):
    """BERT-style corruption of one encoded caption -> (input ids, targets with -100 = ignore).
    At least one byte is masked so every sample carries a text-text loss."""
    real = ((ids < 256).nonzero().flatten()).numpy()
    chosen = real[rng.random(len(real)) < p]
    if len(chosen) == 0 and len(real) > 0:
        chosen = rng.choice(real, size=1)
    chosen = torch.as_tensor(chosen, dtype=torch.long)
    inp, tgt = ids.clone(), torch.full_like(ids, -100)
    tgt[chosen] = ids[chosen]
    inp[chosen] = MASK
    return inp, tgt


def _init_linear(m: nn.Linear):
    nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)   # as eva.py
    if m.bias is not None:
        nn.init.zeros_(m.bias)


NGRAM_BUCKETS = 4093   # hashed byte bigrams and trigrams, each in a table of this many rows


def byte_ngrams(ids: torch.Tensor):
    """(B, L) byte ids -> hashed ids of the bigram and the trigram that end at each position,
    both (B, L), the trigrams offset by NGRAM_BUCKETS so one table holds both."""
    prev1 = F.pad(ids, (1, 0), value=PAD)[:, :-1]                          # (B, L) byte t-1
    prev2 = F.pad(ids, (2, 0), value=PAD)[:, :-2]                          # (B, L) byte t-2
    bi = (prev1 * VOCAB + ids) % NGRAM_BUCKETS
    tri = ((prev2 * VOCAB + prev1) * VOCAB + ids) % NGRAM_BUCKETS + NGRAM_BUCKETS
    return bi, tri


class TextTower(nn.Module):
    """A small bidirectional transformer over byte tokens (EVA's block; no causal mask).

    Each byte enters as its own embedding + hashed embeddings of the bigram and trigram ending
    at it (CANINE / fastText style): a byte alone says almost nothing, so without them the
    mean of a fresh tower's outputs is nearly the same for every caption (English letter
    frequencies) and contrastive training stalls for hundreds of steps. The caption's
    embedding is the mean of its non-PAD outputs (a per-sample op); per-token outputs feed
    masked-byte prediction. PAD tokens take part in attention like any other: they are
    constant, so the model learns to ignore them, and kernels.attention needs no mask.
    """

    def __init__(self, width: int = 128, depth: int = 2, num_heads: int = 4,
                 context: int = TEXT_CONTEXT):
        super().__init__()
        from eva import Block
        self.context = context
        self.token_embed = nn.Embedding(VOCAB, width)
        self.ngram_embed = nn.Embedding(2 * NGRAM_BUCKETS, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, 4 * width, 0.0) for _ in range(depth)])
        self.norm = kernels.LayerNorm(width, eps=1e-6)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.ngram_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                _init_linear(m)
        # Each block's residual branches end at zero, so a fresh tower is a bag of byte n-grams
        # and every word reaches the pooled caption from step 0. Drawn at random, the branches
        # add context noise far larger than the 0.02-scale embeddings, which buried the shape
        # words: the shape prompts came out nearly parallel (cosine ~0.99, README).
        for blk in self.blocks:
            nn.init.zeros_(blk.attn.proj.weight)
            nn.init.zeros_(blk.mlp.fc2.weight)

    def block_list(self) -> list:
        return list(self.blocks)

    def forward(self, ids: torch.Tensor):
        """ids (B, L) -> (pooled (B, C), tokens (B, L, C)), after the final norm."""
        bi, tri = byte_ngrams(ids)
        x = self.token_embed(ids) + self.ngram_embed(bi) + self.ngram_embed(tri)   # (B, L, C)
        x = x + self.pos_embed[:, : ids.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        keep = (ids != PAD).unsqueeze(-1).to(x.dtype)                             # (B, L, 1)
        return (x * keep).sum(1) / keep.sum(1), x


# ----------------------------------------------------------------------------- Up-A model

class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the gradient of its own slice, summed over
    the ranks that used it. With DDP's gradient averaging on top, each rank's parameters get
    exactly the gradient of the mean over ranks of the per-rank losses, i.e. the gradient of
    the global-batch loss (what large-batch CLIP training computes)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)                                        # (world * b, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)                  # every rank's d(loss_r)/d(gathered), summed
        b = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * b:(r + 1) * b]


def gather_all(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on each rank -> (world * b, ...) in rank order, differentiable; identity alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return GatherWithGrad.apply(x)


class GlobalBatchNorm(nn.Module):
    """BatchNorm over the global batch: statistics of every rank's rows (all-gathered with
    gradient), so 2 ranks x 4 samples normalise exactly as 1 rank x 8 (a SyncBatchNorm that also
    runs on gloo). Under --accum they are one micro-batch's, as the InfoNCE negatives are.
    Training statistics only: the SimSiam heads it serves never run at eval."""

    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:             # x (n, C)
        every = gather_all(x)                                         # (world * n, C)
        y = (x - every.mean(0)) / torch.sqrt(every.var(0, unbiased=False) + self.eps)
        return y if self.weight is None else y * self.weight + self.bias


def _mlp(dims: list, last_norm: bool, batch_norm: bool = False) -> nn.Sequential:
    """Linear -> norm -> GELU stacks; last_norm: a norm on the output too (without affine for BN).
    batch_norm: GlobalBatchNorm, as SimSiam needs: with LayerNorm the amateur's SimSiam
    collapsed within ~90 steps (loss -1.0, one output for every image) and taught nothing. The
    hybrid's InfoNCE projector keeps LayerNorm: its negatives already keep outputs apart."""
    def norm(d: int, out: bool):
        if batch_norm:
            return GlobalBatchNorm(d, affine=not out)
        return kernels.LayerNorm(d)

    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b))
        if not last:
            layers += [norm(b, False), nn.GELU()]
        elif last_norm:
            layers.append(norm(b, True))
    return nn.Sequential(*layers)


class Amateur(nn.Module):
    """Up-A: image tower + text tower + joint space, three kinds of supervision.

    batch: view1, view2 (b, 3, H, W) two augmentations of an image; tokens (b, L) its caption;
    tokens2 (b, L) a variant of the caption with ~15 % of its bytes masked, and mlm_targets
    (b, L) the masked bytes (-100 elsewhere). tokens2 serves both the image-text loss (as the
    augmented caption) and the masked-byte loss, so the text tower runs twice, not three times.
    """
    WEIGHTS = {"clip": 0.4, "simsiam": 0.2, "mlm": 0.2}   # DESIGN §5.5 (DeCLIP's weights)

    def __init__(self, backbone: nn.Module, embed_dim: int = 128, text_width: int = 128,
                 text_depth: int = 2, ssl_dim: int = 256, lock_image: bool = False):
        super().__init__()
        self.backbone = backbone
        # LiT: a locked tower has no gradient and stays in eval mode (BN statistics, drop path)
        self.lock_image = lock_image
        if lock_image:
            backbone.requires_grad_(False).eval()
        self.text = TextTower(text_width, text_depth)
        nf = backbone.num_features
        self.img_proj = nn.Linear(nf, embed_dim, bias=False)
        self.txt_proj = nn.Linear(text_width, embed_dim, bias=False)
        # log of CLIP's 1/0.07; shape (1,) rather than a scalar, which FSDP2 cannot shard
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.projector = _mlp([nf, ssl_dim, ssl_dim, ssl_dim], last_norm=True, batch_norm=True)
        self.predictor = _mlp([ssl_dim, ssl_dim // 4, ssl_dim], last_norm=False, batch_norm=True)
        self.mlm_head = nn.Linear(text_width, VOCAB)
        for m in [self.img_proj, self.txt_proj, self.mlm_head, *self.projector, *self.predictor]:
            if isinstance(m, nn.Linear):
                _init_linear(m)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lock_image:
            self.backbone.eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> unit vectors (B, D) in the joint space."""
        return F.normalize(self.img_proj(self.backbone(images)).float(), dim=-1)

    def encode_text(self, texts: list) -> torch.Tensor:
        """list of B str -> unit vectors (B, D) in the joint space."""
        ids = torch.stack([encode_text(t, self.text.context) for t in texts])
        ids = ids.to(self.logit_scale.device)
        return F.normalize(self.txt_proj(self.text(ids)[0]).float(), dim=-1)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D, h, w): per-location features in the joint space (the image-text
        aligned targets an EVA student regresses in the mim stage)."""
        fmap = self.backbone.forward_patches(images)                      # (B, C, h, w)
        return torch.einsum("bchw,dc->bdhw", fmap, self.img_proj.weight)

    def forward(self, batch: dict):
        b = batch["view1"].shape[0]
        feats = self.backbone(torch.cat([batch["view1"], batch["view2"]]))       # (2b, F)
        ids = torch.cat([batch["tokens"], batch["tokens2"]])                     # (2b, L)
        txt_pooled, txt_tokens = self.text(ids)                                  # (2b, C), (2b, L, C)
        # the heads and losses are small: run them in fp32 whatever the towers' autocast
        with torch.autocast(feats.device.type, enabled=False):
            feats, txt_pooled, txt_tokens = feats.float(), txt_pooled.float(), txt_tokens.float()
            return self._losses(b, batch, feats, txt_pooled, txt_tokens)

    def _losses(self, b, batch, feats, txt_pooled, txt_tokens):
        # image-text InfoNCE over view x caption, negatives from every rank
        img = F.normalize(self.img_proj(feats), dim=-1)                          # (2b, D)
        txt = F.normalize(self.txt_proj(txt_pooled), dim=-1)                     # (2b, D)
        local = torch.stack([*img.chunk(2), *txt.chunk(2)], dim=1)               # (b, 4, D)
        every = gather_all(local)                                                # (G, 4, D)
        rank = dist.get_rank() if dist.is_initialized() else 0
        labels = torch.arange(b, device=img.device) + rank * b   # my samples' rows in `every`
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()[0]
        clip = 0.0
        for v in (0, 1):
            for c in (2, 3):
                i2t = scale * local[:, v] @ every[:, c].T                        # (b, G)
                t2i = scale * local[:, c] @ every[:, v].T                        # (b, G)
                clip = clip + (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 8

        # image-image: SimSiam, symmetric negative cosine with stop-gradient on the target
        z = self.projector(feats)                                                # (2b, S)
        p = self.predictor(z)
        z1, z2 = z.chunk(2)
        p1, p2 = p.chunk(2)
        simsiam = -(F.cosine_similarity(p1, z2.detach()).mean()
                    + F.cosine_similarity(p2, z1.detach()).mean()) / 2

        # text-text: masked-byte prediction, averaged per caption, then over captions
        logits = self.mlm_head(txt_tokens[b:])                                   # (b, L, V)
        tgt = batch["mlm_targets"]
        ce = F.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none")
        n = (tgt != -100).sum(1).clamp(min=1)
        mlm = (ce.sum(1) / n).mean()

        terms = {"clip": clip, "simsiam": simsiam, "mlm": mlm}
        loss = sum(self.WEIGHTS[k] * v for k, v in terms.items())
        terms["logit_scale"] = scale.detach()
        return loss, terms


# ----------------------------------------------------------------------------- stage recipes

@dataclass
class Stage:
    model: nn.Module                   # .backbone; forward(batch) -> (loss, {name: term})
    train_set: object = None           # map-style dataset of augmented samples (has set_epoch)
    evaluate: Callable = None          # evaluate(plain_model, args, device) -> {metric: value}
    images_per_sample: int = 1         # images the tower sees per sample (for images/s)


def caption_of(sample: dict, classes) -> str:
    """A caption for any sample: its own, or one made from its class name."""
    if "caption" in sample:
        return sample["caption"]
    return f"a photo of a {classes[int(sample['label'])]}"


class _AmateurAugment:
    """Per-sample augmentation (a class, so DataLoader workers can pickle it)."""

    def __init__(self, classes):
        self.classes = classes

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        import data
        img = sample["image"]
        caption = caption_of(sample, self.classes)
        # the second caption is a word-level variant with some bytes masked: it is the
        # augmented caption of the image-text loss and, at once, the masked-byte task's input
        tokens2, mlm_targets = mask_bytes(encode_text(data.caption_variant(caption, rng)), rng)
        return {"view1": data.random_resized_crop_flip(img, rng, scale=(0.35, 1.0)),
                "view2": data.random_resized_crop_flip(img, rng, scale=(0.35, 1.0)),
                "tokens": encode_text(caption), "tokens2": tokens2, "mlm_targets": mlm_targets}


def _sources(specs: list, split: str, img_size: int, tasks: tuple):
    """The named sources (data.py's default seed: --seed varies the training, not the data)."""
    import data
    parts = []
    for spec in specs:
        ds = data.build_dataset(spec, split, img_size=img_size)
        if ds.task not in tasks:
            raise ValueError(f"--data {spec} is a {ds.task!r} source; this stage takes "
                             f"{' / '.join(tasks)} sources (e.g. gvd/caption, gvd/shape)")
        parts.append(ds)
    return parts


def setup_amateur(args, with_data: bool = True) -> Stage:
    if getattr(args, "teacher", None):
        raise ValueError("--teacher is for --stage mim; the amateur stage has no teacher")
    # same initial weights on every rank and every run; the global RNG is left untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        backbone = build_backbone(args.arch, img_size=args.img_size, num_classes=0,
                                  drop_path_rate=args.drop_path)
        model = Amateur(backbone, lock_image=getattr(args, "lock_image", False))
    if not with_data:
        return Stage(model)
    import data
    specs = (args.data or "gvd/caption").split(",")
    parts = _sources(specs, "train", args.img_size, ("caption", "cls"))
    augmented = [data.Augmented(ds, _AmateurAugment(getattr(ds, "classes", None)), args.seed)
                 for ds in parts]
    train_set = augmented[0] if len(augmented) == 1 else _ConcatEpochs(augmented)
    return Stage(model, train_set, evaluate_amateur, images_per_sample=2)


class _ConcatEpochs(torch.utils.data.ConcatDataset):
    """ConcatDataset that forwards set_epoch to its parts."""

    def set_epoch(self, epoch: int):
        for d in self.datasets:
            d.set_epoch(epoch)


@torch.no_grad()
def zero_shot(model: Amateur, spec: str = "gvd/shape", split: str = "test", img_size: int = 64,
              device="cpu", template: str = "a photo of a {}", batch_size: int = 256) -> dict:
    """Classify a labelled source by caption prompts, one per class: the evidence that
    image-text alignment emerged. -> {"acc", "mean_class_acc", "chance"}."""
    import data
    ds = data.build_dataset(spec, split, img_size=img_size)
    was_training = model.training
    model.eval()
    text = model.encode_text([template.format(c) for c in ds.classes])              # (K, D)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=data.collate)
    preds, labels = [], []
    for batch in loader:
        img = model.encode_image(batch["image"].to(device))                        # (B, D)
        preds.append((img @ text.T).argmax(1).cpu())
        labels.append(torch.as_tensor(batch["label"]).cpu())
    model.train(was_training)
    preds, labels = torch.cat(preds), torch.cat(labels)
    per_class = [(preds[labels == k] == k).float().mean().item()
                 for k in range(len(ds.classes)) if (labels == k).any()]
    return {"acc": (preds == labels).float().mean().item(), "mean_class_acc": float(np.mean(per_class)),
            "chance": 1.0 / len(ds.classes)}


# (source, prompt template): the shape of the front object (10 classes; what the issue asks
# for, and slow to emerge at demo scale: shape is the hardest cue in GV-D-mini) and its fill +
# colour (24 classes; aligned within a few hundred CPU steps).
ZERO_SHOT = {"shape": ("gvd/shape", "a photo of a {}"), "attr": ("gvd/attr", "a photo of a {} shape")}


def evaluate_amateur(model: Amateur, args, device) -> dict:
    out = {}
    for name, (spec, template) in ZERO_SHOT.items():
        r = zero_shot(model, spec, "test", args.img_size, device, template)
        out[f"zeroshot_{name}"], out[f"zeroshot_{name}_chance"] = r["acc"], r["chance"]
    return out


# ----------------------------------------------------------------------------- MIM (EVA)

class MIMStage(mim.MIMModel):
    """The mim stage's model (mim.MIMModel: `backbone.*`, `lm_head.*`, frozen `teacher.*`)
    with the engine's forward(batch) -> (loss, terms)."""

    def __init__(self, backbone, target_dim: int, teacher: mim.Teacher, num_masked: int):
        super().__init__(backbone, target_dim, teacher)
        self.num_masked = num_masked

    def forward(self, batch: dict):
        images, mask = batch["image"], batch["mask"]                  # (b, 3, H, W), (b, N)
        # the nominal count, not mask.sum(): every masked patch then weighs the same however
        # the global batch is split over ranks and micro-batches (mim.mim_loss). A MetaNet target
        # cell covers (target_patch / mask_patch)^2 mask cells: the weights sum to num_masked / that.
        per_cell = (self.target_patch // self.mask_patch) ** 2
        return self.forward_loss(images, mask, denom=images.shape[0] * self.num_masked / per_cell)


def mask_geometry(backbone: nn.Module, args, stage: str):
    """-> (grid (h, w), num_masked) of a mim / hybrid stage's block masks at --img-size:
    a ViT is masked on its patches, a MetaNet on METANET_MASK_PATCH cells (mim.mask_grid)."""
    patch = mim.mask_grid(backbone)[0]
    if args.img_size % patch:
        raise ValueError(f"--img-size {args.img_size} is not a multiple of the mask patch {patch}")
    grid = (args.img_size // patch,) * 2
    num_masked = mim.num_masked_for(*grid, args.mask_ratio)
    if num_masked < 1:
        raise ValueError(f"--mask-ratio {args.mask_ratio} masks no patch of the {grid[0]}x{grid[1]} "
                         f"grid, so the {stage} stage's MIM has nothing to predict: use e.g. 0.4 (EVA's ratio)")
    return grid, num_masked


class _MaskAugment:
    """MIM sample: crop + flip (the teacher sees these same pixels) and a block mask, both from
    Augmented's per-sample rng: masks depend on (seed, epoch, index) only, not on the rank."""

    def __init__(self, grid: tuple, num_masked: int):
        self.grid, self.num_masked = grid, num_masked

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        import data
        image = data.random_resized_crop_flip(sample["image"], rng, scale=(0.4, 1.0))
        mask = mim.block_mask(*self.grid, self.num_masked, rng)                 # (h, w) bool
        return {"image": image, "mask": torch.from_numpy(mask.reshape(-1))}      # mask (N,)


def setup_mim(args, with_data: bool = True) -> Stage:
    import eva
    if getattr(args, "teacher_arch", None) and not with_data:
        # rebuilding a saved run: the teacher's weights come with the checkpoint
        tower = build_backbone(args.teacher_arch, img_size=args.img_size, num_classes=0)
        proj = nn.Linear(tower.num_features, args.teacher_dim, bias=False)
    else:
        if not args.teacher:
            raise ValueError("--stage mim needs --teacher AMATEUR.pt (the image-text aligned tower "
                             "whose patch features the student regresses): run --stage amateur first")
        amateur, tcfg = load_stage_model(args.teacher, expect_stage="amateur")
        if tcfg["img_size"] != args.img_size:
            raise ValueError(f"--teacher {args.teacher} was trained at --img-size {tcfg['img_size']}, "
                             f"this run says {args.img_size}: use the same size")
        tower, proj = amateur.backbone, amateur.img_proj
        args.teacher_arch, args.teacher_dim = tcfg["arch"], proj.out_features   # -> the config
    with torch.random.fork_rng(devices=[]):              # student and lm_head: same on every rank
        torch.manual_seed(args.seed)
        vit = args.arch in eva.PRESETS
        # as mim.build_student: EVA's official MIM model pools (and so norms) through the cls token
        student = build_backbone(args.arch, img_size=args.img_size, num_classes=0, use_mask_token=True,
                                 drop_path_rate=args.drop_path, **(dict(global_pool="token") if vit else {}))
        teacher = mim.Teacher(tower, proj, patch_size=mim.mask_grid(student)[1])
        grid, num_masked = mask_geometry(student, args, "mim")
        model = MIMStage(student, teacher.out_dim, teacher, num_masked)
    if not with_data:
        return Stage(model)
    import data
    parts = _sources((args.data or "gvd/caption").split(","), "train", args.img_size, ("caption", "cls"))
    augmented = [data.Augmented(ds, _MaskAugment(grid, num_masked), args.seed) for ds in parts]
    train_set = augmented[0] if len(augmented) == 1 else _ConcatEpochs(augmented)
    return Stage(model, train_set, evaluate_mim)


@torch.no_grad()
def evaluate_mim(model: MIMStage, args, device, n: int = 256) -> dict:
    """-cos at the masked patches of the first source's first n test images (fixed masks), and
    test_loss_mean_target: the same for a student that always predicts the mean teacher feature
    (the trivial solution a short run must beat)."""
    import data
    ds = data.build_dataset((args.data or "gvd/caption").split(",")[0], "test", img_size=args.img_size)
    images = data.normalize(torch.stack([ds[i]["image"] for i in range(min(n, len(ds)))])).to(device)
    grid = args.img_size // model.mask_patch
    masks = mim.masks_for_indices(grid, model.num_masked, args.seed, 0, range(len(images))).to(device)
    was = model.training
    model.eval()
    loss, terms = model.forward_loss(images, masks)
    model.train(was)
    target = model.teacher(images)                                           # (n, N_t, D_t)
    trivial = mim.mim_loss(target.mean((0, 1)).expand_as(target), target, model.target_weights(masks))
    return {"test_loss": loss.item(), "test_loss_mean_target": trivial.item(),
            "test_cos_visible": terms["cos_visible"].item()}


# ----------------------------------------------------------------------------- experts (Up-E)

EXPERT_SOURCES = {"cls": "gvd/shape,gvd/attr", "det": "gvd/det", "seg": "gvd/seg"}
TASK_KEYS = {"cls": ("label",), "det": ("boxes", "box_labels"), "seg": ("seg",)}


def head_key(spec: str) -> str:
    return spec.replace(".", "_")          # module names cannot hold '.' (real-data paths do)


class TaskModel(nn.Module):
    """A backbone + one task head per source: an expert, or with a ktm.Generalist backbone Up-G.

    batch: image (b, 3, H, W), source (b,) index into `sources`, and the targets of each source.
    The backbone runs once on the whole batch; each source's rows go through its own head. Source
    s adds S * n_s / b * loss_s (S sources, n_s of the b rows): the plain sum of the per-source
    losses when the sources are balanced, and for per-sample losses (classification) the same
    gradient however the global batch is cut into ranks and micro-batches. A source absent from a
    micro-batch still touches its head (x 0), so DDP sees every trainable parameter used.
    """

    def __init__(self, backbone: nn.Module, heads: tasks.MultiHead, sources: list):
        super().__init__()
        self.backbone, self.heads, self.sources = backbone, heads, list(sources)

    def forward(self, batch: dict):
        levels, pooled = self.backbone.forward_levels(batch["image"])  # 4 x (b, C, h, w), (b, F)
        b, S = batch["image"].shape[0], len(self.sources)
        loss, terms = 0.0, {}
        for s, spec in enumerate(self.sources):
            rows = (batch["source"] == s).nonzero().flatten()
            head = self.heads[head_key(spec)]
            out = head([f[rows] for f in levels], pooled[rows])
            if len(rows):
                sub = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
                term = head.loss(out, sub)[0]
            else:
                parts = out.values() if isinstance(out, dict) else [out]
                term = sum(o.sum() for o in parts) * 0.0
            loss = loss + term * (S * len(rows) / b)
            terms[f"loss_{spec}"] = term.detach()
        return loss, terms


def _placeholder(key: str, H: int, W: int) -> torch.Tensor:
    """An empty target for a key this sample's task lacks (its source's head never reads it)."""
    return {"label": lambda: torch.tensor(-1), "seg": lambda: torch.full((H, W), 255),
            "boxes": lambda: torch.zeros(0, 4), "box_labels": lambda: torch.zeros(0, dtype=torch.long),
            }[key]()


class _TaskAugment:
    """Keep the image and the task's targets, tag the source, give the other tasks of the run
    placeholders (so samples of different tasks collate into one batch). cls: flip only (a crop
    can cut the labelled object out); det / seg: crop + flip, boxes and masks follow the pixels."""

    def __init__(self, task: str, source: int, run_tasks: tuple):
        self.task, self.source, self.run_tasks = task, source, run_tasks

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        import data
        keep = {k: sample[k] for k in ("image",) + TASK_KEYS[self.task]}
        crop = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0)) if self.task == "cls" else dict(scale=(0.5, 1.0))
        out = data.crop_flip_sample(keep, rng, **crop)
        H, W = out["image"].shape[-2:]
        for key in (k for t in self.run_tasks for k in TASK_KEYS[t] if k not in out):
            out[key] = _placeholder(key, H, W)
        out["source"] = torch.tensor(self.source)
        return out


def _task_train_set(specs: list, task_of: list, args):
    """Every source's training set, augmented and tagged with its index; batches mix sources
    (and, for the generalist, tasks) in proportion to their sizes."""
    import data
    parts = []
    for i, (spec, task) in enumerate(zip(specs, task_of)):
        ds = _sources([spec], "train", args.img_size, (task,))[0]
        parts.append(data.Augmented(ds, _TaskAugment(task, i, tuple(dict.fromkeys(task_of))), args.seed))
    return parts[0] if len(parts) == 1 else _ConcatEpochs(parts)


def setup_expert(args, with_data: bool = True) -> Stage:
    if args.task is None:
        raise ValueError("--stage expert needs --task, one of cls / det / seg")
    specs = (args.data or EXPERT_SOURCES[args.task]).split(",")
    if with_data or not getattr(args, "num_classes", None):
        parts = _sources(specs, "train", args.img_size, (args.task,))
        args.num_classes = {spec: ds.num_classes for spec, ds in zip(specs, parts)}   # -> config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        backbone = build_backbone(args.arch, img_size=args.img_size, num_classes=0,
                                  drop_path_rate=args.drop_path)
        heads = tasks.MultiHead({head_key(s): tasks.head_for(args.task, backbone, args.num_classes[s])
                                 for s in specs})
    model = TaskModel(backbone, heads, specs)
    if not with_data:
        return Stage(model)
    return Stage(model, _task_train_set(specs, [args.task] * len(specs), args), evaluate_tasks)


@torch.no_grad()
def evaluate_tasks(model: TaskModel, args, device, batch_size: int = 100) -> dict:
    """Each source's task metric on its whole test split -> {"SOURCE METRIC": value}."""
    import data
    was = model.training
    model.eval()
    out = {}
    for spec in model.sources:
        head = model.heads[head_key(spec)]
        ds = data.build_dataset(spec, "test", img_size=args.img_size)
        outputs, batches_ = [], []
        for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=data.collate):
            levels, pooled = model.backbone.forward_levels(batch["image"].to(device))
            outputs.append(head(levels, pooled))
            batches_.append(to_device(batch, device))
        out.update({f"{spec} {k}": v for k, v in tasks.evaluate(head.task, head, outputs, batches_).items()})
    model.train(was)
    return out


# ----------------------------------------------------------------------------- generalist (Up-G)

def parse_experts(spec: str, main: str) -> dict:
    """'cls=a.pt,det=b.pt' -> {"cls": "a.pt", "det": "b.pt"} (in this order)."""
    if not spec:
        raise ValueError("--stage generalist needs --experts TASK=CKPT,... (e.g. cls=runs/expert_cls/"
                         "last.pt,det=runs/expert_det/last.pt)")
    experts = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in experts or "." in name:
            raise ValueError(f"--experts item {item!r}: write NAME=CKPT, names unique and without '.'")
        experts[name] = path
    if main not in experts:
        raise ValueError(f"--main {main!r} is not one of the --experts {list(experts)}")
    return experts


def setup_generalist(args, with_data: bool = True) -> Stage:
    experts = parse_experts(args.experts, args.main)
    if getattr(args, "expert_configs", None) and not with_data:
        # rebuilding a saved run: the experts' structures from their configs, weights from ours
        models = {n: setup_expert(argparse.Namespace(**cfg), with_data=False).model
                  for n, cfg in args.expert_configs.items()}
    else:
        loaded = {n: load_stage_model(p, expect_stage="expert") for n, p in experts.items()}
        models = {n: m for n, (m, _) in loaded.items()}
        args.expert_configs = {n: c for n, (_, c) in loaded.items()}             # -> the config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        gen = ktm.Generalist(models[args.main].backbone,
                             aux={n: m.backbone for n, m in models.items() if n != args.main},
                             train_main=args.train_main, main_name=args.main, zero_init=args.ktm_init)
    # every expert's heads, initialised from that expert, now read the generalist's output
    heads, specs, task_of = tasks.MultiHead(), [], []
    for m in models.values():
        for spec in m.sources:
            if spec in specs:
                raise ValueError(f"two --experts train on {spec}: give each source to one expert")
            heads[head_key(spec)] = m.heads[head_key(spec)]
            specs.append(spec)
            task_of.append(m.heads[head_key(spec)].task)
    heads.requires_grad_(True)
    args.generalist = gen.config()
    model = TaskModel(gen, heads, specs)
    if not with_data:
        return Stage(model)
    return Stage(model, _task_train_set(specs, task_of, args), evaluate_tasks)


# ----------------------------------------------------------------------------- hybrid (seed 003)

# Seed 003 (arXiv 2310.07510) pre-trains one backbone on multi-label classification, masked image
# modelling and contrastive learning together, "in a multi-task manner". The text of it that we
# hold (papers/003_*.txt, the abstract) names the three tasks but gives no weights, so the total
# is their plain sum. At demo scale the terms start at comparable sizes (BCE ~0.7, L1 on
# normalised pixels ~0.8, InfoNCE ~2 at batch 32), so none drowns the others.
HYBRID_WEIGHTS = {"multilabel": 1.0, "mim": 1.0, "nce": 1.0}
# InfoNCE temperature, fixed (MoCo v3's value for ViTs). A learned scale, as in the amateur's
# image-text loss, can run away on an image-image loss whose two views are easy to match.
HYBRID_TEMPERATURE = 0.2


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): patches row-major, each flattened (row, column, channel), as
    MAE's patchify."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)            # (B, C, h, p, w, q)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def pixel_mim_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int,
                   denom=None) -> torch.Tensor:
    """Pixel MIM without a teacher: L1 between the predicted pixels and the *per-patch normalised*
    pixels of the image (MAE's norm_pix: each patch minus the mean of its p*p*3 values, divided by
    sqrt(their unbiased variance + 1e-6)), averaged over each patch's values, then over the masked
    patches only. Computed in fp32.

    pred, images (B, 3, H, W) (the model's input, before masking); mask bool (B, N) over the
    (H/patch) x (W/patch) grid, row-major, True = masked. denom: as mim.mim_loss -- divide the sum
    by this (the nominal count B * num_masked: split-invariant) instead of the masked count."""
    if pred.shape != images.shape or pred.ndim != 4:
        raise ValueError(f"pred and images must both be (B, 3, H, W), got {tuple(pred.shape)} and "
                         f"{tuple(images.shape)}")
    B, _, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"patch {patch} does not tile {H}x{W} images")
    N = (H // patch) * (W // patch)
    if mask.shape != (B, N) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (B, N) = ({B}, {N}), got {mask.dtype} {tuple(mask.shape)}")
    target = patchify(images.float(), patch)                                  # (B, N, p*p*3)
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    err = (patchify(pred.float(), patch) - target).abs().mean(-1)[mask]      # (M,) masked only
    if denom is None:
        if err.numel() == 0:
            raise ValueError("pixel_mim_loss got a mask with no masked patch: raise --mask-ratio")
        return err.mean()
    return err.sum() / denom


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = HYBRID_TEMPERATURE,
             every_rank: bool = True) -> torch.Tensor:
    """Symmetric image-image InfoNCE. z1, z2 (b, D): L2-normalised embeddings of the two views of
    this rank's b images. View 1 of image i must pick view 2 of image i among the view-2 embeddings
    of the whole global batch (every rank's, gathered with gradient), and vice versa; the loss is
    the mean of both directions. every_rank=False: this rank's embeddings only (evaluation on one
    rank, where a collective would wait for ranks that are not there)."""
    b = z1.shape[0]
    local = torch.stack([z1, z2], dim=1)                                      # (b, 2, D)
    every = gather_all(local) if every_rank else local                        # (G, 2, D)
    rank = dist.get_rank() if every_rank and dist.is_initialized() else 0
    labels = torch.arange(b, device=z1.device) + rank * b      # my images' rows in `every`
    l12 = z1 @ every[:, 1].T / temperature                                    # (b, G)
    l21 = z2 @ every[:, 0].T / temperature                                    # (b, G)
    return (F.cross_entropy(l12, labels) + F.cross_entropy(l21, labels)) / 2


class Hybrid(nn.Module):
    """Seed 003's multi-task pre-training: one backbone, three losses, summed (HYBRID_WEIGHTS).

    batch: view1 (b, 3, H, W) a random crop of the image, hidden at the patches of mask (b, N)
    (block-wise, over the (H/p) x (W/p) grid, p = self.patch); view2 (b, 3, H, W) the whole image,
    maybe mirrored; labels (b, K) the multi-hot of the classes present.

        view1 + mask -> backbone -> pixel decoder -> L1 to normalised pixels, masked patches only
                           '-> pooled -> projector --.
        view2 ---------> backbone -> pooled -> projector --'-> InfoNCE (negatives: every rank)
                                      '-> multi-label head -> BCE against labels

    Two backbone passes per image, not three: the contrastive pair is (masked crop, whole image),
    so the masked pass serves MIM and contrast at once. The labels go with the whole image, where
    every labelled object is visible (a crop may cut one out).

    How the mask enters: EVA swaps masked patch embeddings for its `mask_token` (forward_tokens);
    MetaNet zeroes the masked pixels and swaps the stem outputs inside masked cells for its learned
    `mask_token` before the first stage (metanet.MetaNet._stem) -- the conv analogue of the token
    swap, hiding the pixels from every later layer (SimMIM masks Swin at its patch embedding alike).

    Pixel decoder (SimMIM's: one linear layer, no transformer decoder): a Linear from a feature map
    at stride s to s*s*3 values per location, unfolded to a (3, H, W) image. EVA: the normed patch
    tokens (fc_norm per token, as mim.MIMModel), s = the patch size. MetaNet: the last level
    (stride 32, the end of the network but for the 1x1 head) after a LayerNorm, s = 32, as SimMIM
    decodes Swin's stride-32 output; an early stride-8 level would leave the deep stages out of MIM.

    No batch statistics in the heads (LayerNorm, not BN), BCE a per-sample mean, the pixel loss over
    the nominal masked count and InfoNCE over the gathered global batch: the total and its gradient
    do not depend on how the global batch is split over ranks (for BN-free backbones: MetaNet's BN
    normalises over each rank's share, as DDP always does). Micro-batches (--accum) see only their
    own negatives, as in the amateur stage.
    """

    def __init__(self, backbone: nn.Module, num_labels: int, num_masked: int,
                 proj_hidden: int = 256, proj_dim: int = 128):
        super().__init__()
        if getattr(backbone, "mask_token", None) is None:
            raise ValueError("the hybrid backbone needs a mask token: build it with use_mask_token=True")
        self.backbone, self.num_masked = backbone, num_masked
        self.is_vit = mim.is_vit(backbone)
        # MetaNet has no patches: it is masked (and the pixel loss scored) on mim's 8 px cells
        self.patch = mim.mask_grid(backbone)[0]
        if self.is_vit:
            dec_in, self.dec_stride = backbone.embed_dim, backbone.patch_size
            self.dec_norm = nn.Identity()                   # fc_norm (inside _masked) normalises
        else:
            dec_in, self.dec_stride = backbone.level_channels[-1], backbone.level_strides[-1]
            self.dec_norm = kernels.LayerNorm(dec_in)
        self.decoder = nn.Linear(dec_in, self.dec_stride ** 2 * 3)
        self.head = tasks.MultiLabelHead(backbone.num_features, num_labels)
        self.projector = _mlp([backbone.num_features, proj_hidden, proj_dim], last_norm=False)
        for m in [self.decoder, *self.projector]:
            if isinstance(m, nn.Linear):
                _init_linear(m)

    def _masked(self, images: torch.Tensor, mask: torch.Tensor):
        """images (b, 3, H, W), mask bool (b, N) -> (predicted pixels (b, 3, H, W), pooled (b, F))."""
        b, _, H, W = images.shape
        if self.is_vit:
            tokens = self.backbone.forward_tokens(images, mask)                # (b, 1+N, C)
            pooled = self.backbone.forward_head(tokens, pre_logits=True)       # (b, C)
            fmap = self.backbone.fc_norm(tokens[:, 1:])                        # (b, N, C)
        else:
            grid = mask.view(b, H // self.patch, W // self.patch)               # (b, h, w)
            levels, pooled = self.backbone.forward_levels(images, mask=grid)
            fmap = levels[-1].permute(0, 2, 3, 1)                              # (b, H/32, W/32, C)
        s = self.dec_stride
        h, w = H // s, W // s
        out = self.decoder(self.dec_norm(fmap)).reshape(b, h, w, s, s, 3)       # (b, h, w, s, s, 3)
        pred = out.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, H, W)               # (b, 3, h*s, w*s)
        return pred, pooled

    def forward(self, batch: dict, every_rank: bool = True):
        """-> (weighted sum, {"multilabel", "mim", "nce"}). every_rank: see info_nce."""
        view1, view2, mask = batch["view1"], batch["view2"], batch["mask"]
        pred, pooled1 = self._masked(view1, mask)                   # (b, 3, H, W), (b, F)
        pooled2 = self.backbone(view2)                               # (b, F)
        # the heads and losses are small: run them in fp32 whatever the backbone's autocast
        with torch.autocast(view1.device.type, enabled=False):
            pooled1, pooled2 = pooled1.float(), pooled2.float()
            multilabel = self.head.loss(self.head(None, pooled2), batch)[0]
            mim_term = pixel_mim_loss(pred.float(), view1.float(), mask, self.patch,
                                      denom=view1.shape[0] * self.num_masked)
            z1, z2 = F.normalize(self.projector(torch.cat([pooled1, pooled2])), dim=-1).chunk(2)
            nce = info_nce(z1, z2, HYBRID_TEMPERATURE, every_rank)
        terms = {"multilabel": multilabel, "mim": mim_term, "nce": nce}
        return sum(HYBRID_WEIGHTS[k] * v for k, v in terms.items()), terms


class _HybridAugment:
    """Hybrid sample from Augmented's per-sample rng (so views and masks depend on (seed, epoch,
    index) only, never on the rank): a random crop + flip that will be masked, the whole image
    (maybe mirrored), a block mask (mim.block_mask) and the multi-hot labels."""

    def __init__(self, grid: tuple, num_masked: int):
        self.grid, self.num_masked = grid, num_masked

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        import data
        img = sample["image"]
        view1 = data.random_resized_crop_flip(img, rng, scale=(0.35, 1.0))
        view2 = img.flip(-1) if rng.random() < 0.5 else img
        mask = mim.block_mask(*self.grid, self.num_masked, rng)                 # (h, w) bool
        return {"view1": view1, "view2": view2, "mask": torch.from_numpy(mask.reshape(-1)),
                "labels": sample["labels"]}


def setup_hybrid(args, with_data: bool = True) -> Stage:
    if getattr(args, "teacher", None):
        raise ValueError("--teacher is for --stage mim; the hybrid stage regresses pixels, no teacher")
    specs = (args.data or "gvd/shape").split(",")
    if with_data or not getattr(args, "num_labels", None):
        parts = _sources(specs, "train", args.img_size, ("cls",))
        for spec, ds in zip(specs, parts):
            if "labels" not in ds[0]:
                raise ValueError(f"--data {spec} has no multi-hot 'labels'; the hybrid stage's "
                                 f"multi-label task needs them (gvd/shape has them)")
        widths = {spec: len(ds[0]["labels"]) for spec, ds in zip(specs, parts)}
        if len(set(widths.values())) > 1:
            raise ValueError(f"--data sources have multi-hot labels of different widths {widths}; "
                             f"one multi-label head needs one label space")
        args.num_labels = widths[specs[0]]                                         # -> the config
    with torch.random.fork_rng(devices=[]):              # same initial weights on every rank
        torch.manual_seed(args.seed)
        backbone = build_backbone(args.arch, img_size=args.img_size, num_classes=0,
                                  drop_path_rate=args.drop_path, use_mask_token=True)
        grid, num_masked = mask_geometry(backbone, args, "hybrid")
        model = Hybrid(backbone, args.num_labels, num_masked)
    if not with_data:
        return Stage(model)
    import data
    augmented = [data.Augmented(ds, _HybridAugment(grid, num_masked), args.seed) for ds in parts]
    train_set = augmented[0] if len(augmented) == 1 else _ConcatEpochs(augmented)
    return Stage(model, train_set, evaluate_hybrid, images_per_sample=2)


@torch.no_grad()
def evaluate_hybrid(model: Hybrid, args, device, n: int = 256, batch_size: int = 100) -> dict:
    """On the first source's test split, eval mode:
    test_mAP: the multi-label head's mAP over the whole split (whole images), beside
    test_mAP_chance, the mean share of positives per class (the mAP of random scores);
    test_multilabel / test_mim / test_nce / test_loss: the training losses on the first n images
    (views and masks as in training, InfoNCE among those n), beside test_mim_zero, the pixel loss
    of predicting every patch's mean (what a short run must beat)."""
    import data
    spec = (args.data or "gvd/shape").split(",")[0]
    ds = data.build_dataset(spec, "test", img_size=args.img_size)
    was = model.training
    model.eval()
    scores, targets = [], []
    for batch in torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=data.collate):
        scores.append(model.head(None, model.backbone(batch["image"].to(device))).float().cpu())
        targets.append(batch["labels"].cpu())
    scores, targets = torch.cat(scores), torch.cat(targets)                     # (T, K) each
    out = {"test_mAP": tasks.mean_average_precision(scores, targets),
           "test_mAP_chance": targets.mean(0)[targets.sum(0) > 0].mean().item()}
    grid = (args.img_size // model.patch,) * 2
    aug = data.Augmented(ds, _HybridAugment(grid, model.num_masked), args.seed)
    batch = to_device(data.collate([aug[i] for i in range(min(n, len(ds)))]), device)
    loss, terms = model(batch, every_rank=False)
    model.train(was)
    out.update({f"test_{k}": v.item() for k, v in terms.items()}, test_loss=loss.item())
    view1 = batch["view1"]
    out["test_mim_zero"] = pixel_mim_loss(torch.zeros_like(view1), view1, batch["mask"], model.patch,
                                          denom=len(view1) * model.num_masked).item()
    return out


STAGES = {
    "amateur": setup_amateur,
    "mim": setup_mim,
    "expert": setup_expert,
    "generalist": setup_generalist,
    "hybrid": setup_hybrid,
}


# ----------------------------------------------------------------------------- distributed

def init_distributed(timeout_s: float = 600):
    """From torchrun's environment: (rank, world, device). Starts the process group once.
    timeout_s bounds every collective: a rank whose peer died or hangs raises instead of waiting
    forever (torch's default is 30 min for gloo, and NCCL can wait indefinitely)."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    return rank, world, device


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier():
    if distributed():
        dist.barrier()


# ----------------------------------------------------------------------------- optimisation

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "logit_scale")


def spared_from_decay(p: torch.Tensor, name: str, skip: set = frozenset(), backbone_name: str | None = None) -> bool:
    """No weight decay for norms, biases, tokens, position embeddings and the logit scale
    (decaying them shrinks what should stay free), nor for what the backbone's no_weight_decay()
    lists (`skip`, matched against the parameter's name inside the backbone, if it is in one)."""
    return p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES or backbone_name in skip


def param_groups(model: nn.Module, wd: float) -> list:
    """AdamW groups: decay matrices and conv kernels, spare the rest (spared_from_decay)."""
    skip = set(getattr(model.backbone, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bb_name = name[len("backbone."):] if name.startswith("backbone.") else None
        if spared_from_decay(p, name, skip, bb_name):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine to MIN_LR_RATIO at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


class RankLost(RuntimeError):
    """Another rank died or stopped answering in a collective; this rank leaves instead of hanging."""


def _peer_failure(e: BaseException) -> bool:
    """Is `e` a collective that failed because a peer is gone (closed socket, timeout)? gloo
    raises plain RuntimeErrors for these, so the backend's own words are the only sign."""
    if not distributed() or not isinstance(e, RuntimeError) or isinstance(e, (TrainingDiverged, CheckpointError)):
        return False
    words = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout", "broken pipe")
    return isinstance(e, getattr(dist, "DistError", ())) or any(w in str(e).lower() for w in words)


# ----------------------------------------------------------------------------- the run

class Run:
    """Everything one training run holds: model (wrapped for DDP / FSDP), the plain module,
    optimizer, scheduler, scaler, data order. Built by build_run(); driven by train()."""

    def __init__(self, args, rank, world, device, stage, model, raw, optimizer, scheduler, scaler):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.stage, self.model, self.raw = stage, model, raw
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        n = len(stage.train_set) if stage.train_set is not None else 0
        self.steps_per_epoch = n // args.batch_size

    @property
    def mode(self) -> str:
        if self.args.fsdp or self.args.zero:
            return "fsdp" if self.args.fsdp else "zero"
        return "ddp" if distributed() else "single"

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)


def build_run(args, resume_state: dict | None = None) -> Run:
    """Stage + model (+ weights to resume or init from) + wrapping + optimizer + schedule."""
    rank, world, device = init_distributed(getattr(args, "dist_timeout", 600))
    if (args.zero or args.fsdp) and not distributed():
        raise ValueError("--zero / --fsdp shard over ranks: launch with torchrun "
                         "(e.g. torchrun --nproc_per_node=2 stages.py ...)")
    if args.batch_size % (args.accum * world):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by --accum x ranks "
                         f"= {args.accum} x {world}")
    stage = STAGES[args.stage](args)
    raw = stage.model
    if stage.train_set is not None and len(stage.train_set) < args.batch_size:
        raise ValueError(f"--data has {len(stage.train_set)} training samples, fewer than one "
                         f"global batch of {args.batch_size}: lower --batch-size")
    if resume_state is not None:
        raw.load_state_dict(resume_state["model"])
    elif args.init:
        init_backbone(raw, args)
    if args.grad_ckpt:
        raw.backbone.set_grad_checkpointing(True)
    raw.to(device)

    model = raw
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        # every tower that lists its residual blocks (backbone, text tower, ...): one FSDP unit
        # per block, so only one block's full weights exist at a time; the rest is the root's
        # frozen parameters (the MIM teacher, frozen experts) are neither sharded nor optimised:
        # every rank keeps its full copy, as under DDP
        frozen = {p for p in raw.parameters() if not p.requires_grad}
        towers = [m for m in raw.modules() if callable(getattr(m, "block_list", None))]
        blocks = {id(b): b for t in towers for b in t.block_list()
                  if not any(p in frozen for p in b.parameters())}
        for blk in blocks.values():
            fully_shard(blk, mesh=mesh)
        fully_shard(raw, mesh=mesh, ignored_params=frozen or None)
    elif distributed():
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None)

    groups = param_groups(raw, args.wd)
    adam = dict(lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    if args.zero:
        from torch.distributed.optim import ZeroRedundancyOptimizer
        optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adam)
    else:
        optimizer = torch.optim.AdamW(groups, **adam)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    run = Run(args, rank, world, device, stage, model, raw, optimizer, scheduler, scaler)
    if resume_state is not None:
        load_optimizer_state(run, resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
    return run


def init_backbone(raw: nn.Module, args):
    ckpt = load_checkpoint(args.init)
    if ckpt["config"]["arch"] != args.arch:
        raise ValueError(f"--init {args.init} holds a {ckpt['config']['arch']} backbone but "
                         f"--arch is {args.arch}: use the same --arch")
    try:
        raw.backbone.load_state_dict(fit_backbone_state(backbone_state(ckpt["model"]), raw.backbone))
    except RuntimeError as e:
        raise ValueError(f"--init {args.init}: backbone weights do not fit ({e}); was it trained "
                         f"at another --img-size?") from e


def model_state(run: Run) -> dict:
    """Full, unwrapped state dict on CPU (collective under FSDP; every rank must call it)."""
    if run.args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(run.raw, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
    return {k: v.detach().cpu() for k, v in run.raw.state_dict().items()}


def optimizer_state(run: Run) -> dict:
    """Full optimizer state on rank 0 (collective under ZeRO and FSDP)."""
    if run.args.zero:
        run.optimizer.consolidate_state_dict(to=0)
        return run.optimizer.state_dict() if run.rank == 0 else {}
    if run.args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(run.raw, run.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
    return run.optimizer.state_dict()


def load_optimizer_state(run: Run, state: dict):
    if run.args.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(run.raw, run.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))
    else:
        run.optimizer.load_state_dict(state)


def rng_state(run: Run) -> list:
    """Every rank's RNG states as plain Python lists (rank 0 gets the list of all ranks)."""
    np_state = np.random.get_state()
    mine = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    if torch.cuda.is_available():
        mine["cuda"] = torch.cuda.get_rng_state(run.device).tolist()
    if not distributed():
        return [mine]
    every = [None] * run.world
    dist.all_gather_object(every, mine)
    return every


def set_rng_state(run: Run, states: list):
    if len(states) != run.world:
        print(f"[stages] checkpoint has RNG states of {len(states)} ranks, this run has "
              f"{run.world}: reseeding (the run stays valid, not bit-identical)", file=sys.stderr)
        torch.manual_seed(run.args.seed + 1000 * run.rank + 1)
        return
    s = states[run.rank]
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8), run.device)


def make_checkpoint(run: Run, step: int, metrics: dict) -> dict:
    """Collective: every rank calls it; rank 0 gets the full dict (others get None)."""
    model, optim, rngs = model_state(run), optimizer_state(run), rng_state(run)
    if run.rank != 0:
        return None
    config = dict(vars(run.args), world_size=run.world, mode=run.mode)
    return {"model": model, "config": config, "step": step, "optimizer": optim,
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "rng": rngs, "metrics": metrics,
            "data": {"epoch": step // max(1, run.steps_per_epoch),
                     "batch_in_epoch": step % max(1, run.steps_per_epoch)}}


# ----------------------------------------------------------------------------- data order

def batches(run: Run, start_step: int):
    """Yield, for each optimizer step from start_step on, its `accum` per-rank micro-batches.
    Epoch e's order is a permutation seeded by (seed, e); global micro-batch j takes
    perm[j*M:(j+1)*M] (M = batch / accum) and rank r keeps every world-th of those, so the
    set of samples in a global batch is the same for any number of ranks."""
    import data
    args, ds = run.args, run.stage.train_set
    M = args.batch_size // args.accum
    step = start_step
    while True:
        epoch, first = divmod(step, run.steps_per_epoch)
        ds.set_epoch(epoch)
        g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        perm = torch.randperm(len(ds), generator=g)
        per_epoch = run.steps_per_epoch * args.accum
        chunks = perm[: per_epoch * M].view(per_epoch, M)[:, run.rank::run.world]   # (J, M/world)
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global
        # RNG, which would make a resumed run's drop-path masks differ from an uninterrupted one
        loader = torch.utils.data.DataLoader(ds, batch_sampler=chunks[first * args.accum:].tolist(),
                                             collate_fn=data.collate, num_workers=args.workers,
                                             pin_memory=run.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(epoch))
        micro = []
        for batch in loader:
            micro.append(batch)
            if len(micro) == args.accum:
                yield micro
                micro = []
                step += 1


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(run: Run, micro_batches: list) -> dict:
    """One optimizer step over `accum` micro-batches -> the global mean of every loss term.
    Raises TrainingDiverged (before touching the weights) if the loss is not finite."""
    args, model = run.args, run.model
    names, sums = None, None
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext()
        if not last and isinstance(model, nn.parallel.DistributedDataParallel):
            sync = model.no_sync()                 # reduce gradients once, on the last micro-batch
        elif args.fsdp:
            model.set_requires_gradient_sync(last)
        with sync:
            with run.autocast():
                loss, terms = model(to_device(batch, run.device))
            run.scaler.scale(loss / len(micro_batches)).backward()
        vals = torch.stack([loss.detach().float()] + [t.detach().float() for t in terms.values()])
        names = ["loss"] + list(terms)
        sums = vals if sums is None else sums + vals
    means = sums / len(micro_batches)
    if distributed():                              # also tells every rank about a NaN anywhere
        dist.all_reduce(means)
        means /= run.world
    out = dict(zip(names, means.tolist()))
    if not math.isfinite(out["loss"]):
        run.optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(out)
    run.scaler.unscale_(run.optimizer)
    if args.clip_grad > 0:
        norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.clip_grad)
        out["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    out["lr"] = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    return out


def eval_model(run: Run) -> nn.Module:
    """A plain (unsharded, unwrapped) model to evaluate on rank 0."""
    if not run.args.fsdp:
        return run.raw
    state = model_state(run)                       # collective
    if run.rank != 0:
        return None
    model = STAGES[run.args.stage](run.args, with_data=False).model
    model.load_state_dict(state)
    return model.to(run.device)


# ----------------------------------------------------------------------------- training

def _rewrite_log(path: str, upto: int):
    """On resume, drop log lines past the checkpoint: the resumed run logs them again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [(line, json.loads(line)) for line in f if line.strip()]
    keep = [line for line, r in records if "loss" in r and r["step"] <= upto]   # no eval lines
    with open(path, "w") as f:
        f.writelines(keep)


REUSE_IGNORES = ("out", "resume", "reuse", "workers")


def config_diff(args, config: dict) -> list:
    """The command-line options on which a saved config and `args` disagree (derived entries such
    as teacher_arch or num_classes follow from the options; --out/--resume/--reuse/--workers do
    not change the result)."""
    defaults = vars(get_parser().parse_args([]))
    keys = [k for k in defaults if k not in REUSE_IGNORES]
    # an option added after a run was saved counts as its default there (what that run used)
    return [k for k in keys if config.get(k, defaults[k]) != getattr(args, k)]


def reuse_checkpoint(args, ckpt_path: str) -> bool:
    """--reuse: True when ckpt_path is a complete run of this config (nothing to do); False when
    it is an unfinished run of it (the caller resumes); a ValueError when the configs differ."""
    ckpt = load_checkpoint(ckpt_path, expect_stage=args.stage)
    diff = config_diff(args, ckpt["config"])
    if diff:
        what = ", ".join(f"--{k.replace('_', '-')} {ckpt['config'].get(k)!r} -> {getattr(args, k)!r}"
                         for k in diff)
        raise ValueError(f"--reuse: {ckpt_path} was trained with another config ({what}); choose a "
                         f"new --out, or delete that file to retrain (nothing was overwritten)")
    if ckpt["step"] != args.steps:
        return False
    if not distributed() or dist.get_rank() == 0:
        print(f"[stages] reusing {ckpt_path} (same config, complete)")
    return True


def train(args, stop_at: int | None = None) -> dict:
    """Run (or resume) one stage. stop_at: leave after that step, as a preempted job would.
    Returns the final metrics (rank 0; other ranks get {})."""
    rank, world, device = init_distributed(getattr(args, "dist_timeout", 600))
    ckpt_path = os.path.join(args.out, "last.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    resume_state = None
    if rank == 0 and os.path.isdir(args.out):
        # a save killed mid-write leaves its temp file (never last.pt itself): drop such leftovers
        stale = [f for f in os.listdir(args.out) if f.startswith(".tmp_") and f.endswith(".pt")]
        for f in stale:
            os.remove(os.path.join(args.out, f))
        if stale:
            print(f"[stages] removed {len(stale)} partial checkpoint file(s) of an interrupted save")
    if args.reuse and os.path.exists(ckpt_path) and reuse_checkpoint(args, ckpt_path):
        return dict(load_checkpoint(ckpt_path)["metrics"]) if rank == 0 else {}
    if os.path.exists(ckpt_path):
        if not (args.resume or args.reuse):
            raise ValueError(f"{ckpt_path} already exists: pass --resume to continue that run, or "
                             f"choose another --out (nothing is overwritten)")
        resume_state = load_checkpoint(ckpt_path, expect_stage=args.stage)
        old = resume_state["config"]
        for key in ("arch", "img_size", "batch_size", "seed", "accum"):
            if old.get(key) != getattr(args, key):
                raise ValueError(f"--resume: {ckpt_path} was trained with --{key.replace('_', '-')} "
                                 f"{old.get(key)}, this command says {getattr(args, key)}")
    elif args.resume and rank == 0:
        print(f"[stages] --resume: no {ckpt_path} yet, starting from step 0")
    start = resume_state["step"] if resume_state else 0
    metrics = dict(resume_state["metrics"]) if resume_state else {}
    if start >= args.steps:
        if rank == 0:
            print(f"[stages] {ckpt_path} is already at step {start} of {args.steps}: nothing to do")
        return metrics if rank == 0 else {}
    run = build_run(args, resume_state)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        if resume_state:
            _rewrite_log(log_path, start)
        else:
            open(log_path, "w").close()
    if resume_state:
        set_rng_state(run, resume_state["rng"])
    else:
        torch.manual_seed(args.seed + 1000 * rank + 1)   # per-rank stream for drop path etc.

    t_start = t_log = time.time()
    first_loss, seen, last_saved = None, 0, start
    bar = tqdm(total=args.steps, initial=start, disable=rank != 0, dynamic_ncols=True,
               desc=f"{args.stage} {args.arch}")
    step = start
    try:
        for micro in batches(run, start):
            try:
                terms = train_step(run, micro)
            except TrainingDiverged as e:
                bar.close()
                raise TrainingDiverged(
                    f"loss is not finite at step {step + 1}: {e.args[0]}. {ckpt_path} still holds "
                    f"step {last_saved}" + (" (no checkpoint yet)" if last_saved == 0 else "") +
                    f". To continue: rerun with --resume and a lower --lr (e.g. {args.lr / 2:g}), "
                    f"and/or --precision fp32") from None
            step += 1
            seen += args.batch_size * run.stage.images_per_sample
            first_loss = terms["loss"] if first_loss is None else first_loss
            metrics.update(terms)
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.4f}")
            if step % args.log_every == 0 or step == args.steps:
                now = time.time()
                terms["images_per_s"] = seen / max(now - t_log, 1e-9)
                seen, t_log = 0, now
                if rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, **terms}) + "\n")
            done = step == args.steps
            if done and not args.no_eval and run.stage.evaluate is not None:
                plain = eval_model(run)
                if rank == 0:
                    ev = run.stage.evaluate(plain, args, device)
                    metrics.update(ev)
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": step, **ev}) + "\n")
                barrier()
            if done or (args.ckpt_every and step % args.ckpt_every == 0) or step == stop_at:
                ckpt = make_checkpoint(run, step, metrics)
                if rank == 0:
                    save_checkpoint(ckpt_path, ckpt)
                last_saved = step
                barrier()
            if done or step == stop_at:
                break
    except RuntimeError as e:
        if not _peer_failure(e):
            raise
        bar.close()
        raise RankLost(
            f"rank {rank} of {world} lost the other ranks during step {step + 1} ({str(e).strip()[:200]}). "
            f"Another rank probably died (out of memory, killed, a node lost) or hangs; its own log "
            f"says why. " + (f"{ckpt_path} holds step {last_saved}: relaunch every rank with --resume "
                             f"to continue from there" if last_saved else
                             "No checkpoint was written yet (--ckpt-every N saves more often): relaunch "
                             "to start over")) from None
    bar.close()
    wall = time.time() - t_start
    if rank == 0 and step == args.steps:
        summary = {"stage": args.stage, "arch": args.arch, "steps": step, "wall_s": wall,
                   "world_size": world, "first_loss": first_loss, **metrics}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        zs = "".join(f", zero-shot {k[9:]} {100 * v:.1f} % (chance {100 * metrics[k + '_chance']:.1f} %)"
                     for k, v in metrics.items() if k.startswith("zeroshot_") and not k.endswith("_chance"))
        print(f"[stages] {args.stage} {args.arch}: {step - start} steps in {wall:.1f} s on {world} "
              f"rank(s), loss {first_loss:.4f} -> {metrics['loss']:.4f}{zs}; saved {ckpt_path}")
    return metrics if rank == 0 else {}


# ----------------------------------------------------------------------------- benchmark

def step_benchmark(args_list: list, steps: int = 10, warmup: int = 2) -> dict:
    """Build a stage from CLI arguments and time `steps` training steps after `warmup`, writing
    no files. -> images_per_s (views the image tower sees), samples_per_s, step_s,
    peak_mem_bytes (CUDA: max allocated; CPU: the process's peak RSS), mfu (CUDA bf16/fp16 on a
    known GPU, else None)."""
    args = parse_args(list(args_list) + ["--no-eval"])
    run = build_run(args)
    it = batches(run, 0)
    for _ in range(warmup):
        train_step(run, next(it))
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
    # data loading is part of a step: what a user waits for
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(run, next(it))
    if cuda:
        torch.cuda.synchronize(run.device)
    dt = (time.perf_counter() - t0) / steps
    peak = (torch.cuda.max_memory_allocated(run.device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    mfu = None
    if cuda and args.precision != "fp32":
        from torch.utils.flop_counter import FlopCounterMode
        peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items()
                           if k in torch.cuda.get_device_name(run.device)), None)
        if peak_flops:
            with FlopCounterMode(display=False) as counter:
                train_step(run, next(it))
            mfu = counter.get_total_flops() / dt / peak_flops      # per rank: flops of one step
    return {"images_per_s": args.batch_size * run.stage.images_per_sample / dt,
            "samples_per_s": args.batch_size / dt, "step_s": dt, "peak_mem_bytes": int(peak),
            "mfu": mfu}


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense, per GPU


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        train(args)
        code = 0
    except RankLost as e:
        print(f"[stages] error: {e}", file=sys.stderr)          # every survivor says it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)           # no destroy_process_group: it would wait on the lost rank
    except (ValueError, CheckpointError, TrainingDiverged, NotImplementedError) as e:
        if not distributed() or dist.get_rank() == 0:
            print(f"[stages] error: {e}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if distributed():
        # gloo's teardown at interpreter exit aborts in a few percent of runs (DESIGN §6):
        # leave the group explicitly, flush, then exit without running destructors.
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
