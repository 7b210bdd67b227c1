#!/usr/bin/env bash
# Reproduce docs/results.md from a checkout (after `bash scripts/setup.sh`), offline, on a CPU:
# the quickstart (testbed data, SFT, five methods from the same start; ~5 min), then the 16-cell grid
# of methods x (learning rate, beta) (80 runs, ~20-40 min on 2 cores), then the reports.
set -euo pipefail
cd "$(dirname "$0")/.."
P=${POISE:-.venv/bin/poise}
$P quickstart --out quickstart
$P sweep configs/sweeps/testbed-grid.yaml
$P report sweeps/testbed-grid/*/* --out sweeps/testbed-grid/report.md > /dev/null
$P sweep configs/sweeps/testbed-baselines.yaml     # issue 17: the section-10 baselines, 6 seeds (~20 min)
$P report sweeps/testbed-baselines/*/*/* --out sweeps/testbed-baselines/report.md > /dev/null
$P score-pairs configs/dpo.yaml model=quickstart/sft/model train_file=quickstart/data/pairs.jsonl max_length=32 \
  max_prompt_length=16 micro_batch_size=16 'mixed_precision="no"' output_dir=quickstart/pair_scores \
  --out quickstart/pair_scores --drop-top 0.1 --force
$P sweep configs/sweeps/testbed-ches-filter.yaml   # DPO and AdaDPO on the CHES-filtered pairs vs all (~4 min)
$P report sweeps/testbed-ches-filter/*/*/* --baseline dpo-full --out sweeps/testbed-ches-filter/report.md > /dev/null
$P plot quickstart/runs/* --out quickstart/plots > /dev/null
echo "results: quickstart/report.md, quickstart/plots/, sweeps/testbed-grid/report.md, sweeps/testbed-baselines/report.md, quickstart/pair_scores/summary.json, sweeps/testbed-ches-filter/report.md"
