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
        # The pipeline so far: the backbones exist; the stages (amateur -> mim -> experts ->
        # generalist -> probe) are still to come (see README, "Status").
        for f in eva.py metanet.py; do
            [ -f "$f" ] && "$PY" "$f"
        done
        echo "[run.sh] still to come: stages.py (amateur, mim, experts, generalist) and probe.py"
        ;;
    *)
        echo "usage: bash run.sh [--quick] | test [pytest args] | bench [bench.py args]" >&2
        exit 2
        ;;
esac
