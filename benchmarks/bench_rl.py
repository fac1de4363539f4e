"""RL on CPU: rollout tokens/s and GRPO step time / peak memory, ours against transformers and TRL, same weights.

1. Rollout: ``intro2llm.training.rl.generate_responses`` (16 prompts × G=8 samples, KV cache, prefill shared by
   the G samples of a prompt, finished rows dropped, decode steps on ``fast_decode``'s C++ step) against
   ``transformers``' ``generate(num_return_sequences=8)`` on the same weights (``LlamaForCausalLM`` loaded from
   our ``save_pretrained``), same sampling (temperature 1, no top-k/top-p) and ``max_new_tokens``; also ours with
   ``fast_decode=False`` (decode steps through the module forward: the path before the fast step). Tokens/s
   counts the response tokens each produced (up to EOS).
2. GRPO step: ``GRPOTrainer.training_step`` against TRL's ``GRPOTrainer`` (one optimizer step = one generation
   batch of 16 prompts × 8, same model, prompts, G, max_completion_length, beta=0, loss_type "grpo", AdamW).
   Each contender lives in its own fresh process; after both are built they take steps in turn (ours, TRL;
   TRL, ours; ...), one process working at a time, so a change of the machine's load falls on both alike.
   Step time = median of the measured steps after one warm-up step (wall, and process CPU time). Peak memory:
   peak = VmHWM (after writing 5 to /proc/self/clear_refs) − VmRSS just before the trainer is built (DESIGN.md:
   ru_maxrss is inherited across fork/exec, VmHWM after a reset is not).

Run: ``python benchmarks/bench_rl.py [--ckpt DIR] [--threads 1]`` prints a JSON summary. Without ``--ckpt`` the
model is the ``tiny`` preset (random weights; the vocabulary of the synthetic character tokenizer). Contenders of
the rollout alternate round by round and the best round counts (the machine is shared and noisy).
``pytest benchmarks/bench_rl.py`` runs a cut-down rollout comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

P, G, NEW = 16, 8, 8


def _tokenizer():
    from intro2llm.data.prepare import synthetic_tokenizer
    from intro2llm.data.synthetic import pretrain_documents

    return synthetic_tokenizer(list(pretrain_documents(2000, seed=0)))


def _model_dir(ckpt: str | None, workdir: Path) -> Path:
    """A save_pretrained directory with tokenizer.json: the given checkpoint or the tiny preset, random weights."""
    if ckpt:
        return Path(ckpt)
    from intro2llm.configs import get_config
    from intro2llm.model import CausalLM

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, max_position_embeddings=64)
    d = workdir / "model"
    CausalLM(cfg).save_pretrained(d)
    tok.save(d / "tokenizer.json")
    return d


def _prompts(n: int = P) -> list[str]:
    from intro2llm.data import synthetic

    cfg = synthetic.SyntheticConfig(ops=("+",), min_digits=2, max_digits=2)
    return [p for p, _ in synthetic.prompts_and_answers(n, seed=7, config=cfg)]


def _hf_tokenizer(tok):  # noqa: ANN001, ANN202
    """A transformers fast tokenizer with exactly our character vocabulary (for TRL)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok.decode([i]): i for i in range(tok.vocab_size)}
    eos = tok.decode([tok.eos_token_id])
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    t.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, eos_token=eos, pad_token=eos, unk_token="<unk>")
    hf.padding_side = "left"
    return hf


