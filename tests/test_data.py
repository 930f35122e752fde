"""Tests for data.py: the procedural sources, the real-data readers, subsets, augmentation, loaders.

The references are independent of the code under test where it matters: boxes are checked against
the rendered mask, occlusion against each object's own (amodal) mask and depth, IDX/folder/COCO
readers against files written here with numpy/pillow, loader order against DistributedSampler.
"""
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32


def _digest(sample):
    h = hashlib.sha256()
    for k in sorted(sample):
        v = sample[k]
        h.update(k.encode())
        h.update(v.encode() if isinstance(v, str) else torch.as_tensor(v).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- synthetic sources

@pytest.mark.parametrize("spec", list(data.SOURCES))
def test_source_keys_dtypes_shapes_ranges(spec):
    for split, n in zip(("train", "test"), data.SOURCES[spec]["n"]):
        ds = data.build_dataset(spec, split, img_size=S, seed=3)
        assert (ds.spec, ds.split, len(ds)) == (spec, split, n)
        assert ds.task in {"caption", "cls", "det", "seg", "depth"} and ds.num_classes == len(ds.classes)
        if ds.task in ("caption", "depth"):
            assert ds.num_classes == 0
        if ds.task == "seg":
            assert ds.classes[0] == "background"
        for i in (0, 1, n - 1):
            s = ds[i]
            img = s["image"]
            assert img.dtype == torch.float32 and img.shape == (3, S, S)
            assert 0 <= img.min() and img.max() <= 1 and img.std() > 0.01
            if spec.startswith("gvd/"):
                assert isinstance(s["caption"], str) and len(s["caption"].split()) >= 2
            if ds.task == "cls":
                assert s["label"].dtype == torch.int64 and s["label"].shape == ()
                assert 0 <= int(s["label"]) < ds.num_classes
                assert int(s["label"]) == ds.scene(i)["label"]
            if spec == "gvd/shape":
                hot = s["labels"]
                assert hot.dtype == torch.float32 and hot.shape == (ds.num_classes,)
                assert hot[int(s["label"])] == 1 and set(hot.unique().tolist()) <= {0.0, 1.0}
                assert {ds.classes[j] for j in hot.nonzero()[:, 0].tolist()} == \
                    {o["shape"] for o in ds.scene(i)["objects"]}
            if ds.task == "det":
                b, lab = s["boxes"], s["box_labels"]
                assert b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == 4 and len(b) >= 1
                assert lab.dtype == torch.int64 and lab.shape == (len(b),)
                assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all() and b.min() >= 0 and b.max() <= S
                assert 0 <= lab.min() and lab.max() < ds.num_classes
            if ds.task == "seg":
                assert s["seg"].dtype == torch.int64 and s["seg"].shape == (S, S)
                assert 0 <= s["seg"].min() and s["seg"].max() < ds.num_classes and (s["seg"] > 0).any()
            if ds.task == "depth":
                d = s["depth"]
                assert d.dtype == torch.float32 and d.shape == (S, S) and d.min() >= 2.0 and d.max() < 15


def test_targets_match_labels_and_are_balanced_enough():
    ds = data.build_dataset("gvb/texture", "test", img_size=S)
    t = ds.targets
    assert len(t) == len(ds)
    for i in (0, 7, 123, len(ds) - 1):
        assert int(ds[i]["label"]) == t[i]
    counts = np.bincount(t, minlength=ds.num_classes)
    assert counts.min() > 0.5 * len(ds) / ds.num_classes        # uniform draws, every class present


def test_train_test_disjoint_and_seed_changes_samples():
    for spec in ("gvb/shape", "gvd/attr"):
        train = {_digest({"image": data.build_dataset(spec, "train", S)[i]["image"]}) for i in range(150)}
        test = {_digest({"image": data.build_dataset(spec, "test", S)[i]["image"]}) for i in range(150)}
        assert len(train) == 150 and len(test) == 150 and not train & test
    a, b = data.build_dataset("gvd/det", "train", S, seed=0), data.build_dataset("gvd/det", "train", S, seed=1)
    assert not torch.equal(a[3]["image"], b[3]["image"])


def _assert_boxes_match_seg(boxes, labels, seg):
    """Every box is the tight box of pixels of its class; every labelled pixel lies in a box of its class."""
    covered = torch.zeros_like(seg, dtype=torch.bool)
    for (x1, y1, x2, y2), c in zip(boxes.long().tolist(), labels.tolist()):
        inside = seg[y1:y2, x1:x2] == c + 1
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        covered[y1:y2, x1:x2] |= inside
    assert torch.equal(covered, seg > 0)


@pytest.mark.parametrize("spec", ["gvd/det", "gvb/det"])
def test_boxes_agree_with_masks(spec):
    ds = data.build_dataset(spec, "train", S)
    for i in range(40):
        full = ds.render(i, data.ALL_SIGNALS)
        plain = ds[i]
        assert torch.equal(full["image"], plain["image"]) and torch.equal(full["boxes"], plain["boxes"])
        assert len(full["boxes"]) == len(ds.scene(i)["objects"])
        _assert_boxes_match_seg(full["boxes"], full["box_labels"], full["seg"])


def test_depth_is_nearer_where_an_object_occludes_another():
    found = 0
    for spec in ("gvd/seg", "gvb/depth"):
        ds = data.build_dataset(spec, "train", S)
        for i in range(60):
            sc, full = ds.scene(i), ds.render(i, data.ALL_SIGNALS)
            depth, seg = full["depth"].numpy(), full["seg"].numpy()
            amodal = []
            for o in sc["objects"]:
                m = np.zeros((S, S), bool)
                m[o["y0"]:o["y0"] + o["m"], o["x0"]:o["x0"] + o["m"]] = data._shape_mask(o["shape"], o["m"], o["b"])[1]
                amodal.append(m)
            union = np.any(amodal, axis=0) if amodal else np.zeros((S, S), bool)
            assert (depth[~union] > 6.5).all() and (seg[~union] == 0).all()      # background plane is far
            for a in range(len(amodal)):
                for b in range(a + 1, len(amodal)):
                    both = amodal[a] & amodal[b]
                    if not both.any():
                        continue
                    free = both.copy()                     # pixels no third object covers
                    for c in range(len(amodal)):
                        if c not in (a, b):
                            free &= ~amodal[c]
                    if not free.any():
                        continue
                    found += 1
                    za, zb = sc["objects"][a]["z"], sc["objects"][b]["z"]
                    near = a if za < zb else b
                    assert min(za, zb) < max(za, zb) and np.allclose(depth[free], min(za, zb))
                    assert (seg[free] == ds.shape_names.index(sc["objects"][near]["shape"]) + 1).all()
    assert found >= 5


def test_count_and_shape_labels_describe_the_scene():
    ds = data.build_dataset("gvb/count", "train", S)
    for i in range(30):
        full = ds.render(i, data.ALL_SIGNALS)
        assert len(full["boxes"]) == int(full["label"]) + 1          # counted objects are all visible
    ds = data.build_dataset("gvd/shape", "train", S)
    for i in range(30):
        objs, lab = ds.scene(i)["objects"], int(ds[i]["label"])
        front = min(objs, key=lambda o: o["z"])
        assert front["shape"] == ds.classes[lab] and front["m"] == max(o["m"] for o in objs)


def test_captions_name_the_shapes_canonically_often():
    ds = data.build_dataset("gvd/caption", "train", S)
    canon = total = 0
    for i in range(200):
        words = ds[i]["caption"].replace(",", " ").replace(":", " ").split()
        for o in ds.scene(i)["objects"]:
            names = [o["shape"]] + data.SYNONYMS.get(o["shape"], [])
            assert any(n in words for n in names), (ds[i]["caption"], o["shape"])
            canon += o["shape"] in words
            total += 1
        for w, nxt in zip(words, words[1:]):
            if w in ("a", "an"):
                assert w == ("an" if nxt[0] in "aeiou" else "a"), ds[i]["caption"]
    assert canon / total > 0.6


# ----------------------------------------------------------------------------- errors

def test_bad_spec_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="gvd/caption.*gvb/depth.*idx:DIR.*folder:DIR.*coco:"):
        data.build_dataset("gvd/nope", "train")
    with pytest.raises(ValueError, match="split"):
        data.build_dataset("gvd/det", "val")
    with pytest.raises(IndexError):
        data.build_dataset("gvb/det", "test", S)[500]
    with pytest.raises(ValueError, match="percent"):
        data.percent_subset(data.build_dataset("gvb/det", "test", S), 0)


