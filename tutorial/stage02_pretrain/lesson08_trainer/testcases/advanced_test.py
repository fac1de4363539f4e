"""Lesson 08 advanced test: the Trainer under `torchrun` with two gloo processes (DDP) gives the losses and weights
of one process with the whole batch — the property behind `torchrun --nproc_per_node=2 -m intro2llm train`."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.distributed

VOCAB = 32

# The script every rank runs: torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; the Trainer does the rest.
WORKER = textwrap.dedent(f"""
    import sys
    import torch
    from intro2llm.data.pretrain_dataset import PretrainDataset
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.config import ModelConfig
    from intro2llm.training import PretrainTrainer, TrainerConfig
    from intro2llm.training.distributed import cleanup_distributed

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size={VOCAB}, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=32))
    cfg = TrainerConfig(steps=4, batch_size=8, lr=1e-2, progress=False, tensorboard=False, wandb=False,
                        precision="fp32", device="cpu")
    tr = PretrainTrainer(model, cfg, PretrainDataset(sys.argv[1], 12, vocab_size={VOCAB}))
    losses = [h["loss"] for h in tr.train()]
    if tr.info.is_main:
        torch.save({{"losses": losses, "state": tr.raw_model.state_dict()}}, sys.argv[2])
    cleanup_distributed()
""")


def _torchrun(script, nproc, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_equal_one(tmp_path):
    from intro2llm.data.pretrain_dataset import ShardWriter

    data = tmp_path / "data"
    with ShardWriter(data, VOCAB, eos_token_id=0) as w:
        for s in range(1, 120):
            w.add([(s * 7 + i * 3) % (VOCAB - 1) + 1 for i in range(15)])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _torchrun(script, 2, data, tmp_path / "two.pt")
    _torchrun(script, 1, data, tmp_path / "one.pt")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, atol=1e-5, rtol=0, msg=k)
