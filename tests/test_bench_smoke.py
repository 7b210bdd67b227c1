"""benchmarks/bench.py --quick: the whole harness (poise, TRL and the bare loop, the balancer section and
the memory scan) on a tiny model, in about a minute. Skipped when TRL is not installed
(``pip install -e .[trl]``). It checks that the harness runs and reports; the figures of a tiny model mean
nothing, so no target is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_bench_quick_writes_the_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--json", str(out),
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("tokens_per_s_ratio_vs_trl", "peak_mem_ratio_vs_trl", "step_ratio_vs_bare"):
        assert isinstance(res[key], float) and res[key] > 0, key
    assert set(res["balancer_overhead"]) == {"adadpo", "gate-dpo", "balanced-dpo"}
    assert all(isinstance(v, float) for v in res["balancer_overhead"].values())
    assert res["tokens"]["identical"], res["tokens"]  # the three trained on the same token ids
    for key in ("cpu_model", "cpu_cores", "torch"):
        assert res["machine"][key]
    assert res["date"]
    assert {c: res["raw"]["contenders"][c]["tokens_per_s"] > 0 for c in ("poise", "trl", "bare")}
    assert res["mem_scan"]["entries"]
    assert {t["verdict"] for t in res["targets"]} <= {"PASS", "FAIL", "n/a"}
    assert "poise/TRL tokens/s" in proc.stdout
