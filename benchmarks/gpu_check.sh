#!/usr/bin/env bash
# The GPU check of issue 17 in one call (see benchmarks/gpu_check.py for the steps; README.md in
# this folder for the device call). On the GPU machine, from the repository root:
#
#   bash benchmarks/gpu_check.sh                 # --device cuda, full sizes, results in $OUT
#   bash benchmarks/gpu_check.sh --device cpu --tiny --out /tmp/gc    # the CPU proof
#
# On the GPU machine (device tool), in ONE call, after `bash benchmarks/gpu_prepare.sh` has made
# .whl/ and .gpu_data/ in the checkout the session was started in (the device tool sends that
# checkout, not a helper's worktree):
#
#   run(command="set -o pipefail; bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/console.log",
#       carry=[".whl", ".gpu_data"], timeout_s=420)
#
# The step limits in gpu_check.py add up to 345 s, so the script ends (and writes its summary)
# before the call's limit; the 6 files in $OUT come back (summary.md, results.json, pytest.log,
# bench.log, ablate.log, console.log) and the console's tail holds summary.md.
#
# First installs the wheels carried in .whl/ (made by benchmarks/gpu_prepare.sh) into /tmp/site
# and puts them on PYTHONPATH; reads Fashion-MNIST from .gpu_data/ (also made by gpu_prepare.sh)
# unless QLRLAB_DATA is set. Extra arguments go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${QLRLAB_DATA:-}" ] && [ -d .gpu_data/fashion_mnist ]; then
  export QLRLAB_DATA=$PWD/.gpu_data
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
