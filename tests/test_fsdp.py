"""FSDP2 under torchrun (gloo, CPU): two sharded processes train like one process, with the fused AdamW and Lion on
DTensor parameters, global-norm clipping, end-of-run generation (the synthetic accuracy) and HF export; sharded
(DCP) checkpoints resume bit-exactly on the same world size and across world sizes and strategies (2 -> 1,
1 -> 2); two launchers (``--nnodes 2``, c10d rendezvous) equal one node; a dying rank makes the other exit.

Regression tests of issue 21: the fused AdamW met DTensors (``adamw_step_ ... does not have a sharding strategy``)
and ``generate`` on the sharded model mixed Tensor and DTensor. Runs: one-process references in this process,
three torchrun launches (~10 s each on an idle 2-core box), two launchers and two bare processes (the dying rank).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from intro2llm.cli import main
from intro2llm.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, verify_checkpoint
from intro2llm.training.logging import read_metrics

pytestmark = pytest.mark.distributed

MICRO = {"vocab_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
STEPS = 6


def _args(out, config, *extra, steps=STEPS):
    # grad-clip 0.3: the clip is active in most steps, so a per-shard (wrong) norm would change the losses
    return ["train", "--config", str(config), "--out", str(out), "--steps", str(steps), "--batch-size", "8",
            "--seq-len", "16", "--synthetic-docs", "500", "--no-progress", "--no-tensorboard", "--precision", "fp32",
            "--accuracy-samples", "0", "--warmup", "1", "--lr", "3e-3", "--eval-every", "3", "--save-every", "3",
            "--grad-clip", "0.3", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "INTRO2LLM_DIST_TIMEOUT": "60"}


def _torchrun(args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "intro2llm", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_losses(ref, got, steps, tol=1e-5):
    ref = {r["step"]: r for r in ref}
    got = {r["step"]: r for r in got}
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)  # rank 0 logs once per step
    for s in steps:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=tol), (s, ref[s]["loss"], got[s]["loss"])
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), s


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "micro.json"
    path.write_text(json.dumps(MICRO))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, config):
    """The one-process reference run and the FSDP x 2 run, shared by the tests below."""
    root = tmp_path_factory.mktemp("fsdp")
    torch.set_num_threads(1)
    one = root / "one"
    assert main(_args(one, config)) == 0
    fsdp = root / "fsdp"
    # default optimizer = our fused AdamW (C++ op on each rank's shards); --accuracy-samples: generate() after
    # training, on rank 0, from the consolidated model
    proc = _torchrun(_args(fsdp, config, "--strategy", "fsdp", "--accuracy-samples", "8"))
    return {"root": root, "config": config, "one": one, "fsdp": fsdp, "proc": proc}


def test_fsdp_two_processes_equal_one_process(runs):
    one, fsdp = runs["one"], runs["fsdp"]
    r1, r2 = read_metrics(one / "metrics.jsonl"), read_metrics(fsdp / "metrics.jsonl")
    assert max(r["grad_norm"] for r in r1) > 0.3  # the clip was active
    _assert_same_losses(r1, r2, range(1, STEPS + 1))
    assert r2[2]["eval_loss"] == pytest.approx(r1[2]["eval_loss"], abs=1e-5)  # evaluation through the shards
    summary = json.loads((fsdp / "summary.json").read_text())
    assert 0.0 <= summary["accuracy"] <= 1.0  # generate() ran (issue 21: it crashed on DTensors)
    assert runs["proc"].stdout.count('"accuracy"') == 1  # the summary is printed once
    # the consolidated HF export equals the one-process model
    w1, w2 = load_file(one / "model.safetensors"), load_file(fsdp / "model.safetensors")
    assert set(w1) == set(w2)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
    # sharded checkpoints: one DCP file per rank, verified like a full checkpoint
    ck = latest_checkpoint(fsdp / "checkpoints")
    meta = verify_checkpoint(ck)
    assert meta["layout"] == "sharded"
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(meta["files"])
    assert not list(fsdp.glob("checkpoints/.tmp-*"))


def test_sharded_checkpoint_damage_is_named(runs, tmp_path):
    ck = tmp_path / "step_00000006"
    shutil.copytree(latest_checkpoint(runs["fsdp"] / "checkpoints"), ck)
    (ck / "sharded" / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="__1_0.distcp"):
        verify_checkpoint(ck)


def test_fsdp_resume_bit_exact_same_world_size(runs, tmp_path):
    src = runs["fsdp"]
    run = tmp_path / "fsdp"
    shutil.copytree(src, run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # as if killed after step 3's checkpoint
    _torchrun(_args(run, runs["config"], "--strategy", "fsdp", "--resume"))
    a, b = load_file(src / "model.safetensors"), load_file(run / "model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    ra, rb = read_metrics(src / "metrics.jsonl"), read_metrics(run / "metrics.jsonl")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


def test_resume_two_processes_to_one(runs, tmp_path):
    """FSDP x 2 sharded checkpoint -> one process, unsharded (DCP loads full tensors)."""
    run = tmp_path / "two_to_one"
    shutil.copytree(runs["fsdp"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    assert main(_args(run, runs["config"], "--resume")) == 0
    _assert_same_losses(read_metrics(runs["one"] / "metrics.jsonl"), read_metrics(run / "metrics.jsonl"),
                        range(4, STEPS + 1))
    c = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert c.sharded is None and c.trainer_state["world_size"] == 1  # one process writes the full layout


def test_resume_one_process_to_two_fsdp(runs, tmp_path):
    """One-process full checkpoint (safetensors + optimizer.pt) -> FSDP x 2: re-sharded, optimizer re-keyed."""
    run = tmp_path / "one_to_two"
    shutil.copytree(runs["one"], run)
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    proc = _torchrun(_args(run, runs["config"], "--strategy", "fsdp", "--resume"))
    assert "written by 1 process(es)" in proc.stderr  # the world-size change is said
    _assert_same_losses(read_metrics(runs["one"] / "metrics.jsonl"), read_metrics(run / "metrics.jsonl"),
                        range(4, STEPS + 1))


def test_two_launchers_multi_node_lion_equals_one_process(config, tmp_path):
    """``torchrun --nnodes 2 --nproc_per_node 1`` twice (the stand-in for two machines), FSDP + our Lion."""
    ref, run = tmp_path / "lion_one", tmp_path / "lion_nodes"
    assert main(_args(ref, config, "--optimizer", "lion", "--lr", "1e-3")) == 0
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"i21-{port}",
           "-m", "intro2llm", *_args(run, config, "--strategy", "fsdp", "--optimizer", "lion", "--lr", "1e-3")]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    for n, (out, err) in zip(nodes, outs):
        assert n.returncode == 0, out[-2000:] + err[-3000:]
    _assert_same_losses(read_metrics(ref / "metrics.jsonl"), read_metrics(run / "metrics.jsonl"),
                        range(1, STEPS + 1))


_DIE = """
import os, sys, time
from intro2llm.training.trainer import Trainer
step = Trainer.train_step
def dying_step(self, batch):
    if self.info.rank == 1 and self.step == 2:
        with open(os.environ["DIE_STAMP"], "w") as f:
            f.write(repr(time.time()))
        os._exit(17)  # a crash that sends nothing to the other rank
    return step(self, batch)
Trainer.train_step = dying_step
from intro2llm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_dying_rank_makes_the_other_exit(config, tmp_path):
    port = _free_port()
    stamp = tmp_path / "died_at"
    env = {**_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "INTRO2LLM_DIST_TIMEOUT": "30", "DIE_STAMP": str(stamp)}
    args = _args(tmp_path / "die", config, "--strategy", "fsdp", "--save-every", "0")
    procs = [subprocess.Popen([sys.executable, "-c", _DIE, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        procs[1].communicate(timeout=600)
        err0 = procs[0].communicate(timeout=300)[1]  # 300 s: a hang fails here
        survived = time.time() - float(stamp.read_text())  # rank 1's death -> rank 0 gone (an upper bound)
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 17
    assert procs[0].returncode not in (0, None), err0[-2000:]  # an error, not a hang and not success
    assert survived < 30 + 60, survived  # within the process-group timeout (30 s) plus teardown


def test_fsdp_without_torchrun_is_a_clear_error(config, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(_args(tmp_path / "x", config, "--strategy", "fsdp")) == 2
    err = capsys.readouterr().err
    assert "--strategy fsdp" in err and "torchrun" in err
    assert not (tmp_path / "x").exists()  # refused before any work
