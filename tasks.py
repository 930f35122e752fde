"""Task heads, their losses and their metrics: cls, multilabel, det, seg, depth.

Everything downstream of a backbone lives here, shared by the experts (stages.py, Up-E), the
generalist (Up-G) and the linear probe (probe.py, GV-B-mini). A head only ever sees what
`backbone.forward_levels(x)` returns -- 4 maps `levels[k]` (B, C_k, H_k, W_k) at strides
`level_strides[k]` and the pooled feature (B, num_features) -- so it runs equally on live
features and on features the probe cached once. Every head has the same three methods:

    out = head(levels, pooled)            # raw outputs (logits, maps, ...)
    loss, terms = head.loss(out, batch)   # scalar to minimise, dict of named detached terms
    pred = head.predict(out)              # what the metric consumes

    task        head (on what)                         loss                      metric(s)
    cls         Linear (pooled)                        cross-entropy             top-1, mean per-class acc.
    multilabel  Linear, one logit per class (pooled)   BCE with logits           mAP over classes
    det         CenterNet-style dense head (levels)    focal heatmap + L1 boxes  AP50 (VOC all-point)
    seg         1x1 conv per level, upsampled, summed  CE, ignore 255            mIoU
    depth       1x1 conv per level -> log depth        L1 on log depth           RMSE

Batch keys (data.py's collate): `label` (B,), `labels` (B, C) multi-hot, `boxes` (B, K, 4) xyxy
pixels + `box_labels` (B, K) padded with -1 (object classes are 0..num_classes-1), `seg`
(B, H, W) with 0 = background and 255 = ignore, `depth` (B, H, W) positive.
Metrics return Python floats; fractions in [0, 1] (accuracy, AP, IoU), metres-like units for RMSE.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TASKS = ("cls", "multilabel", "det", "seg", "depth")
# the number each task is judged by (probe tables, model selection), and whether higher is better
PRIMARY_METRIC = {"cls": ("top1", True), "multilabel": ("mAP", True), "det": ("AP50", True),
                  "seg": ("mIoU", True), "depth": ("RMSE", False)}


# ============================================================================== metrics

def accuracy(logits_or_pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]. Accepts logits (N, C) or predicted labels (N,)."""
    pred = logits_or_pred.argmax(-1) if logits_or_pred.ndim == 2 else logits_or_pred
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ")
    return (pred == target).float().mean().item()


