"""The pipeline's outputs from its state: ``summary.json``, ``metrics.jsonl``, the PNG plots and ``report.md``.

Everything is rewritten from ``pipeline.json`` and the stage directories after every stage, so an interrupted or
failed run still has a report of what finished. The report's table cells are ``cell(value)`` of the very values in
``summary.json`` (the test checks they agree).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from intro2llm.pipeline import STAGES

# (column title, key in a stage's summary)
COLUMNS = (("steps", "steps"), ("seconds", "seconds"), ("tokens/s", "tokens_per_s"), ("train loss", "train_loss"),
           ("held-out loss", "loss"), ("perplexity", "perplexity"), ("2-digit add exact match", "accuracy"),
           ("mean reward", "reward"), ("preference acc", "preference_accuracy"),
           ("HumanEval pass@1", "humaneval_pass@1"))
PLOTS = {"loss_curves.png": "Training loss of every stage", "accuracy.png": "Exact match per stage and operation",
         "rl_curves.png": "Reward and KL during the RL stages", "samples.png": "Sample answers before and after"}


def cell(value) -> str:  # noqa: ANN001
    """How a summary value appears in the report (the test parses it back)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _stage_metrics(out: Path, stage: str) -> list[dict]:
    path = out / stage / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def summarize(state: dict) -> dict:
    """summary.json: per stage loss, perplexity, accuracy, reward, seconds, tokens/s (and the rest of the eval)."""
    stages = {}
    for stage in state["options"]["stages"]:
        res = state["results"].get(stage)
        if res is None:
            stages[stage] = {"status": "interrupted" if state.get("interrupted") == stage else "not run"}
            continue
        row = {k: v for k, v in res.items() if k != "samples"}
        if isinstance(res.get("humaneval"), dict):
            row["humaneval_pass@1"] = res["humaneval"].get("pass@1")
        stages[stage] = row
    return {"stages": stages, "failed": state.get("failed"), "interrupted": state.get("interrupted"),
            "total_seconds": state.get("total_seconds"), "options": state["options"], "started": state.get("started")}


