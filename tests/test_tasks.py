"""tasks.py: metrics against hand-computed cases and naive re-implementations, heads on both demo
backbones (shapes, finite losses, gradients), the detector's encode/decode round trip and a tiny
overfit that ties loss, decoding and AP50 together."""
import math

import pytest
import torch

import eva
import metanet
import tasks


# ----------------------------------------------------------------------------- naive references

def naive_ap_ranking(scores, targets):
    """Per class: mean over positives i of (#positives scoring >= s_i) / (#samples scoring >= s_i)
    (distinct scores), then the mean over classes with a positive."""
    aps = []
    for c in range(scores.shape[1]):
        s, t = scores[:, c].tolist(), targets[:, c].tolist()
        pos = [i for i in range(len(s)) if t[i] > 0.5]
        if not pos:
            continue
        per = []
        for i in pos:
            above = [j for j in range(len(s)) if s[j] >= s[i]]
            per.append(sum(t[j] > 0.5 for j in above) / len(above))
        aps.append(sum(per) / len(per))
    return sum(aps) / len(aps)


def naive_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def naive_det_ap(preds, targets, thr=0.5):
    """One global pass over all detections of a class (VOC devkit style), plain Python lists."""
    classes = sorted({c for t in targets for c in t["labels"].tolist()})
    aps = []
    for c in classes:
        gts = [[b for b, l in zip(t["boxes"].tolist(), t["labels"].tolist()) if l == c] for t in targets]
        npos = sum(len(g) for g in gts)
        dets = [(s, i, b) for i, p in enumerate(preds)
                for b, s, l in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()) if l == c]
        dets.sort(key=lambda d: -d[0])
        used = [[False] * len(g) for g in gts]
        tp = []
        for s, i, b in dets:
            ious = [naive_iou(b, g) for g in gts[i]]
            if ious and max(ious) >= thr and not used[i][ious.index(max(ious))]:
                used[i][ious.index(max(ious))] = True
                tp.append(1)
            else:
                tp.append(0)
        rec, prec, n_tp = [], [], 0
        for n, hit in enumerate(tp, 1):
            n_tp += hit
            rec.append(n_tp / npos)
            prec.append(n_tp / n)
        # all-point: sum over each recall increase of the best precision at that recall or beyond
        ap, last_r = 0.0, 0.0
        for n in range(len(tp)):
            if rec[n] > last_r:
                ap += (rec[n] - last_r) * max(prec[n:])
                last_r = rec[n]
        aps.append(ap)
    return sum(aps) / len(aps)


# ----------------------------------------------------------------------------- classification metrics

def test_accuracy_and_mean_class_accuracy_unbalanced():
    # 8 samples of class 0, 2 of class 1; always predicting 0 is 80 % accurate, but the mean
    # per-class accuracy is (8/8 + 0/2) / 2 = 0.5; class 2 never occurs and is skipped
    target = torch.tensor([0] * 8 + [1] * 2)
    pred = torch.zeros(10, dtype=torch.long)
    assert tasks.accuracy(pred, target) == pytest.approx(0.8)
    assert tasks.mean_class_accuracy(pred, target, num_classes=3) == pytest.approx(0.5)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g)
    target = torch.multinomial(torch.tensor([0.6, 0.25, 0.1, 0.05, 0.0]), 200, True, generator=g)
    pred = logits.argmax(1)
    hits = sum(int(a == b) for a, b in zip(pred, target))
    assert tasks.accuracy(logits, target) == pytest.approx(hits / 200)
    per = [sum(int(p == c and t == c) for p, t in zip(pred, target)) / int((target == c).sum())
           for c in range(5) if (target == c).any()]
    assert tasks.mean_class_accuracy(logits, target, 5) == pytest.approx(sum(per) / len(per))


