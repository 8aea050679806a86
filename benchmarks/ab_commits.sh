#!/usr/bin/env bash
# Same host, same hour: bench_step.py's ratios (× torch.optim.Adam, each measured against Adam in
# its own process) for an older commit and for the working tree, in alternating runs, so that a
# change of the host between two sessions is not mistaken for a change of the code.
#
# usage: [OPTIMIZER=label] bash benchmarks/ab_commits.sh OLD_COMMIT [ROUNDS] [bench_step args...]
#   e.g. bash benchmarks/ab_commits.sh 140f772 3 --models fmnist_mlp wide_mlp cnn --steps 60
#        OPTIMIZER=kfac bash benchmarks/ab_commits.sh HEAD 3 --models cnn --steps 30
# OPTIMIZER: a label of bench_step.py's OPTIMISERS (default "adamqlr (own→fast)").
# Prints one line per run: round, tree, model, median × Adam, mean × Adam.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:?usage: ab_commits.sh OLD_COMMIT [ROUNDS] [bench_step args...]}
rounds=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(--models fmnist_mlp wide_mlp --steps 60)
fi
opt=${OPTIMIZER:-"adamqlr (own→fast)"}
py="$PWD/.venv/bin/python"
tree=$(mktemp -d)
trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
git worktree add --detach --force "$tree" "$old" >/dev/null
for ((i = 1; i <= rounds; i++)); do
    for dir in "$tree" "$PWD"; do
        label=$([ "$dir" = "$PWD" ] && echo "working-tree" || echo "$old")
        # PYTHONPATH first: that tree's qlrlab, not the installed one
        (cd "$dir" && PYTHONPATH="$dir" "$py" benchmarks/bench_step.py \
            --optimizers torch.optim.Adam "$opt" "${args[@]}" 2>/dev/null) |
            awk -F'|' -v i="$i" -v t="$label" -v o=" $opt " '$4 == o {print i, t, $2, $7, $8}'
    done
done
