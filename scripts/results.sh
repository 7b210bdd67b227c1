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
$P plot quickstart/runs/* --out quickstart/plots > /dev/null
echo "results: quickstart/report.md, quickstart/plots/, sweeps/testbed-grid/report.md"
