#!/usr/bin/env bash
# intern-eva entry point.
#   bash run.sh            the whole pipeline on the embedded default (GV-D-mini, demo models, CPU)
#   bash run.sh --quick    the same with minimal steps (a smoke run), Down-A included
#   bash run.sh adapt      Down-A rows (LP-FT, distillation) into the pipeline's table
#   bash run.sh test       the test suite (what CI runs)
#   bash run.sh bench      the benchmarks (bench.py); extra arguments are passed on
# Environment: ARCH (the chain's backbone preset, default eva_demo; metanet_demo runs INTERN's own
# backbone through every stage, MIM included), STEPS (per stage, default 120), RUNS_DIR (runs).
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
# amateur -> mim -> three experts (+ the supervised baseline) -> generalist (+ the hybrid peer)
# -> GV-B-mini probe. `bash run.sh adapt` then adds the Down-A rows (LP-FT, distillation);
# `--quick` does both.
# Each stage reuses its checkpoint when one with the same config is already complete (--reuse).
# Stages that do not depend on each other run two at a time, one thread each: these small models
# use a second thread poorly (two 1-thread runs together take 1.2x one 2-thread run, not 2x).
pipeline() {
    local runs=${RUNS_DIR:-runs} tag=${ARCH:+_$ARCH}     # ARCH=metanet_demo -> runs/demo_metanet_demo
    local out=$runs/demo$tag steps=${STEPS:-120} probe_steps=60 caps="--max-train 600 --max-test 300"
    local stage_opts=()
    if [ "$1" = "--quick" ]; then
        out=$runs/quick$tag steps=4 probe_steps=3 caps="--max-train 48 --max-test 24"
        stage_opts=(--no-eval)    # 4-step stages have nothing to evaluate; the tests cover evaluation
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    local arch=${ARCH:-eva_demo} t0=$SECONDS
    local S=("$PY" stages.py --arch "$arch" --reuse "${stage_opts[@]}")
    mkdir -p "$out/logs"
    echo "[run.sh] pipeline into $out/ (arch $arch, $steps steps per stage; stage logs in $out/logs/)"
    # one function per stage (they read this function's locals: bash scoping is dynamic)
    amateur() { "${S[@]}" --stage amateur --steps "$steps" --out "$out/amateur"; }
    mim() { "${S[@]}" --stage mim --steps "$steps" --teacher "$out/amateur/last.pt" --out "$out/mim"; }
    expert_cls() { "${S[@]}" --stage expert --task cls --steps "$steps" --init "$out/mim/last.pt" --out "$out/expert_cls"; }
    expert_det() { "${S[@]}" --stage expert --task det --steps "$steps" --init "$out/mim/last.pt" --out "$out/expert_det"; }
    expert_seg() { "${S[@]}" --stage expert --task seg --steps "$steps" --init "$out/mim/last.pt" --out "$out/expert_seg"; }
    # the "ImageNet baseline": the same backbone trained from scratch on upstream classification only
    supervised() { "${S[@]}" --stage expert --task cls --steps "$steps" --out "$out/supervised"; }
    # beside the chain: seed 003's one-stage hybrid (multi-label + pixel MIM + contrastive)
    hybrid() { "${S[@]}" --stage hybrid --steps "$steps" --out "$out/hybrid"; }
    generalist() {
        "${S[@]}" --stage generalist --steps "$steps" --main cls \
            --experts "cls=$out/expert_cls/last.pt,det=$out/expert_det/last.pt,seg=$out/expert_seg/last.pt" \
            --out "$out/generalist"
    }
    together amateur hybrid
    together mim supervised
    together expert_cls expert_det
    together expert_seg
    together generalist
    "$PY" probe.py --steps "$probe_steps" $caps --out "$out/probe" --ckpt "random=random:$arch" \
        "supervised=$out/supervised/last.pt" "amateur=$out/amateur/last.pt" "mim=$out/mim/last.pt" \
        "expert_cls=$out/expert_cls/last.pt" "expert_det=$out/expert_det/last.pt" \
        "expert_seg=$out/expert_seg/last.pt" "hybrid=$out/hybrid/last.pt" \
        "generalist=$out/generalist/last.pt"     # last: viz/ pictures the generalist's predictions
    echo "[run.sh] done in $((SECONDS - t0)) s; table: $out/probe/gvb.md, pictures: $out/probe/viz/"
    if [ "$1" = "--quick" ]; then adapt "$1"; fi
}

# Run the named stage functions at the same time (one thread each when two), each into
# $out/logs/NAME.log; print their one-line summaries; stop with the log's tail if one fails.
together() {
    local name pids=() failed=""
    echo "[run.sh] $* ..."
    for name in "$@"; do
        if [ $# -gt 1 ]; then
            OMP_NUM_THREADS=1 "$name" > "$out/logs/$name.log" 2>&1 &
        else
            "$name" > "$out/logs/$name.log" 2>&1 &
        fi
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || failed="$failed ${*:$((i + 1)):1}"
    done
    for name in "$@"; do grep -a "^\[stages\]" "$out/logs/$name.log" || true; done
    if [ -n "$failed" ]; then
        for name in $failed; do
            echo "[run.sh] stage $name failed; the end of $out/logs/$name.log:" >&2
            tail -n 20 "$out/logs/$name.log" >&2
        done
        exit 1
    fi
}

# Down-A on the pipeline's generalist: rows generalist+lpft, student+distill and student, merged
# into the pipeline's table (run it after the pipeline; about 4 more minutes on 2 CPU cores).
adapt() {
    local tag=${ARCH:+_$ARCH}
    local out=${RUNS_DIR:-runs}/demo$tag probe_steps=60 caps="--max-train 600 --max-test 300" adapt_opts=""
    if [ "${1:-}" = "--quick" ]; then
        out=${RUNS_DIR:-runs}/quick$tag probe_steps=3 caps="--max-train 48 --max-test 24"
        adapt_opts="--ft-epochs 0.05 --ft-min-steps 2 --distill-epochs 0.05"
    fi
    if [ ! -f "$out/generalist/last.pt" ] || [ ! -f "$out/probe/gvb.json" ]; then
        echo "[run.sh] adapt: no $out/generalist/last.pt or $out/probe/gvb.json yet: run 'bash run.sh${1:+ $1}' first" >&2
        exit 1
    fi
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
    local t0=$SECONDS
    "$PY" probe.py --adapt lpft --steps "$probe_steps" $caps $adapt_opts --out "$out/probe" \
        --ckpt "generalist=$out/generalist/last.pt"
    "$PY" probe.py --adapt distill --student eva_demo --steps "$probe_steps" $caps $adapt_opts \
        --out "$out/probe" --ckpt "generalist=$out/generalist/last.pt"
    echo "[run.sh] Down-A done in $((SECONDS - t0)) s; rows added to $out/probe/gvb.md"
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
    adapt)
        shift
        adapt "${1:-}"
        ;;
    *)
        echo "usage: bash run.sh [--quick] | adapt [--quick] | test [pytest args] | bench [bench.py args]" >&2
        exit 2
        ;;
esac
