"""Trainer: equals a hand-written torch loop, gradient accumulation, clipping, non-finite steps, eval, logging,
bf16, and bit-exact resume (micro model, random token shards)."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch

from intro2llm.data.pretrain_dataset import PretrainDataset, PretrainLoader, ShardWriter
from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.training import NonFiniteLossError, PretrainTrainer, TrainerConfig, read_metrics

VOCAB, BLOCK = 64, 16


def micro_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, dropout=dropout)
    return CausalLM(cfg)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    with ShardWriter(path, VOCAB, eos_token_id=0, shard_tokens=3000) as w:
        for _ in range(200):  # documents: a random start, then counting mod VOCAB (learnable)
            start = int(rng.integers(1, VOCAB))
            w.add([(start + i) % (VOCAB - 1) + 1 for i in range(int(rng.integers(10, 60)))])
    return path


def cfg(**kw):
    base = dict(steps=4, batch_size=8, lr=3e-3, warmup_steps=0, schedule="constant", progress=False,
                tensorboard=False, wandb=False)
    base.update(kw)
    return TrainerConfig(**base)


def dataset(path, seed=0):
    return PretrainDataset(path, BLOCK, seed=seed, vocab_size=VOCAB)


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_equals_plain_torch_loop(shards):
    model = micro_model()
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tr = PretrainTrainer(model, cfg(grad_clip=None), dataset(shards), optimizer=opt, scheduler=sched)
    hist = tr.train()
    # the oracle: the textbook loop with torch's AdamW on the same batches
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=3e-3, weight_decay=0.1)
    loader = PretrainLoader(dataset(shards), 8)
    losses = []
    for _ in range(4):
        x, y = loader.next_batch()
        logits = ref(x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()
        losses.append(loss.item())
    # our trainer feeds the T+1 window, the loop feeds T tokens: same targets and causal context for every target
    assert [h["loss"] for h in hist] == pytest.approx(losses, abs=1e-5)
    for k, v in params(model).items():
        torch.testing.assert_close(v, params(ref)[k], atol=1e-5, rtol=0, msg=k)


def test_grad_accumulation_8x1_equals_2x4(shards):
    runs = []
    for mb in (1, 4):  # 8 micro-batches of 1 row vs 2 micro-batches of 4 rows
        model = micro_model()
        tr = PretrainTrainer(model, cfg(micro_batch_size=mb, steps=3), dataset(shards))
        assert tr.accum_steps == 8 // mb
        hist = tr.train()
        runs.append(([h["loss"] for h in hist], [h["grad_norm"] for h in hist], params(model)))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    assert runs[0][1] == pytest.approx(runs[1][1], rel=1e-5)
    for k in runs[0][2]:
        torch.testing.assert_close(runs[0][2][k], runs[1][2][k], atol=1e-5, rtol=0, msg=k)


def test_grad_norm_logged_and_clipped(shards):
    model = micro_model()
    ref = copy.deepcopy(model)
    tr = PretrainTrainer(model, cfg(steps=1, grad_clip=0.05, optimizer="torch-adamw"), dataset(shards))
    hist = tr.train()
    x, y = PretrainLoader(dataset(shards), 8).next_batch()
    loss = torch.nn.functional.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten())
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()])).item()
    assert hist[0]["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert norm > 0.05  # so clipping was active: Adam's first step is then unchanged (scale invariant) but the
    # moments hold the clipped gradient
    first_state = next(iter(tr.optimizer.state.values()))
    assert first_state["exp_avg"].abs().max() < 0.1 * 0.05 + 1e-6


def test_nonfinite_loss_skips_then_stops(shards):
    class Flaky(PretrainTrainer):
        bad_steps = {2, 4, 5, 6}

        def compute_loss(self, batch):
            loss = super().compute_loss(batch)
            return loss * float("nan") if self.step + 1 in self.bad_steps else loss

    model = micro_model()
    tr = Flaky(model, cfg(steps=10, max_bad_steps=3), dataset(shards))
    before = {}
    orig = tr.train_step

    def spy(batch):
        before[tr.step + 1] = params(model)
        return orig(batch)

    tr.train_step = spy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
            tr.train()
    assert sum("non-finite" in str(w.message) for w in caught) == 4
    assert tr.step == 6
    after2 = before[3]  # weights after step 2 == weights before step 2: the update was skipped
    for k, v in before[2].items():
        assert torch.equal(v, after2[k]), k
    assert any(not torch.equal(v, before[2][k]) for k, v in before[1].items())  # step 1 did update
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_metrics_jsonl_tensorboard_and_eval(shards, tmp_path):
    model = micro_model()
    out = tmp_path / "run"
    tr = PretrainTrainer(model, cfg(steps=4, eval_every=2, out_dir=str(out), tensorboard=True),
                         dataset(shards), eval_dataset=dataset(shards, seed=1), eval_batches=2)
    tr.train()
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) for r in recs)
    assert "eval_loss" in recs[1] and "eval_loss" in recs[3] and "eval_loss" not in recs[0]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # eval loss recomputed independently on the same held-out windows
    loader = PretrainLoader(dataset(shards, seed=1), 8)
    tot = 0.0
    with torch.no_grad():
        for _ in range(2):
            x, y = loader.next_batch()
            tot += torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
    assert recs[3]["eval_loss"] == pytest.approx(tot / 2, abs=1e-5)
    assert recs[0]["loss"] > recs[3]["loss"]


def test_bf16_autocast_close_to_fp32(shards):
    losses = {}
    for prec in ("fp32", "bf16"):
        tr = PretrainTrainer(micro_model(), cfg(steps=2, precision=prec), dataset(shards))
        losses[prec] = [h["loss"] for h in tr.train()]
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=5e-2)
    assert losses["bf16"] != losses["fp32"]  # autocast really changed the arithmetic


def test_bit_exact_resume(shards, tmp_path):
    # dropout > 0 so that the torch RNG state matters too
    full = micro_model(dropout=0.1)
    PretrainTrainer(full, cfg(steps=20, schedule="cosine", warmup_steps=3), dataset(shards)).train()

    out = tmp_path / "resume"
    first = micro_model(dropout=0.1)
    c = cfg(steps=20, schedule="cosine", warmup_steps=3, out_dir=str(out), save_every=10)
    tr = PretrainTrainer(first, c, dataset(shards))
    tr.config.steps = 10  # stop after 10 steps (as if killed after the step-10 checkpoint)
    tr.train()
    torch.manual_seed(1234)  # disturb every RNG the resumed run could accidentally depend on
    np.random.seed(1234)
    second = micro_model(seed=99, dropout=0.1)
    tr2 = PretrainTrainer(second, cfg(steps=20, schedule="cosine", warmup_steps=3, out_dir=str(out)),
                          dataset(shards))
    assert tr2.resume(out) == 10
    tr2.train()
    for k, v in params(full).items():
        assert torch.equal(v, params(second)[k]), f"{k} differs after resume"
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, 21))


def test_bad_config_and_batch(shards):
    with pytest.raises(ValueError, match="micro_batch_size"):
        PretrainTrainer(micro_model(), cfg(batch_size=8, micro_batch_size=3), dataset(shards))
    with pytest.raises(ValueError, match="precision"):
        PretrainTrainer(micro_model(), cfg(precision="fp8"), dataset(shards))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        PretrainTrainer(micro_model(), cfg(), PretrainDataset(shards, 64, vocab_size=VOCAB))
    json.dumps(cfg().__dict__)  # the config is JSON-serialisable (it is logged)
