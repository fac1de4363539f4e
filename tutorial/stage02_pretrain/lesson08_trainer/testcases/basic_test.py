"""Lesson 08 basic tests: ring all-reduce, ZeRO/FSDP memory arithmetic, how a global batch is split over ranks,
and why token-weighted losses make DDP equal to one big batch."""

import pytest
import torch

from intro2llm.training.distributed import (
    DistInfo,
    init_distributed,
    simulate_ring_all_reduce,
    wrap_model,
    zero_memory_per_rank,
)


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


def test_token_weighted_losses_make_ddp_equal_one_batch():
    # Two ranks with different numbers of valid tokens: the global token-mean is sum(l_i * n_i) / N.
    mean_losses, tokens = torch.tensor([2.0, 5.0]), torch.tensor([30.0, 10.0])
    n = tokens.sum()
    per_rank = mean_losses * tokens / n * 2  # what each rank backpropagates (x W because DDP averages)
    assert (per_rank.mean()).item() == pytest.approx((2 * 30 + 5 * 10) / 40)
    assert mean_losses.mean().item() != pytest.approx((2 * 30 + 5 * 10) / 40)  # a plain average would be wrong


def test_single_process_defaults():
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, DistInfo()) is model
    with pytest.raises(ValueError, match="strategy"):
        wrap_model(model, DistInfo(), strategy="zero4")