def write_outputs(out: Path, state: dict, plots: bool = True) -> dict:
    """Rewrite summary.json, metrics.jsonl, the plots (``plots=False``: keep the PNGs already there: drawing them
    costs seconds, so the pipeline redraws them only when it stops) and report.md; returns the summary."""
    from intro2llm._io import atomic_write

    out = Path(out)
    summary = summarize(state)
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    lines = []
    for stage in state["options"]["stages"]:
        lines += [json.dumps({"stage": stage, "event": "train", **r}) for r in _stage_metrics(out, stage)]
        res = state["results"].get(stage)
        if res and res.get("status") == "done" and stage != "tokenizer":
            lines.append(json.dumps({"stage": stage, "event": "eval",
                                     **{k: v for k, v in res.items() if k != "samples"}}))
    atomic_write(out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    names = make_plots(out, state) if plots else [p for p in PLOTS if (out / p).exists()]
    atomic_write(out / "report.md", render_report(summary, state, names))
    return summary


def make_plots(out: Path, state: dict) -> list[str]:
    """The PNGs (matplotlib, Agg); returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stages = [s for s in state["options"]["stages"] if s != "tokenizer"]
    # 1. the loss curves of every stage on one figure, one after the other on a common step axis
    fig, ax = plt.subplots(figsize=(9, 4.5))
    offset, any_curve = 0, False
    for stage in stages:
        rows = _stage_metrics(out, stage)
        key = "loss" if any("loss" in r for r in rows) else "policy_loss"
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        ax.plot([offset + s for s, _ in pts], [v for _, v in pts], label=f"{stage} ({key})")
        ax.axvline(offset, color="0.85", lw=0.8)
        offset += max(s for s, _ in pts)
        any_curve = True
    if any_curve:
        ax.set_xlabel("optimizer step (stages one after another)")
        ax.set_ylabel("training loss")
        ax.set_title("Training loss of every stage")
        ax.legend(loc="upper right")
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        written.append("loss_curves.png")
    plt.close(fig)
    # 2. reward and KL of the RL stages
    rl = [s for s in stages if s in ("grpo", "ppo") and _stage_metrics(out, s)]
    if rl:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for stage in rl:
            rows = _stage_metrics(out, stage)
            a1.plot([r["step"] for r in rows], [r.get("reward", float("nan")) for r in rows], label=stage)
            kl = "kl" if any("kl" in r for r in rows) else "approx_kl"
            a2.plot([r["step"] for r in rows], [r.get(kl, float("nan")) for r in rows], label=f"{stage} ({kl})")
        a1.set(title="mean reward per rollout", xlabel="RL step", ylabel="reward")
        a2.set(title="KL to the reference", xlabel="RL step", ylabel="KL")
        a1.legend(loc="upper left")
        a2.legend(loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "rl_curves.png", dpi=110)
        plt.close(fig)
        written.append("rl_curves.png")
    # 3. exact match per stage, one bar per operation
    done = [s for s in stages if state["results"].get(s, {}).get("status") == "done"]
    if done:
        ops = list(state["results"][done[0]]["accuracy_by_op"])
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(ops)
        for j, op in enumerate(ops):
            vals = [100 * state["results"][s]["accuracy_by_op"].get(op, 0.0) for s in done]
            bars = ax.bar([i + (j - (len(ops) - 1) / 2) * width for i in range(len(done))], vals, width, label=op)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(done)), done)
        ax.set_ylabel("held-out exact match (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Greedy exact match after each stage (same held-out problems)")
        ax.legend(fontsize=8, loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=110)
        plt.close(fig)
        written.append("accuracy.png")
    # 4. sample answers: first model stage vs last
    if len(done) >= 1:
        first, last = done[0], done[-1]
        s0, s1 = state["results"][first]["samples"], state["results"][last]["samples"]
        rows = [[a["prompt"].replace("\n", " "), a["expected"], a["answer"] or "(empty)", b["answer"] or "(empty)"]
                for a, b in zip(s0, s1)]
        if rows:
            fig, ax = plt.subplots(figsize=(9, 0.5 + 0.4 * len(rows)))
            ax.axis("off")
            t = ax.table(cellText=rows, colLabels=["prompt", "expected", f"after {first}", f"after {last}"],
                         loc="center", cellLoc="left")
            t.auto_set_font_size(False)
            t.set_fontsize(9)
            t.scale(1, 1.3)
            fig.tight_layout()
            fig.savefig(out / "samples.png", dpi=110)
            plt.close(fig)
            written.append("samples.png")
    return written


def render_report(summary: dict, state: dict, plots: list[str]) -> str:
    """report.md: the stage table (cells = summary.json values), per-operation accuracy, plots, samples."""
    import torch

    opts = summary["options"]
    lines = ["# intro2llm pipeline report", ""]
    cmd = "intro2llm pipeline --out DIR" + (f" --config {opts['config']}" if opts["config"] else "") + \
        (" --fast" if opts["fast"] else "") + (" --qlora" if opts["qlora"] else "") + \
        f" --stages {','.join(opts['stages'])}"
    lines += [f"Command: `{cmd}` (seed {opts['seed']}), started {summary.get('started')}; machine: "
              f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}.", ""]
    if summary.get("failed"):
        f = summary["failed"]
        lines += [f"**Stage `{f['stage']}` FAILED**: {f['error']}. The stages before it finished and their "
                  "checkpoints are usable; `--resume` retries from it.", ""]
    if summary.get("interrupted"):
        lines += [f"**Interrupted during `{summary['interrupted']}`**; the finished stages are kept "
                  "(`intro2llm pipeline --out DIR --resume` continues).", ""]
    if summary.get("total_seconds") is not None:
        lines += [f"Total stage time: {cell(summary['total_seconds'])} s.", ""]
    lines += ["## Stages", "", "| stage | status | " + " | ".join(c for c, _ in COLUMNS) + " |",
              "|---|---|" + "---|" * len(COLUMNS)]
    for stage, row in summary["stages"].items():
        lines.append(f"| {stage} | {row.get('status')} | " + " | ".join(cell(row.get(k)) for _, k in COLUMNS) + " |")
    tok = summary["stages"].get("tokenizer", {})
    if tok.get("status") == "done":
        lines += ["", f"Tokenizer: vocabulary {tok['vocab_size']} (character level: every digit its own token), "
                      f"special tokens {tok['special_tokens']}, chat template `{tok['template']}`, "
                      f"{tok['chars_per_token']} characters per token on a problem."]
    done = [s for s in STAGES if s != "tokenizer" and summary["stages"].get(s, {}).get("status") == "done"]
    if done:
        ops = list(summary["stages"][done[0]]["accuracy_by_op"])
        lines += ["", "## Exact match per operation (greedy, held-out)", "",
                  "| stage | " + " | ".join(ops) + " | code loss/token | code <unk> share | HumanEval outcomes |",
                  "|---|" + "---|" * (len(ops) + 3)]
        for s in done:
            r = summary["stages"][s]
            he = r.get("humaneval") or {}
            lines.append(f"| {s} | " + " | ".join(cell(r["accuracy_by_op"].get(o)) for o in ops) +
                         f" | {cell(r.get('code_loss'))} | {cell(r.get('code_unk_fraction'))} | "
                         f"{he.get('outcomes', he.get('error', '-'))} |")
    lines += ["", "## Plots", ""]
    lines += [f"### {PLOTS[p]}\n\n![{PLOTS[p]}]({p})\n" for p in plots]
    if done:
        first, last = done[0], done[-1]
        lines += ["## Sample answers", "", f"| prompt | expected | after {first} | after {last} |", "|---|---|---|---|"]
        for a, b in zip(state["results"][first]["samples"], state["results"][last]["samples"]):
            lines.append(f"| `{a['prompt'].replace(chr(10), ' ')}` | {a['expected']} | `{a['answer']}` | "
                         f"`{b['answer']}` |")
    lines += ["", "## What the numbers are", "",
              "- held-out loss / perplexity: next-token cross-entropy on the answers (` c\\n` + end token) of held-out "
              "problems `Q: a+b=?\\nA:` in the stage's chat template — the tokens every stage trains; summary.json's "
              "`text_loss` scores the whole text, prompt included (it grows after SFT: prompts are no longer trained);",
              "- 2-digit add exact match: greedy answers to the 200 held-out 2-digit additions that `intro2llm sft` "
              "reports (never in any training set); per operation: 50 fresh problems each;",
              "- mean reward: `synthetic.reward` of those answers (1 right, 0.1 a well-formed wrong number, 0 else);",
              "- preference acc: share of 100 held-out (prompt, right, plausible wrong) answer pairs where the model "
              "gives the right answer the higher log-probability;",
              "- code loss: loss per token on Python standard-library source (the tokenizer is character level "
              "over the synthetic alphabet, so most code characters are `<unk>`: a probe, not a code model);",
              "- HumanEval pass@1: greedy completions of the shortest HumanEval problems run in the sandbox "
              "(a smoke test of the harness: a model trained on arithmetic solves none);",
              "- tokens/s: training tokens per second (RL stages: generated tokens per second).", ""]
    return "\n".join(lines)