# ----------------------------------------------------------------------------- real data readers

def _idx_bytes(arr, code=0x08):
    return struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _write(path, payload, gz):
    with (gzip.open if gz else open)(path, "wb") as fh:
        fh.write(payload)


def test_idx_reader_gz_and_raw(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (9, 28, 28), dtype=np.uint8), "t10k": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)}
    labs = {"train": rng.integers(0, 10, 9).astype(np.uint8), "t10k": rng.integers(0, 10, 4).astype(np.uint8)}
    labs["train"][0] = 9
    for prefix, gz in (("train", False), ("t10k", True)):              # raw names and .gz names
        ext = ".gz" if gz else ""
        _write(tmp_path / f"{prefix}-images-idx3-ubyte{ext}", _idx_bytes(imgs[prefix]), gz)
        _write(tmp_path / f"{prefix}-labels-idx1-ubyte{ext}", _idx_bytes(labs[prefix]), gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = data.build_dataset(f"idx:{tmp_path}", split, img_size=28)
        assert ds.task == "cls" and len(ds) == len(imgs[prefix]) and ds.classes == [str(c) for c in range(10)]
        assert ds.targets == labs[prefix].tolist()
        for i in range(len(ds)):
            s = ds[i]
            ref = torch.from_numpy(imgs[prefix][i].astype(np.float32) / 255)
            assert s["image"].shape == (3, 28, 28) and torch.allclose(s["image"], ref.expand(3, -1, -1))
            assert int(s["label"]) == labs[prefix][i]
    assert data.build_dataset(f"idx:{tmp_path}", "train", img_size=40)[0]["image"].shape == (3, 40, 40)


def test_idx_bad_magic_truncated_and_missing_are_clear_errors(tmp_path):
    arr = np.arange(2 * 5 * 5, dtype=np.uint8).reshape(2, 5, 5)
    good = _idx_bytes(arr)
    (tmp_path / "magic").write_bytes(b"\x08\x08" + good[2:])
    (tmp_path / "short").write_bytes(good[:-7])
    (tmp_path / "short.gz").write_bytes(gzip.compress(good)[:-12])
    (tmp_path / "ok.gz").write_bytes(gzip.compress(good))
    assert np.array_equal(data.read_idx(tmp_path / "ok.gz"), arr)
    with pytest.raises(ValueError, match="magic number"):
        data.read_idx(tmp_path / "magic")
    with pytest.raises(ValueError, match="truncated IDX body.*holds 43 B"):
        data.read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(tmp_path / "short.gz")
    with pytest.raises(FileNotFoundError, match="train-images"):
        data.build_dataset(f"idx:{tmp_path}", "train")


def test_folder_reader_with_grey_rgb_and_unreadable_images(tmp_path):
    rng = np.random.default_rng(1)
    made = {}
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / split / c)
            for j in range(3 if split == "train" else 1):
                arr = rng.integers(0, 256, (20, 30) if c == "cat" else (20, 30, 3), dtype=np.uint8)
                path = tmp_path / split / c / f"{j}.png"
                Image.fromarray(arr).save(path)
                made[str(path)] = arr
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"definitely not a png")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        ds = data.build_dataset(f"folder:{tmp_path}", "train", img_size=S)
    assert len(ds) == 6 and ds.classes == ["cat", "dog"] and ds.targets == [0, 0, 0, 1, 1, 1]
    assert ds.skipped[0][0].endswith("broken.png")
    for i, path in enumerate(ds.files):
        ref = Image.fromarray(made[path]).convert("RGB").resize((S, S), Image.BILINEAR)
        ref = torch.from_numpy(np.asarray(ref, np.float32) / 255).permute(2, 0, 1)
        s = ds[i]
        assert s["image"].shape == (3, S, S) and torch.allclose(s["image"], ref)
        if ds.targets[i] == 0:                                           # grey -> three equal channels
            assert torch.equal(s["image"][0], s["image"][1]) and torch.equal(s["image"][1], s["image"][2])
    assert len(data.build_dataset(f"folder:{tmp_path}", "test", img_size=S)) == 2