def mean_class_accuracy(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of per-class recall (the confusion matrix's diagonal / row sums), the
    GV-B metric for unbalanced sets. Classes absent from `target` are skipped (no row to divide)."""
    pred = pred.argmax(-1) if pred.ndim == 2 else pred
    correct = torch.bincount(target[pred == target], minlength=num_classes).float()
    total = torch.bincount(target, minlength=num_classes).float()
    present = total > 0
    return (correct[present] / total[present]).mean().item()


def mean_average_precision(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Multi-label mAP: for each class, rank the samples by score and average the precision at
    the rank of every positive (non-interpolated ranking AP); then the mean over classes.
    scores, targets (N, C); classes with no positive are skipped; ties keep the sample order.
    Returns nan when no class has a positive."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and targets {tuple(targets.shape)} "
                         f"must both be (N, C)")
    aps = []
    for c in range(scores.shape[1]):
        hits = targets[:, c][torch.argsort(scores[:, c], descending=True, stable=True)] > 0.5
        if hits.sum() == 0:
            continue
        precision_at_k = hits.double().cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.double,
                                                              device=hits.device)
        aps.append(precision_at_k[hits].mean().item())
    return sum(aps) / len(aps) if aps else float("nan")


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes a (N, 4) and b (M, 4) -> (N, M). Continuous coordinates (no +1)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])                  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)                             # (N, M)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-12)


def average_precision(preds: list, targets: list, iou: float = 0.5) -> float:
    """Detection AP at one IoU threshold, averaged over the classes that have ground truth.

    preds: per image {boxes (K, 4), scores (K,), labels (K,)}; targets: per image {boxes, labels}.
    Per class, every detection of the dataset is visited by decreasing score (ties: image order,
    then order within the image) and matched to the ground truth it overlaps most in its image
    (VOC devkit convention): a true positive if that IoU >= `iou` and the ground truth was not
    matched before, else a false positive -- each ground truth is matched at most once.
    AP = area under the precision envelope, all recall points (VOC 2010+ interpolation).
    Detections of a class without ground truth anywhere do not count. nan if no ground truth."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets: give one dict per image")
    classes = sorted({int(c) for t in targets for c in t["labels"].tolist()})
    aps = []
    for c in classes:
        scores, is_tp = [], []
        npos = 0
        for p, t in zip(preds, targets):
            gt = t["boxes"][t["labels"] == c].double()
            npos += len(gt)
            keep = p["labels"] == c
            boxes, s = p["boxes"][keep].double(), p["scores"][keep].double()
            if len(s) == 0:
                continue
            # VOC: a detection's candidate is its best-overlapping ground truth, taken or not, so
            # it is fixed before the greedy pass; the pass only tracks which are already taken
            if len(gt):
                best_iou, best = box_iou(boxes, gt).max(1)
            else:                          # nothing to match in this image: all false positives
                best_iou, best = torch.zeros(len(s)), torch.zeros(len(s), dtype=torch.long)
            order = torch.argsort(s, descending=True, stable=True).tolist()
            best_iou, best, s = best_iou.tolist(), best.tolist(), s.tolist()
            taken = [False] * len(gt)
            for i in order:                # within one image, higher scores claim ground truth first
                ok = best_iou[i] >= iou and not taken[best[i]]
                if ok:
                    taken[best[i]] = True
                scores.append(s[i])
                is_tp.append(ok)
        if not scores:
            aps.append(0.0)
            continue
        # the greedy pass above is per image; matches never cross images, so ranking all
        # detections globally afterwards gives the same TP/FP labels as one global pass
        order = torch.argsort(torch.tensor(scores, dtype=torch.double), descending=True, stable=True)
        tp = torch.tensor(is_tp, dtype=torch.double)[order]
        ctp, cfp = tp.cumsum(0), (1 - tp).cumsum(0)
        recall = ctp / npos
        precision = ctp / (ctp + cfp)
        aps.append(_all_point_ap(recall, precision))
    return sum(aps) / len(aps) if aps else float("nan")


def _all_point_ap(recall: torch.Tensor, precision: torch.Tensor) -> float:
    """Area under the precision envelope (VOC 2010+): precision at recall r is replaced by the
    best precision at any recall >= r, then integrated over every recall step."""
    r = torch.cat([recall.new_zeros(1), recall, recall.new_ones(1)])
    p = torch.cat([precision.new_zeros(1), precision, precision.new_zeros(1)])
    p = torch.flip(torch.cummax(torch.flip(p, [0]), 0).values, [0])     # envelope from the right
    steps = torch.nonzero(r[1:] != r[:-1]).flatten()
    return ((r[steps + 1] - r[steps]) * p[steps + 1]).sum().item()


def miou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """Mean IoU over classes from the confusion matrix of all non-ignored pixels (background,
    class 0, counts as a class as in VOC). A class absent from both prediction and target (on the
    valid pixels) has no IoU (0/0) and is skipped rather than counted as 0 or 1."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    valid = target != ignore_index
    p, t = pred[valid].long(), target[valid].long()
    if (t < 0).any() or (t >= num_classes).any() or (p < 0).any() or (p >= num_classes).any():
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")
    conf = torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter          # FP + FN + TP
    present = union > 0
    return (inter[present] / union[present]).mean().item() if present.any() else float("nan")


def rmse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor = None) -> float:
    """Root mean squared error over the valid pixels of the whole set (pooled over images, not a
    mean of per-image RMSEs). valid=None: every pixel with a finite, positive target depth."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if valid is None:
        valid = torch.isfinite(target) & (target > 0)
    d = (pred.double() - target.double())[valid]
    return d.pow(2).mean().sqrt().item() if d.numel() else float("nan")


# ============================================================================== heads

def _input_size(levels, level_strides):
    """The image size the levels came from: finest map x its stride (64 px at stride 4: 16x16)."""
    h, w = levels[0].shape[-2:]
    return h * level_strides[0], w * level_strides[0]


class Head(nn.Module):
    """Common interface; see the module docstring."""
    task = ""

    def loss(self, out, batch):
        raise NotImplementedError

    def predict(self, out):
        raise NotImplementedError


class ClsHead(Head):
    """Linear classifier on the pooled feature (GV-B's linear probe: one nn.Linear)."""
    task = "cls"

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)   # small: starts near uniform predictions
        nn.init.zeros_(self.fc.bias)

    def forward(self, levels, pooled):
        return self.fc(pooled)                                          # (B, num_classes)

    def loss(self, out, batch):
        loss = F.cross_entropy(out, batch["label"])
        return loss, {"ce": loss.detach()}

    def predict(self, out):
        return out.argmax(-1)                                           # (B,)


