"""Shared-prompt vs separate rows on a GPU: one forward + backward of the policy's log-probs per layout,
alternating, with the attention implementation given (sdpa picks its flash kernel only without a custom
mask: the shared layout's 4D mask rules it out, the separate layout's right padding allows it).

    python benchmarks/layout_gpu.py [--attn sdpa] [--pairs 8] [--prompt 384] [--response 128] [--reps 10]

Prints one line per layout (median ms, peak GiB) and which layout is faster. A random-weight model of
SmolLM2-135M's shape in bf16 autocast over fp32 weights (what `mixed_precision: auto` runs on a GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from poise.data import TokenizedPair
from poise.model.logprobs import batch_logps
from poise.model.shared_prefix import collate_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attn", default="sdpa", help="attn_implementation: sdpa, eager, flash_attention_2")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=384)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    dev = torch.device("cuda")
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                      attn_implementation=a.attn)
    model = LlamaForCausalLM(cfg).to(dev)
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(10, cfg.vocab_size, (n,), generator=g).tolist()

    pairs = [TokenizedPair(ids(a.prompt - 16 * (i % 4)), ids(a.response - 8 * (i % 3)), ids(a.response - 8 * (i % 5)),
                           "random", i) for i in range(a.pairs)]
    times: dict[str, list[float]] = {"shared": [], "separate": []}
    peak: dict[str, float] = {}
    for rep in range(a.reps + 2):
        for layout in times:
            batch = collate_layout(pairs, 0, layout).to(dev)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = batch_logps(model, batch, chunk_size=1024)
            out.logps.sum().backward()
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if rep >= 2:  # two warm-up rounds
                times[layout].append(time.perf_counter() - t0)
                peak[layout] = torch.cuda.max_memory_allocated() / 2**30
    for layout, ts in times.items():
        print(f"{layout:9s} {statistics.median(ts) * 1e3:8.1f} ms  peak {peak[layout]:.2f} GiB  ({a.attn})")
    faster = min(times, key=lambda k: statistics.median(times[k]))
    ratio = statistics.median(times["separate"]) / statistics.median(times["shared"])
    print(f"faster: {faster} (separate / shared time = {ratio:.2f})")


if __name__ == "__main__":
    main()
