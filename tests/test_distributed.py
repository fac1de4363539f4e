"""DDP under torchrun (gloo, CPU): two processes with global batch G give the losses of one process with batch G,
only rank 0 writes logs and checkpoints, and a two-process run resumes bit-exactly."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from intro2llm.cli import main
from intro2llm.training.checkpoint import latest_checkpoint, load_checkpoint
from intro2llm.training.logging import read_metrics

pytestmark = pytest.mark.distributed

MICRO = {"vocab_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _args(out, config, steps, *extra):
    return ["train", "--config", config, "--out", str(out), "--steps", str(steps), "--batch-size", "8",
            "--seq-len", "16", "--synthetic-docs", "500", "--no-progress", "--no-tensorboard", "--precision", "fp32",
            "--accuracy-samples", "0", "--warmup", "1", "--lr", "3e-3", "--eval-every", "3", *extra]


def _torchrun(args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "intro2llm", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_ddp_two_processes_equal_one_process_and_resume_bit_exactly(tmp_path):
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    assert main(_args(one, str(config), 6)) == 0
    # 2 ranks x 2 micro-batches of 2 rows: DDP and gradient accumulation together
    _torchrun(_args(two, str(config), 6, "--micro-batch-size", "2", "--save-every", "3"))
    r1, r2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in r2] == list(range(1, 7))  # rank 0 only: no duplicate lines
    for a, b in zip(r1, r2):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
    assert r2[2]["eval_loss"] == pytest.approx(r1[2]["eval_loss"], abs=1e-5)
    w1 = load_checkpoint(latest_checkpoint(one / "checkpoints"))
    w2 = load_checkpoint(latest_checkpoint(two / "checkpoints"))
    for k, v in w1.model_state.items():
        torch.testing.assert_close(w2.model_state[k], v, atol=1e-5, rtol=0, msg=k)
    assert len(w2.trainer_state["rng"]) == 2  # every rank's RNG state is in the checkpoint
    assert not list(two.glob("checkpoints/.tmp-*"))

    # Resume: drop the final checkpoint (as if killed after step 3's) and continue with two processes again.
    shutil.rmtree(two / "checkpoints" / "step_00000006")
    _torchrun(_args(two, str(config), 6, "--micro-batch-size", "2", "--save-every", "3", "--resume"))
    w3 = load_checkpoint(latest_checkpoint(two / "checkpoints"))
    assert w3.step == 6
    for k, v in w2.model_state.items():
        assert torch.equal(w3.model_state[k], v), f"{k} differs after resume"
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl")] == list(range(1, 7))
