"""GV-B-mini: how well does a frozen backbone transfer to *other* tasks with little data?

INTERN's General Vision Benchmark, shrunk to the procedural world of data.py. For each backbone
checkpoint and each downstream set (gvb/*, plus any real set given with --data):

  1. freeze the backbone (eval mode, no gradient) and cache its features ONCE per split:
     the pooled feature for classification, the 4 levels for dense tasks;
  2. for each percentage (10 and 100 by default) take a fixed-seed subset of the training split
     (per class for classification, per image for dense tasks: data.percent_subset);
  3. pick the head's learning rate / weight decay on a held-out fifth of that subset, refit on
     the whole subset with the winner, and score once on the complete test split.

The test split never takes part in model selection. Heads come from tasks.py: a linear layer on
the pooled feature (cls), a 1x1 conv per level upsampled and summed (seg, depth), a light
CenterNet head on the levels (det).

    python probe.py --ckpt random=random:eva_demo mim=runs/demo/mim/last.pt --out runs/demo/probe

Writes OUT/gvb.json ({"rows": [...]}, one row per (model, percent)), OUT/gvb.md (the table) and
OUT/viz/*.png (predictions of the last model next to the ground truth).

Down-A (INTERN's fourth component: adapting beyond the frozen probe), `--adapt`:

  linear   (default) the protocol above.
  lpft     linear probe, then fine-tune: phase 1 is the probe above, row untouched; phase 2 starts
           from its head (and its frozen standardisation), unfreezes a fresh copy of the backbone
           and trains backbone + head end to end on the subset's images with AdamW, layer-wise
           learning-rate decay (--layer-decay) and a short cosine schedule; given several --ft-lr
           the lr is selected on the same held-out fifth, then refit on the whole subset and tested
           once -> "MODEL+lpft". A generalist fine-tunes its main stream and KTMs (its auxiliary
           experts stay frozen, as in Up-G). The default (one lr, one epoch) is sized for the demo.
  distill  a small student (--student, from scratch) learns to match the --ckpt teacher's pooled
           and level features on the training images of every --data set, without labels; then it
           is linear-probed -> "student+distill". The same student trained end to end on the
           labelled subset alone, from scratch -> "student". Parameters and images/s of both
           networks go to OUT/adapt.json.

An --adapt lpft|distill run MERGES its rows into an existing OUT/gvb.json (a row replaces the one
with the same model and percent; the others stay), so it can extend the main table:

    python probe.py --adapt lpft --ckpt generalist=runs/demo/generalist/last.pt --out runs/demo/probe
    python probe.py --adapt distill --student eva_demo --ckpt generalist=... --out runs/demo/probe

Use the caps, --steps and --seed of the run being extended (a mismatch is warned about). An
--adapt linear run writes a fresh table: run the adapt modes after it.
"""
import argparse
import copy
import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import tasks

DOWNSTREAM = ("gvb/shape", "gvb/count", "gvb/texture", "gvb/det", "gvb/seg", "gvb/depth")
# the table's summary columns: which metric of which task type, and its direction
SUMMARY = {"cls": ("cls_avg", "mean_class_acc", True), "det": ("det_ap50", "AP50", True),
           "seg": ("seg_miou", "mIoU", True), "depth": ("depth_rmse", "RMSE", False)}
SELECT = {"cls": ("mean_class_acc", True), "det": ("AP50", True), "seg": ("mIoU", True), "depth": ("RMSE", False)}


# ----------------------------------------------------------------------------- backbones

def load_backbone(spec: str):
    """`random:ARCH` -> a freshly initialised ARCH (seed 0); anything else is a checkpoint path
    whose backbone (or generalist) stages.load_backbone rebuilds. Returns a frozen, eval-mode module."""
    import stages
    if spec.startswith("random:"):
        torch.manual_seed(0)
        backbone = stages.build_backbone(spec[len("random:"):])
    else:
        backbone, _ = stages.load_backbone(spec)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


class Split:
    """One downstream split rendered once and shared by every model of a run: images (N, 3, H, W)
    kept in fp16 (half the memory; the scenes carry no detail below 1e-3), and every sample's
    targets padded as data.collate pads them."""

    def __init__(self, dataset, desc: str = ""):
        images, targets = [], []
        for i in tqdm(range(len(dataset)), desc=desc, leave=False):
            s = dataset[i]
            images.append(s["image"].half())
            targets.append({k: v for k, v in s.items() if k != "image" and torch.is_tensor(v)})
        self.images = torch.stack(images)                                          # (N, 3, H, W)
        self.targets = data.collate(targets)                                       # label/boxes/seg/... (N, ...)
        self.task, self.num_classes = dataset.task, dataset.num_classes

    def __len__(self):
        return self.images.shape[0]


class Features:
    """A frozen backbone's outputs on one split, computed once: pooled (N, F) always, the 4 levels
    for dense tasks (fp32: converting fp16 caches on every step cost more than it saved)."""

    def __init__(self, backbone, split: Split, dense: bool, batch_size: int = 128):
        pooled, levels = [], []
        with torch.no_grad():
            for start in range(0, len(split), batch_size):
                lv, pl = backbone.forward_levels(data.normalize(split.images[start:start + batch_size].float()))
                pooled.append(pl.float())
                if dense:
                    levels.append([f.float() for f in lv])
        self.pooled = torch.cat(pooled)                                            # (N, F)
        self.levels = [torch.cat(ls) for ls in zip(*levels)] if dense else None    # 4 x (N, C_k, H_k, W_k)
        self.targets = split.targets
        self.geometry = (backbone.level_channels, backbone.level_strides, backbone.num_features)

    def __len__(self):
        return self.pooled.shape[0]

    def batch(self, idx: torch.Tensor):
        """Cached (levels, pooled, targets) of the samples `idx`, ready for a head."""
        levels = [f[idx] for f in self.levels] if self.levels is not None else None
        return levels, self.pooled[idx], {k: v[idx] for k, v in self.targets.items() if torch.is_tensor(v)}


