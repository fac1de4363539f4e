"""Post-training step benchmark: our SFT (and DPO) trainers vs TRL's ``SFTTrainer`` (and ``DPOTrainer``) on the same
``transformers`` Llama weights, same batch, same sequence length, fp32, CPU.

    python benchmarks/bench_post_training.py [--batch 8 --seq 128 --rounds 6] [--only sft|dpo]
    pytest benchmarks/bench_post_training.py --benchmark-only                      # pytest-benchmark timings

Model: the ``tiny`` preset (~10M parameters, vocab 8192) built by intro2llm, exported with ``save_pretrained``
and loaded by ``transformers.LlamaForCausalLM.from_pretrained`` for TRL, so both sides start from identical weights.

SFT step (one optimizer step on one batch of ``batch`` rows x ``seq`` tokens, the last ``seq // 2`` tokens of each
row supervised): ours = ``SFTTrainer.train_step`` (forward, fused linear cross-entropy over the supervised tokens,
backward, clip, AdamW step); TRL = ``SFTTrainer.training_step`` on the batch its own data collator built from the same
ids and ``completion_mask`` (its ``compute_loss`` with entropy/accuracy metrics), then ``clip_grad_norm_``,
``optimizer.step()`` and ``zero_grad()`` — what ``transformers.Trainer``'s loop does per step.

Harness (shared by the SFT and DPO halves): ``BUILDERS[name]() -> step_fn``; time = the steps of all sides alternate
in one process for ``--rounds`` rounds after a warm-up, median per side (the ratio survives a noisy machine); peak
memory = each side in a fresh subprocess: ``VmRSS`` after imports, ``VmHWM`` reset (``5`` > ``/proc/self/clear_refs``),
build + 3 steps, figure = ``VmHWM - VmRSS before`` (weights, grads, optimizer state, activations). Linux only.
TRL imports a top-level package called ``kernels``; the repository root must not be on ``sys.path`` (run the script
by its path, as above), or this checkout's ``kernels/`` directory shadows it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable

import pytest
import torch

from intro2llm import testing
from intro2llm.testing import child_json_value, peak_mib_since, reset_peak_rss, status_kb

BATCH, SEQ = 8, 128
_TMP = tempfile.mkdtemp(prefix="bench_post_training_")


# ------------------------------------------------------------------------------------------------ shared harness
def tiny_model(seed: int = 0):
    from intro2llm.configs import get_config
    from intro2llm.model.causal_lm import CausalLM

    torch.manual_seed(seed)
    return CausalLM(get_config("tiny"))


def export_llama(seed: int = 0) -> str:
    """Save our tiny model in Hugging Face format once per process; returns the directory."""
    path = os.path.join(_TMP, f"llama_{seed}")
    if not os.path.exists(os.path.join(path, "config.json")):
        tiny_model(seed).save_pretrained(path)
    return path


def hf_llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(export_llama(seed), torch_dtype=torch.float32, attn_implementation="sdpa")


def hf_tokenizer(vocab_size: int):
    """A word-level ``PreTrainedTokenizerFast`` over ids "0".."V-1" (TRL wants one; the data is pre-tokenized)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({str(i): i for i in range(vocab_size)}, unk_token="0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="1", eos_token="2", unk_token="0")


def batch_ids(batch: int, seq: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def _memory_child(name: str, batch: int, seq: int) -> None:
    import gc

    gc.collect()
    before = status_kb("VmRSS")
    reset_peak_rss()
    step = BUILDERS[name](batch, seq)
    for _ in range(3):
        step()
    print(json.dumps({"name": name, "peak_mib": peak_mib_since(before)}))


def measure_memory(name: str, batch: int, seq: int) -> float:
    """Peak MiB of building ``name`` and running 3 steps, in a fresh process."""
    return child_json_value([sys.executable, os.path.abspath(__file__), "--child", name, "--batch", str(batch),
                             "--seq", str(seq)], "peak_mib", cwd=_TMP)


def measure_speed(names: list[str], batch: int, seq: int, rounds: int) -> dict[str, float]:
    """Median seconds per step of each side, the sides alternating in one process."""
    # after a warm-up (allocator, first-touch, lazy init)
    return testing.median_seconds_alternating({n: BUILDERS[n](batch, seq) for n in names}, rounds)


# ------------------------------------------------------------------------------------------------ SFT
def trainer_config(batch: int):
    """Our trainers' settings for one step (constant lr 1e-4, no weight decay, clip 1.0, CPU, no logging)."""
    from intro2llm.training.trainer import TrainerConfig

    return TrainerConfig(steps=10**6, batch_size=batch, lr=1e-4, warmup_steps=0, schedule="constant",
                         weight_decay=0.0, grad_clip=1.0, progress=False, tensorboard=False, wandb=False, device="cpu")


def hf_trainer_step(trainer, model, inputs) -> Callable[[], None]:
    """One optimizer step of a TRL (``transformers.Trainer``) trainer on ``inputs``, as its training loop runs it:
    ``training_step`` (forward + backward), clip 1.0, optimizer and scheduler step, zero_grad."""
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer._inner_training_loop in a real run
    model.train()

    def step() -> None:
        trainer.training_step(model, inputs)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def build_sft_ours(batch: int = BATCH, seq: int = SEQ) -> Callable[[], None]:
    from intro2llm.data import synthetic
    from intro2llm.data.prepare import synthetic_tokenizer
    from intro2llm.data.sft_dataset import SFTDataset, rows_from_pairs
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.training.sft_trainer import SFTTrainer

    model = CausalLM.from_pretrained(export_llama())
    pairs = synthetic.sft_pairs(batch, seed=0)
    tok = synthetic_tokenizer([p + r for p, r in pairs])  # only for the trainer's data plumbing; the batch is below
    ds = SFTDataset(rows_from_pairs(pairs), tok, "plain")
    cfg = trainer_config(batch)
    trainer = SFTTrainer(model, cfg, ds, tokenizer=tok)
    ids = batch_ids(batch, seq, model.config.vocab_size)
    labels = ids.clone()
    labels[:, : seq - seq // 2] = -100
    data = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    return lambda: trainer.train_step(data)


def build_sft_trl(batch: int = BATCH, seq: int = SEQ) -> Callable[[], None]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = hf_llama()
    ids = batch_ids(batch, seq, model.config.vocab_size)
    mask = [[0] * (seq - seq // 2) + [1] * (seq // 2)] * batch
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "completion_mask": mask})
    args = SFTConfig(output_dir=os.path.join(_TMP, "trl_sft"), per_device_train_batch_size=batch, max_length=seq,
                     learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                     report_to="none", use_cpu=True, completion_only_loss=True, packing=False,
                     dataloader_num_workers=0, save_strategy="no", logging_strategy="no", seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                         processing_class=hf_tokenizer(model.config.vocab_size))
    inputs = next(iter(trainer.get_train_dataloader()))
    return hf_trainer_step(trainer, model, inputs)


# ------------------------------------------------------------------------------------------------ DPO
# DPO step (one optimizer step on ``batch`` pairs; each row = a shared ``seq // 2``-token prompt + a ``seq // 2``-token
# response, chosen and rejected differing in the response): ours = ``DPOTrainer.train_step`` (one concatenated
# forward of the 2B rows returning hidden states, ``fused_linear_logprobs`` over the response tokens, a frozen
# reference forward under no_grad, sigmoid loss, backward, clip, AdamW); TRL = ``DPOTrainer.training_step`` on the
# batch of its own ``DataCollatorForPreference`` (same ids; its policy forward with TRL's fused LM head, its frozen
# ``ref_model`` loaded from the same directory) + clip + optimizer step, as ``transformers.Trainer`` does per step.
def dpo_pairs(batch: int, seq: int, vocab: int) -> list[tuple[list[int], list[int], list[int]]]:
    """``batch`` (prompt, chosen, rejected) id lists: prompt seq // 2 tokens, responses seq - seq // 2 tokens."""
    ids = batch_ids(3 * batch, seq, vocab, seed=1)
    half = seq // 2
    return [(ids[3 * i, :half].tolist(), ids[3 * i + 1, half:].tolist(), ids[3 * i + 2, half:].tolist())
            for i in range(batch)]


def build_dpo_ours(batch: int = BATCH, seq: int = SEQ) -> Callable[[], None]:
    from intro2llm.data.dpo_dataset import DPODataset, collate, synthetic_triples
    from intro2llm.data.prepare import synthetic_tokenizer
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.training.dpo_trainer import DPOTrainer

    model = CausalLM.from_pretrained(export_llama())
    ref = CausalLM.from_pretrained(export_llama())
    rows = synthetic_triples(batch, seed=0)
    tok = synthetic_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in rows])  # trainer plumbing only
    ds = DPODataset(rows, tok, "plain")
    cfg = trainer_config(batch)
    trainer = DPOTrainer(model, cfg, ds, ref, beta=0.1, tokenizer=tok)
    rows = []
    for i, (p, c, r) in enumerate(dpo_pairs(batch, seq, model.config.vocab_size)):
        skip = [-100] * len(p)
        rows.append({"chosen_input_ids": torch.tensor(p + c), "chosen_labels": torch.tensor(skip + c),
                     "rejected_input_ids": torch.tensor(p + r), "rejected_labels": torch.tensor(skip + r),
                     "index": torch.tensor(i)})
    data = collate(rows, pad_id=0)
    return lambda: trainer.train_step(data)


def build_dpo_trl(batch: int = BATCH, seq: int = SEQ) -> Callable[[], None]:
    from datasets import Dataset
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model = hf_llama()
    ref = LlamaForCausalLM.from_pretrained(export_llama(), torch_dtype=torch.float32, attn_implementation="sdpa")
    pairs = dpo_pairs(batch, seq, model.config.vocab_size)
    text = {"prompt": ["3"] * batch, "chosen": ["4"] * batch, "rejected": ["5"] * batch}  # construction only
    args = DPOConfig(output_dir=os.path.join(_TMP, "trl_dpo"), per_device_train_batch_size=batch, max_length=seq,
                     learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                     loss_type=["sigmoid"], report_to="none", use_cpu=True, dataloader_num_workers=0,
                     save_strategy="no", logging_strategy="no", seed=0)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_dict(text),
                         processing_class=hf_tokenizer(model.config.vocab_size))
    collator = DataCollatorForPreference(pad_token_id=1, max_length=seq)
    inputs = collator([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    return hf_trainer_step(trainer, model, inputs)


BUILDERS: dict[str, Callable[..., Callable[[], None]]] = {"sft-ours": build_sft_ours, "sft-trl": build_sft_trl,
                                                          "dpo-ours": build_dpo_ours, "dpo-trl": build_dpo_trl}
GROUPS = {"sft": ["sft-ours", "sft-trl"], "dpo": ["dpo-ours", "dpo-trl"]}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_step(benchmark, name):
    """One optimizer step of each side; groups post-training-sft and post-training-dpo."""
    step = BUILDERS[name](BATCH, SEQ)
    step()
    benchmark.group = "post-training-" + name.split("-")[0]
    benchmark.extra_info.update(batch=BATCH, seq=SEQ)
    benchmark.pedantic(step, rounds=5, iterations=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--only", default=None, help="run one group: " + ", ".join(GROUPS))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _memory_child(args.child, args.batch, args.seq)
        return
    results = {"batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads()}
    for group, names in GROUPS.items():
        if args.only and group != args.only:
            continue
        t = measure_speed(names, args.batch, args.seq, args.rounds)
        ours, theirs = names
        res = {f"{n}_step_ms": round(v * 1e3, 1) for n, v in t.items()}
        res["speedup_vs_trl"] = round(t[theirs] / t[ours], 2)
        if not args.no_memory and os.path.exists("/proc/self/clear_refs"):
            mem = {n: measure_memory(n, args.batch, args.seq) for n in names}
            res.update({f"{n}_peak_mib": round(v, 1) for n, v in mem.items()})
            res["memory_ratio_vs_trl"] = round(mem[ours] / mem[theirs], 2)
        results[group] = res
        print(json.dumps({group: res}), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
