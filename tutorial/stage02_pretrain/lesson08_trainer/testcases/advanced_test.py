"""Lesson 08 advanced tests: the Trainer learns, gradient accumulation is exact, a run resumed from a checkpoint is
bit-exact, a non-finite loss is skipped; and the Trainer under `torchrun` with two gloo processes (DDP) gives the
losses and weights of one process with the whole batch — the property behind
`torchrun --nproc_per_node=2 -m intro2llm train`."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from intro2llm.data.pretrain_dataset import PretrainDataset, ShardWriter
from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.training import PretrainTrainer, TrainerConfig

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


@pytest.mark.distributed
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


# ------------------------------------------------------------------ the trainer (single process)
def model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lesson08")
    with ShardWriter(path, VOCAB, eos_token_id=0) as w:
        for start in range(1, 200):  # counting sequences: easy to learn
            w.add([(start + i) % (VOCAB - 1) + 1 for i in range(20)])
    return PretrainDataset(path, 12, vocab_size=VOCAB)


def config(**kw):
    return TrainerConfig(**{**dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, progress=False,
                                   tensorboard=False, wandb=False, precision="fp32"), **kw})


@pytest.mark.task("Trainer.train_step")
def test_trainer_learns_counting(data):
    hist = PretrainTrainer(model(), config(), data).train()
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]


@pytest.mark.task("Trainer.train_step", "save_checkpoint", "load_checkpoint")
def test_accumulation_and_resume(data, tmp_path):
    a = PretrainTrainer(model(), config(steps=6, micro_batch_size=2), data)
    b = PretrainTrainer(model(), config(steps=6), data)
    la, lb = [h["loss"] for h in a.train()], [h["loss"] for h in b.train()]
    assert la == pytest.approx(lb, abs=1e-5)  # 4 micro-batches of 2 == 1 batch of 8

    out = tmp_path / "run"
    first = PretrainTrainer(model(), config(steps=6, out_dir=str(out)), data)
    first.config.steps = 3
    first.train()
    second = PretrainTrainer(model(seed=1), config(steps=6, out_dir=str(out)), data)
    second.resume(out)
    second.train()
    for (k, v), w in zip(b.raw_model.state_dict().items(), second.raw_model.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.task("Trainer.train_step")
def test_nonfinite_step_is_skipped(data):
    class OneBadStep(PretrainTrainer):
        def compute_loss(self, batch):
            loss = super().compute_loss(batch)
            return loss + float("inf") if self.step == 1 else loss

    tr = OneBadStep(model(), config(steps=3), data)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        hist = tr.train()
    assert [h["skipped"] for h in hist] == [False, True, False]
    assert all(np.isfinite(p.detach().numpy()).all() for p in tr.raw_model.parameters())