def test_multilabel_map():
    # class 0: ranking by score gives hits [1, 0, 1, 0] -> precisions at the hits 1/1 and 2/3
    #   -> AP = (1 + 2/3) / 2 = 5/6; class 1: its only positive is ranked last -> AP = 1/4;
    # class 2 has no positive and is skipped -> mAP = (5/6 + 1/4) / 2 = 13/24
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.2, 0.4], [0.7, 0.3, 0.3], [0.6, 0.0, 0.2]])
    targets = torch.tensor([[1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.float)
    assert tasks.mean_average_precision(scores, targets) == pytest.approx(13 / 24)

    g = torch.Generator().manual_seed(1)
    scores = torch.rand(40, 6, generator=g)
    targets = (torch.rand(40, 6, generator=g) < 0.3).float()
    assert tasks.mean_average_precision(scores, targets) == pytest.approx(naive_ap_ranking(scores, targets))
    # a perfect ranking scores 1
    assert tasks.mean_average_precision(targets + 0.01 * scores, targets) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- detection AP

def _box(x, y, w=10.0, h=10.0):
    return [x, y, x + w, y + h]


def test_average_precision_hand_case():
    # image 0, class 0: ground truths A, B, C; detections by score:
    #   .9 on A (TP), .8 nowhere (FP), .7 on A again (duplicate -> FP), .6 on B (TP); C is missed.
    #   recall    1/3, 1/3, 1/3, 2/3     precision 1, 1/2, 1/3, 1/2
    #   envelope at recall 1/3 is 1, at 2/3 is 1/2 -> AP = 1/3 * 1 + 1/3 * 1/2 = 1/2
    # image 1, class 1: one ground truth D; detections .95 shifted by 6 px (IoU 4*10/(200-40) =
    #   0.25, FP), .9 nowhere (FP), .5 on D (TP) -> precision 1/3 at recall 1 -> AP = 1/3
    # class 2 only has a (false) detection and no ground truth: ignored. mAP = (1/2 + 1/3) / 2 = 5/12
    targets = [
        {"boxes": torch.tensor([_box(0, 0), _box(20, 20), _box(40, 0)]), "labels": torch.tensor([0, 0, 0])},
        {"boxes": torch.tensor([_box(10, 10)]), "labels": torch.tensor([1])},
    ]
    preds = [
        {"boxes": torch.tensor([_box(0, 0), _box(60, 60), _box(1, 0), _box(20, 21), _box(5, 5)]),
         "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.99]), "labels": torch.tensor([0, 0, 0, 0, 2])},
        {"boxes": torch.tensor([_box(16, 10), _box(50, 50), _box(10, 10)]),
         "scores": torch.tensor([0.95, 0.9, 0.5]), "labels": torch.tensor([1, 1, 1])},
    ]
    assert tasks.average_precision(preds, targets) == pytest.approx(5 / 12)
    # at IoU 0.2 the shifted box (IoU 0.25) becomes the TP and the later exact one a duplicate:
    # class 1 precision 1 at recall 1 -> AP 1; class 0 unchanged -> (1/2 + 1) / 2
    assert tasks.average_precision(preds, targets, iou=0.2) == pytest.approx(3 / 4)


def test_average_precision_perfect_and_against_naive():
    g = torch.Generator().manual_seed(2)
    targets, perfect, noisy = [], [], []
    for _ in range(6):
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 50
        boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=g) * 15], 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
        perfect.append({"boxes": boxes.clone(), "scores": torch.rand(n, generator=g),
                        "labels": labels.clone()})
        # jittered copies (some fall under IoU 0.5), duplicates and random boxes, shuffled labels
        m = 3 * n
        src = boxes[torch.randint(0, n, (m,), generator=g)]
        jit = src + torch.randn(m, 4, generator=g) * 3
        lab = torch.where(torch.rand(m, generator=g) < 0.8, labels[torch.randint(0, n, (m,), generator=g)],
                          torch.randint(0, 3, (m,), generator=g))
        noisy.append({"boxes": jit, "scores": torch.rand(m, generator=g), "labels": lab})
    assert tasks.average_precision(perfect, targets) == pytest.approx(1.0)
    ap = tasks.average_precision(noisy, targets)
    assert 0.0 < ap < 1.0
    assert ap == pytest.approx(naive_det_ap(noisy, targets))
    assert tasks.average_precision(noisy, targets, 0.3) == pytest.approx(naive_det_ap(noisy, targets, 0.3))


# ----------------------------------------------------------------------------- dense metrics

def test_miou_with_ignored_pixels():
    # valid pixels (target, pred): (0,0) (0,1) (1,1) (1,1) (1,1) (2,2); the two ignored pixels
    # predict 2 and must not count as false positives of class 2.
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 3, FP 1 -> 3/4; class 2: TP 1 -> 1; class 3 absent
    # from both (skipped) -> mIoU = (1/2 + 3/4 + 1) / 3 = 3/4
    target = torch.tensor([[0, 0, 1, 1], [255, 255, 1, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 1, 2]])
    assert tasks.miou(pred, target, num_classes=4) == pytest.approx(0.75)

    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (3, 9, 9), generator=g)
    target[torch.rand(3, 9, 9, generator=g) < 0.2] = 255
    noise = torch.randint(0, 5, (3, 9, 9), generator=g)
    pred = torch.where(torch.rand(3, 9, 9, generator=g) < 0.6, target.clamp(max=4), noise)
    ious = []
    v = target != 255
    for c in range(5):
        tp = int(((pred == c) & (target == c) & v).sum())
        fp = int(((pred == c) & (target != c) & v).sum())
        fn = int(((pred != c) & (target == c) & v).sum())
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    assert tasks.miou(pred, target, 5) == pytest.approx(sum(ious) / len(ious))


