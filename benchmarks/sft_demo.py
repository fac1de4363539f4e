"""SFT demonstration: the default ``intro2llm sft`` run from a pretrained checkpoint, over several seeds.

    intro2llm train --out runs/nano                       # the pretrained checkpoint (once; nano preset by default)
    python benchmarks/sft_demo.py --ckpt runs/nano [--seeds 0 1 2] [-- extra sft flags]

For each seed: ``intro2llm sft --ckpt CKPT --out OUT/seed_<s> --seed <s>`` (fresh directory), then the held-out
2-digit-addition exact match before/after (``summary.json``) and the wall time. Prints one JSON line per seed and
a summary: mean, min/max and standard deviation of the accuracy after SFT (the run-to-run noise), and the times.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", default="runs/sft_demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("extra", nargs="*", help="extra flags for intro2llm sft (after --)")
    args = ap.parse_args()
    runs = []
    for seed in args.seeds:
        out = Path(args.out) / f"seed_{seed}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "intro2llm", "sft", "--ckpt", args.ckpt, "--out", str(out), "--seed",
                        str(seed), "--no-progress", *args.extra], check=True)
        summary = json.loads((out / "summary.json").read_text())
        rec = {"seed": seed, "accuracy_before": summary.get("accuracy_before"), "accuracy": summary.get("accuracy"),
               "train_seconds": summary.get("train_seconds"), "wall_seconds": round(time.perf_counter() - t0, 1)}
        runs.append(rec)
        print(json.dumps(rec), flush=True)
    acc = [r["accuracy"] for r in runs]
    result = {"ckpt": args.ckpt, "seeds": args.seeds, "accuracy_mean": round(statistics.mean(acc), 4),
              "accuracy_min": min(acc), "accuracy_max": max(acc),
              "accuracy_std": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
              "accuracy_before": runs[0]["accuracy_before"],
              "train_seconds_mean": round(statistics.mean(r["train_seconds"] for r in runs), 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
