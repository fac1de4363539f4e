"""The lesson 12/13 demonstrations: GRPO and PPO from an SFT checkpoint on held-out 2-digit addition (CPU).

    python benchmarks/rl_demo.py grpo --ckpt /work/ckpt/sft          # held-out exact match before/after, time
    python benchmarks/rl_demo.py ppo  --ckpt /work/ckpt/sft          # 3 seeds: reward gain vs seed-to-seed noise

Each run is ``intro2llm grpo|ppo`` (the CLI, in this process) with fixed seeds; the script reads each run's
``summary.json`` and prints one JSON line per run plus a summary: held-out greedy exact match and mean reward
(``intro2llm.data.synthetic.reward``: 1 right, 0.1 well-formed but wrong, 0 otherwise) before and after, the
training wall time and the process CPU time of the run (on a shared machine the CPU time is the honest figure:
wall time there measures the neighbours). PPO's noise is the standard deviation over seeds of the final held-out
reward and of the gain; the claim is gain / noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# the CLI's own defaults (intro2llm/training/rl_cli.py) are the demonstration's settings; flags given after the
# script's own options are appended and win
GRPO_ARGS: list[str] = []
PPO_ARGS: list[str] = []


def run_one(cmd: str, ckpt: str, seed: int, extra: list[str], out_root: Path) -> dict:
    from intro2llm.cli import main

    out = out_root / f"{cmd}_seed{seed}"
    args = [cmd, "--ckpt", ckpt, "--out", str(out), "--seed", str(seed), "--eval-prompts", "200", "--no-progress",
            "--save-every", "1000", "--threads", "1", *extra]
    cpu0, t0 = time.process_time(), time.perf_counter()
    rc = main(args)
    if rc != 0:
        raise SystemExit(f"{cmd} seed {seed} failed with exit code {rc}")
    s = json.loads((out / "summary.json").read_text())
    rec = {"cmd": cmd, "seed": seed, "before": s["eval_before"], "after": s["eval_after"],
           "train_seconds": s["train_seconds"], "run_wall_seconds": round(time.perf_counter() - t0, 1),
           "run_cpu_seconds": round(time.process_time() - cpu0, 1), "first_rewards": s["first_rewards"],
           "last_rewards": s["last_rewards"]}
    print(json.dumps(rec), flush=True)
    return rec


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["grpo", "ppo"])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--seeds", default=None, help="comma list (default: grpo 0; ppo 0,1,2)")
    ap.add_argument("--out", default=None, help="keep the run directories here (default: a temporary dir)")
    a, more = ap.parse_known_args(argv)  # anything else goes to the CLI (after the defaults, so it wins)
    seeds = [int(s) for s in (a.seeds or ("0" if a.which == "grpo" else "0,1,2")).split(",")]
    extra = (GRPO_ARGS if a.which == "grpo" else PPO_ARGS) + [x for x in more if x != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        recs = [run_one(a.which, a.ckpt, s, extra, root) for s in seeds]
    res: dict = {"which": a.which, "ckpt": a.ckpt, "args": extra, "runs": recs}
    acc = [r["after"]["accuracy"] for r in recs]
    rew_after = [r["after"]["reward"] for r in recs]
    gains = [r["after"]["reward"] - r["before"]["reward"] for r in recs]
    res["accuracy_before"] = recs[0]["before"]["accuracy"]
    res["accuracy_after"] = acc
    res["reward_before"] = recs[0]["before"]["reward"]
    res["reward_after"] = rew_after
    res["max_run_cpu_seconds"] = max(r["run_cpu_seconds"] for r in recs)
    # the reward the trainer optimizes: mean sampled (temperature 1) reward of the first 5 vs the last 5 steps
    sampled = [statistics.mean(r["last_rewards"]) - statistics.mean(r["first_rewards"]) for r in recs]
    res["sampled_reward_gain"] = [round(g, 4) for g in sampled]
    if len(recs) > 1:
        res["reward_gain_mean"] = statistics.mean(gains)
        res["reward_after_std_over_seeds"] = statistics.stdev(rew_after)
        res["reward_gain_std_over_seeds"] = statistics.stdev(gains)
        res["gain_over_noise"] = statistics.mean(gains) / max(statistics.stdev(gains), 1e-9)
        res["sampled_reward_gain_mean"] = statistics.mean(sampled)
        res["sampled_reward_gain_std_over_seeds"] = statistics.stdev(sampled)
        res["sampled_gain_over_noise"] = statistics.mean(sampled) / max(statistics.stdev(sampled), 1e-9)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
