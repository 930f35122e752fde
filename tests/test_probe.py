"""probe.py: the GV-B-mini protocol's invariants, on a tiny spy backbone and capped data sets."""
import json
import math

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
