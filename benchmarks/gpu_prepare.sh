#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on the GPU machine, which has no network:
#
#   .whl/        cp312 manylinux wheels of the packages its image lacks (pip download --no-deps)
#   .gpu_data/   Fashion-MNIST (the four IDX .gz files, ~31 MB) copied from ../shared/data
#
# Both folders are git-ignored; the device call names them in `carry`. Run from anywhere:
#
#   bash benchmarks/gpu_prepare.sh            # then check the printed total is < 64 MiB
#
# Versions are the ones the CPU test suite runs with (constraints.txt / the dev venv).
# The GPU image already has torch, numpy, scipy, pandas, pyarrow, pyyaml, tqdm, einops,
# matplotlib, typer, pytest, hypothesis, pytest-timeout, lightning and transformers
# (/work/.library/device/KINDS.md), so only these travel.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Fashion-MNIST from $SHARED_DATA, else ../shared/data, else $QLRLAB_DATA
SHARED_DATA=${SHARED_DATA:-../shared/data}
[ -d "$SHARED_DATA/fashion_mnist" ] || SHARED_DATA=${QLRLAB_DATA:-$SHARED_DATA}

WHEELS=(
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd==0.2.3
  curvlinops-for-pytorch==3.0.1
  optuna==5.1.0 alembic==1.20.1 colorlog==6.12.0 Mako==1.4.3 SQLAlchemy==2.1.9
)

rm -rf .whl && mkdir -p .whl
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$w"
done

# the same install the GPU machine does, for Python 3.12 (proves the set resolves: tags match,
# one version of each package)
check=$(mktemp -d)
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
  --target "$check" --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --only-binary=:all: .whl/*.whl
rm -rf "$check"

rm -rf .gpu_data && mkdir -p .gpu_data/fashion_mnist
cp "$SHARED_DATA"/fashion_mnist/*.gz .gpu_data/fashion_mnist/
chmod -R u+w .gpu_data

ls -l .whl
# what travels: the tracked and untracked-not-ignored files plus the carried folders
tree_bytes=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
whl_bytes=$(du -sb .whl | cut -f1)
data_bytes=$(du -sb .gpu_data | cut -f1)
total=$((tree_bytes + whl_bytes + data_bytes))
printf 'working tree %d B, .whl %d B, .gpu_data %d B: total %.1f MiB (limit 64 MiB)\n' \
  "$tree_bytes" "$whl_bytes" "$data_bytes" "$(echo "$total / 1048576" | bc -l)"
if [ "$total" -ge $((64 * 1048576)) ]; then
  echo "over the 64 MiB limit: drop optuna's wheels (optuna alembic colorlog Mako SQLAlchemy;" \
       "only qlrlab tune needs them) first" >&2
  exit 1
fi