def test_folder_flat_layout_holds_out_every_fifth_file(tmp_path):
    for c, n in (("x", 10), ("y", 5)):
        os.makedirs(tmp_path / c)
        for j in range(n):
            Image.fromarray(np.full((8, 8), j, np.uint8)).save(tmp_path / c / f"{j:02d}.png")
    train = data.build_dataset(f"folder:{tmp_path}", "train", img_size=S)
    test = data.build_dataset(f"folder:{tmp_path}", "test", img_size=S)
    assert (len(train), len(test)) == (12, 3) and not set(train.files) & set(test.files)
    assert sorted(os.path.basename(f) for f in test.files) == ["04.png", "04.png", "09.png"]
    with pytest.raises(ValueError, match="no class folders"):
        data.build_dataset(f"folder:{tmp_path / 'x'}", "train")


def test_coco_reader_boxes_polygons_and_ignore(tmp_path):
    W, H = 40, 20
    images, anns = [], []
    for j in range(5):
        Image.fromarray(np.full((H, W, 3), 40 * j, np.uint8)).save(tmp_path / f"im{j}.png")
        images.append({"id": 10 + j, "file_name": f"im{j}.png", "width": W, "height": H})
        anns.append({"id": 100 + j, "image_id": 10 + j, "category_id": 7, "bbox": [4, 2, 16, 8], "area": 128,
                     "iscrowd": 0, "segmentation": [[4, 2, 20, 2, 20, 10, 4, 10]]})
        anns.append({"id": 200 + j, "image_id": 10 + j, "category_id": 3, "bbox": [28, 12, 8, 6], "area": 48,
                     "iscrowd": 1, "segmentation": {"counts": [0, 48], "size": [H, W]}})
    js = {"images": images, "annotations": anns, "categories": [{"id": 7, "name": "kite"}, {"id": 3, "name": "bus"}]}
    (tmp_path / "ann.json").write_text(json.dumps(js))
    train = data.build_dataset(f"coco:{tmp_path / 'ann.json'}", "train", img_size=S)
    test = data.build_dataset(f"coco:{tmp_path / 'ann.json'}:{tmp_path}", "test", img_size=S)
    assert (len(train), len(test)) == (4, 1) and train.task == "det" and train.classes == ["bus", "kite"]
    assert train.seg_classes == ["background", "bus", "kite"]
    s = train[1]
    sx, sy = S / W, S / H
    assert torch.allclose(s["boxes"], torch.tensor([[4 * sx, 2 * sy, 20 * sx, 10 * sy]]))
    assert s["box_labels"].tolist() == [1]
    seg = s["seg"]
    assert seg.dtype == torch.int64 and seg.shape == (S, S)
    assert (seg[int(3 * sy) + 1:int(9 * sy), int(5 * sx) + 1:int(19 * sx)] == 2).all()     # inside the polygon
    assert (seg[int(13 * sy) + 1:int(17 * sy), int(29 * sx) + 1:int(35 * sx)] == 255).all()  # crowd RLE: ignore
    assert seg[0, -1] == 0 and set(seg.unique().tolist()) == {0, 2, 255}
    assert torch.allclose(s["image"], torch.full((3, S, S), 40 / 255))


