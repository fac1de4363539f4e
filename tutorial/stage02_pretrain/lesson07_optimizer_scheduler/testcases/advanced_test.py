"""Lesson 07 advanced tests: AdamW equals torch.optim.AdamW, the Trainer learns, gradient accumulation is exact,
a non-finite loss is skipped, and resume from a checkpoint is bit-exact."""

import copy

import numpy as np
import pytest
import torch

from intro2llm.data.pretrain_dataset import PretrainDataset, ShardWriter
from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.optimizer import AdamW
from intro2llm.training import PretrainTrainer, TrainerConfig

VOCAB = 32


def model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=32))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("lesson07")
    with ShardWriter(path, VOCAB, eos_token_id=0) as w:
        for start in range(1, 200):  # counting sequences: easy to learn
            w.add([(start + i) % (VOCAB - 1) + 1 for i in range(20)])
    return PretrainDataset(path, 12, vocab_size=VOCAB)


def config(**kw):
    return TrainerConfig(**{**dict(steps=30, batch_size=8, lr=1e-2, warmup_steps=3, progress=False,
                                   tensorboard=False, wandb=False, precision="fp32"), **kw})


def test_adamw_equals_torch():
    torch.manual_seed(0)
    a = model()
    b = copy.deepcopy(a)
    opt_a, opt_b = AdamW(a.parameters(), lr=1e-2), torch.optim.AdamW(b.parameters(), lr=1e-2)
    for step in range(10):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(ids, labels=ids).loss.backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


def test_trainer_learns_counting(data):
    hist = PretrainTrainer(model(), config(), data).train()
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]


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