# ---------------------------------------------------------------------------------------------------- rollout
def rollout_vs_transformers(model_dir: Path, rounds: int = 3, prompts: int = P, g: int = G,
                            new_tokens: int = NEW) -> dict[str, float]:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    from intro2llm.data.prepare import load_tokenizer
    from intro2llm.model import CausalLM
    from intro2llm.testing import seconds_alternating
    from intro2llm.training.rl import generate_responses, left_pad

    logging.set_verbosity_error()
    tok = load_tokenizer(model_dir)
    ours = CausalLM.from_pretrained(model_dir).eval()
    hf = LlamaForCausalLM.from_pretrained(model_dir).eval()
    texts = _prompts(prompts)
    eos = tok.eos_token_id
    ids, mask = left_pad([tok.encode(p) for p in texts], eos)
    counts = {}

    def run_ours(fast: bool = True):
        r = generate_responses(ours, texts, g, tokenizer=tok, temperature=1.0, max_new_tokens=new_tokens,
                               generator=torch.Generator().manual_seed(0), fast_decode=fast)
        counts["ours" if fast else "ours_module"] = int(r.response_mask.sum())

    def run_hf():
        torch.manual_seed(0)
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              num_return_sequences=g, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
        resp = out[:, ids.shape[1]:]
        is_eos = (resp == eos).long()
        counts["transformers"] = int(((is_eos.cumsum(1) - is_eos) == 0).sum())  # tokens up to and incl. first EOS

    fns = {"ours": run_ours, "ours_module": lambda: run_ours(False), "transformers": run_hf}
    times = seconds_alternating(fns, rounds)
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: counts[k] / best[k] for k in fns}
    return {"ours_tokens_per_s": tps["ours"], "ours_module_tokens_per_s": tps["ours_module"],
            "transformers_tokens_per_s": tps["transformers"], "speedup": tps["ours"] / tps["transformers"],
            "speedup_module_path": tps["ours_module"] / tps["transformers"],
            "speedup_median": (counts["ours"] / med["ours"]) / (counts["transformers"] / med["transformers"]),
            "ours_tokens": counts["ours"], "ours_module_tokens": counts["ours_module"],
            "transformers_tokens": counts["transformers"], "prompts": prompts, "G": g, "max_new_tokens": new_tokens}


# ---------------------------------------------------------------------------------------------------- GRPO step
def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _wait_for_go() -> None:
    """Block until the parent says "go" (it runs one contender's step at a time, alternating)."""
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(0)


def _report_step(wall: float, cpu: float) -> None:
    print("STEP", json.dumps([wall, cpu]), flush=True)


def grpo_step_ours(model_dir: Path, steps: int, driven: bool = False) -> dict[str, float]:
    """Our GRPO steps (one warm-up + ``steps``); ``driven``: each step waits for "go" on stdin (``_alternate``)."""
    from intro2llm.data.grpo_dataset import GRPODataset
    from intro2llm.data.prepare import load_tokenizer
    from intro2llm.model import CausalLM
    from intro2llm.training.grpo_trainer import GRPOConfig, GRPOTrainer
    from intro2llm.training.rl import synthetic_reward

    tok = load_tokenizer(model_dir)
    model = CausalLM.from_pretrained(model_dir)
    texts = _prompts(P * (steps + 1))
    base = _vm("VmRSS")
    _reset_hwm()
    tr = GRPOTrainer(model, tok, synthetic_reward, GRPODataset(texts, G, seed=0),
                     GRPOConfig(prompts_per_step=P, num_generations=G, max_new_tokens=NEW, lr=1e-5, beta=0.0,
                                loss_type="grpo"))
    print("READY", flush=True)
    times, cpu = [], []
    for _ in range(steps + 1):
        if driven:
            _wait_for_go()
        t0, c0 = time.perf_counter(), time.process_time()
        tr.training_step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if driven:
            _report_step(times[-1], cpu[-1])
    return {"step_s": statistics.median(times[1:]), "step_cpu_s": statistics.median(cpu[1:]), "steps_s": times,
            "steps_cpu_s": cpu, "peak_bytes": _vm("VmHWM") - base}


def grpo_step_trl(model_dir: Path, steps: int, driven: bool = False) -> dict[str, float]:
    """TRL's GRPOTrainer, same setting; a callback times each optimizer step (and waits for "go" if ``driven``)."""
    import datasets
    from transformers import LlamaForCausalLM, TrainerCallback
    from transformers.utils import logging
    from trl import GRPOConfig, GRPOTrainer

    from intro2llm.data.prepare import load_tokenizer
    from intro2llm.training.rl import synthetic_reward

    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    hf_tok = _hf_tokenizer(load_tokenizer(model_dir))
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ds = datasets.Dataset.from_dict({"prompt": _prompts(P * (steps + 1))})

    def reward(prompts, completions, **kw):
        return synthetic_reward(prompts, completions)

    times, cpu, t0 = [], [], [0.0, 0.0]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if driven:
                _wait_for_go()
            t0[0], t0[1] = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - t0[0])
            cpu.append(time.process_time() - t0[1])
            if driven:
                _report_step(times[-1], cpu[-1])

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=P * G, num_generations=G,
                         max_completion_length=NEW, temperature=1.0, top_k=0, top_p=1.0, beta=0.0, loss_type="grpo",
                         learning_rate=1e-5, max_steps=steps + 1, use_cpu=True, report_to=[], save_strategy="no",
                         logging_steps=1000, bf16=False, shuffle_dataset=False, disable_tqdm=True,
                         dataloader_num_workers=0, seed=0)
        base = _vm("VmRSS")
        _reset_hwm()
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=hf_tok,
                              callbacks=[Timer()])
        print("READY", flush=True)
        trainer.train()
        peak = _vm("VmHWM") - base
    return {"step_s": statistics.median(times[1:]), "step_cpu_s": statistics.median(cpu[1:]), "steps_s": times,
            "steps_cpu_s": cpu, "peak_bytes": peak}


