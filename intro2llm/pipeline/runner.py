"""Run the pipeline's stages in order, one stage command each, with resuming and failure handling.

Layout of ``DIR``:

    pipeline.json         the run's state (options, stage results, failure/interruption); what --resume reads
    tokenizer/            the tokenizer (ours + Hugging Face format, chat template)
    pretrain/ sft/ dpo/   one Hugging Face-format checkpoint per stage (plus the stage's checkpoints/, metrics.jsonl,
    grpo/ [ppo/]          summary.json written by the stage's command); pretrain/data/ holds the token shards
    metrics.jsonl         every stage's training metrics and the pipeline's evaluations, one JSON object per line
    summary.json, report.md, *.png

A stage's settings are those of its command (the same parser, the same defaults): the pipeline passes only the
input/output directories, the seed, switches that skip the command's own before/after evaluation (the pipeline
evaluates every stage itself) and, with ``--fast``, a smaller ``--steps``. ``INTRO2LLM_PIPELINE_TINY=1`` (tests
only) shrinks steps, data and evaluation sets to a few items so that the whole pipeline runs in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from intro2llm.pipeline import STAGES

STATE_FILE = "pipeline.json"
FAST_FACTOR = 0.25  # --fast: every stage runs this share of its command's default steps
TINY_ENV = "INTRO2LLM_PIPELINE_TINY"
TEMPLATE = "plain"  # the chat template of every stage (intro2llm sft's default)
INPUT_STAGES = ("pretrain", "sft", "dpo")  # stages whose checkpoint later stages start from
# files and folders the pipeline writes in DIR (what --force removes; nothing else is touched)
OWNED = (STATE_FILE, "metrics.jsonl", "summary.json", "report.md", *STAGES)


class PipelineError(ValueError):
    """Bad options or an output directory the pipeline must not use (the CLI's exit code 2)."""


@dataclass
class Options:
    out: str
    config: str | None = None  # None: intro2llm train's default preset
    stages: tuple[str, ...] = ()
    fast: bool = False
    seed: int = 0
    qlora: bool = False
    progress: bool = True


def tiny() -> bool:
    return os.environ.get(TINY_ENV) == "1"


def parse_stages(spec: str) -> tuple[str, ...]:
    """``"tokenizer,pretrain,..."`` -> the stages in pipeline order; ValueError naming an unknown stage."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise PipelineError(f"--stages: unknown stage(s) {unknown or [spec]}; the stages are {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)


def stage_argv(stage: str, opts: Options, ckpt: str | None, out: Path) -> list[str]:
    """The stage command's argv: input, output, seed, and the switches that skip its own evaluation."""
    seed = ["--seed", str(opts.seed)]
    if stage in ("tokenizer", "pretrain"):
        argv = ["train", *(["--config", opts.config] if opts.config else []), "--out", str(out), *seed,
                "--accuracy-samples", "0"]
        if tiny():
            argv += ["--synthetic-docs", "2000", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1"]
    elif stage in ("sft", "dpo"):
        argv = [stage, "--ckpt", str(ckpt), "--out", str(out), *seed, "--accuracy-samples", "0"]
        if opts.qlora:
            argv.append("--qlora")
        if tiny():
            argv += ["--num-train", "64", "--batch-size", "4"]
    else:
        argv = [stage, "--ckpt", str(ckpt), "--out", str(out), *seed, "--eval-prompts", "0"]
        if tiny():
            argv += ["--train-prompts", "16", "--prompts-per-step", "2"]
            argv += ["--num-generations", "2"] if stage == "grpo" else ["--samples-per-prompt", "2"]
    if not opts.progress:
        argv.append("--no-progress")
    if opts.fast or tiny():
        argv.append("--no-tensorboard")
    return argv


def stage_args(stage: str, opts: Options, ckpt: str | None, out: Path, resume: bool = False):  # noqa: ANN201
    """Parse the stage command's argv with its own parser (its defaults), then scale the steps for --fast."""
    from intro2llm.cli import build_parser

    argv = stage_argv(stage, opts, ckpt, out) + (["--resume"] if resume else [])
    args = build_parser().parse_args(argv)
    if tiny():
        args.steps = min(args.steps, 2)
    elif opts.fast:
        args.steps = max(1, round(args.steps * FAST_FACTOR))
    return args


class Pipeline:
    """One pipeline run in ``out``; ``run()`` returns the exit code (0, 1 a stage failed, 130 interrupted)."""

    def __init__(self, opts: Options, resume: bool = False, force: bool = False) -> None:
        self.opts, self.out = opts, Path(opts.out)
        self.state = self._open(resume, force)

    # ------------------------------------------------------------------------------------------------ state
    def _open(self, resume: bool, force: bool) -> dict:
        out, state_file = self.out, self.out / STATE_FILE
        if out.exists() and not out.is_dir():
            raise PipelineError(f"--out {out} is a file, not a directory")
        holds = out.is_dir() and any(out.iterdir())
        if resume:
            if not state_file.is_file():
                raise PipelineError(f"--resume: {out} holds no pipeline run (no {STATE_FILE})")
            state = json.loads(state_file.read_text())
            if not self.opts.stages:
                self.opts.stages = tuple(state["options"]["stages"])
            for key in ("config", "seed", "qlora"):  # a resumed stage must see the settings it started with
                setattr(self.opts, key, state["options"][key])
            state.update(failed=None, interrupted=None, options=asdict(self.opts))
            return state
        if holds and not force:
            what = "a pipeline run (pass --resume to continue it" if state_file.is_file() else \
                "files that are not a pipeline run (choose an empty or new directory"
            raise PipelineError(f"--out {out} already holds {what}, or --force to start over there)")
        if holds:
            for name in OWNED:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
            for png in out.glob("*.png"):
                png.unlink()
        self.opts.stages = self.opts.stages or tuple(s for s in STAGES if s != "ppo")
        return {"version": 1, "options": asdict(self.opts), "results": {}, "failed": None, "interrupted": None,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def save_state(self) -> None:
        from intro2llm._io import atomic_write

        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.out / STATE_FILE, json.dumps(self.state, indent=1) + "\n")

    def input_of(self, stage: str) -> str | None:
        """The checkpoint ``stage`` starts from: the newest of pretrain/sft/dpo before it that runs or ran."""
        if stage in ("tokenizer", "pretrain"):
            return None
        before = STAGES.index("grpo") if stage in ("grpo", "ppo") else STAGES.index(stage)
        done = {s for s, r in self.state["results"].items() if r.get("status") == "done"}
        for s in reversed(INPUT_STAGES):
            if STAGES.index(s) < before and (s in self.opts.stages or s in done):
                return str(self.out / s)
        raise PipelineError(f"stage {stage} needs a model to start from: include pretrain in --stages (or --resume "
                            f"a run where it finished)")

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> int:
        from intro2llm.pipeline.report import write_outputs

        for stage in self.opts.stages:  # check every input before spending minutes on the first stages
            self.input_of(stage)
        self.save_state()
        t_all = time.perf_counter()
        sets = None
        for stage in self.opts.stages:
            if self.state["results"].get(stage, {}).get("status") == "done":
                print(f"pipeline: {stage}: finished earlier, kept", file=sys.stderr)
                continue
            print(f"pipeline: stage {stage} ...", file=sys.stderr)
            t0 = time.perf_counter()
            try:
                if stage == "tokenizer":
                    res = self.run_tokenizer()
                else:
                    if sets is None:
                        sets = self.eval_sets()
                    res = self.run_model_stage(stage, sets)
            except KeyboardInterrupt:
                self.state["interrupted"] = stage
                self.state["results"].pop(stage, None)
                self.save_state()
                write_outputs(self.out, self.state)
                print(f"\npipeline: interrupted during {stage}; the finished stages are kept in {self.out} "
                      f"(continue with: intro2llm pipeline --out {self.out} --resume)", file=sys.stderr)
                return 130
            except Exception as exc:  # noqa: BLE001 - any stage failure: recorded, reported, earlier stages kept
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                self.state["failed"] = {"stage": stage, "error": msg}
                self.state["results"][stage] = {"status": "failed", "error": msg}
                self.save_state()
                write_outputs(self.out, self.state)
                print(f"pipeline: stage {stage} FAILED: {msg}; the finished stages stay usable in {self.out}; see "
                      f"{self.out / 'report.md'}", file=sys.stderr)
                return 1
            res.update(status="done", seconds=round(time.perf_counter() - t0, 1))
            self.state["results"][stage] = res
            self.save_state()
            write_outputs(self.out, self.state, plots=False)
            print(f"pipeline: {stage} done in {res['seconds']:.0f}s: {one_line(stage, res)}", file=sys.stderr)
        self.state["total_seconds"] = round(sum(r.get("seconds", 0) for r in self.state["results"].values()), 1)
        self.state["wall_seconds_last_invocation"] = round(time.perf_counter() - t_all, 1)
        self.save_state()
        write_outputs(self.out, self.state)
        print(f"pipeline: done; report {self.out / 'report.md'}", file=sys.stderr)
        return 0

    def eval_sets(self):  # noqa: ANN201
        from intro2llm.pipeline.evaluate import EvalSets

        if tiny():
            return EvalSets.build(n_accuracy=8, n_per_op=4, n_pref=4, n_lm=4, code_chars=300, n_humaneval=1)
        return EvalSets.build()

    def run_tokenizer(self) -> dict:
        """Train the tokenizer (``intro2llm train``'s own first step, ``_prepare``); export it to DIR/tokenizer."""
        from intro2llm.data import chat
        from intro2llm.training import cli as train_cli
        from intro2llm.training.distributed import DistInfo

        args = stage_args("pretrain", self.opts, None, self.out / "pretrain")
        _, _, tok = train_cli._prepare(args, DistInfo())
        added = chat.ensure_special_tokens(tok, TEMPLATE)
        export_tokenizer(tok, self.out / "tokenizer")
        probe = "Q: 12+35=?\nA: 47\n"
        return {"vocab_size": tok.vocab_size, "added_special_tokens": added, "template": TEMPLATE,
                "chars_per_token": round(len(probe) / len(tok.encode(probe)), 4),
                "special_tokens": sorted(getattr(tok, "special_tokens", {}) or {})}

    def run_model_stage(self, stage: str, sets) -> dict:  # noqa: ANN001
        from intro2llm.pipeline.evaluate import evaluate_stage
        from intro2llm.training.checkpoint import latest_checkpoint

        out = self.out / stage
        resume = latest_checkpoint(out / "checkpoints") is not None
        args = stage_args(stage, self.opts, self.input_of(stage), out, resume=resume)
        rc = args.func(args)
        if rc:
            raise RuntimeError(f"intro2llm {stage} exited with code {rc} (its error is printed above)")
        if self.opts.qlora and stage in ("sft", "dpo"):
            merge_adapters(out)
        export_stage(out)
        res = {"steps": args.steps, **stage_speed(out, stage, args)}
        t0 = time.perf_counter()
        res.update(evaluate_stage(str(out), sets, humaneval_tokens=8 if tiny() else 32))
        res["eval_seconds"] = round(time.perf_counter() - t0, 1)
        return res


def one_line(stage: str, res: dict) -> str:
    """The summary printed when a stage ends."""
    if stage == "tokenizer":
        return f"vocab {res['vocab_size']}, {res['chars_per_token']} chars/token"
    parts = [f"loss {res.get('loss')}", f"2-digit addition exact match {res.get('accuracy')}",
             f"reward {res.get('reward')}", f"preference acc {res.get('preference_accuracy')}"]
    return ", ".join(parts)


def stage_speed(out: Path, stage: str, args) -> dict:  # noqa: ANN001
    """Training loss at the end and throughput from the stage's metrics.jsonl (RL: generated tokens/s)."""
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    rows = [r for r in rows if "step" in r]
    res: dict = {}
    losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
    if losses:
        res["train_loss"] = round(losses[-1], 4)
    tps = [r["tokens_per_s"] for r in rows if isinstance(r.get("tokens_per_s"), (int, float))]
    if tps:
        res["tokens_per_s"] = round(sum(tps) / len(tps), 1)
    elif rows and all("response_length" in r and "step_time" in r for r in rows):
        per_step = args.prompts_per_step * (args.num_generations if stage == "grpo" else args.samples_per_prompt)
        secs = sum(r["step_time"] for r in rows)
        res["tokens_per_s"] = round(sum(r["response_length"] * per_step for r in rows) / max(secs, 1e-9), 1)
    return res


def export_tokenizer(tok, directory: Path) -> None:  # noqa: ANN001
    """The tokenizer in the checkpoint layout: ours, Hugging Face's tokenizer.json, the chat template."""
    from intro2llm.interop import hf

    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(hf, "export_tokenizer"):
        hf.export_tokenizer(directory, tok, TEMPLATE)
        return
    from intro2llm.data import chat  # before the Hugging Face tokenizer export: our format only

    tok.save(directory / "tokenizer.json")
    chat.write_chat_template(directory, tok, TEMPLATE)


def export_stage(out: Path) -> None:
    """Make sure the stage directory is a complete checkpoint (the stage commands already export it)."""
    from intro2llm.evaluation.cli import load_checkpoint

    load_checkpoint(str(out))  # raises with what is missing


def merge_adapters(out: Path) -> None:
    """A --qlora stage wrote adapters only: merge them into a full model in ``out`` (adapters move to adapter/)."""
    from intro2llm.data import chat
    from intro2llm.data.prepare import load_tokenizer
    from intro2llm.model.lora import merge_and_unload
    from intro2llm.training.peft_args import load_adapted_model
    from intro2llm.training.sft_trainer import export_sft_model

    model = merge_and_unload(load_adapted_model(str(out)))
    tok = load_tokenizer(out)
    keep = out / "adapter"
    keep.mkdir(exist_ok=True)
    for f in out.iterdir():
        if f.is_file() and f.name.startswith(("adapter_", "qlora_")):  # the merged model is a plain one
            f.replace(keep / f.name)
    export_sft_model(model, out, tok, chat.read_chat_template_name(out) or TEMPLATE)