def standardise(train: Features, test: Features):
    """MAE's linear probe puts a non-affine BatchNorm in front of the head; the same here, with
    statistics of the training images only (no labels, never the test split): every pooled
    feature and every level channel becomes zero-mean, unit-variance, so one small learning-rate
    grid suits backbones whose raw feature scales differ by orders of magnitude (a random
    backbone's pooled features barely vary from image to image).
    Returns the statistics, {"pooled": (mean, std), "levels": [(mean, std)] * 4 or None}: LP-FT
    keeps applying them, frozen, in front of the head it fine-tunes."""
    mean, std = train.pooled.mean(0), train.pooled.std(0) + 1e-6                  # (F,)
    stats = {"pooled": (mean, std), "levels": None}
    for f in (train, test):
        f.pooled = (f.pooled - mean) / std
    if train.levels is None:
        return stats
    stats["levels"] = []
    for k, level in enumerate(train.levels):
        m, sd = level.mean((0, 2, 3), keepdim=True), level.std((0, 2, 3), keepdim=True) + 1e-6   # (1, C_k, 1, 1)
        stats["levels"].append((m, sd))
        for f in (train, test):
            f.levels[k] = (f.levels[k] - m) / sd
    return stats


# ----------------------------------------------------------------------------- heads on cached features

