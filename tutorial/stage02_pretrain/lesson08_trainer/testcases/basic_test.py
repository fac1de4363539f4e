"""Lesson 08 basic tests: the Trainer's step (token-weighted gradient accumulation, global-norm clipping), the
metrics logger, checkpoints (round trip, keep the last N, corruption named); and, for the distributed part, ring
all-reduce, ZeRO/FSDP memory arithmetic, how a global batch is split over ranks, and why token-weighted losses make
DDP equal to one big batch."""

import json

import pytest
import torch

from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.training import Trainer, TrainerConfig
from intro2llm.training import checkpoint as ckpt
from intro2llm.training import trainer as trainer_mod
from intro2llm.training.distributed import (
    DistInfo,
    init_distributed,
    simulate_ring_all_reduce,
    wrap_model,
    zero_memory_per_rank,
)
from intro2llm.training.logging import MetricsLogger, read_metrics


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ring_all_reduce_sums_and_sends_2_w_minus_1_over_w(world):
    tensors = [torch.randn(24) for _ in range(world)]
    out, sent = simulate_ring_all_reduce(tensors)
    for o in out:
        torch.testing.assert_close(o, sum(tensors))
    assert sent == 2 * (world - 1) * 24 // world  # 24 divides evenly into the chunks


def test_zero_memory_by_hand():
    psi = 1_000_000  # parameters; fp32 Adam = 4 (weight) + 4 (grad) + 8 (m, v) = 16 bytes each
    assert zero_memory_per_rank(psi, 8, 0) == 16 * psi  # DDP: full replica everywhere
    assert zero_memory_per_rank(psi, 8, 1) == (4 + 4 + 1) * psi
    assert zero_memory_per_rank(psi, 8, 2) == (4 + 0.5 + 1) * psi
    assert zero_memory_per_rank(psi, 8, 3) == 2 * psi  # FSDP full shard: 16 / 8


def test_rank_rows_cover_the_global_batch(tmp_path):
    from intro2llm.data.pretrain_dataset import PretrainDataset, PretrainLoader, ShardWriter

    with ShardWriter(tmp_path, 50, eos_token_id=0) as w:
        w.add(list(range(1, 50)) * 20)
    ds = PretrainDataset(tmp_path, 8)
    single = PretrainLoader(ds, 8).next_batch()[0]
    parts = [PretrainLoader(ds, 8, rank=r, world_size=2).next_batch()[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), single)


@pytest.mark.task("Trainer.train_step")
def test_token_weighted_losses_make_ddp_equal_one_batch(monkeypatch):
    # Two simulated ranks with different numbers of valid tokens. Each rank's Trainer backpropagates
    # loss * n_rank * W / N (N = the all-reduced token count); DDP averages the two gradients. The average must be
    # the gradient of the token mean over the whole batch (a plain mean of the two rank losses would not be).
    ids, labels = _batch()
    n_total = int((labels[:, 1:] != -100).sum())

    def fake_all_reduce(t):  # the step's first all-reduce sums the token counts over ranks; the second the losses
        fake_all_reduce.calls += 1
        return t.new_tensor(float(n_total)) if fake_all_reduce.calls % 2 == 1 else t

    fake_all_reduce.calls = 0
    monkeypatch.setattr(trainer_mod, "all_reduce_sum", fake_all_reduce)
    monkeypatch.setattr(trainer_mod, "wrap_model", lambda model, *args, **kwargs: model)  # no process group here
    grads = []
    for rank in range(2):
        rows = slice(2 * rank, 2 * rank + 2)
        info = trainer_mod.DistInfo(rank=rank, world_size=2)
        tr, opt = _trainer(batch_size=4, dist_info=info)
        tr.train_step({"input_ids": ids[rows], "labels": labels[rows]})
        grads.append(opt.grads)
    want, _ = _full_batch_grads(ids, labels)
    for g0, g1, w in zip(*grads, want):
        torch.testing.assert_close((g0 + g1) / 2, w, atol=1e-6, rtol=1e-5)


def test_single_process_defaults():
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, DistInfo()) is model
    with pytest.raises(ValueError, match="strategy"):
        wrap_model(model, DistInfo(), strategy="zero4")


# ------------------------------------------------------------------------------------------ the trainer
VOCAB = 32


def _model():
    torch.manual_seed(0)
    return CausalLM(ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, max_position_embeddings=32))