# ----------------------------------------------------------------------------- percentage-shot subsets

class _Labelled(torch.utils.data.Dataset):
    task, classes = "cls", ["a", "b", "c", "d"]
    num_classes = 4

    def __init__(self, counts, seed=0):
        self.targets = np.random.default_rng(seed).permutation(np.repeat(np.arange(4), counts)).tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"label": torch.tensor(self.targets[i]), "index": torch.tensor(i)}


def test_percent_subset_keeps_class_proportions():
    counts = [600, 130, 9, 2]
    ds = _Labelled(counts)
    sub = data.percent_subset(ds, 10, seed=4)
    got = np.bincount(sub.targets, minlength=4)
    assert got.tolist() == [max(1, round(c * 0.1)) for c in counts]
    assert got.min() >= 1 and sub.task == "cls" and sub.classes == ds.classes and sub.num_classes == 4
    assert sorted(set(sub.indices)) == list(sub.indices)                  # unique, sorted
    assert all(ds.targets[i] == t for i, t in zip(sub.indices, sub.targets))
    assert data.percent_subset(ds, 10, seed=4).indices == sub.indices
    assert data.percent_subset(ds, 10, seed=5).indices != sub.indices
    assert len(data.percent_subset(ds, 100)) == len(ds)
    real = data.build_dataset("gvb/count", "train", S)
    sub = data.percent_subset(real, 10, seed=0)
    full, part = np.bincount(real.targets, minlength=6) / len(real), np.bincount(sub.targets, minlength=6) / len(sub)
    assert np.abs(full - part).max() < 0.01 and sub[0]["image"].shape == (3, S, S)