def fit_head(task, num_classes, feats: Features, idx: torch.Tensor, lr: float, wd: float,
             steps: int, batch_size: int = 64, seed: int = 0):
    """Train a fresh head of `task` on the cached features `idx` with AdamW + cosine."""
    torch.manual_seed(seed)
    channels, strides, num_features = feats.geometry
    head = tasks.build_head(task, channels, strides, num_features, num_classes)
    if task == "depth":
        init_depth_bias(head, feats.targets["depth"][idx])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    batch_size = batch_size if task == "cls" else batch_size // 4   # dense heads: ~30x costlier steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    order = idx[torch.randperm(len(idx), generator=g)]
    pos = 0
    head.train()
    for _ in range(steps):
        if pos + batch_size > len(order):          # reshuffle each epoch; small subsets cycle
            order, pos = idx[torch.randperm(len(idx), generator=g)], 0
        chunk = order[pos:pos + batch_size]
        pos += batch_size
        levels, pooled, batch = feats.batch(chunk)
        loss, _ = head.loss(head(levels, pooled), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


@torch.no_grad()
def init_depth_bias(head, depth: torch.Tensor):
    """Start a depth head at the subset's mean log depth, as a classifier's bias may start at the
    log prior: otherwise a short fit spends its steps walking the bias from 1 m to the scene's scale."""
    head.proj[0].bias.fill_(depth[depth > 0].log().mean().item())


@torch.no_grad()
def score(task, head, feats: Features, idx: torch.Tensor, batch_size: int = 256) -> dict:
    outs, batches = [], []
    for start in range(0, len(idx), batch_size):
        levels, pooled, batch = feats.batch(idx[start:start + batch_size])
        outs.append(head(levels, pooled))
        batches.append(batch)
    return tasks.evaluate(task, head, outs, batches)


def holdout(subset_idx: torch.Tensor, seed: int):
    """(fit_idx, val_idx): a fixed-seed fifth of the subset (at least one sample) held out."""
    g = torch.Generator().manual_seed(seed)
    perm = subset_idx[torch.randperm(len(subset_idx), generator=g)]
    n_val = max(1, len(perm) // 5)
    return perm[n_val:], perm[:n_val]


def better(value, best, higher: bool) -> bool:
    return best is None or (value > best if higher else value < best)


def probe_one(task, num_classes, train: Features, test: Features, subset_idx: torch.Tensor, grid, steps, seed):
    """Model selection on a held-out fifth of the training subset, refit on all of it, test once.
    -> (result, head refit on the subset, the winning head fitted on 4/5 of it)."""
    metric, higher = SELECT[task]
    fit_idx, val_idx = holdout(subset_idx, seed)
    best, best_hp, val_head = None, None, None
    for lr, wd in grid:
        head = fit_head(task, num_classes, train, fit_idx, lr, wd, steps, seed=seed)
        value = score(task, head, train, val_idx)[metric]
        if better(value, best, higher):
            best, best_hp, val_head = value, (lr, wd), head
    head = fit_head(task, num_classes, train, subset_idx, *best_hp, steps, seed=seed)
    result = score(task, head, test, torch.arange(len(test)))
    result.update(lr=best_hp[0], wd=best_hp[1], val=best, n_train=len(subset_idx))
    return result, head, val_head


# ----------------------------------------------------------------------------- the benchmark

def capped(dataset, limit):
    """The first `limit` samples (samples are i.i.d. draws, so a prefix is a fixed random subset)."""
    return dataset if not limit or limit >= len(dataset) else data.Subset(dataset, list(range(limit)))


def prepare(specs, img_size, seed, max_train=None, max_test=None):
    """-> datasets {spec: (train, test)} and their splits rendered once {spec: (Split, Split)}."""
    datasets = {s: (capped(data.build_dataset(s, "train", img_size, seed), max_train),
                    capped(data.build_dataset(s, "test", img_size, seed), max_test)) for s in specs}
    for s, (train_set, _) in datasets.items():
        if train_set.task not in SELECT:
            raise ValueError(f"{s}: task {train_set.task!r} has no probe; probe tasks are {sorted(SELECT)}")
    splits = {s: (Split(tr, f"render {s} train"), Split(te, f"render {s} test")) for s, (tr, te) in datasets.items()}
    return datasets, splits


def subset_indices(train_set, percent, seed) -> torch.Tensor:
    return torch.as_tensor(data.percent_subset(train_set, percent, seed=seed).indices, dtype=torch.long)


def run_probe(models: dict, specs, percents, img_size=64, steps=150, grid=None, seed=0, viz_dir=None,
              max_train=None, max_test=None, log=print, lpft=None, timings=None):
    """models: name -> backbone spec (see load_backbone). Returns the list of table rows.
    max_train / max_test cap every split (the CPU demo uses them to stay within its time goal).
    lpft: a Recipe to add LP-FT's second phase (rows "NAME+lpft" after each model's rows).
    timings: a dict to receive {name: {"probe_s", "lpft_s"}}."""
    backbones = {name: load_backbone(spec) for name, spec in models.items()}   # a bad file fails fast
    datasets, splits = prepare(specs, img_size, seed, max_train, max_test)
    rows = []
    for name, backbone in backbones.items():
        rows += probe_backbone(name, backbone, datasets, splits, percents, steps, grid, seed,
                               viz_dir if name == list(models)[-1] else None, log, lpft, timings)
    return rows


def probe_backbone(name, backbone, datasets, splits, percents, steps=150, grid=None, seed=0, viz_dir=None,
                   log=print, lpft=None, timings=None) -> list:
    """The GV-B-mini rows of one frozen backbone (+ its LP-FT rows when `lpft` is a Recipe)."""
    grid = grid or [(1e-3, 1e-4), (1e-2, 1e-4)]
    t0, t_ft = time.time(), 0.0
    per_percent = {p: {} for p in percents}
    tuned = {p: {} for p in percents}
    for s, (train_set, test_set) in datasets.items():
        task = train_set.task
        dense = task != "cls"
        train = Features(backbone, splits[s][0], dense)
        test = Features(backbone, splits[s][1], dense)
        stats = standardise(train, test)
        for p in percents:
            idx = subset_indices(train_set, p, seed)
            result, head, val_head = probe_one(task, train_set.num_classes, train, test, idx, grid, steps, seed)
            per_percent[p][s] = result
            if lpft is not None:   # phase 2, after phase 1 is complete and recorded
                t1 = time.time()
                tuned[p][s] = lpft_one(task, backbone, stats, {"select": val_head, "refit": head},
                                       splits[s][0], splits[s][1], idx, lpft, seed, f"lpft {s} {p}%")
                t_ft += time.time() - t1
        if viz_dir and dense:
            draw_predictions(s, splits[s][1], test, head, viz_dir)
        del train, test
    task_of = {s: d[0].task for s, d in datasets.items()}
    rows = [make_row(name, p, per_percent[p], task_of) for p in percents]
    log(f"[probe] {name}: {time.time() - t0 - t_ft:.1f}s  " +
        "  ".join(f"{p}%: " + summary_text(r) for p, r in zip(percents, rows)))
    if timings is not None:
        timings[name] = {"probe_s": time.time() - t0 - t_ft, "lpft_s": t_ft}
    if lpft is not None:
        rows += [make_row(f"{name}+lpft", p, tuned[p], task_of) for p in percents]
        log(f"[lpft] {name}: {t_ft:.1f}s  " +
            "  ".join(f"{p}%: " + summary_text(r) for p, r in zip(percents, rows[-len(percents):])))
    return rows


def make_row(model, percent, results: dict, task_of: dict) -> dict:
    row = {"model": model, "percent": percent}
    for task, (column, metric, _) in SUMMARY.items():
        values = [r[metric] for s, r in results.items() if task_of[s] == task]
        row[column] = sum(values) / len(values) if values else None
    row["sets"] = results
    return row


def summary_text(row) -> str:
    return " ".join(f"{c}={row[c]:.3f}" for c, _, _ in SUMMARY.values() if row.get(c) is not None)


def markdown(rows) -> str:
    """INTERN Table-1 style: one line per (model, percent), one column per downstream set (the
    union over rows, in order of appearance: merged tables may cover different sets)."""
    sets = list(dict.fromkeys(s for r in rows for s in r["sets"]))
    metric_of = {s: next(m for r in rows if s in r["sets"] for _, (_, m, _) in SUMMARY.items() if m in r["sets"][s])
                 for s in sets}
    arrow = {m: ("↑" if h else "↓") for _, (_, m, h) in SUMMARY.items()}
    head = ["model", "data %"] + [f"{s} {metric_of[s]} {arrow[metric_of[s]]}" for s in sets] + \
        [f"{c} {'↑' if h else '↓'}" for c, _, h in SUMMARY.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["percent"])]
        cells += [_fmt(r["sets"][s][metric_of[s]] if s in r["sets"] else None, metric_of[s]) for s in sets]
        cells += [_fmt(r[c], m) for c, m, _ in SUMMARY.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + \
        "\n\nAccuracy (mean per class), AP50 and mIoU in %; RMSE in metres. ↑ higher is better, ↓ lower."


def _fmt(value, metric) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if metric == "RMSE" else f"{100 * value:.1f}"


# ----------------------------------------------------------------------------- Down-A: training on images

@dataclass
class Recipe:
    """How a network is trained end to end on a subset's images (LP-FT's phase 2, the scratch
    student). Steps grow with the subset (10 % costs a tenth of 100 %), with a floor so that a
    tiny subset still gets a few updates."""
    lrs: tuple = (3e-4,)        # several: selected on the held-out fifth; one: nothing to select
    wd: float = 0.05
    layer_decay: float = 0.9    # EVA fine-tunes with 0.85-0.95; 1.0 = none (training from scratch)
    epochs: float = 1.0
    min_steps: int = 10
    batch_size: int = 16

    def steps(self, n: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * n / self.batch_size))


class Tuned(nn.Module):
    """images -> backbone -> the probe's standardisation (frozen buffers) -> head, trainable end to
    end. Built from a probe's backbone, statistics and head it computes exactly what the probe
    computed, so LP-FT's second phase starts from the probe's predictions, not from a random head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, stats: dict = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.standardised = stats is not None
        self.n_level_stats = len(stats["levels"] or []) if stats else 0
        if stats:
            self.register_buffer("pooled_mean", stats["pooled"][0].clone())         # (F,)
            self.register_buffer("pooled_std", stats["pooled"][1].clone())
            for k, (m, sd) in enumerate(stats["levels"] or []):                      # (1, C_k, 1, 1)
                self.register_buffer(f"level_mean{k}", m.clone())
                self.register_buffer(f"level_std{k}", sd.clone())

    def forward(self, images: torch.Tensor):
        """images (B, 3, H, W) in [0, 1] -> the head's output."""
        levels, pooled = self.backbone.forward_levels(data.normalize(images))
        if self.standardised:
            pooled = (pooled - self.pooled_mean) / self.pooled_std
            levels = [(f - getattr(self, f"level_mean{k}")) / getattr(self, f"level_std{k}")
                      if k < self.n_level_stats else f for k, f in enumerate(levels)]
        return self.head(levels, pooled)


def unfreeze(backbone: nn.Module) -> nn.Module:
    """Make a (copied) probe backbone trainable. A generalist (ktm.Generalist) trains its main
    stream and its KTMs; its auxiliary experts stay frozen and in eval mode, as in Up-G: they run
    under no_grad inside ktm.aux_levels, so no gradient could reach them anyway."""
    backbone.requires_grad_(True)
    if hasattr(backbone, "aux") and hasattr(backbone, "train_main"):
        backbone.aux.requires_grad_(False)
        backbone.train_main = True          # Generalist.train() then lets the main stream train
    return backbone


def layer_decay_groups(backbone: nn.Module, head: nn.Module, lr: float, wd: float, decay: float) -> list:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT / EVA fine-tuning).

    With D = len(backbone.block_list()) blocks in depth order, block i (0-based) trains at
    lr * decay**(D - i); what runs before the first block (stem or patch embedding, position
    embedding, cls token) at lr * decay**(D + 1); what is registered after the blocks (final
    norm, MetaNet's head conv, a generalist's KTMs) and `head` at lr. The layers nearest the input
    hold the most generic features, so they move least. Norms, biases, tokens and position
    embeddings get no weight decay (stages.spared_from_decay). Frozen parameters are left out.
    Each group carries its "layer" (0 .. D + 1) and "lr_scale"."""
    import stages
    blocks = backbone.block_list()
    depth = len(blocks)
    block_of = {id(p): i for i, blk in enumerate(blocks) for p in blk.parameters()}
    skip = set(getattr(backbone, "no_weight_decay", lambda: set())())
    groups, past_blocks = {}, False
    named = [(n, p, None) for n, p in backbone.named_parameters()] + \
        [(n, p, depth + 1) for n, p in head.named_parameters()]
    for name, p, layer in named:
        from_backbone = layer is None
        if from_backbone:      # its block, or before / after all blocks
            past_blocks = past_blocks or id(p) in block_of
            layer = block_of[id(p)] + 1 if id(p) in block_of else (depth + 1 if past_blocks else 0)
        if not p.requires_grad:
            continue
        no_decay = stages.spared_from_decay(p, name, skip, name if from_backbone else None)
        scale = decay ** (depth + 1 - layer)
        g = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else wd,
                                                  "lr": lr * scale, "lr_scale": scale, "layer": layer})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def optimise(groups: list, steps: int, loss_of, idx: torch.Tensor, batch_size: int, seed: int,
             desc: str = "") -> list:
    """AdamW over `groups` for `steps` steps of `loss_of(chunk)` on shuffled batches of `idx`
    (reshuffled each epoch); linear warm-up over the first 10 % of the steps, then cosine
    (stages.lr_factor). Returns the loss of every step."""
    import stages
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: stages.lr_factor(s, max(1, steps // 10), steps))
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(idx))
    order, pos, losses = idx[torch.randperm(len(idx), generator=g)], 0, []
    for _ in tqdm(range(steps), desc=desc, leave=False):
        if pos + batch_size > len(order):
            order, pos = idx[torch.randperm(len(idx), generator=g)], 0
        chunk = order[pos:pos + batch_size]
        pos += batch_size
        loss = loss_of(chunk)
        if not torch.isfinite(loss):
            raise stages.TrainingDiverged(f"{desc}: the loss became {loss.item()}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def targets_of(split: Split, idx: torch.Tensor) -> dict:
    return {k: v[idx] for k, v in split.targets.items() if torch.is_tensor(v)}


def train_live(model: Tuned, split: Split, idx: torch.Tensor, groups: list, steps: int, batch_size: int,
               seed: int, desc: str = "") -> Tuned:
    """Train backbone + head end to end on the images `idx` of a split (no augmentation: a few
    epochs at most). The backbone runs live: cached features cannot follow a changing network."""
    torch.manual_seed(seed)
    model.train()
    optimise(groups, steps, lambda chunk: model.head.loss(model(split.images[chunk].float()),
                                                          targets_of(split, chunk))[0],
             idx, batch_size, seed, desc)
    return model.eval()


@torch.no_grad()
def score_live(task, model: Tuned, split: Split, idx: torch.Tensor, batch_size: int = 100) -> dict:
    model.eval()
    outs, batches = [], []
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        outs.append(model(split.images[chunk].float()))
        batches.append(targets_of(split, chunk))
    return tasks.evaluate(task, model.head, outs, batches)


def select_live(task, make, train: Split, test: Split, subset_idx: torch.Tensor, recipe: Recipe, seed: int,
                desc: str = "") -> dict:
    """probe_one's protocol for networks trained on images: for each lr of the recipe, a fresh
    make(lr, fit_idx, "select") trains on 4/5 of the subset and is scored on the held-out fifth;
    a fresh make(best_lr, subset_idx, "refit") trains on the whole subset and is tested once.
    make -> (Tuned, param groups). With one lr there is nothing to select: only the refit runs."""
    metric, higher = SELECT[task]
    fit_idx, val_idx = holdout(subset_idx, seed)
    best, best_lr = None, recipe.lrs[0]
    if len(recipe.lrs) > 1:
        for lr in recipe.lrs:
            model, groups = make(lr, fit_idx, "select")
            train_live(model, train, fit_idx, groups, recipe.steps(len(fit_idx)), recipe.batch_size, seed,
                       f"{desc} lr={lr:g}")
            value = score_live(task, model, train, val_idx)[metric]
            if better(value, best, higher):
                best, best_lr = value, lr
            del model
    model, groups = make(best_lr, subset_idx, "refit")
    steps = recipe.steps(len(subset_idx))
    train_live(model, train, subset_idx, groups, steps, recipe.batch_size, seed, f"{desc} refit")
    result = score_live(task, model, test, torch.arange(len(test)))
    result.update(lr=best_lr, val=best, n_train=len(subset_idx), steps=steps)
    return result


def lpft_one(task, backbone, stats, heads: dict, train: Split, test: Split, subset_idx, recipe: Recipe, seed,
             desc: str = "lpft"):
    """LP-FT's phase 2 for one (set, percent): each candidate starts from a fresh copy of the
    pre-trained backbone (nothing leaks between rows) and from the phase-1 head fitted on the same
    samples it now trains on (heads["select"] on 4/5 of the subset, heads["refit"] on all of it)."""
    def make(lr, idx, phase):
        model = Tuned(unfreeze(copy.deepcopy(backbone)), copy.deepcopy(heads[phase]).requires_grad_(True), stats)
        return model, layer_decay_groups(model.backbone, model.head, lr, recipe.wd, recipe.layer_decay)
    return select_live(task, make, train, test, subset_idx, recipe, seed, desc)


def scratch_one(task, arch, num_classes, img_size, train: Split, test: Split, subset_idx, recipe: Recipe, seed,
                desc: str = "student"):
    """The student trained directly: a fresh `arch` + a fresh head of tasks.py, end to end on the
    labelled subset (no layer decay: nothing pre-trained to protect)."""
    import stages

    def make(lr, idx, phase):
        torch.manual_seed(seed)
        backbone = stages.build_backbone(arch, img_size=img_size, num_classes=0)
        head = tasks.head_for(task, backbone, num_classes)
        if task == "depth":
            init_depth_bias(head, train.targets["depth"][idx])
        return Tuned(backbone, head), layer_decay_groups(backbone, head, lr, recipe.wd, 1.0)
    return select_live(task, make, train, test, subset_idx, recipe, seed, desc)


# ----------------------------------------------------------------------------- Down-A: distillation

class Projector(nn.Module):
    """Student features -> the teacher's widths and grids (FitNets' regressor, discarded after
    distillation): a Linear on the pooled feature, a 1x1 conv per level, then bilinear resizing to
    the teacher's level grid (a MetaNet student's levels are at strides 4..32, EVA's all at one)."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        if len(student.level_channels) != len(teacher.level_channels):
            raise ValueError(f"student has {len(student.level_channels)} levels, teacher "
                             f"{len(teacher.level_channels)}: both must follow the 4-level contract")
        self.pooled = nn.Linear(student.num_features, teacher.num_features)
        self.levels = nn.ModuleList([nn.Conv2d(cs, ct, 1) for cs, ct in
                                     zip(student.level_channels, teacher.level_channels)])

    def forward(self, levels: list, pooled: torch.Tensor, grids: list):
        out = []
        for conv, f, hw in zip(self.levels, levels, grids):
            y = conv(f)                                                    # (B, C_teacher, h, w)
            out.append(y if tuple(y.shape[-2:]) == tuple(hw) else
                       F.interpolate(y, size=tuple(hw), mode="bilinear", align_corners=False))
        return out, self.pooled(pooled)                                    # 4 x (B, C_t, H_t, W_t), (B, F_t)


