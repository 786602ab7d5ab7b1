#!/usr/bin/env bash
# Everything GPU-related in one go, on a machine with a GPU and no network, inside one time budget
# (GPU_CHECK_BUDGET seconds, default 520): the gpu tests at 1 and 2 ranks, the device all-reduce per
# path at 1 and 2 ranks, the training step on cupy against PyTorch, and a --backend cupy training run.
# Results: $OUT (default build/gpu_check) holds gpu_check.json (every step's JSON, merged after each
# step), the tables (gpu_check.txt) and the test logs.
#
#   bash benchmarks/gpu_check.sh
#
# The steps run most telling first, each within what is left of the budget, so a run cut short still
# leaves the tests at 1 rank and the comparison with PyTorch. A step that runs out of time, or that
# no time is left for, says so and makes the status 1.
#
# What is missing is installed from wheels carried in .whl/ beside the source tree (pip --no-index):
# mpich (mpiexec and libmpi for mpi4py), mpi4py and pytest-mpi. Fetch them where pip works with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl mpich==5.0.2 mpi4py==4.1.2 pytest-mpi==0.6
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
BUDGET=${GPU_CHECK_BUDGET:-520}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
if ! command -v mpiexec >/dev/null && [ -d .whl ]; then
    # The carried MPI under a prefix of its own, in front of the system's packages (cupy, torch):
    # needs no venv module, and pip leaves an externally managed Python alone for a --prefix.
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --prefix /tmp/gpu-mpi .whl/*.whl || exit 1
    site=$(dirname "$(find /tmp/gpu-mpi -maxdepth 6 -type d -name mpi4py | head -n 1)")
    libs=$(dirname "$(find /tmp/gpu-mpi -name 'libmpi.so.12' | head -n 1)")
    export PATH="/tmp/gpu-mpi/bin:$PATH" PYTHONPATH="$site:$PYTHONPATH" LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
log() { echo "$@" | tee -a "$OUT/gpu_check.txt"; }
merge() {
    $PY - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
merged = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*.json")))
          if not p.endswith("gpu_check.json")}
json.dump(merged, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
PY
}
status=0
# step NAME LIMIT LOG COMMAND...: run COMMAND for at most LIMIT seconds (less if the budget has less
# left), its output into LOG, the last lines into the table; mpiexec gets the limit as MPIEXEC_TIMEOUT.
step() {
    local name=$1 limit=$2 output=$3 left=$((BUDGET - SECONDS))
    shift 3
    if [ "$left" -lt 30 ]; then
        log "## $name: not run, ${left} s left of the ${BUDGET} s budget"; status=1; return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    log "## $name (at most ${limit} s)"
    MPIEXEC_TIMEOUT=$limit timeout $((limit + 5)) "$@" > "$output" 2>&1
    local rc=$?
    tail -n 25 "$output" | tee -a "$OUT/gpu_check.txt"
    if [ "$rc" -ne 0 ]; then
        log "## $name: exit status $rc$([ "$rc" -eq 124 ] && echo ", out of time")"; status=1
    fi
    merge
}
: > "$OUT/gpu_check.txt"
log "# gpu_check $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET} s"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/gpu_check.txt"
$PY -c "import cupy, torch, mpi4py; print('cupy', cupy.__version__, 'torch', torch.__version__, 'mpi4py', mpi4py.__version__)" \
    2>&1 | tee -a "$OUT/gpu_check.txt"
TESTS="tests/test_gpu.py tests/test_device.py tests/test_cuda_aware.py"
PYTEST="-m mpi4py -m pytest -p no:cacheprovider -q --with-mpi"
step "python -m mpitrain info at 2 ranks" 60 "$OUT/info.log" mpiexec -n 2 $PY -m mpitrain info
step "gpu tests at 1 rank (every test of $TESTS)" 150 "$OUT/tests_1.log" mpiexec -n 1 $PY $PYTEST $TESTS
step "training step: mpitrain on cupy against torch on the same GPU" 150 "$OUT/training.log" \
    $PY benchmarks/gpu.py training --json "$OUT/training.json"
step "device all-reduce at 2 ranks (they share the GPU where there is one)" 90 "$OUT/collectives_2.log" \
    mpiexec -n 2 $PY benchmarks/gpu.py collectives --json "$OUT/collectives_2.json"
step "gpu tests at 2 ranks (the mpi ones)" 150 "$OUT/tests_2.log" mpiexec -n 2 $PY $PYTEST -m mpi $TESTS
step "python -m mpitrain train --backend cupy at 2 ranks (the run header names each rank's GPU)" 90 \
    "$OUT/train.log" mpiexec -n 2 $PY -m mpitrain train --backend cupy --epochs 3 --no-progress
step "device all-reduce at 1 rank (the copy column: the staging limit)" 60 "$OUT/collectives_1.log" \
    mpiexec -n 1 $PY benchmarks/gpu.py collectives --json "$OUT/collectives_1.json"
log "# gpu_check status: $status after ${SECONDS} s; wrote $OUT/gpu_check.json"
exit $status
