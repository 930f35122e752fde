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
"""
import argparse
import json
import math
import os
import time

import torch
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
    backbone's pooled features barely vary from image to image)."""
    mean, std = train.pooled.mean(0), train.pooled.std(0) + 1e-6                  # (F,)
    for f in (train, test):
        f.pooled = (f.pooled - mean) / std
    if train.levels is None:
        return
    for k, level in enumerate(train.levels):
        m, sd = level.mean((0, 2, 3), keepdim=True), level.std((0, 2, 3), keepdim=True) + 1e-6
        for f in (train, test):
            f.levels[k] = (f.levels[k] - m) / sd


# ----------------------------------------------------------------------------- heads on cached features

def fit_head(task, num_classes, feats: Features, idx: torch.Tensor, lr: float, wd: float,
             steps: int, batch_size: int = 64, seed: int = 0):
    """Train a fresh head of `task` on the cached features `idx` with AdamW + cosine."""
    torch.manual_seed(seed)
    channels, strides, num_features = feats.geometry
    head = tasks.build_head(task, channels, strides, num_features, num_classes)
    if task == "depth":
        # start at the subset's mean log depth, as a classifier's bias may start at the log prior:
        # otherwise a short fit spends its steps walking the bias from 1 m to the scene's scale
        depth = feats.targets["depth"][idx]
        with torch.no_grad():
            head.proj[0].bias.fill_(depth[depth > 0].log().mean().item())
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
def score(task, head, feats: Features, idx: torch.Tensor, batch_size: int = 256) -> dict:
    outs, batches = [], []
    for start in range(0, len(idx), batch_size):
        levels, pooled, batch = feats.batch(idx[start:start + batch_size])
        outs.append(head(levels, pooled))
        batches.append(batch)
    return tasks.evaluate(task, head, outs, batches)


def probe_one(task, num_classes, train: Features, test: Features, subset_idx: torch.Tensor, grid, steps, seed):
    """Model selection on a held-out fifth of the training subset, refit on all of it, test once."""
    metric, higher = SELECT[task]
    g = torch.Generator().manual_seed(seed)
    perm = subset_idx[torch.randperm(len(subset_idx), generator=g)]
    n_val = max(1, len(perm) // 5)
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    best, best_hp = None, None
    for lr, wd in grid:
        head = fit_head(task, num_classes, train, fit_idx, lr, wd, steps, seed=seed)
        value = score(task, head, train, val_idx)[metric]
        if best is None or (value > best if higher else value < best):
            best, best_hp = value, (lr, wd)
    head = fit_head(task, num_classes, train, subset_idx, *best_hp, steps, seed=seed)
    result = score(task, head, test, torch.arange(len(test)))
    result.update(lr=best_hp[0], wd=best_hp[1], val=best, n_train=len(subset_idx))
    return result, head


# ----------------------------------------------------------------------------- the benchmark

def capped(dataset, limit):
    """The first `limit` samples (samples are i.i.d. draws, so a prefix is a fixed random subset)."""
    return dataset if not limit or limit >= len(dataset) else data.Subset(dataset, list(range(limit)))


def run_probe(models: dict, specs, percents, img_size=64, steps=150, grid=None, seed=0, viz_dir=None,
              max_train=None, max_test=None, log=print):
    """models: name -> backbone spec (see load_backbone). Returns the list of table rows.
    max_train / max_test cap every split (the CPU demo uses them to stay within its time goal)."""
    grid = grid or [(1e-3, 1e-4), (1e-2, 1e-4)]
    backbones = {name: load_backbone(spec) for name, spec in models.items()}   # a bad file fails fast
    datasets = {s: (capped(data.build_dataset(s, "train", img_size, seed), max_train),
                    capped(data.build_dataset(s, "test", img_size, seed), max_test)) for s in specs}
    for s, (train_set, _) in datasets.items():
        if train_set.task not in SELECT:
            raise ValueError(f"{s}: task {train_set.task!r} has no probe; probe tasks are {sorted(SELECT)}")
    splits = {s: (Split(tr, f"render {s} train"), Split(te, f"render {s} test")) for s, (tr, te) in datasets.items()}
    rows = []
    for name, backbone in backbones.items():
        t0 = time.time()
        per_percent = {p: {} for p in percents}
        for s, (train_set, test_set) in datasets.items():
            task = train_set.task
            dense = task != "cls"
            train = Features(backbone, splits[s][0], dense)
            test = Features(backbone, splits[s][1], dense)
            standardise(train, test)
            for p in percents:
                subset = data.percent_subset(train_set, p, seed=seed)
                idx = torch.as_tensor(subset.indices, dtype=torch.long)
                result, head = probe_one(task, train_set.num_classes, train, test, idx, grid, steps, seed)
                per_percent[p][s] = result
            if viz_dir and name == list(models)[-1] and dense:
                draw_predictions(s, splits[s][1], test, head, viz_dir)
            del train, test
        for p in percents:
            rows.append(make_row(name, p, per_percent[p], {s: d[0].task for s, d in datasets.items()}))
        log(f"[probe] {name}: {time.time() - t0:.1f}s  " +
            "  ".join(f"{p}%: " + summary_text(rows[-len(percents) + i]) for i, p in enumerate(percents)))
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
    """INTERN Table-1 style: one line per (model, percent), one column per downstream set."""
    sets = list(rows[0]["sets"]) if rows else []
    metric_of = {s: next(m for t, (c, m, h) in SUMMARY.items() if m in rows[0]["sets"][s]) for s in sets}
    arrow = {m: ("↑" if h else "↓") for _, (_, m, h) in SUMMARY.items()}
    head = ["model", "data %"] + [f"{s} {metric_of[s]} {arrow[metric_of[s]]}" for s in sets] + \
        [f"{c} {'↑' if h else '↓'}" for c, _, h in SUMMARY.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["percent"])]
        cells += [_fmt(r["sets"][s][metric_of[s]], metric_of[s]) for s in sets]
        cells += [_fmt(r[c], m) for c, m, _ in SUMMARY.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + \
        "\n\nAccuracy (mean per class), AP50 and mIoU in %; RMSE in metres. ↑ higher is better, ↓ lower."


def _fmt(value, metric) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if metric == "RMSE" else f"{100 * value:.1f}"


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
    args = p.parse_args(argv)
    models = parse_models(args.ckpt)
    percents = [int(x) if float(x).is_integer() else x for x in args.percent]
    grid = [(lr, wd) for lr in args.lr for wd in args.wd]
    os.makedirs(args.out, exist_ok=True)
    import stages
    t0 = time.time()
    try:
        rows = run_probe(models, args.data.split(","), percents, args.img_size, args.steps, grid, args.seed,
                         viz_dir=os.path.join(args.out, "viz"), max_train=args.max_train, max_test=args.max_test)
    except (stages.CheckpointError, ValueError) as e:   # bad checkpoint, spec, size: say it, no traceback
        raise SystemExit(f"probe.py: {e}")
    with open(os.path.join(args.out, "gvb.json"), "w") as f:
        json.dump({"rows": rows, "config": vars(args)}, f, indent=1)
    table = markdown(rows)
    with open(os.path.join(args.out, "gvb.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:   # what `bench.py pipeline` reads
        json.dump({"stage": "probe", "steps": args.steps, "models": len(models), "wall_s": time.time() - t0}, f)
    print(table)


if __name__ == "__main__":
    main()