def distill_loss(levels, pooled, t_levels, t_pooled, kind: str = "cosine") -> torch.Tensor:
    """Mean over the pooled feature and the 4 levels of 1 - cosine similarity along channels (per
    image and position) or of smooth-L1; the teacher's features come standardised."""
    terms = []
    for s, t in [(pooled, t_pooled)] + list(zip(levels, t_levels)):
        t = t.float()
        terms.append(1 - F.cosine_similarity(s, t, dim=1).mean() if kind == "cosine" else F.smooth_l1_loss(s, t))
    return sum(terms) / len(terms)


DISTILL_LOSSES = ("cosine", "smoothl1")


@dataclass
class DistillRecipe:
    epochs: float = 1.0
    lr: float = 5e-4
    wd: float = 0.05
    batch_size: int = 32
    loss: str = "cosine"


def distill(teacher: nn.Module, student_arch: str, images: torch.Tensor, recipe: DistillRecipe, img_size: int,
            seed: int = 0, batch_size_teacher: int = 128):
    """Train a fresh `student_arch` to match the frozen teacher's pooled and level features on
    `images` (N, 3, H, W) in [0, 1], no labels. The teacher runs once, in eval mode and under
    no_grad (its targets are cached in fp16), so it can receive no gradient. Its features are
    centred per channel and position over these images, then scaled per channel: the student
    learns what varies between images, not the image-independent part (a ViT's levels carry its
    position embedding), which cosine similarity would otherwise reward for free.
    -> (student frozen in eval mode, {"losses": [...], "steps": ...})."""
    import stages
    if recipe.loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown distillation loss {recipe.loss!r}; choose one of {DISTILL_LOSSES}")
    teacher.eval()
    pooled, levels = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size_teacher):
            lv, pl = teacher.forward_levels(data.normalize(images[start:start + batch_size_teacher].float()))
            pooled.append(pl.float())
            levels.append([f.half() for f in lv])
    t_pooled = torch.cat(pooled)                                           # (N, F_t)
    t_levels = [torch.cat(ls) for ls in zip(*levels)]                      # 4 x (N, C_t, H_t, W_t) fp16
    t_pooled = (t_pooled - t_pooled.mean(0)) / (t_pooled.std(0) + 1e-6)
    for k, f in enumerate(t_levels):
        f = f.float() - f.float().mean(0, keepdim=True)                    # minus the mean image (1, C, H, W)
        t_levels[k] = (f / (f.std((0, 2, 3), keepdim=True) + 1e-6)).half()  # / the channel's spread
    grids = [tuple(f.shape[-2:]) for f in t_levels]

    torch.manual_seed(seed)
    student = stages.build_backbone(student_arch, img_size=img_size, num_classes=0)
    proj = Projector(student, teacher)
    groups = layer_decay_groups(student, proj, recipe.lr, recipe.wd, 1.0)
    steps = max(1, math.ceil(recipe.epochs * len(images) / recipe.batch_size))

    def loss_of(chunk):
        lv, pl = student.forward_levels(data.normalize(images[chunk].float()))
        p_levels, p_pooled = proj(lv, pl, grids)
        return distill_loss(p_levels, p_pooled, [f[chunk] for f in t_levels], t_pooled[chunk], recipe.loss)

    student.train()
    losses = optimise(groups, steps, loss_of, torch.arange(len(images)), recipe.batch_size, seed,
                      f"distill {student_arch}")
    student.eval().requires_grad_(False)
    return student, {"losses": losses, "steps": steps, "images": len(images)}


