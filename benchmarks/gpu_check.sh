#!/usr/bin/env bash
# Everything GPU-related in one go, on a machine with a GPU and no network (well under 10 minutes):
# the gpu tests at 1 and 2 ranks, the device all-reduce per path at 1 and 2 ranks, and the training
# step on cupy against PyTorch. Results: $OUT (default build/gpu_check) holds gpu_check.json, the
# tables (gpu_check.txt) and the test logs.
#
#   bash benchmarks/gpu_check.sh
#
# What is missing is installed from wheels carried in .whl/ beside the source tree (pip --no-index):
# mpich (mpiexec and libmpi for mpi4py), mpi4py and pytest-mpi. Fetch them where pip works with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl mpich==5.0.2 mpi4py==4.1.2 pytest-mpi==0.6
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
if ! command -v mpiexec >/dev/null && [ -d .whl ]; then
    # A virtual environment over the system's packages (cupy, torch), with the carried MPI in it.
    $PY -m venv --system-site-packages /tmp/gpu-venv && PY=/tmp/gpu-venv/bin/python
    $PY -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl || exit 1
    export PATH="/tmp/gpu-venv/bin:$PATH"
fi
log() { echo "$@" | tee -a "$OUT/gpu_check.txt"; }
: > "$OUT/gpu_check.txt"
log "# gpu_check $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT/gpu_check.txt"
$PY -c "import cupy, torch, mpi4py; print('cupy', cupy.__version__, 'torch', torch.__version__, 'mpi4py', mpi4py.__version__)" \
    2>&1 | tee -a "$OUT/gpu_check.txt"
MPIEXEC_TIMEOUT=120 mpiexec -n 2 $PY -m mpitrain info 2>&1 | tee -a "$OUT/gpu_check.txt"
status=0
for n in 1 2; do
    only=$([ $n -eq 1 ] || echo "-m mpi")  # every test of these files at 1 rank, the mpi ones at 2
    log "## gpu tests at $n rank(s)"
    MPIEXEC_TIMEOUT=300 mpiexec -n $n $PY -m mpi4py -m pytest -p no:cacheprovider -q --with-mpi $only \
        tests/test_gpu.py tests/test_device.py tests/test_cuda_aware.py 2>&1 | tee "$OUT/tests_$n.log" | tail -15 \
        | tee -a "$OUT/gpu_check.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
for n in 1 2; do
    log "## device all-reduce at $n rank(s) (two ranks share the one GPU where there is one)"
    MPIEXEC_TIMEOUT=200 mpiexec -n $n $PY benchmarks/gpu.py collectives --json "$OUT/collectives_$n.json" 2>&1 \
        | tee -a "$OUT/gpu_check.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
log "## python -m mpitrain train --backend cupy at 2 ranks (the run header names each rank's GPU)"
MPIEXEC_TIMEOUT=180 mpiexec -n 2 $PY -m mpitrain train --backend cupy --epochs 3 --no-progress 2>&1 \
    | tee -a "$OUT/gpu_check.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
log "## training step: mpitrain on cupy against torch on the same GPU"
timeout 240 $PY benchmarks/gpu.py training --json "$OUT/training.json" 2>&1 | tee -a "$OUT/gpu_check.txt"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
$PY - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
merged = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*.json")))
          if not p.endswith("gpu_check.json")}
json.dump(merged, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
print("# wrote", os.path.join(out, "gpu_check.json"), "with", ", ".join(merged))
PY
log "# gpu_check status: $status"
exit $status