def test_percent_subset_dense_is_per_image():
    ds = data.build_dataset("gvb/seg", "train", S)
    sub = data.percent_subset(ds, 10, seed=0)
    assert len(sub) == 100 and len(set(sub.indices)) == 100 and max(sub.indices) < len(ds)
    assert sub.task == "seg" and sub.num_classes == ds.num_classes
    assert torch.equal(sub[3]["seg"], ds[sub.indices[3]]["seg"])


# ----------------------------------------------------------------------------- augmentation

def test_augmented_is_a_function_of_seed_epoch_index():
    base = data.build_dataset("gvd/caption", "train", S)
    fn = lambda s, rng: {"image": data.random_resized_crop_flip(s["image"], rng),   # noqa: E731
                         "caption": data.caption_variant(s["caption"], rng)}
    aug = data.Augmented(base, fn, seed=11)
    a0 = [_digest(aug[i]) for i in range(4)]
    assert [_digest(aug[i]) for i in reversed(range(4))] == a0[::-1]
    aug.set_epoch(1)
    assert [_digest(aug[i]) for i in range(4)] != a0
    aug.set_epoch(0)
    assert _digest(data.Augmented(base, fn, seed=11)[2]) == a0[2]
    assert (aug.task, aug.num_classes, len(aug)) == ("caption", 0, len(base))
    cls = data.Augmented(data.build_dataset("gvb/shape", "test", S), lambda s, rng: s)
    assert cls.targets[:5] == cls.dataset.targets[:5] and cls.classes == cls.dataset.classes


def test_random_resized_crop_flip_shapes_and_identity():
    img = torch.rand(3, S, S)
    out = data.random_resized_crop_flip(img, np.random.default_rng(0))
    assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    same = data.random_resized_crop_flip(img, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1), flip=0.0)
    assert torch.allclose(same, img, atol=1e-6)
    mirror = data.random_resized_crop_flip(img, np.random.default_rng(0), scale=(1, 1), ratio=(1, 1), flip=1.0)
    assert torch.allclose(mirror, img.flip(-1), atol=1e-6)


