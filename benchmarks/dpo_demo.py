"""DPO demonstration on the synthetic arithmetic task (fixed seeds, CPU): from an SFT checkpoint, ``intro2llm dpo``
with 3 seeds; reports the held-out reward margin, preference accuracy and 2-digit-addition exact match before and
after, with their spread over the seeds.

    python benchmarks/dpo_demo.py --sft /work/ckpt/sft --out /tmp/dpo_demo            # the lesson's figures
    python benchmarks/dpo_demo.py --make-sft --out /tmp/dpo_demo                       # no SFT checkpoint yet: a small
                                                                                       # model SFT-trained from scratch

Run-to-run noise: the standard deviation over the 3 DPO seeds (data order and sampled pairs), and the binomial
standard error of an exact-match rate over the held-out problems (sqrt(p (1 - p) / n)).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path


def make_sft(out: Path, steps: int, threads: int) -> Path:
    """A 0.8M-parameter model (4 layers, width 128, char-level synthetic tokenizer) SFT-trained from scratch."""
    import torch

    from intro2llm.cli import main
    from intro2llm.data import synthetic
    from intro2llm.data.prepare import synthetic_tokenizer
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.config import ModelConfig

    init, sft = out / "init", out / "sft"
    if (sft / "model.safetensors").exists():
        return sft
    tok = synthetic_tokenizer(list(synthetic.pretrain_documents(2000, seed=0)))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    CausalLM(cfg).save_pretrained(init)
    tok.save(init / "tokenizer.json")
    rc = main(["sft", "--ckpt", str(init), "--data", "synthetic", "--out", str(sft), "--steps", str(steps), "--lr",
               "3e-3", "--warmup", "30", "--batch-size", "32", "--no-progress", "--no-tensorboard", "--threads",
               str(threads), "--save-every", "100", "--eval-every", "100000"])
    if rc != 0:
        sys.exit(rc)
    return sft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sft", default="/work/ckpt/sft", help="SFT checkpoint directory")
    ap.add_argument("--make-sft", action="store_true", help="train a small SFT model first (into OUT/sft)")
    ap.add_argument("--sft-steps", type=int, default=500)
    ap.add_argument("--out", default="/tmp/dpo_demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    from intro2llm.training.dpo_cli import DEFAULTS  # the demonstration runs the CLI's defaults

    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--beta", type=float, default=DEFAULTS["beta"])
    ap.add_argument("--num-train", type=int, default=DEFAULTS["num_train"])
    ap.add_argument("--samples", type=int, default=200, help="held-out problems")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    from intro2llm.cli import main as cli

    out = Path(args.out)
    sft = make_sft(out, args.sft_steps, args.threads) if args.make_sft else Path(args.sft)
    runs = []
    for seed in args.seeds:
        run_dir = out / f"dpo_seed{seed}"
        t0 = time.perf_counter()
        if not (run_dir / "summary.json").exists():
            rc = cli(["dpo", "--ckpt", str(sft), "--data", "synthetic", "--out", str(run_dir), "--seed", str(seed),
                      "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                      "--beta", str(args.beta), "--num-train", str(args.num_train), "--accuracy-samples",
                      str(args.samples), "--threads", str(args.threads), "--no-progress", "--no-tensorboard"])
            if rc != 0:
                sys.exit(rc)
        s = json.loads((run_dir / "summary.json").read_text())
        s["wall_seconds"] = round(time.perf_counter() - t0, 1)
        runs.append(s)
        print(json.dumps({"seed": seed, **{k: s[k] for k in ("accuracy_before", "accuracy_after", "train_seconds")},
                          "margin_before": s["eval_before"]["rewards/margins"],
                          "margin_after": s["eval_after"]["rewards/margins"],
                          "pref_acc_before": s["eval_before"]["rewards/accuracies"],
                          "pref_acc_after": s["eval_after"]["rewards/accuracies"]}), flush=True)

    def spread(values):
        return {"mean": round(statistics.mean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}

    acc_before = runs[0]["accuracy_before"]
    report = {
        "sft_checkpoint": str(sft), "seeds": args.seeds, "steps": args.steps, "batch_size": args.batch_size,
        "lr": args.lr, "beta": args.beta, "held_out": args.samples,
        "accuracy_before": acc_before,
        "accuracy_after": spread([r["accuracy_after"] for r in runs]),
        "accuracy_binomial_se": round(math.sqrt(acc_before * (1 - acc_before) / args.samples), 4),
        "margin_before": runs[0]["eval_before"]["rewards/margins"],
        "margin_after": spread([r["eval_after"]["rewards/margins"] for r in runs]),
        "preference_accuracy_before": runs[0]["eval_before"]["rewards/accuracies"],
        "preference_accuracy_after": spread([r["eval_after"]["rewards/accuracies"] for r in runs]),
        "train_seconds": spread([r["train_seconds"] for r in runs]),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
