"""Checkpoints: round trip, keep-last-k, atomicity under a crash or a full disk, corrupt/missing files, and
weights_only loading."""

import errno
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from intro2llm.training import checkpoint as ck


def _model(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight  # tied, as in CausalLM(tie_word_embeddings=True)
    return m


def _save(root, step, model, keep_last=3):
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    return ck.save_checkpoint(root, step, model.state_dict(), opt.state_dict(), {"rng": ck.rng_state(), "x": 1},
                              keep_last=keep_last)


def test_round_trip_with_tied_weights(tmp_path):
    m = _model()
    path = _save(tmp_path, 5, m)
    assert path.name == "step_00000005"
    c = ck.load_checkpoint(path)
    assert c.step == 5 and c.trainer_state["x"] == 1
    m2 = _model(seed=1)
    m2.load_state_dict(c.model_state)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert c.optimizer_state["state"][0]["step"].item() == 1


def test_rng_state_round_trip(tmp_path):
    state = ck.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    path = ck.save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, None, {"rng": state})
    random.random(), np.random.rand(), torch.rand(3)
    ck.set_rng_state(ck.load_checkpoint(path).trainer_state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_keep_last_k(tmp_path):
    m = _model()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, m, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert ck.latest_checkpoint(tmp_path).name == "step_00000004"


def test_disk_full_keeps_previous(tmp_path, monkeypatch):
    m = _model()
    prev = _save(tmp_path, 1, m)
    before = ck.load_checkpoint(prev).model_state

    def fail(path):
        if path.name == ck.OPTIMIZER_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_after_file_hook", fail)
    with pytest.raises(ck.CheckpointError, match="No space left.*step_00000001 is intact"):
        _save(tmp_path, 2, m)
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001"]  # no partial step_2, no temp dir
    after = ck.load_checkpoint(ck.latest_checkpoint(tmp_path)).model_state
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_killed_mid_save_leaves_previous_usable(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time, torch
        from torch import nn
        from intro2llm.training import checkpoint as ck
        m = nn.Linear(3, 3)
        ck.save_checkpoint({str(tmp_path)!r}, 1, m.state_dict(), None, {{}})
        def hang(path):
            print("MIDSAVE", flush=True)
            time.sleep(60)
        ck._after_file_hook = hang
        with torch.no_grad():
            m.weight.add_(1.0)
        ck.save_checkpoint({str(tmp_path)!r}, 2, m.state_dict(), None, {{}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "MIDSAVE"
    finally:
        proc.kill()
        proc.wait()
    assert any(p.name.startswith(".tmp-step_00000002") for p in tmp_path.iterdir())
    latest = ck.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000001"
    state = ck.load_checkpoint(latest).model_state
    assert set(state) == {"weight", "bias"}
    ck.save_checkpoint(tmp_path, 3, state, None, {})  # the next save clears the stray temp dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000003"]


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated", "no_meta"])
def test_missing_or_corrupt_file_is_named(tmp_path, damage):
    path = _save(tmp_path, 1, _model())
    target = path / ck.OPTIMIZER_FILE
    if damage == "missing":
        target.unlink()
    elif damage == "corrupt":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:10])
    else:
        target = path / ck.META_FILE
        target.unlink()
    with pytest.raises(ck.CheckpointError, match=str(target.name)):
        ck.load_checkpoint(path)


def test_loading_refuses_pickled_code(tmp_path):
    path = _save(tmp_path, 1, _model())

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = path / ck.TRAINER_FILE
    torch.save({"step": 1, "x": Evil()}, bad)
    meta = json.loads((path / ck.META_FILE).read_text())  # make the checksum agree, so only weights_only stops it
    meta["files"][ck.TRAINER_FILE] = {"bytes": bad.stat().st_size, "sha256": ck._sha256(bad)}
    (path / ck.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ck.CheckpointError, match="trainer.pt could not be read"):
        ck.load_checkpoint(path)