@torch.no_grad()
def throughput(backbone: nn.Module, img_size: int, batch_size: int = 64, reps: int = 3) -> float:
    """Forward images/s (eval, no_grad, after one warm-up batch) on this machine."""
    backbone.eval()
    x = torch.randn(batch_size, 3, img_size, img_size)
    backbone.forward_levels(x)
    t0 = time.perf_counter()
    for _ in range(reps):
        backbone.forward_levels(x)
    return reps * batch_size / (time.perf_counter() - t0)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run_distill(teacher_name: str, teacher_spec: str, student_arch: str, specs, percents, img_size=64, steps=150,
                grid=None, seed=0, max_train=None, max_test=None, recipe: DistillRecipe = None,
                scratch: Recipe = None, log=print):
    """Rows "student+distill" (the distilled student, linear-probed) and "student" (the same
    architecture trained end to end on each labelled subset), and a dict of what it cost.
    Distillation sees the training images of every set (all of them: labels are what the
    percentage limits, not images) and never a test image."""
    recipe, scratch = recipe or DistillRecipe(), scratch or Recipe(lrs=(1e-3,), layer_decay=1.0)
    teacher = load_backbone(teacher_spec)
    datasets, splits = prepare(specs, img_size, seed, max_train, max_test)
    t0 = time.time()
    images = torch.cat([splits[s][0].images for s in datasets])           # (N, 3, H, W) fp16, no labels
    student, dinfo = distill(teacher, student_arch, images, recipe, img_size, seed)
    t_distill = time.time() - t0
    log(f"[distill] {student_arch} <- {teacher_name}: {dinfo['steps']} steps on {len(images)} images, "
        f"loss {dinfo['losses'][0]:.3f} -> {dinfo['losses'][-1]:.3f}, {t_distill:.1f}s")
    rows = probe_backbone("student+distill", student, datasets, splits, percents, steps, grid, seed, log=log)
    t_probe = time.time() - t0 - t_distill

    t1 = time.time()
    task_of = {s: d[0].task for s, d in datasets.items()}
    per_percent = {p: {} for p in percents}
    for s, (train_set, _) in datasets.items():
        for p in percents:
            per_percent[p][s] = scratch_one(train_set.task, student_arch, train_set.num_classes, img_size,
                                            splits[s][0], splits[s][1], subset_indices(train_set, p, seed),
                                            scratch, seed, f"student {s} {p}%")
    rows += [make_row("student", p, per_percent[p], task_of) for p in percents]
    t_scratch = time.time() - t1
    log(f"[student] {student_arch} from scratch: {t_scratch:.1f}s  " +
        "  ".join(f"{p}%: " + summary_text(r) for p, r in zip(percents, rows[-len(percents):])))

    info = {"teacher": {"name": teacher_name, "spec": teacher_spec, "params": count_params(teacher),
                        "images_per_s": throughput(teacher, img_size)},
            "student": {"arch": student_arch, "params": count_params(student),
                        "images_per_s": throughput(student, img_size)},
            "distill": {"steps": dinfo["steps"], "images": dinfo["images"], "first_loss": dinfo["losses"][0],
                        "last_loss": dinfo["losses"][-1], "loss": recipe.loss},
            "wall_s": {"distill": t_distill, "probe_student": t_probe, "student_scratch": t_scratch}}
    t, st = info["teacher"], info["student"]
    log(f"[distill] teacher {teacher_name}: {t['params'] / 1e6:.2f} M params, {t['images_per_s']:.0f} img/s; "
        f"student {student_arch}: {st['params'] / 1e6:.2f} M params, {st['images_per_s']:.0f} img/s "
        f"(forward, batch 64, {img_size} px, this CPU)")
    return rows, info