class MultiLabelHead(ClsHead):
    """One independent logit per class; BCE with logits against the multi-hot `labels`."""
    task = "multilabel"

    def loss(self, out, batch):
        loss = F.binary_cross_entropy_with_logits(out, batch["labels"].to(out.dtype))
        return loss, {"bce": loss.detach()}

    def predict(self, out):
        return out.sigmoid()                                            # (B, C) scores for mAP


class DenseHead(Head):
    """seg / depth linear probe (GV-B-mini): a 1x1 conv per level, upsampled (bilinear) and
    summed. The out_ch-channel outputs are brought to the finest level's grid, summed there and
    upsampled to the input size once: still a linear map of the levels, and one full-size
    interpolation instead of four (none at all between EVA's equal-stride levels)."""

    def __init__(self, level_channels, level_strides, out_ch: int):
        super().__init__()
        self.level_strides = list(level_strides)
        self.proj = nn.ModuleList([nn.Conv2d(c, out_ch, 1) for c in level_channels])
        for conv in self.proj:
            nn.init.trunc_normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, levels, pooled):
        size = _input_size(levels, self.level_strides)
        fine = max(levels, key=lambda f: f.shape[-1] * f.shape[-2]).shape[-2:]
        out = 0
        for conv, f in zip(self.proj, levels):
            y = conv(f)                                                 # (B, out_ch, H_k, W_k)
            out = out + (y if y.shape[-2:] == fine else F.interpolate(y, size=fine, mode="bilinear",
                                                                       align_corners=False))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=False)   # (B, out_ch, H, W)

    @staticmethod
    def _fit(out, target):
        """Resize the output to the target's (H, W) when they differ (odd input sizes)."""
        if out.shape[-2:] != target.shape[-2:]:
            out = F.interpolate(out, size=target.shape[-2:], mode="bilinear", align_corners=False)
        return out


class SegHead(DenseHead):
    task = "seg"

    def __init__(self, level_channels, level_strides, num_classes: int):
        super().__init__(level_channels, level_strides, num_classes)
        self.num_classes = num_classes

    def loss(self, out, batch):
        target = batch["seg"]
        if not (target != 255).any():             # all ignored: CE's mean would be 0/0
            loss = out.sum() * 0
        else:
            loss = F.cross_entropy(self._fit(out, target), target, ignore_index=255)
        return loss, {"ce": loss.detach()}

    def predict(self, out):
        return out.argmax(1)                                            # (B, H, W)


