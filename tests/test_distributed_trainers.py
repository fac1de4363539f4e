"""Every post-training command under torchrun (gloo, CPU, 2 processes) x strategy (ddp, fsdp): exit code 0, one
metrics line per step from rank 0, and the losses and gradient norms of one process (issue 21). Pretraining is
covered by test_distributed.py (ddp) and test_fsdp.py (fsdp); SFT here replaces test_fsdp's former SFTTrainer
script test. PPO/GRPO FSDP checkpoints (full tensors) also resume in one process.

Regression tests of bugs found on the way: DPO read the LM head weight before the forward (under FSDP the DTensor
shard: "fused_linear_logprobs_fwd got mixed torch.Tensor and DTensor"); PPO's no-grad value forward left the FSDP
root unsharded and the next backward lost the root's gradients (grad norm 3x low; caught by the grad-norm check);
generation inside ``gathered_params`` had its blocks resharded by the prefill forward (the C++ decode then met
DTensors). Runs: 4 one-process references in this process, 9 torchrun launches (~8 s each on an idle 2-core box);
LoRA/QLoRA under FSDP: 3 more references and launches.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from intro2llm.cli import main
from intro2llm.testing import save_toy_checkpoint
from intro2llm.training.logging import read_metrics

pytestmark = pytest.mark.distributed

STEPS = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_toy_checkpoint(tmp_path_factory.mktemp("ckpt"), num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=64)


def _args(cmd, ckpt, out, *extra):
    common = ["--ckpt", str(ckpt), "--out", str(out), "--steps", str(STEPS), "--no-progress", "--no-tensorboard"]
    if cmd in ("sft", "dpo"):
        # grad-clip 0.3: active, so a per-shard (wrong) norm would change the losses
        return [cmd, *common, "--batch-size", "8", "--num-train", "32", "--accuracy-samples", "4", "--lr", "3e-3",
                "--warmup", "1", "--grad-clip", "0.3", "--save-every", "2", "--eval-every", "0", *extra]
    rl = [cmd, *common, "--prompts-per-step", "4", "--max-new-tokens", "4", "--eval-prompts", "4", "--train-prompts",
          "20", "--reward", "synthetic_format", "--lr", "1e-3", "--save-every", "2"]
    if cmd == "grpo":  # beta > 0: a frozen reference (sharded under FSDP)
        return [*rl, "-G", "2", "--beta", "0.05", *extra]
    return [*rl, "--samples-per-prompt", "2", *extra]  # PPO: 2 epochs x 2 mini-batches (defaults)


def _torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INTRO2LLM_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "intro2llm", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_process(ckpt, tmp_path_factory):
    """The one-process reference run of each command (in this process, computed once)."""
    root = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    runs = {}

    def get(cmd):
        if cmd not in runs:
            out = root / cmd
            assert main(_args(cmd, ckpt, out)) == 0
            runs[cmd] = out
        return runs[cmd]

    return get


@pytest.fixture(scope="module")
def launched():
    """Output directories of the torchrun runs so far, by (command, strategy): later tests reuse them."""
    return {}


def _assert_same_run(ref, got):
    r1, r2 = read_metrics(ref / "metrics.jsonl"), read_metrics(got / "metrics.jsonl")
    assert [r["step"] for r in r2] == list(range(1, STEPS + 1))  # rank 0 logs, once per step
    assert max(r["grad_norm"] for r in r1) > 0  # the runs train (a zero gradient would prove nothing)
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-7), (a["step"], a["grad_norm"],
                                                                                      b["grad_norm"])
    # the exported model (FSDP: consolidated on rank 0) equals the one-process one
    w1, w2 = load_file(ref / "model.safetensors"), load_file(got / "model.safetensors")
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("cmd", ["sft", "dpo", "grpo", "ppo"])
def test_command_under_torchrun_equals_one_process(cmd, strategy, ckpt, one_process, launched, tmp_path):
    out = tmp_path / f"{cmd}-{strategy}"
    proc = _torchrun(_args(cmd, ckpt, out, "--strategy", strategy))
    launched[cmd, strategy] = out
    _assert_same_run(one_process(cmd), out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    assert sum(line.startswith("{") for line in proc.stdout.splitlines()) == 1  # the summary is printed once
    if cmd in ("sft", "dpo"):  # greedy accuracy before/after on rank 0 (FSDP: from unsharded models)
        assert 0.0 <= summary["accuracy" if cmd == "sft" else "accuracy_after"] <= 1.0
        assert (out / "tokenizer_config.json").is_file()  # rank 0 exported the chat template too
    else:
        assert "accuracy" in summary["eval_after"]
        if strategy == "fsdp":  # the RL checkpoint holds full tensors: it resumes in one process, same run
            resumed = tmp_path / "resumed"
            shutil.copytree(out, resumed)
            shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS:08d}")
            (resumed / "model.safetensors").unlink()
            assert main(_args(cmd, ckpt, resumed, "--resume")) == 0
            _assert_same_run(one_process(cmd), resumed)


def test_dpo_fsdp_resume_from_sharded_checkpoint(ckpt, one_process, launched, tmp_path):
    """A DPO FSDP run killed after step 2's sharded checkpoint resumes under FSDP and ends like one process."""
    out = tmp_path / "dpo"
    if ("dpo", "fsdp") in launched:
        shutil.copytree(launched["dpo", "fsdp"], out)
    else:  # run alone
        _torchrun(_args("dpo", ckpt, out, "--strategy", "fsdp"))
    assert (out / "checkpoints" / "step_00000002" / "sharded").is_dir()  # FSDP wrote the sharded layout
    shutil.rmtree(out / "checkpoints" / f"step_{STEPS:08d}")
    (out / "model.safetensors").unlink()
    _torchrun(_args("dpo", ckpt, out, "--strategy", "fsdp", "--resume"))
    _assert_same_run(one_process("dpo"), out)