def _worker(which: str, model_dir: Path, steps: int, threads: int) -> subprocess.Popen:
    """A fresh process running ``grpo_step_<which>`` driven step by step over stdin/stdout."""
    code = (f"import json, torch, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); torch.set_num_threads"
            f"({threads}); import bench_rl as b; from pathlib import Path; "
            f"print('RESULT', json.dumps(b.grpo_step_{which}(Path({str(model_dir)!r}), {steps}, driven=True)), "
            f"flush=True)")
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    err = tempfile.TemporaryFile("w+")  # not a pipe: a chatty library must not block on a full pipe
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=err, text=True, env=env, cwd="/tmp")
    proc.err_file = err
    return proc


def _read_tagged(proc: subprocess.Popen, tag: str, which: str) -> str:
    for line in proc.stdout:
        if line.startswith(tag):
            return line[len(tag):].strip()
    proc.wait(timeout=60)
    proc.err_file.seek(0)
    raise RuntimeError(f"grpo_step_{which} ended before {tag.strip()}:\n{proc.err_file.read()[-3000:]}")


def grpo_alternating(model_dir: Path, steps: int, threads: int) -> dict:
    """Both contenders in their own fresh process (peak memory per process), built side by side, then stepped
    one at a time in turn — ours, TRL; TRL, ours; ... — so a change of the machine's load falls on both. The
    step time is the median over the ``steps`` measured steps (after one warm-up step each)."""
    procs = {k: _worker(k, model_dir, steps, threads) for k in ("ours", "trl")}
    try:
        for k, pr in procs.items():
            _read_tagged(pr, "READY", k)
        for i in range(steps + 1):
            for k in (("ours", "trl") if i % 2 == 0 else ("trl", "ours")):
                procs[k].stdin.write("go\n")
                procs[k].stdin.flush()
                _read_tagged(procs[k], "STEP ", k)
        res = {k: json.loads(_read_tagged(pr, "RESULT ", k)) for k, pr in procs.items()}
    finally:
        for pr in procs.values():
            pr.stdin.close()
            pr.wait(timeout=120)
    ours, trl = res["ours"], res["trl"]
    return {"ours": ours, "trl": trl, "speedup_wall": trl["step_s"] / ours["step_s"],
            "speedup_cpu": trl["step_cpu_s"] / ours["step_cpu_s"],
            "memory_ratio": ours["peak_bytes"] / trl["peak_bytes"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="measured GRPO steps after one warm-up step")
    ap.add_argument("--skip", default="", help="comma list: rollout,grpo")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads}
    with tempfile.TemporaryDirectory() as wd:
        model_dir = _model_dir(args.ckpt, Path(wd))
        res["model"] = str(args.ckpt or "tiny preset (random weights)")
        if "rollout" not in args.skip:
            res["rollout"] = rollout_vs_transformers(model_dir, args.rounds)
            print(json.dumps({"rollout": res["rollout"]}), flush=True)
        if "grpo" not in args.skip:
            res["grpo_step"] = grpo_alternating(model_dir, args.steps, args.threads)
    print(json.dumps(res, indent=1))
    return res


def test_rollout_vs_transformers(benchmark, tmp_path):
    """Cut-down rollout comparison (4 prompts × 4, 8 new tokens); asserts both produced tokens."""
    benchmark.group = "rl-rollout"
    d = _model_dir(None, tmp_path)
    r = benchmark.pedantic(rollout_vs_transformers, args=(d,), kwargs=dict(rounds=1, prompts=4, g=4), rounds=1,
                           iterations=1)
    benchmark.extra_info.update(r)
    assert r["ours_tokens"] > 0 and r["transformers_tokens"] > 0


if __name__ == "__main__":
    main()
