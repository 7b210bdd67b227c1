"""benchmarks/bench.py --quick: the whole harness (poise with its defaults and at its fastest, TRL and the bare
loop, each one epoch from process start; the matmul peak, the balancer section and the memory scan) on a
tiny model, in about a minute. Skipped when TRL is not installed
(``pip install -e .[trl]``). It checks that the harness runs and reports; the figures of a tiny model mean
nothing, so no target is asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)  # about 40 s on a quiet 2-core machine: room for a loaded one
def test_bench_quick_writes_the_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--json", str(out),
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("tokens_per_s_ratio_vs_trl", "peak_mem_ratio_vs_trl", "step_ratio_vs_bare",
                "default_tokens_per_s_ratio_vs_trl", "default_peak_mem_ratio_vs_trl", "epoch_wall_ratio_vs_trl",
                "reference_pairs_per_s_ratio_vs_training", "matmul_peak_gflops", "step_matmul_fraction"):
        assert isinstance(res[key], float) and math.isfinite(res[key]) and res[key] > 0, key
    # a difference of two wall times (may come out below 0 on a tiny model) and a share of the tokens computed
    assert isinstance(res["diagnostics_overhead"], float) and math.isfinite(res["diagnostics_overhead"])
    assert math.isfinite(res["diagnostics_peak_mem_overhead"])
    assert 0 <= res["padding_fraction"] < 1
    assert res["matmul_peaks_gflops"]["fp32"] > 0
    contenders = res["raw"]["contenders"]
    for c in ("poise-default", "poise-nodiag", "poise-fast", "trl", "bare"):
        assert contenders[c]["epoch_wall_s"] > contenders[c]["train_s"] > 0, c
        assert 0 <= contenders[c]["padding_fraction"] < 1, c
        assert contenders[c]["mixed_precision"] in ("no", "bf16"), c
    assert contenders["poise-default"]["options"]["diagnostics"] is True
    assert contenders["poise-fast"]["options"]["diagnostics"] is False
    assert contenders["poise-nodiag"]["options"]["diagnostics"] is False
    assert contenders["poise-default"]["options"]["gradient_checkpointing"] is True
    assert contenders["poise-nodiag"]["options"]["gradient_checkpointing"] is True  # defaults but diagnostics
    assert contenders["poise-fast"]["options"]["gradient_checkpointing"] is False
    # the quick run is a few steps: the default diagnostics budget plans no probe (counted, and timed, as 0)
    assert contenders["poise-fast"]["probes"] == 0 and contenders["poise-default"]["probes"] >= 0
    assert (contenders["poise-default"]["probes"] == 0) == (contenders["poise-default"]["probe_s"] == 0)
    assert contenders["poise-default"]["disk"]["final_model_mib"] > 0
    assert set(res["balancer_overhead"]) == {"adadpo", "gate-dpo", "balanced-dpo"}
    assert all(isinstance(v, float) for v in res["balancer_overhead"].values())
    assert res["tokens"]["identical"], res["tokens"]  # the four trained on the same token ids
    for key in ("cpu_model", "cpu_cores", "torch"):
        assert res["machine"][key]
    assert res["date"]
    assert all(contenders[c]["tokens_per_s"] > 0 for c in ("poise", "poise-default", "poise-fast", "trl", "bare"))
    assert res["mem_scan"]["entries"]
    assert {t["verdict"] for t in res["targets"]} <= {"PASS", "FAIL", "n/a"}
    assert "poise fastest/TRL tokens/s" in proc.stdout and "poise defaults/TRL epoch wall" in proc.stdout
    assert "matmul peak of this machine" in proc.stdout
