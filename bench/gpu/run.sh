#!/usr/bin/env bash
# The GPU tier in one command, on a machine with CUDA and torch but no package registry:
#
#   bench/gpu/run.sh [OUT_DIR]        (DEVICE=cpu ROUNDS=1 bench/gpu/run.sh: the same steps on a CPU, to try it;
#                                      SKIP_CPU=1: the GPU's figures only)
#
# What it carries comes from `make gpu-wheels` (docs/benchmarks.md, "On a GPU"): .whl/ (the wheels of the
# package's light dependencies, for CPython 3.12) and .gpu/baseline/ (the baseline commit's package). It
#  1. installs those wheels where the packages are missing (pip --no-index, into /tmp/mm-site),
#  2. runs tests/gpu (the tap under torch.compile and CUDA graphs, scoring parity, the sidecar loop on CUDA),
#  3. runs bench/fleet.py on the GPU, then on the CPU, each side by side with the baseline,
# writing logs and JSON to OUT_DIR (default bench/gpu/results, or $OUT). About 5 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${1:-${OUT:-bench/gpu/results}}
device=${DEVICE:-cuda}
rounds=${ROUNDS:-3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if ! $py -c "import pydantic, pythonjsonlogger" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "run.sh: pydantic or python-json-logger is missing and .whl/ is empty: run 'make gpu-wheels' where pip works, and carry .whl"; exit 2; }
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mm-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/mm-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from this checkout, not installed
$py -c "import sae_lens" 2>/dev/null || export PYTHONPATH=$PYTHONPATH:$PWD/bench/gpu/shim  # for the baseline only

{
  date -u +%FT%TZ
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $py -c "import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', platform.python_version(), 'cpu', platform.processor() or platform.machine())"
  nproc
} 2>&1 | tee "$out/device.txt"

status=0
if [ "$device" = cuda ]; then
  timeout 300 $py -m pytest -q -p no:cacheprovider -o addopts="" tests/gpu 2>&1 | tee "$out/gpu-tests.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

baseline=()
[ -d .gpu/baseline/monitor ] && baseline=(--baseline .gpu/baseline)
for dev in "$device" cpu; do
  [ "$dev" = cpu ] && [ "$device" = cuda ] && [ -n "${SKIP_CPU:-}" ] && continue
  [ "$dev" = cpu ] && [ "$device" = cpu ] && [ -f "$out/fleet-cpu.json" ] && continue
  r=$rounds; [ "$dev" = cpu ] && [ "$device" = cuda ] && r=1  # the CPU side: one round is enough to see it did not fall
  profile=(); [ "$dev" = "$device" ] && profile=(--profile "$out/profile-$dev.txt")
  timeout 360 $py bench/fleet.py --device "$dev" --rounds "$r" --skip-memory "${baseline[@]}" "${profile[@]}" \
    --json "$out/fleet-$dev.json" 2>&1 | tee "$out/fleet-$dev.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "run.sh: done (status $status); results in $out"
exit $status