class DepthHead(DenseHead):
    """Predicts log depth linearly; depth = exp(.) is positive by construction. Loss: L1 between
    log depths = mean |log(pred/target)|, a relative error, so near and far pixels weigh alike
    (an L2 on metres would be ruled by the far ones), yet the absolute scale is still learned
    (unlike a fully scale-invariant loss), which RMSE, the metric, needs."""
    task = "depth"

    def __init__(self, level_channels, level_strides):
        super().__init__(level_channels, level_strides, 1)

    def loss(self, out, batch):
        target = batch["depth"]
        log_pred = self._fit(out, target)[:, 0]                         # (B, H, W)
        valid = (target > 0) & (target < float("inf"))                  # NaN fails both tests
        # masked mean without boolean indexing (which copies and is slow on big maps);
        # an all-invalid batch gives 0 with a zero gradient instead of 0/0
        log_target = torch.where(valid, target, torch.ones_like(target)).log()
        err = torch.where(valid, (log_pred - log_target).abs(), torch.zeros_like(log_pred))
        loss = err.sum() / valid.sum().clamp(min=1)
        return loss, {"l1_log": loss.detach()}

    def predict(self, out):
        return out[:, 0].clamp(max=30).exp()                            # (B, H, W) depth


class DetHead(Head):
    """A light CenterNet-style detector on the frozen (or live) levels.

    Neck: 1x1 conv per level to `width` channels, bilinear resize to the finest level, sum,
    GroupNorm (features of different backbones differ wildly in scale), 3x3 conv + ReLU.
    Heads (1x1 convs) at the finest stride s:
      heatmap (num_classes): one peak per object at the cell holding its centre; focal loss
      regression (4): centre offset inside the cell (dx, dy) and log box size in cells
                      (log w/s, log h/s); L1 at the centre cells only
    Decoding: sigmoid heatmap, local maxima (3x3 max-pool == itself, the "NMS"), top-k over
    classes x cells, boxes clipped to the image (= finest map x stride)."""
    task = "det"

    def __init__(self, level_channels, level_strides, num_classes: int, width: int = 64,
                 topk: int = 100):
        super().__init__()
        self.num_classes, self.topk = num_classes, topk
        self.stride = level_strides[0]
        self.level_strides = list(level_strides)
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in level_channels])
        self.norm = nn.GroupNorm(math.gcd(8, width), width)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.heatmap = nn.Conv2d(width, num_classes, 1)
        self.reg = nn.Conv2d(width, 4, 1)
        # CenterNet / RetinaNet prior: start every cell at p = 0.1 so the many negatives do not
        # swamp the first steps of the focal loss
        nn.init.constant_(self.heatmap.bias, -math.log((1 - 0.1) / 0.1))
        nn.init.zeros_(self.reg.bias)

    def forward(self, levels, pooled):
        size = levels[0].shape[-2:]
        x = 0
        for conv, f in zip(self.lateral, levels):
            x = x + F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
        x = F.relu(self.conv(self.norm(x)))                             # (B, width, H0, W0)
        return {"heatmap": self.heatmap(x), "reg": self.reg(x)}         # (B, C, H0, W0), (B, 4, H0, W0)

    # -- training targets --------------------------------------------------------------------------
    def targets(self, boxes, box_labels, H: int, W: int):
        """Ground truth at the output grid. boxes (B, K, 4) xyxy pixels, box_labels (B, K) with -1
        padding -> heat (B, C, H, W) Gaussians peaking at exactly 1 on each centre cell, and for
        the M real boxes: their (b, y, x) cells (M,) x3 and regression targets (M, 4)."""
        s = self.stride
        valid = box_labels >= 0
        b_idx, k_idx = torch.nonzero(valid, as_tuple=True)               # (M,), (M,)
        bx = boxes[b_idx, k_idx].float() / s                             # (M, 4) in cells
        labels = box_labels[b_idx, k_idx]
        cx, cy = (bx[:, 0] + bx[:, 2]) / 2, (bx[:, 1] + bx[:, 3]) / 2
        w, h = (bx[:, 2] - bx[:, 0]).clamp(min=1e-2), (bx[:, 3] - bx[:, 1]).clamp(min=1e-2)
        ix, iy = cx.floor().clamp(0, W - 1).long(), cy.floor().clamp(0, H - 1).long()
        reg = torch.stack([cx - ix, cy - iy, w.log(), h.log()], dim=1)   # (M, 4)

        # elliptical Gaussian per box (TTFNet: sigma = 0.54 * side / 6), floored so tiny boxes
        # still soften their neighbours; exp(0) = 1 exactly at the centre cell = the positive
        sx, sy = (0.09 * w).clamp(min=0.3), (0.09 * h).clamp(min=0.3)
        ys = torch.arange(H, device=boxes.device, dtype=torch.float32)
        xs = torch.arange(W, device=boxes.device, dtype=torch.float32)
        gy = ((ys[None] - iy[:, None]) ** 2) / (2 * sy[:, None] ** 2)    # (M, H)
        gx = ((xs[None] - ix[:, None]) ** 2) / (2 * sx[:, None] ** 2)    # (M, W)
        g = torch.exp(-(gy[:, :, None] + gx[:, None, :]))                # (M, H, W)
        heat = torch.zeros(boxes.shape[0] * self.num_classes, H * W, device=boxes.device)
        slot = (b_idx * self.num_classes + labels)[:, None].expand(-1, H * W)   # (M, H*W): its map
        heat.scatter_reduce_(0, slot, g.flatten(1), "amax")              # overlapping objects: max
        return heat.view(-1, self.num_classes, H, W), (b_idx, iy, ix), reg

    def loss(self, out, batch):
        hm, reg = out["heatmap"], out["reg"]
        if (batch["box_labels"] >= self.num_classes).any():
            raise ValueError(f"box_labels must lie in [0, {self.num_classes}) (or -1 for padding)")
        heat, (b, y, x), reg_t = self.targets(batch["boxes"], batch["box_labels"], *hm.shape[-2:])
        # CenterNet's focal loss: positives are the exact peaks; near-peak negatives are
        # down-weighted by (1 - heat)^4, easy cells by p^2 / (1 - p)^2
        pos = heat == 1
        logp, log1mp = F.logsigmoid(hm), F.logsigmoid(-hm)
        p = hm.sigmoid()
        pos_term = ((1 - p) ** 2 * logp)[pos].sum()
        neg_term = ((1 - heat) ** 4 * p ** 2 * log1mp)[~pos].sum()
        focal = -(pos_term + neg_term) / pos.sum().clamp(min=1)
        box = (reg[b, :, y, x] - reg_t).abs().mean() if len(b) else hm.sum() * 0   # (M, 4) at centres
        loss = focal + box
        return loss, {"focal": focal.detach(), "box_l1": box.detach()}

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, out):
        """-> one dict per image: boxes (k, 4) xyxy pixels inside the image, scores (k,), labels (k,)."""
        hm, reg = out["heatmap"].sigmoid(), out["reg"]
        B, C, H, W = hm.shape
        s = self.stride
        peaks = hm * (hm == F.max_pool2d(hm, 3, stride=1, padding=1))   # keep local maxima only
        k = min(self.topk, C * H * W)
        scores, idx = peaks.flatten(1).topk(k)                           # (B, k) over classes x cells
        labels, cell = idx // (H * W), idx % (H * W)
        y, x = cell // W, cell % W
        r = reg.flatten(2).gather(2, cell[:, None, :].expand(-1, 4, -1))  # (B, 4, k)
        cx, cy = (x + r[:, 0]) * s, (y + r[:, 1]) * s
        w = r[:, 2].clamp(max=math.log(4 * max(H, W))).exp() * s
        h = r[:, 3].clamp(max=math.log(4 * max(H, W))).exp() * s
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)  # (B, k, 4)
        boxes[..., 0::2] = boxes[..., 0::2].clamp(0, W * s)
        boxes[..., 1::2] = boxes[..., 1::2].clamp(0, H * s)
        return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(B)]