def _batch():
    # 4 rows of 10 tokens; rows have 9, 3, 6 and 1 target tokens (label -100 = not a target)
    ids = torch.randint(1, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    for row, n_ignored in enumerate((0, 6, 3, 8)):
        labels[row, 1:1 + n_ignored] = -100
    return ids, labels


class CaptureGrads(torch.optim.SGD):
    """An optimizer that records the gradients it is given (after clipping) and does not move the weights."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads = None

    @torch.no_grad()
    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def _trainer(grad_clip=None, **kw):
    model = _model()
    opt = CaptureGrads(model.parameters())
    dist_info = kw.pop("dist_info", trainer_mod.DistInfo())
    cfg = TrainerConfig(**{**dict(steps=1, batch_size=4, progress=False, tensorboard=False, wandb=False,
                                  grad_clip=grad_clip, device="cpu"), **kw})
    return Trainer(model, cfg, train_data=None, optimizer=opt, dist_info=dist_info), opt


def _full_batch_grads(ids, labels):
    model = _model()
    model(ids, labels=labels).loss.backward()
    return [p.grad for p in model.parameters()], model(ids, labels=labels).loss.item()


@pytest.mark.task("Trainer.train_step")
@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_grad_accumulation_is_a_token_weighted_mean(micro_batch_size):
    # Micro-batches with 9, 3, 6, 1 target tokens: the accumulated gradient and the logged loss must be those of the
    # token mean over the whole batch, however the rows are split.
    ids, labels = _batch()
    tr, opt = _trainer(micro_batch_size=micro_batch_size)
    metrics = tr.train_step({"input_ids": ids, "labels": labels})
    want, loss = _full_batch_grads(ids, labels)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-6)
    for g, w in zip(opt.grads, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    if micro_batch_size == 1:  # the mean of the per-row means is a different (wrong) number
        model = _model()
        row_means = [model(ids[i:i + 1], labels=labels[i:i + 1]).loss.item() for i in range(4)]
        assert sum(row_means) / 4 != pytest.approx(loss, rel=1e-3)


@pytest.mark.task("Trainer.train_step")
def test_grad_clipping_in_the_trainer():
    ids, labels = _batch()
    want, _ = _full_batch_grads(ids, labels)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(w) for w in want])).item()
    tr, opt = _trainer(grad_clip=norm / 10)
    metrics = tr.train_step({"input_ids": ids, "labels": labels})
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)  # the norm before clipping is logged
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in opt.grads])).item()
    assert clipped == pytest.approx(norm / 10, rel=1e-4)  # g * max_norm / ||g||: the global norm is max_norm
    for g, w in zip(opt.grads, want):
        torch.testing.assert_close(g, w / 10, atol=1e-7, rtol=1e-4)  # same direction
    tr, opt = _trainer(grad_clip=norm * 2)  # a norm under the threshold is left alone
    tr.train_step({"input_ids": ids, "labels": labels})
    for g, w in zip(opt.grads, want):
        torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-5)


@pytest.mark.task("MetricsLogger.log")
def test_metrics_logger_writes_every_step(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False, wandb=False)
    log.log(1, {"loss": 2.5, "lr": torch.tensor(1e-3), "grad_norm": float("nan")})
    log.log(2, {"loss": 2.0, "lr": 1e-3, "grad_norm": 0.5})
    log.log(3, {"loss": 1.5, "lr": 5e-4, "grad_norm": float("inf")})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)  # one valid JSON object per step
    rec = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rec] == [1, 2, 3] and [r["loss"] for r in rec] == [2.5, 2.0, 1.5]
    assert rec[0]["lr"] == pytest.approx(1e-3) and rec[0]["grad_norm"] is None and rec[2]["grad_norm"] is None
    log = MetricsLogger(tmp_path, tensorboard=False, wandb=False)
    log.truncate_after(2)  # what resume does: drop the steps after the checkpoint
    log.log(3, {"loss": 1.4})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(1, 2.5), (2, 2.0), (3, 1.4)]
    MetricsLogger(tmp_path / "off", enabled=False).log(1, {"loss": 1.0})  # other ranks: nothing written
    assert not (tmp_path / "off").exists()


@pytest.mark.task("save_checkpoint", "load_checkpoint")
def test_checkpoint_round_trip_and_keep_last(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids, labels = _batch()
    model(ids, labels=labels).loss.backward()
    opt.step()
    for step in (10, 20, 30, 40):
        path = ckpt.save_checkpoint(tmp_path, step, model.state_dict(), opt.state_dict(), {"note": step},
                                    keep_last=2)
        assert path.name == ckpt.step_dir_name(step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [ckpt.step_dir_name(30), ckpt.step_dir_name(40)]
    c = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert c.step == 40 and c.trainer_state["note"] == 40
    for k, v in model.state_dict().items():
        assert torch.equal(c.model_state[k], v), k
    fresh = torch.optim.AdamW(_model().parameters(), lr=1e-3)
    fresh.load_state_dict(c.optimizer_state)
    a, b = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)


@pytest.mark.task("load_checkpoint")
def test_corrupt_checkpoint_names_the_file(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 1, _model().state_dict(), None, {}, keep_last=None)
    weights = path / ckpt.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=ckpt.MODEL_FILE):
        ckpt.load_checkpoint(path)
