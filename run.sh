#!/usr/bin/env bash
# intern-eva entry point.
#   bash run.sh            the whole pipeline on the embedded default (GV-D-mini, demo models, CPU)
#   bash run.sh --quick    the same with minimal steps (a smoke run)
#   bash run.sh test       the test suite (what CI runs)
#   bash run.sh bench      the benchmarks (bench.py); extra arguments are passed on
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

# Install only what is missing: a GPU machine may carry its own torch build, which we keep.
if ! "$PY" -c "import torch, triton, numpy, PIL, einops, tqdm, pytest" >/dev/null 2>&1; then
    echo "[run.sh] installing requirements.txt (torch is pinned to the 2.13.0 CPU wheel)"
    "$PY" -m pip install --quiet -r requirements.txt
fi
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

# The paradigm end to end on the embedded default (GV-D-mini, demo-size EVA, CPU):
# amateur -> mim -> three experts (+ the supervised baseline) -> generalist -> GV-B-mini probe.
# Each stage reuses its checkpoint when one with the same config is already complete (--reuse).
pipeline() {
    local runs=${RUNS_DIR:-runs}
    local out=$runs/demo steps=${STEPS:-120} probe_steps=80 caps="--max-train 600 --max-test 300"
    if [ "$1" = "--quick" ]; then
        out=$runs/quick steps=4 probe_steps=3 caps="--max-train 48 --max-test 24"
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    local arch=eva_demo t0=$SECONDS
    local S=("$PY" stages.py --arch "$arch" --reuse)
    mkdir -p "$out"
    echo "[run.sh] pipeline into $out/ (arch $arch, $steps steps per stage)"
    "${S[@]}" --stage amateur --steps "$steps" --out "$out/amateur"
    "${S[@]}" --stage mim --steps "$steps" --teacher "$out/amateur/last.pt" --out "$out/mim"
    for task in cls det seg; do
        "${S[@]}" --stage expert --task "$task" --steps "$steps" --init "$out/mim/last.pt" --out "$out/expert_$task"
    done
    # the "ImageNet baseline": the same backbone trained from scratch on upstream classification only
    "${S[@]}" --stage expert --task cls --steps "$steps" --out "$out/supervised"
    "${S[@]}" --stage generalist --steps "$steps" --main cls \
        --experts "cls=$out/expert_cls/last.pt,det=$out/expert_det/last.pt,seg=$out/expert_seg/last.pt" \
        --out "$out/generalist"
    "$PY" probe.py --steps "$probe_steps" $caps --out "$out/probe" --ckpt "random=random:$arch" \
        "supervised=$out/supervised/last.pt" "amateur=$out/amateur/last.pt" "mim=$out/mim/last.pt" \
        "expert_cls=$out/expert_cls/last.pt" "expert_det=$out/expert_det/last.pt" \
        "expert_seg=$out/expert_seg/last.pt" "generalist=$out/generalist/last.pt"
    echo "[run.sh] done in $((SECONDS - t0)) s; table: $out/probe/gvb.md, pictures: $out/probe/viz/"
}

cmd=${1:-pipeline}
case "$cmd" in
    test)
        shift
        # One BLAS thread: the Triton interpreter's tiny numpy ops run 3-4x faster so.
        export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 TRITON_INTERPRET=1
        exec "$PY" -m pytest -q tests "$@"
        ;;
    bench)
        shift
        if [ $# -gt 0 ]; then exec "$PY" bench.py "$@"; fi
        for what in kernels flops data; do "$PY" bench.py "$what"; done
        ;;
    pipeline|--quick)
        pipeline "$cmd"
        ;;
    *)
        echo "usage: bash run.sh [--quick] | test [pytest args] | bench [bench.py args]" >&2
        exit 2
        ;;
esac
