"""probe.py: the GV-B-mini protocol's invariants, on a tiny spy backbone and capped data sets;
Down-A (--adapt lpft|distill) on random eva_demo / metanet_demo backbones at 32 px."""
import copy
import json
import math
import re

import pytest
import torch
import torch.nn as nn

import data
import probe


class SpyBackbone(nn.Module):
    """A small conv backbone that records how it is called: mode, grad state, batch sizes."""
    level_channels = [8, 8, 8, 8]
    level_strides = [8, 8, 8, 8]
    num_features = 8
    img_size = 64

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.bn = nn.BatchNorm2d(8)
        self.calls = []

    def block_list(self):
        return [self.conv]

    def forward_levels(self, x, inject=None):
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(), "n": x.shape[0]})
        f = self.bn(self.conv(x))
        return [f, f * 2, f.relu(), -f], f.mean((2, 3))


@pytest.fixture
def spy(monkeypatch):
    """Stands in for load_backbone; frozen as load_backbone freezes (tested on its own below),
    so the tests see whether the probe ever puts it back into training or grad mode."""
    backbone = SpyBackbone().eval().requires_grad_(False)
    monkeypatch.setattr(probe, "load_backbone", lambda spec: backbone)
    return backbone


def _run(specs, percents=(10, 100), max_train=60, max_test=24, **kw):
    return probe.run_probe({"spy": "spy"}, specs, list(percents), steps=4, max_train=max_train,
                           max_test=max_test, log=lambda *_: None, **kw)


def test_backbone_frozen_in_eval_mode_and_features_computed_once(spy):
    _run(["gvb/shape", "gvb/seg"])
    assert spy.calls and all(not c["training"] and not c["grad"] for c in spy.calls)
    # one pass over each capped split, whatever the number of percents and grid points
    assert sum(c["n"] for c in spy.calls) == 2 * (60 + 24)
    assert all(p.grad is None for p in spy.parameters())


def test_load_backbone_freezes_a_random_backbone():
    bb = probe.load_backbone("random:metanet_demo")
    assert not bb.training and all(not p.requires_grad for p in bb.parameters())


