#!/usr/bin/env bash
# The reduced-budget CPU studies again at more training seeds, with each seed-0 run's protocol, so
# that every claim can be stated across seeds (docs/results.md, "Across training seeds"):
#
#   1. the Lake-split pair (scripts/run_lake_split.sh: 2,000 steps, 500 test episodes, 10 MC),
#   2. the 2x2 study (scripts/run_fidelity_study.sh: both meta-gradients x MAML / Meta-dropout,
#      2,000 steps, 1000 test episodes, 30 MC),
#   3. the l-inf PGD curve of the 2x2 study's authors' pair (scripts/run_robustness.sh: 100
#      episodes, 20 steps),
#
# each with --config.seed=S; the test episodes depend on eval.seed (0) only, so every seed meets
# the seed-0 runs' episodes and the paired differences are per seed on the same episodes.
# Finished runs are published to results/lake_split/seedS/ and results/fidelity/seedS/.
# Resumable: rerun the same command; finished runs are skipped.
#
#   scripts/run_seed_studies.sh            # SEEDS (default "1 2"), PYTHON (default python)
#
# The pooling is pinned to what the seed-0 runs trained with on the CPU (reduce_window), so that a
# change of the CPU default never mixes formulations across seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-1 2}
PIN="--config.model.pool_impl=reduce_window"
for s in $SEEDS; do
  echo "$(date -u +%FT%TZ) seed $s: Lake-split pair"
  EXTRA="--config.seed=$s $PIN" ROOT=workdirs/seeds/seed$s/lake_split EPISODES=500 MC=10 \
      PUBLISH=results/lake_split/seed$s scripts/run_lake_split.sh maml metadrop
done
for s in $SEEDS; do
  echo "$(date -u +%FT%TZ) seed $s: 2x2 study"
  ROOT=workdirs/seeds/seed$s/fidelity EXTRA="--config.seed=$s $PIN" \
      TITLE="Omniglot 5-way 1-shot (CPU config), 2000 steps, seed $s: exact vs authors' meta-gradient" \
      scripts/run_fidelity_study.sh
  for run in authors_maml authors_metadrop exact_maml exact_metadrop; do
    wd=workdirs/seeds/seed$s/fidelity/$run
    if [[ -f $wd/results.json && ! -f results/fidelity/seed$s/$run/results.json ]]; then
      ${PYTHON:-python} -m metadrop_jax.cli.publish --workdir="$wd" --out="results/fidelity/seed$s/$run"
    fi
  done
done
for s in $SEEDS; do
  echo "$(date -u +%FT%TZ) seed $s: robustness (l-inf) of the authors' pair"
  NORMS=linf OUT='' scripts/run_robustness.sh results/fidelity/seed$s/authors_maml \
      results/fidelity/seed$s/authors_metadrop
done