def build_head(task: str, level_channels, level_strides, num_features: int, num_classes: int,
               img_size: int = None, **options) -> Head:
    """The head for `task` on a backbone described by its level channels / strides and pooled
    width. num_classes: classes (cls, multilabel), object classes (det), classes including
    background (seg); ignored for depth. img_size is accepted for symmetry with the backbones;
    the heads read the actual size off the levels. options: det's `width`, `topk`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if len(level_channels) != len(level_strides):
        raise ValueError(f"{len(level_channels)} level channels but {len(level_strides)} strides")
    if task != "det" and options:
        raise ValueError(f"options {sorted(options)} only apply to task='det' (width, topk)")
    if task != "depth" and num_classes < 1:
        raise ValueError(f"task {task!r} needs num_classes >= 1, got {num_classes}")
    if task == "cls":
        return ClsHead(num_features, num_classes)
    if task == "multilabel":
        return MultiLabelHead(num_features, num_classes)
    if task == "det":
        return DetHead(level_channels, level_strides, num_classes, **options)
    if task == "seg":
        return SegHead(level_channels, level_strides, num_classes)
    return DepthHead(level_channels, level_strides)


def head_for(task: str, backbone: nn.Module, num_classes: int = 0, **options) -> Head:
    """build_head() with the geometry read off any backbone of the contract (or a Generalist)."""
    return build_head(task, backbone.level_channels, backbone.level_strides, backbone.num_features,
                      num_classes, backbone.img_size, **options)


class MultiHead(nn.ModuleDict):
    """One head per source (sources with different label spaces, DESIGN §5.6); the caller sums
    the per-source losses. `heads[source](levels, pooled)` picks one; this only adds names."""

    def forward(self, levels, pooled, source: str):
        if source not in self:
            raise ValueError(f"unknown source {source!r}; this MultiHead has {list(self.keys())}")
        return self[source](levels, pooled)

    def loss(self, out, batch, source: str):
        return self[source].loss(out, batch)

    def predict(self, out, source: str):
        return self[source].predict(out)


# ============================================================================== evaluation

def det_targets(batch) -> list:
    """Padded `boxes` / `box_labels` of a batch -> one {boxes, labels} dict per image."""
    out = []
    for boxes, labels in zip(batch["boxes"], batch["box_labels"]):
        keep = labels >= 0
        out.append({"boxes": boxes[keep], "labels": labels[keep]})
    return out


@torch.no_grad()
def evaluate(task: str, head: Head, outputs_list: list, batches_list: list) -> dict:
    """Metrics of a task over a whole set, from the head outputs of each batch and the batches.
    -> {"top1", "mean_class_acc"} | {"mAP"} | {"AP50"} | {"mIoU"} | {"RMSE"}."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if len(outputs_list) != len(batches_list):
        raise ValueError(f"{len(outputs_list)} outputs for {len(batches_list)} batches")
    if task in ("seg", "depth"):
        # predict at the label's resolution (a no-op when the input size is a stride multiple)
        key = "seg" if task == "seg" else "depth"
        outputs_list = [DenseHead._fit(o, b[key]) for o, b in zip(outputs_list, batches_list)]
    preds = [head.predict(o) for o in outputs_list]
    if task == "cls":
        p = torch.cat(preds).cpu()
        t = torch.cat([b["label"] for b in batches_list]).cpu()
        return {"top1": accuracy(p, t), "mean_class_acc": mean_class_accuracy(p, t, head.num_classes)}
    if task == "multilabel":
        return {"mAP": mean_average_precision(torch.cat(preds).cpu(),
                                              torch.cat([b["labels"] for b in batches_list]).cpu())}
    if task == "det":
        dets = [{k: v.cpu() for k, v in d.items()} for p in preds for d in p]
        gts = [{k: v.cpu() for k, v in d.items()} for b in batches_list for d in det_targets(b)]
        return {"AP50": average_precision(dets, gts, iou=0.5)}
    if task == "seg":
        t = torch.cat([b["seg"] for b in batches_list]).cpu()
        return {"mIoU": miou(torch.cat(preds).cpu(), t, head.num_classes)}
    t = torch.cat([b["depth"] for b in batches_list]).cpu()
    return {"RMSE": rmse(torch.cat(preds).cpu(), t)}
