"""run.sh: `bash run.sh --quick` runs the whole chain (amateur -> mim -> experts -> generalist,
the hybrid beside it -> probe -> Down-A rows) end to end and leaves a complete table; a second
run reuses every finished stage."""
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["random", "supervised", "amateur", "mim", "expert_cls", "expert_det", "expert_seg", "hybrid",
          "generalist"]
STAGES = MODELS[1:]                                       # the ones trained by stages.py
ADAPTED = {"generalist+lpft", "student+distill", "student"}


def test_quick_pipeline_end_to_end_and_reuse(tmp_path):
    env = dict(os.environ, RUNS_DIR=str(tmp_path), INTERN_KERNELS="torch")
    r = subprocess.run(["bash", "run.sh", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.load(open(tmp_path / "quick" / "probe" / "gvb.json"))["rows"]
    main = [(m, p) for m in MODELS for p in (10, 100)]
    assert [(row["model"], row["percent"]) for row in rows[:len(main)]] == main
    assert sorted((row["model"], row["percent"]) for row in rows[len(main):]) == \
        sorted((m, p) for m in ADAPTED for p in (10, 100))        # merged in, nothing replaced
    for row in rows:
        assert all(row[k] is not None for k in ("cls_avg", "det_ap50", "seg_miou", "depth_rmse"))
    for stage in STAGES:
        assert os.path.exists(tmp_path / "quick" / stage / "last.pt")
    # re-run: every stage says it reuses its checkpoint instead of training again
    r2 = subprocess.run(["bash", "run.sh", "--quick"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("reusing") + r2.stderr.count("reusing") == len(STAGES)