def test_percent_subset_is_what_the_heads_see(spy, monkeypatch):
    seen = []
    real_fit = probe.fit_head

    def fit(task, num_classes, feats, idx, *a, **k):
        seen.append((feats, idx.clone()))
        return real_fit(task, num_classes, feats, idx, *a, **k)

    monkeypatch.setattr(probe, "fit_head", fit)
    rows = _run(["gvb/count"], percents=(10,), grid=[(1e-3, 0.0), (1e-2, 0.0)])
    train_set = probe.capped(data.build_dataset("gvb/count", "train", 64, 0), 60)
    expected = sorted(data.percent_subset(train_set, 10, seed=0).indices)
    # two grid fits on 4/5 of the subset, then the refit on exactly the subset
    assert len(seen) == 3
    assert sorted(seen[-1][1].tolist()) == expected
    for _, idx in seen[:2]:
        assert set(idx.tolist()) < set(expected) and len(idx) == len(expected) - max(1, len(expected) // 5)
    assert rows[0]["sets"]["gvb/count"]["n_train"] == len(expected)


def test_test_split_is_scored_once_and_never_used_for_selection(spy, monkeypatch):
    scored = []
    real_score = probe.score

    def score(task, head, feats, idx, **k):
        scored.append((len(feats), len(idx)))
        return real_score(task, head, feats, idx, **k)

    monkeypatch.setattr(probe, "score", score)
    fitted = []
    real_fit = probe.fit_head
    monkeypatch.setattr(probe, "fit_head", lambda t, c, f, i, *a, **k: fitted.append(len(f)) or real_fit(t, c, f, i, *a, **k))
    _run(["gvb/depth"], percents=(10, 100), grid=[(1e-3, 0.0), (1e-2, 0.0)])
    test_scores = [s for s in scored if s[0] == 24]
    assert test_scores == [(24, 24), (24, 24)]             # once per percent, on the whole test split
    assert all(n == 60 for n in fitted)                     # heads only ever fit on training features
    assert sum(1 for s in scored if s[0] == 60) == 4        # validation scoring: 2 grid points x 2 percents


def test_standardise_uses_training_statistics_only():
    class F:
        pass
    train, test = F(), F()
    train.pooled = torch.randn(50, 3) * 5 + 2
    test.pooled = torch.randn(20, 3) * 5 + 100
    train.levels = test.levels = None
    mean, std = train.pooled.mean(0), train.pooled.std(0)
    t0 = test.pooled.clone()
    probe.standardise(train, test)
    torch.testing.assert_close(train.pooled.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(test.pooled, (t0 - mean) / (std + 1e-6))


def test_json_schema_and_markdown(spy, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "parse_models", lambda items: {"spy": "spy"})
    probe.main(["--ckpt", "spy=spy", "--data", "gvb/shape,gvb/det,gvb/seg,gvb/depth", "--percent", "10", "100",
                "--steps", "3", "--max-train", "40", "--max-test", "16", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "gvb.json").read_text())
    assert [(r["model"], r["percent"]) for r in doc["rows"]] == [("spy", 10), ("spy", 100)]
    for r in doc["rows"]:
        for key in ("cls_avg", "det_ap50", "seg_miou", "depth_rmse"):
            assert isinstance(r[key], float) and math.isfinite(r[key])
        assert 0 <= r["cls_avg"] <= 1 and 0 <= r["det_ap50"] <= 1 and r["depth_rmse"] > 0
        assert set(r["sets"]) == {"gvb/shape", "gvb/det", "gvb/seg", "gvb/depth"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stage"] == "probe" and summary["models"] == 1 and summary["wall_s"] > 0
    md = (tmp_path / "gvb.md").read_text()
    assert md.count("\n| spy |") == 2 and "depth_rmse ↓" in md
    assert sorted(p.name for p in (tmp_path / "viz").iterdir()) == ["gvb_depth.png", "gvb_det.png", "gvb_seg.png"]


def test_bad_ckpt_argument_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="NAME=PATH"):
        probe.parse_models(["nonsense"])
    with pytest.raises(SystemExit, match="no such file"):
        probe.parse_models([f"a={tmp_path}/missing.pt"])


def test_corrupt_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x80\x02not really a checkpoint")
    with pytest.raises(SystemExit, match="broken.pt"):
        probe.main(["--ckpt", f"x={bad}", "--data", "gvb/count", "--max-train", "8", "--max-test", "4",
                    "--out", str(tmp_path / "out")])


# ----------------------------------------------------------------------------- Down-A

SMALL = dict(img_size=32, steps=3, grid=[(1e-3, 0.0), (1e-2, 0.0)], max_train=30, max_test=12, log=lambda *_: None)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lpft_keeps_the_linear_rows_and_fine_tunes_only_copies_in_phase_2(monkeypatch):
    backbone = probe.load_backbone("random:eva_demo")
    before = _state(backbone)
    monkeypatch.setattr(probe, "load_backbone", lambda spec: backbone)
    specs = ["gvb/count", "gvb/seg"]
    plain = probe.run_probe({"m": "m"}, specs, [10, 100], **SMALL)

    events, trained = [], []
    real_fit, real_train = probe.fit_head, probe.train_live

    def fit(task, *a, **k):
        events.append(("probe", task))
        return real_fit(task, *a, **k)

    def train(model, split, idx, groups, steps, *a, **k):
        events.append(("finetune", split.task))
        assert model.backbone is not backbone and _same(model.backbone.state_dict(), before)
        trained.append((model, groups))
        out = real_train(model, split, idx, groups, steps, *a, **k)
        assert not _same(model.backbone.state_dict(), before)      # phase 2 does move the backbone
        return out

    monkeypatch.setattr(probe, "fit_head", fit)
    monkeypatch.setattr(probe, "train_live", train)
    recipe = probe.Recipe(lrs=(1e-4, 3e-4), epochs=1.0, min_steps=2, batch_size=8, layer_decay=0.8)
    rows = probe.run_probe({"m": "m"}, specs, [10, 100], lpft=recipe, **SMALL)

    assert [(r["model"], r["percent"]) for r in rows] == [("m", 10), ("m", 100), ("m+lpft", 10), ("m+lpft", 100)]
    assert json.dumps(rows[:2]) == json.dumps(plain)                   # phase 1 = the plain probe, bit for bit
    # per (set, percent): the probe's 3 head fits (2 grid points + refit), then 3 fine-tunes (2 lrs + refit)
    assert events == [e for t in ("cls", "seg") for _ in (10, 100) for e in [("probe", t)] * 3 + [("finetune", t)] * 3]
    assert _same(backbone.state_dict(), before)                        # the probed backbone never changes
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    assert len({id(m.backbone) for m, _ in trained}) == len(trained)   # a fresh copy for every fit
    for model, groups in trained:                                      # the recipe's decay reaches the optimiser
        lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
        base = lr_of[id(model.head.proj[0].weight if hasattr(model.head, "proj") else model.head.fc.weight)]
        for i, blk in enumerate(model.backbone.block_list()):
            assert lr_of[id(blk.mlp.fc1.weight)] == pytest.approx(base * 0.8 ** (8 - i))
    for r in rows[2:]:
        for s in specs:
            assert r["sets"][s]["lr"] in (1e-4, 3e-4) and r["sets"][s]["val"] is not None


def test_tuned_starts_where_the_probe_ended():
    """LP-FT's phase 2 starts from the probe: backbone + frozen standardisation + head on raw images
    gives the probe's outputs on cached, standardised features."""
    backbone = probe.load_backbone("random:eva_demo")
    ds = probe.capped(data.build_dataset("gvb/seg", "train", 32, 0), 24)
    split = probe.Split(ds)
    train, test = probe.Features(backbone, split, True), probe.Features(backbone, split, True)
    stats = probe.standardise(train, test)
    idx = torch.arange(len(split))
    head = probe.fit_head("seg", ds.num_classes, train, idx, 1e-2, 0.0, steps=3)
    model = probe.Tuned(copy.deepcopy(backbone), copy.deepcopy(head), stats).eval()
    levels, pooled, _ = train.batch(idx[:6])
    with torch.no_grad():
        torch.testing.assert_close(model(split.images[:6].float()), head(levels, pooled), atol=1e-4, rtol=1e-4)


def _expected_eva(name, depth, decay):
    """(lr scale, decays?) of an EVA parameter by the BEiT rule, from its name alone."""
    m = re.match(r"(?:main\.)?blocks\.(\d+)\.", name)
    leaf = name.split(".")[-1]
    if m:
        layer = int(m.group(1)) + 1
    elif re.match(r"(?:main\.)?(cls_token|pos_embed|patch_embed\.)", name):
        layer = 0
    else:
        layer = depth + 1
    return decay ** (depth + 1 - layer), leaf in ("cls_token", "pos_embed")


@pytest.mark.parametrize("decay", [0.9, 0.65])
def test_layer_decay_gives_each_block_its_learning_rate(decay):
    import ktm
    import stages
    torch.manual_seed(0)
    lr, wd = 2e-3, 0.05
    eva = stages.build_backbone("eva_demo")
    head = nn.Linear(eva.num_features, 3)
    groups = probe.layer_decay_groups(eva, head, lr, wd, decay)
    opt = torch.optim.AdamW(groups)
    got = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(got)            # every parameter once
    for name, p in eva.named_parameters():
        scale, no_decay = _expected_eva(name, 8, decay)
        assert got[id(p)][0] == pytest.approx(lr * scale), name
        assert got[id(p)][1] == (0.0 if no_decay or p.ndim <= 1 else wd), name
    assert got[id(head.weight)] == (pytest.approx(lr), wd) and got[id(head.bias)] == (pytest.approx(lr), 0.0)

    # MetaNet: stem before block 0 is lowest, the head conv after the last block trains at lr
    mn = stages.build_backbone("metanet_demo", num_classes=0)
    got = {id(p): g["lr"] for g in probe.layer_decay_groups(mn, head, lr, wd, decay) for p in g["params"]}
    D = len(mn.block_list())
    for i, blk in enumerate(mn.block_list()):
        assert all(got[id(p)] == pytest.approx(lr * decay ** (D - i)) for p in blk.parameters())
    assert all(got[id(p)] == pytest.approx(lr * decay ** (D + 1)) for p in mn.stem.parameters())
    assert all(got[id(p)] == pytest.approx(lr) for p in mn.head.parameters())

    # generalist: main stream decayed like a plain EVA, KTMs at lr, frozen auxiliary expert left out
    aux = stages.build_backbone("eva_demo")
    gen = probe.unfreeze(ktm.Generalist(copy.deepcopy(eva), {"det": aux}))
    got = {id(p): g["lr"] for g in probe.layer_decay_groups(gen, head, lr, wd, decay) for p in g["params"]}
    assert not any(id(p) in got for p in aux.parameters())
    for name, p in gen.named_parameters():
        if name.startswith("main."):
            assert got[id(p)] == pytest.approx(lr * _expected_eva(name, 8, decay)[0]), name
        elif name.startswith("ktms."):
            assert got[id(p)] == pytest.approx(lr), name
    gen.train()
    assert gen.main.training and not aux.training


@pytest.mark.parametrize("student", ["eva_demo", "metanet_demo"])
def test_distill_loss_goes_down_and_the_teacher_gets_no_gradient(student):
    torch.manual_seed(0)
    teacher = probe.load_backbone("random:eva_demo").requires_grad_(True)   # even a trainable teacher
    before = _state(teacher)
    images = torch.rand(32, 3, 32, 32).half()
    recipe = probe.DistillRecipe(epochs=4, lr=2e-3, batch_size=8)
    student_net, info = probe.distill(teacher, student, images, recipe, img_size=32, seed=0)
    losses = info["losses"]
    assert info["steps"] == len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4
    assert all(p.grad is None for p in teacher.parameters()) and _same(teacher.state_dict(), before)
    assert not student_net.training and not any(p.requires_grad for p in student_net.parameters())
    import stages
    torch.manual_seed(0)                                               # distill's own seed: its initial student
    assert not _same(stages.build_backbone(student, img_size=32, num_classes=0).state_dict(), student_net.state_dict())


def test_distill_loss_is_zero_only_for_the_teachers_features():
    t_levels = [torch.randn(4, 6, 3, 3) for _ in range(4)]
    t_pooled = torch.randn(4, 5)
    for kind in probe.DISTILL_LOSSES:
        same = probe.distill_loss([f * 2 if kind == "cosine" else f for f in t_levels],
                                  t_pooled * 2 if kind == "cosine" else t_pooled, t_levels, t_pooled, kind)
        assert same.item() == pytest.approx(0.0, abs=1e-6)
        other = probe.distill_loss([-f for f in t_levels], -t_pooled, t_levels, t_pooled, kind)
        assert other.item() > 0.5


def test_run_distill_rows_use_training_images_only(spy, monkeypatch):
    seen = {}
    real = probe.distill

    def distill(teacher, arch, images, *a, **k):
        seen["images"], seen["teacher"] = images, teacher
        return real(teacher, arch, images, *a, **k)

    monkeypatch.setattr(probe, "distill", distill)
    specs = ["gvb/count", "gvb/depth"]
    rows, info = probe.run_distill("spy", "spy", "eva_demo", specs, [10, 100], img_size=32, steps=3,
                                   grid=[(1e-3, 0.0)], max_train=20, max_test=8,
                                   recipe=probe.DistillRecipe(epochs=1, batch_size=8),
                                   scratch=probe.Recipe(lrs=(1e-3,), epochs=1, min_steps=2, batch_size=8),
                                   log=lambda *_: None)
    assert [(r["model"], r["percent"]) for r in rows] == [("student+distill", 10), ("student+distill", 100),
                                                         ("student", 10), ("student", 100)]
    train_images = torch.cat([probe.Split(probe.capped(data.build_dataset(s, "train", 32, 0), 20)).images
                              for s in specs])
    assert seen["teacher"] is spy and torch.equal(seen["images"], train_images)
    import stages
    assert info["student"]["params"] == sum(p.numel() for p in stages.build_backbone("eva_demo", img_size=32).parameters())
    assert info["teacher"]["params"] == sum(p.numel() for p in spy.parameters())
    assert info["teacher"]["images_per_s"] > 0 and info["student"]["images_per_s"] > 0
    n10 = len(data.percent_subset(probe.capped(data.build_dataset("gvb/count", "train", 32, 0), 20), 10).indices)
    assert rows[2]["sets"]["gvb/count"]["n_train"] == n10 and rows[3]["sets"]["gvb/count"]["n_train"] == 20


def test_adapt_run_merges_its_rows_into_the_existing_table(spy, tmp_path, monkeypatch):
    monkeypatch.setattr(probe, "parse_models", lambda items: {"spy": "spy"})
    common = ["--ckpt", "spy=spy", "--data", "gvb/shape,gvb/depth", "--steps", "3", "--max-train", "30",
              "--max-test", "12", "--img-size", "32", "--out", str(tmp_path)]
    probe.main(common)
    linear = json.loads((tmp_path / "gvb.json").read_text())
    summary = (tmp_path / "summary.json").read_text()
    doc = linear
    doc["rows"].insert(0, {**doc["rows"][0], "model": "other"})        # a row of another model, kept as is
    (tmp_path / "gvb.json").write_text(json.dumps(doc))
    probe.main(common + ["--adapt", "lpft", "--ft-lr", "1e-4", "--ft-min-steps", "2", "--ft-batch", "8"])
    merged = json.loads((tmp_path / "gvb.json").read_text())
    assert [(r["model"], r["percent"]) for r in merged["rows"]] == \
        [("other", 10), ("spy", 10), ("spy", 100), ("spy+lpft", 10), ("spy+lpft", 100)]
    assert json.dumps(merged["rows"][:3]) == json.dumps(doc["rows"])   # replaced by identical phase-1 rows
    assert merged["config"]["adapt"] == "linear" and merged["adapt"]["lpft"]["ft_lr"] == [1e-4]
    assert (tmp_path / "summary.json").read_text() == summary         # the probe's summary is left alone
    assert "lpft" in json.loads((tmp_path / "adapt.json").read_text())
    assert (tmp_path / "gvb.md").read_text().count("\n| spy+lpft |") == 2

    (tmp_path / "gvb.json").write_text("not json")                     # a foreign file is never overwritten
    with pytest.raises(SystemExit, match="not a gvb.json"):
        probe.main(common + ["--adapt", "lpft", "--ft-lr", "1e-4", "--ft-min-steps", "2"])
    assert (tmp_path / "gvb.json").read_text() == "not json"


def test_bad_adapt_arguments_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="one teacher"):
        probe.main(["--adapt", "distill", "--ckpt", "a=random:eva_demo", "b=random:eva_demo", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="layer-decay"):
        probe.main(["--adapt", "lpft", "--layer-decay", "1.5", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="valid archs"):
        probe.main(["--adapt", "distill", "--student", "resnet50", "--data", "gvb/count", "--max-train", "8",
                    "--max-test", "4", "--out", str(tmp_path)])