def test_crop_flip_sample_keeps_boxes_and_masks_together():
    ds = data.build_dataset("gvb/det", "train", S)
    for i in range(20):
        full = ds.render(i, data.ALL_SIGNALS)
        rng = np.random.default_rng(i)
        flipped = data.crop_flip_sample(full, rng, scale=(1, 1), ratio=(1, 1), flip=1.0)
        assert torch.equal(flipped["seg"], full["seg"].flip(-1)) and torch.equal(flipped["depth"], full["depth"].flip(-1))
        _assert_boxes_match_seg(flipped["boxes"], flipped["box_labels"], flipped["seg"])
        # a 2x zoom of a 16 px crop: nearest resampling is then exact, so the masks stay exact
        crop = data.crop_flip_sample(full, rng, scale=(.25, .25), ratio=(1, 1))
        b, lab, seg = crop["boxes"], crop["box_labels"], crop["seg"]
        assert crop["image"].shape == (3, S, S) and seg.shape == (S, S) and len(b) == len(lab)
        assert b.numel() == 0 or (b.min() >= 0 and b.max() <= S and (b[:, 2] > b[:, 0]).all())
        covered = torch.zeros_like(seg, dtype=torch.bool)
        for (x1, y1, x2, y2), c in zip(b.long().tolist(), lab.tolist()):
            inside = seg[y1:y2, x1:x2] == c + 1
            covered[y1:y2, x1:x2] |= inside
            if 0 < x1 and 0 < y1 and x2 < S and y2 < S:                      # not clipped: still tight
                assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert torch.equal(covered, seg > 0)                                 # clipped or not, boxes cover


def test_caption_variant_keeps_meaning():
    canon = {w: g[0] for w, g in data._SYN_GROUP.items()}
    ds = data.build_dataset("gvd/caption", "train", S)
    changed = 0
    for i in range(60):
        cap = ds[i]["caption"]
        var = data.caption_variant(cap, np.random.default_rng(i), p_drop=0.0)
        assert var == data.caption_variant(cap, np.random.default_rng(i), p_drop=0.0)
        norm = lambda t: sorted(canon.get(w, w) for w in t.replace(",", " ").split() if w not in ("a", "an"))  # noqa
        assert norm(var) == norm(cap)
        words = var.split()
        for w, nxt in zip(words, words[1:]):
            if w in ("a", "an"):
                assert w == ("an" if nxt[0] in "aeiou" else "a")
        changed += var != cap
        dropped = data.caption_variant(cap, np.random.default_rng(i), p_drop=0.5, p_syn=0.0)
        assert 0 < len(dropped.split()) <= len(cap.split())
    assert changed > 20


# ----------------------------------------------------------------------------- loaders

def test_collate_pads_ragged_keys():
    ds = data.build_dataset("gvd/det", "train", S)
    batch = [ds[i] for i in range(6)]
    out = data.collate(batch)
    k = max(len(b["boxes"]) for b in batch)
    assert out["image"].shape == (6, 3, S, S) and out["boxes"].shape == (6, k, 4) and out["box_labels"].shape == (6, k)
    # the model sees normalised images: (x - mean) / std per channel, computed here by hand
    raw = torch.stack([b["image"] for b in batch]).double()
    for c in range(3):
        torch.testing.assert_close(out["image"][:, c].double(), (raw[:, c] - data.MEAN[c]) / data.STD[c],
                                   atol=1e-5, rtol=1e-5)
    assert isinstance(out["caption"], list) and out["caption"][2] == batch[2]["caption"]
    for j, b in enumerate(batch):
        n = len(b["boxes"])
        assert out["num_boxes"][j] == n and torch.equal(out["boxes"][j, :n], b["boxes"])
        assert (out["boxes"][j, n:] == 0).all() and (out["box_labels"][j, n:] == -1).all()
    lab = data.collate([data.build_dataset("gvd/shape", "test", S)[i] for i in range(3)])
    assert lab["label"].shape == (3,) and lab["label"].dtype == torch.int64 and lab["labels"].shape == (3, 10)