@pytest.mark.parametrize("cmd,peft", [("sft", ["--lora", "8"]), ("sft", ["--lora", "8", "--qlora"]),
                                      ("dpo", ["--lora", "8"])], ids=["sft-lora", "sft-qlora", "dpo-lora"])
def test_adapters_under_fsdp_equal_one_process(cmd, peft, ckpt, tmp_path):
    """LoRA/QLoRA under FSDP: the adapters (and the fp32 embedding/LM head) are sharded, a 4-bit base (buffers) is
    replicated; the losses, gradient norms and saved PEFT adapters equal one process's."""
    one, two = tmp_path / "one", tmp_path / "fsdp"
    assert main(_args(cmd, ckpt, one, *peft)) == 0
    _torchrun(_args(cmd, ckpt, two, *peft, "--strategy", "fsdp"))
    r1, r2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == list(range(1, STEPS + 1))
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4, abs=1e-7)
    w1, w2 = load_file(one / "adapter_model.safetensors"), load_file(two / "adapter_model.safetensors")
    assert set(w1) == set(w2) and any(k.endswith("lora_B.weight") for k in w1)
    assert max(w1[k].abs().max().item() for k in w1 if k.endswith("lora_B.weight")) > 0  # the adapters trained
    for k in w1:  # Adam divides by sqrt(v): an element whose gradient is ~0 turns reduction-order noise into
        # up to lr-sized steps (measured: 1.4e-5 on values ~0.18 after 3 DPO steps at lr 3e-3)
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=0, msg=k)


def test_rl_batch_that_does_not_split_over_the_ranks_is_a_clear_error(ckpt, tmp_path):
    """3 prompt groups over 2 ranks: refused when the trainer is built (before any rollout), not a hang."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INTRO2LLM_DIST_TIMEOUT": "60"}
    args = _args("grpo", ckpt, tmp_path / "odd", "--strategy", "ddp", "--prompts-per-step", "3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "intro2llm",
           *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "3 prompt groups per step in 1 mini-batch(es) cannot be split evenly over 2 processes" in proc.stderr


@pytest.mark.parametrize("cmd", ["sft", "dpo", "grpo", "ppo"])
def test_fsdp_without_torchrun_is_a_clear_error(cmd, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(_args(cmd, ckpt, tmp_path / "x", "--strategy", "fsdp")) == 2
    err = capsys.readouterr().err
    assert "--strategy fsdp" in err and f"torchrun --nproc_per_node N -m intro2llm {cmd}" in err
    assert not (tmp_path / "x").exists()  # refused before any work