# ----------------------------------------------------------------------------- pictures

@torch.no_grad()
def draw_predictions(spec, split: Split, feats: Features, head, out_dir, n=4):
    """For the first n test images of a dense set: image | ground truth | prediction."""
    from PIL import Image, ImageDraw
    os.makedirs(out_dir, exist_ok=True)
    idx = torch.arange(min(n, len(split)))
    levels, pooled, batch = feats.batch(idx)
    pred = head.predict(head(levels, pooled))
    size = split.images.shape[-1]
    zoom = max(1, 160 // size)
    canvas = Image.new("RGB", (3 * size * zoom, len(idx) * size * zoom), "white")
    for i in idx.tolist():
        img = Image.fromarray((split.images[i].float().permute(1, 2, 0).numpy() * 255).astype("uint8"))
        tiles = [img, img.copy(), img.copy()]
        if split.task == "det":
            shown = pred[i]["scores"] > 0.3
            for tile, boxes, labels in ((tiles[1], batch["boxes"][i], batch["box_labels"][i]),
                                        (tiles[2], pred[i]["boxes"][shown], pred[i]["labels"][shown])):
                d = ImageDraw.Draw(tile)
                for b, lab in zip(boxes.tolist(), labels.tolist()):
                    if lab >= 0:
                        d.rectangle(b, outline=tuple(int(255 * c) for c in data.palette(int(lab) + 1)))
        elif split.task == "seg":
            tiles[1], tiles[2] = _label_image(batch["seg"][i]), _label_image(pred[i])
        else:
            tiles[1] = Image.fromarray(data.depth_rgb(batch["depth"][i].numpy()))
            tiles[2] = Image.fromarray(data.depth_rgb(pred[i].numpy()))
        for j, tile in enumerate(tiles):
            canvas.paste(tile.resize((size * zoom, size * zoom), Image.NEAREST), (j * size * zoom, i * size * zoom))
    canvas.save(os.path.join(out_dir, spec.replace("/", "_").replace(":", "_") + ".png"))


def _label_image(labels: torch.Tensor):
    from PIL import Image
    import numpy as np
    lab = labels.numpy()
    rgb = np.zeros(lab.shape + (3,), np.uint8)
    for k in np.unique(lab):
        rgb[lab == k] = (255, 255, 255) if k == 255 else [int(255 * c) for c in data.palette(int(k))]
    return Image.fromarray(rgb)


# ----------------------------------------------------------------------------- CLI

def parse_models(items):
    models = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise SystemExit(f"--ckpt expects NAME=PATH or NAME=random:ARCH, got {item!r}")
        if not spec.startswith("random:") and not os.path.exists(spec):
            raise SystemExit(f"--ckpt {name}: no such file {spec!r}; train it first (see README) or fix the path")
        models[name] = spec
    return models


ADAPTS = ("linear", "lpft", "distill")


def merge_rows(path: str, rows: list, config: dict, log=print) -> dict:
    """The table at `path` (if any) with `rows` merged in: a row replaces the one with the same
    (model, percent) in place, new rows are appended, every other row is kept. The run's config
    is recorded under doc["adapt"][mode]; the original "config" stays."""
    doc = {"rows": [], "config": config}
    if os.path.exists(path):
        try:
            with open(path) as f:
                doc = json.load(f)
            assert isinstance(doc.get("rows"), list)
        except (ValueError, AssertionError) as e:
            raise SystemExit(f"probe.py: {path} exists but is not a gvb.json table ({e}); move it away "
                             f"or choose another --out (nothing was overwritten)")
        old = doc.get("config", {})
        differ = [k for k in ("data", "img_size", "steps", "max_train", "max_test", "seed", "percent", "lr", "wd")
                  if k in old and old[k] != config.get(k)]
        if differ:
            log(f"[probe] warning: merging into {path}, whose rows were made with other settings: " +
                ", ".join(f"{k} {old[k]} -> {config.get(k)}" for k in differ) + " (rows may not be comparable)")
    where = {(r["model"], r["percent"]): i for i, r in enumerate(doc["rows"])}
    for r in rows:
        key = (r["model"], r["percent"])
        if key in where:
            doc["rows"][where[key]] = r
        else:
            where[key] = len(doc["rows"])
            doc["rows"].append(r)
    doc.setdefault("adapt", {})[config["adapt"]] = config
    return doc


def adapt_markdown(info: dict) -> str:
    """The cost lines of the Down-A runs recorded in adapt.json."""
    lines = []
    if "lpft" in info:
        lp = info["lpft"]
        took = ", ".join(f"{n} {s:.0f} s" for n, s in lp["wall_s"].items())
        lines.append(f"- lpft: phase 2 took {took} (layer decay {lp['layer_decay']}, lr grid {lp['lrs']}, "
                     f"{lp['epochs']} epoch(s) per fit).")
    if "distill" in info:
        d = info["distill"]
        t, s = d["teacher"], d["student"]
        lines.append(f"- distill: teacher {t['name']} {t['params'] / 1e6:.2f} M params, {t['images_per_s']:.0f} "
                     f"img/s; student {s['arch']} {s['params'] / 1e6:.2f} M params, {s['images_per_s']:.0f} img/s "
                     f"(forward, batch 64, this CPU); distillation {d['distill']['steps']} steps, loss "
                     f"{d['distill']['first_loss']:.3f} -> {d['distill']['last_loss']:.3f}, "
                     f"{d['wall_s']['distill']:.0f} s; student from scratch {d['wall_s']['student_scratch']:.0f} s.")
    return "\n\nDown-A:\n" + "\n".join(lines) if lines else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", nargs="+", default=["random=random:eva_demo"],
                   help="NAME=PATH (a stage checkpoint) or NAME=random:ARCH (an untrained backbone)")
    p.add_argument("--data", default=",".join(DOWNSTREAM), help="comma list of downstream specs (gvb/*, idx:, folder:, coco:)")
    p.add_argument("--percent", type=float, nargs="+", default=[10, 100])
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=150, help="optimisation steps per head fit")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-2], help="learning-rate grid")
    p.add_argument("--wd", type=float, nargs="+", default=[1e-4], help="weight-decay grid")
    p.add_argument("--max-train", type=int, default=None, help="cap every training split (first N samples)")
    p.add_argument("--max-test", type=int, default=None, help="cap every test split (first N samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/probe")
    a = p.add_argument_group("Down-A (--adapt lpft|distill merge their rows into OUT/gvb.json)")
    a.add_argument("--adapt", default="linear", choices=ADAPTS, help="linear probe only (GV-B), LP-FT, or distillation")
    a.add_argument("--layer-decay", type=float, default=0.9, help="lpft: block i of D trains at lr * decay**(D - i)")
    a.add_argument("--ft-lr", type=float, nargs="+", default=list(Recipe.lrs), help="lpft: fine-tuning lr; several = selected on the held-out fifth (each adds ~0.8 of a fit)")
    a.add_argument("--ft-wd", type=float, default=Recipe.wd)
    a.add_argument("--ft-epochs", type=float, default=Recipe.epochs,
                   help="lpft and the scratch student: epochs over the subset per fit (steps grow with it)")
    a.add_argument("--ft-min-steps", type=int, default=Recipe.min_steps, help="floor on the steps of a fit")
    a.add_argument("--ft-batch", type=int, default=Recipe.batch_size)
    a.add_argument("--student", default="eva_demo", help="distill: the student architecture (eva_demo, metanet_demo, ...)")
    a.add_argument("--student-lr", type=float, nargs="+", default=[1e-3], help="distill: lr(s) of the student trained from scratch (several = selected as --ft-lr)")
    a.add_argument("--distill-epochs", type=float, default=DistillRecipe.epochs)
    a.add_argument("--distill-lr", type=float, default=DistillRecipe.lr)
    a.add_argument("--distill-loss", default=DistillRecipe.loss, choices=DISTILL_LOSSES)
    args = p.parse_args(argv)
    models = parse_models(args.ckpt)
    percents = [int(x) if float(x).is_integer() else x for x in args.percent]
    grid = [(lr, wd) for lr in args.lr for wd in args.wd]
    if not 0 < args.layer_decay <= 1:
        raise SystemExit(f"--layer-decay {args.layer_decay}: use a value in (0, 1] (EVA: 0.85-0.95; 1 = none)")
    if args.adapt == "distill" and len(models) != 1:
        raise SystemExit(f"--adapt distill distils one teacher; got {len(models)} --ckpt entries ({', '.join(models)}): "
                         f"pass only the teacher, e.g. --ckpt generalist=runs/demo/generalist/last.pt")
    import stages
    if args.adapt == "distill" and args.student not in stages.valid_archs():
        raise SystemExit(f"--student {args.student!r} is unknown; valid archs: {', '.join(stages.valid_archs())}")
    ft = Recipe(tuple(args.ft_lr), args.ft_wd, args.layer_decay, args.ft_epochs, args.ft_min_steps, args.ft_batch)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    info = {}
    timings = {}
    try:
        if args.adapt == "distill":
            (name, spec), = models.items()
            scratch = Recipe(tuple(args.student_lr), args.ft_wd, 1.0, args.ft_epochs, args.ft_min_steps, args.ft_batch)
            rows, info = run_distill(name, spec, args.student, args.data.split(","), percents, args.img_size,
                                     args.steps, grid, args.seed, args.max_train, args.max_test,
                                     DistillRecipe(args.distill_epochs, args.distill_lr, loss=args.distill_loss), scratch)
        else:
            lpft = ft if args.adapt == "lpft" else None
            viz = os.path.join(args.out, "viz") if args.adapt == "linear" else None   # adapt runs leave the pictures
            rows = run_probe(models, args.data.split(","), percents, args.img_size, args.steps, grid, args.seed,
                             viz_dir=viz, max_train=args.max_train, max_test=args.max_test, lpft=lpft,
                             timings=timings)
            info = {"models": list(models), "layer_decay": args.layer_decay, "lrs": args.ft_lr,
                    "epochs": args.ft_epochs, "wall_s": {n: t["lpft_s"] for n, t in timings.items()}}
    except (stages.CheckpointError, stages.TrainingDiverged, ValueError) as e:   # bad checkpoint, spec, size, lr
        raise SystemExit(f"probe.py: {e}")
    wall = time.time() - t0
    path = os.path.join(args.out, "gvb.json")
    if args.adapt == "linear":
        doc = {"rows": rows, "config": vars(args)}
    else:
        doc = merge_rows(path, rows, vars(args))
        adapt_path = os.path.join(args.out, "adapt.json")
        try:
            with open(adapt_path) as f:
                adapt = json.load(f)
        except (OSError, ValueError):
            adapt = {}                      # none yet (or unreadable): this run's entry starts it
        adapt[args.adapt] = {**info, "wall_s_total": wall}
        with open(adapt_path, "w") as f:
            json.dump(adapt, f, indent=1)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    table = markdown(doc["rows"])
    if args.adapt != "linear":
        table += adapt_markdown(adapt)
    with open(os.path.join(args.out, "gvb.md"), "w") as f:
        f.write(table + "\n")
    if args.adapt == "linear":   # what `bench.py pipeline` reads; an adapt run leaves the probe's
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"stage": "probe", "steps": args.steps, "models": len(models), "wall_s": wall}, f)
    print(table)
    print(f"[probe] --adapt {args.adapt}: {wall:.1f}s")


if __name__ == "__main__":
    main()