def test_rmse_with_valid_mask():
    pred = torch.tensor([1.0, 2.0, 3.0, 10.0])
    target = torch.tensor([1.0, 4.0, 5.0, 2.0])
    # only the first two pixels count: sqrt((0^2 + 2^2) / 2) = sqrt(2)
    assert tasks.rmse(pred, target, torch.tensor([True, True, False, False])) == pytest.approx(math.sqrt(2))
    # default mask: positive targets only -> the zero-depth pixel is left out: sqrt((0 + 4 + 4) / 3)
    target0 = torch.tensor([1.0, 4.0, 5.0, 0.0])
    assert tasks.rmse(pred, target0) == pytest.approx(math.sqrt(8 / 3))
    g = torch.Generator().manual_seed(4)
    p, t = torch.rand(2, 5, 5, generator=g), torch.rand(2, 5, 5, generator=g) + 0.1
    m = torch.rand(2, 5, 5, generator=g) < 0.5
    ref = ((p.double() - t.double())[m] ** 2).sum() / m.sum()
    assert tasks.rmse(p, t, m) == pytest.approx(ref.sqrt().item())


# ----------------------------------------------------------------------------- heads on backbones

def _batch(B, H, W, num_classes, g):
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0], [0, 0, 0, 0]],
                          [[10.0, 12.0, 22.0, 30.0], [0, 0, 0, 0], [0, 0, 0, 0]]])[:B]
    box_labels = torch.tensor([[0, num_classes - 1, -1], [1 % num_classes, -1, -1]])[:B]
    seg = torch.randint(0, num_classes, (B, H, W), generator=g)
    seg[:, :3] = 255
    return {"image": torch.rand(B, 3, H, W, generator=g),
            "label": torch.randint(0, num_classes, (B,), generator=g),
            "labels": (torch.rand(B, num_classes, generator=g) < 0.4).float(),
            "boxes": boxes, "box_labels": box_labels, "num_boxes": (box_labels >= 0).sum(1),
            "seg": seg, "depth": torch.rand(B, H, W, generator=g) * 10 + 0.5}


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {"eva_demo": eva.build("eva_demo").eval(), "metanet_demo": metanet.build("metanet_demo").eval()}


@pytest.mark.parametrize("name", ["eva_demo", "metanet_demo"])
def test_heads_on_backbones(backbones, name):
    model = backbones[name]
    g = torch.Generator().manual_seed(5)
    C, S = 3, model.img_size
    batch = _batch(2, S, S, C, g)
    with torch.no_grad():                      # cached / frozen features, as in the probe
        levels, pooled = model.forward_levels(batch["image"])
    expect = {"cls": (2, C), "multilabel": (2, C), "seg": (2, C, S, S), "depth": (2, 1, S, S)}
    for task in tasks.TASKS:
        head = tasks.head_for(task, model, num_classes=C)
        out = head(levels, pooled)
        if task == "det":
            h0 = S // model.level_strides[0]
            assert out["heatmap"].shape == (2, C, h0, h0) and out["reg"].shape == (2, 4, h0, h0)
        else:
            assert out.shape == expect[task], task
        loss, terms = head.loss(out, batch)
        assert loss.ndim == 0 and torch.isfinite(loss), task
        assert all(math.isfinite(v) for v in terms.values()), task
        loss.backward()
        grads = [p.grad for p in head.parameters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads), task
        assert any(gr.abs().sum() > 0 for gr in grads), task
        pred = head.predict(out)
        if task == "det":
            assert len(pred) == 2
            for d in pred:
                b = d["boxes"]
                assert b.shape == (min(head.topk, C * h0 * h0), 4)
                assert (b >= 0).all() and (b[:, 0::2] <= S).all() and (b[:, 1::2] <= S).all()
                assert (b[:, 2:] >= b[:, :2]).all()
                assert ((d["labels"] >= 0) & (d["labels"] < C)).all()
        metrics = tasks.evaluate(task, head, [out], [batch])
        key, _ = tasks.PRIMARY_METRIC[task]
        assert key in metrics and (math.isfinite(metrics[key]) or task == "det")


def test_live_backbone_gets_gradient(backbones):
    # heads also train end to end (experts): the loss must reach the backbone through the levels
    model = metanet.build("metanet_demo")
    batch = _batch(2, 64, 64, 3, torch.Generator().manual_seed(6))
    levels, pooled = model.forward_levels(batch["image"])
    head = tasks.head_for("seg", model, 3)
    head.loss(head(levels, pooled), batch)[0].backward()
    assert model.stem[0].weight.grad is not None and model.stem[0].weight.grad.abs().sum() > 0