class _Index(torch.utils.data.Dataset):
    def __len__(self):
        return 37

    def __getitem__(self, i):
        return {"index": i}


def _batches(loader):
    return [b["index"].tolist() for b in loader]


def test_one_rank_order_equals_distributed_sampler_interleave():
    ds, b = _Index(), 4
    single = _batches(data.build_loader(ds, 2 * b, shuffle=True, seed=5, epoch=3))
    ranks = []
    for r in range(2):
        smp = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=5, drop_last=True)
        smp.set_epoch(3)
        ranks.append(_batches(torch.utils.data.DataLoader(ds, b, sampler=smp, drop_last=True, collate_fn=data.collate)))
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 4
    for k in range(4):
        assert sorted(ranks[0][k] + ranks[1][k]) == sorted(single[k])
    assert single != _batches(data.build_loader(ds, 2 * b, seed=5, epoch=4))
    assert _batches(data.build_loader(ds, 8, shuffle=False, drop_last=False))[-1] == [32, 33, 34, 35, 36]
    workers = _batches(data.build_loader(ds, 2 * b, seed=5, epoch=3, workers=2))
    assert workers == single


DIGEST_SPECS, DIGEST_IDX = ["gvd/caption", "gvd/det", "gvb/seg", "gvb/depth", "gvb/count"], [0, 5, 17, 42]


def test_other_processes_render_the_same_samples_and_two_gloo_ranks_split_the_batches(tmp_path):
    """Two fresh processes (other hash seed) join a 2-rank gloo group. Rank 1 also renders samples in
    another order: they must equal this process's. Together the ranks' batch k must hold exactly the
    samples of batch k of a 1-rank loader with twice the batch."""
    code = textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
        import torch.distributed as dist
        import data, test_data
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=rank, world_size=2)
        loader = data.build_loader(test_data._Index(), 4, shuffle=True, seed=5, epoch=3)
        digests = {{}}
        for sp in reversed(test_data.DIGEST_SPECS) if rank else []:   # other order, fresh caches
            ds = data.build_dataset(sp, "train", {S}, seed=7)
            for i in reversed(test_data.DIGEST_IDX):
                digests[f"{{sp}}/{{i}}"] = test_data._digest(ds[i])
        print(json.dumps([test_data._batches(loader), digests]), flush=True)
        dist.destroy_process_group()
        os._exit(0)
    """)
    env = dict(os.environ, PYTHONHASHSEED="12345")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(2)]
    here = {f"{sp}/{i}": _digest(data.build_dataset(sp, "train", S, seed=7)[i]) for sp in DIGEST_SPECS for i in DIGEST_IDX}
    single = _batches(data.build_loader(_Index(), 8, shuffle=True, seed=5, epoch=3))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[1][1] == here
    assert len(outs[0][0]) == len(outs[1][0]) == len(single) == 4
    for k in range(len(single)):
        assert sorted(outs[0][0][k] + outs[1][0][k]) == sorted(single[k])


# ----------------------------------------------------------------------------- bench hook and the grid

def test_throughput_and_show(tmp_path):
    assert data.throughput("gvb/texture", n=20, img_size=S, warm=5) > 0
    out = tmp_path / "grid.png"
    data.main(["--show", "gvd/det,gvb/depth", "--n", "2", "--img-size", str(S), "--out", str(out)])
    im = Image.open(out)
    assert im.width >= 2 * 3 * S * 3 and im.height >= 2 * S * 3                # 2 rows of up to 3 panels
