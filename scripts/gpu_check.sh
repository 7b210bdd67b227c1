#!/usr/bin/env bash
# The GPU checks of docs/performance.md and docs/distributed.md, in one run on a machine with NVIDIA GPUs:
#
#   bash scripts/gpu_check.sh [OUT_FOLDER]        (default: gpu-check; about 10-20 minutes)
#
# 1. bf16 autocast training over fp32 master weights (mixed_precision: auto) on one GPU: a 5e-7 update
#    moves the weights; pure bf16 weights warn;
# 2. the shared-prompt layout against separate rows with sdpa (and flash-attention-2 when installed):
#    which one is faster on this GPU;
# 3. FSDP2 and DeepSpeed ZeRO-3 over every GPU present (nccl), against one process;
# 4. the CUDA benchmark (benchmarks/bench.py --device cuda) on the small model and SmolLM2.
# Everything it prints goes to OUT_FOLDER/log.txt; the figures to OUT_FOLDER/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
bash scripts/setup.sh dev,trl,deepspeed,gguf
PY=.venv/bin/python
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
echo "gpus: $NGPU"

echo "== 1. precision"
$PY -m pytest -q -p no:cacheprovider tests/training/test_precision.py
$PY - "$OUT" <<'PYEOF'
import json, sys, torch
from pathlib import Path
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer
from poise.training.config import from_dict
from poise.training.loop import train
from safetensors.torch import load_file
sys.path.insert(0, "tests/training")
from conftest import write_pairs
out = Path(sys.argv[1]); root = out / "precision"; root.mkdir(parents=True, exist_ok=True)
tok = build_tiny_tokenizer(); build_tiny_model(tok, hidden_size=64, num_layers=2).save_pretrained(root / "model")
tok.save_pretrained(root / "model"); write_pairs(root / "train.jsonl", 64)
base = dict(model=str(root / "model"), train_file=str(root / "train.jsonl"), learning_rate=5e-7, max_steps=10,
            scheduler="constant", warmup_ratio=0.0, max_grad_norm=None, batch_size=8, micro_batch_size=8,
            cache_dir=str(root / "cache"), save_steps=0)
res = {}
start = load_file(str(root / "model" / "model.safetensors"))
for name, kw in {"auto": {}, "pure_bf16": {"dtype": "bfloat16"}}.items():
    run = train(from_dict({**base, **kw, "output_dir": str(root / name)}))
    w = load_file(str(run.model_dir / "model.safetensors"))
    moved = sum((w[k] != start[k].to(w[k].dtype)).sum().item() for k in w if "embed" not in k and w[k].dim() > 1)
    total = sum(w[k].numel() for k in w if "embed" not in k and w[k].dim() > 1)
    res[name] = moved / total
print("fraction of weights moved by 10 AdamW steps at 5e-7:", res)
(out / "precision.json").write_text(json.dumps(res))
PYEOF

echo "== 2. layouts"
$PY benchmarks/layout_gpu.py --attn sdpa | tee "$OUT/layout_sdpa.txt"
if $PY -c "import flash_attn" 2>/dev/null; then
  $PY benchmarks/layout_gpu.py --attn flash_attention_2 | tee "$OUT/layout_flash2.txt" || true
fi

echo "== 3. engines over $NGPU GPUs"
if [ "$NGPU" -ge 2 ]; then
  E="$OUT/engines"; mkdir -p "$E"
  $PY - "$E" <<'PYEOF'
import sys, yaml
from pathlib import Path
sys.path.insert(0, "tests/training")
from conftest import write_pairs
from poise.model.tiny import build_tiny_model, build_tiny_tokenizer
root = Path(sys.argv[1]); tok = build_tiny_tokenizer()
build_tiny_model(tok, hidden_size=256, num_layers=4).save_pretrained(root / "model"); tok.save_pretrained(root / "model")
write_pairs(root / "train.jsonl", 256)
base = dict(model=str(root / "model"), train_file=str(root / "train.jsonl"), batch_size=16, micro_batch_size=2,
            max_steps=8, learning_rate=1e-4, scheduler="constant", warmup_ratio=0.0, cache_dir=str(root / "cache"))
for name, kw in {"one": {}, "fsdp": {"distributed": "fsdp"}, "zero3": {"distributed": "deepspeed", "deepspeed_stage": 3}}.items():
    (root / f"{name}.yaml").write_text(yaml.safe_dump({**base, **kw, "output_dir": str(root / name)}))
PYEOF
  $PY -m poise train "$E/one.yaml"
  for engine in fsdp zero3; do
    $PY -m torch.distributed.run --nproc_per_node "$NGPU" -m poise train "$E/$engine.yaml"
  done
  $PY - "$E" <<'PYEOF'
import sys
from pathlib import Path
from safetensors.torch import load_file
root = Path(sys.argv[1]); one = load_file(str(root / "one/model/model.safetensors"))
for engine in ("fsdp", "zero3"):
    w = load_file(str(root / engine / "model/model.safetensors"))
    worst = max(((w[k].float() - one[k].float()).abs().max() / one[k].float().abs().max()).item() for k in one)
    print(f"{engine}: largest weight difference to one GPU, relative to the tensor's scale: {worst:.2e}")
PYEOF
else
  echo "one GPU: the multi-GPU engine check needs 2 or more"
fi

echo "== 4. CUDA benchmark"
$PY benchmarks/bench.py --device cuda --model small --json "$OUT/bench_small_cuda.json" --md "$OUT/bench_small_cuda.md"
$PY benchmarks/bench.py --device cuda --model smollm2 --json "$OUT/bench_smollm2_cuda.json" --md "$OUT/bench_smollm2_cuda.md"
echo "done: $OUT"