def test_build_head_rejects_unknown_task():
    with pytest.raises(ValueError, match="cls.*multilabel.*det.*seg.*depth"):
        tasks.build_head("pose", [8] * 4, [4, 8, 16, 32], 8, 3, 64)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.evaluate("pose", None, [], [])


# ----------------------------------------------------------------------------- detection conventions

def _random_levels(g, B=1, channels=(16, 24, 32, 48), strides=(4, 8, 16, 32), size=64):
    return [torch.randn(B, c, size // s, size // s, generator=g) for c, s in zip(channels, strides)]


def test_det_encode_decode_round_trip():
    # heatmap and regression built from the training targets decode back to the ground truth
    head = tasks.build_head("det", [16, 24, 32, 48], [4, 8, 16, 32], 48, 4, 64)
    boxes = torch.tensor([[[3.0, 5.0, 21.0, 17.0], [30.0, 28.0, 62.0, 60.0], [0, 0, 0, 0]],
                          [[40.5, 1.0, 50.0, 33.0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    labels = torch.tensor([[2, 0, -1], [3, -1, -1]])
    heat, (b, y, x), reg_t = head.targets(boxes, labels, 16, 16)
    assert heat.shape == (2, 4, 16, 16) and int((heat == 1).sum()) == 3
    assert heat[b, labels[labels >= 0], y, x].eq(1).all()
    reg = torch.zeros(2, 4, 16, 16)
    reg[b, :, y, x] = reg_t
    logits = torch.logit(heat.clamp(1e-6, 1 - 1e-6))
    pred = head.predict({"heatmap": logits, "reg": reg})
    for i, (bx, lb) in enumerate(zip(boxes, labels)):
        n = int((lb >= 0).sum())
        # the n peaks tie in score: compare as sets, ordered by x1
        got = pred[i]["boxes"][:n][pred[i]["boxes"][:n, 0].argsort()]
        got_labels = pred[i]["labels"][:n][pred[i]["boxes"][:n, 0].argsort()]
        want = bx[:n][bx[:n, 0].argsort()]
        assert torch.allclose(got, want, atol=1e-4)
        assert got_labels.tolist() == lb[:n][bx[:n, 0].argsort()].tolist()
        assert (pred[i]["scores"][:n] > 0.99).all() and (pred[i]["scores"][n:] < 0.99).all()


def test_det_head_overfits_one_image():
    # random frozen features of one image with 2 boxes: a few dozen steps must reproduce them
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(8)
    levels = _random_levels(g)
    batch = {"boxes": torch.tensor([[[6.0, 8.0, 30.0, 26.0], [28.0, 30.0, 60.0, 58.0]]]),
             "box_labels": torch.tensor([[1, 0]])}
    head = tasks.build_head("det", [16, 24, 32, 48], [4, 8, 16, 32], 48, 2, 64)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(80):
        loss, _ = head.loss(head(levels, None), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        out = head(levels, None)
    ap = tasks.evaluate("det", head, [out], [batch])["AP50"]
    assert ap == 1.0
    # and the check can fail: the same detections against moved ground truth score below 1
    moved = {"boxes": batch["boxes"] + 40, "box_labels": batch["box_labels"]}
    assert tasks.evaluate("det", head, [out], [moved])["AP50"] < 1.0


def test_multihead_keeps_one_head_per_source():
    # two classification sources with different label spaces share the features, not the heads
    g = torch.Generator().manual_seed(9)
    heads = tasks.MultiHead({"shapes": tasks.build_head("cls", [8] * 4, [4] * 4, 16, 3),
                             "colours": tasks.build_head("cls", [8] * 4, [4] * 4, 16, 5)})
    pooled = torch.randn(4, 16, generator=g)
    out_a, out_b = heads(None, pooled, "shapes"), heads(None, pooled, "colours")
    assert out_a.shape == (4, 3) and out_b.shape == (4, 5)
    assert torch.equal(out_a, heads["shapes"].fc(pooled))
    la, _ = heads.loss(out_a, {"label": torch.tensor([0, 1, 2, 0])}, "shapes")
    lb, _ = heads.loss(out_b, {"label": torch.tensor([4, 3, 2, 1])}, "colours")
    (la + lb).backward()
    assert heads["shapes"].fc.weight.grad is not None and heads["colours"].fc.weight.grad is not None
    assert heads.predict(out_b, "colours").shape == (4,)
    with pytest.raises(ValueError, match="shapes"):
        heads(None, pooled, "textures")
