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
    meta["files"][ck.TRAINER_FILE] = {"bytes": bad.stat().st_size, "sha256": ck.file_sha256(bad)}
    (path / ck.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ck.CheckpointError, match="trainer.pt could not be read"):
        ck.load_checkpoint(path)


def _rewrite_meta(path, change):
    meta = json.loads((path / ck.META_FILE).read_text())
    change(meta)
    (path / ck.META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize("case,message", [
    ("files_empty", "'files' lists \\[\\], expected exactly"),
    ("files_no_optimizer", "'files' lists \\['model.safetensors', 'trainer.pt'\\]"),
    ("files_list", "'files' must be an object, got list"),
    ("bytes_str", "'bytes' of model.safetensors must be an int"),
    ("sha_short", "'sha256' of optimizer.pt must be 64"),
    ("entry_null", "entry for trainer.pt must be"),
    ("step_str", "'step' must be an int >= 0, got '1'"),
    ("step_bool", "'step' must be an int >= 0, got True"),
    ("step_other_dir", "'step' is 7 but the directory is step_00000001"),
    ("version", "format_version is 2"),
    ("not_object", "expected a JSON object, got list"),
    ("not_json", "not valid JSON"),
    ("deep_json", "not valid JSON"),
])
def test_meta_json_is_validated(tmp_path, case, message):
    path = _save(tmp_path, 1, _model())
    edits = {
        "files_empty": lambda m: m.update(files={}),
        "files_no_optimizer": lambda m: m["files"].pop(ck.OPTIMIZER_FILE),
        "files_list": lambda m: m.update(files=list(m["files"])),
        "bytes_str": lambda m: m["files"][ck.MODEL_FILE].update(bytes="12"),
        "sha_short": lambda m: m["files"][ck.OPTIMIZER_FILE].update(sha256="abc"),
        "entry_null": lambda m: m["files"].update({ck.TRAINER_FILE: None}),
        "step_str": lambda m: m.update(step="1"),
        "step_bool": lambda m: m.update(step=True),
        "step_other_dir": lambda m: m.update(step=7),
        "version": lambda m: m.update(format_version=2),
    }
    if case in edits:
        _rewrite_meta(path, edits[case])
    else:
        text = {"not_object": "[1, 2]", "not_json": "{", "deep_json": "[" * 100000 + "]" * 100000}[case]
        (path / ck.META_FILE).write_text(text)
    with pytest.raises(ck.CheckpointError, match=f"meta.json is corrupt: {message}"):
        ck.load_checkpoint(path)
    best, damaged = ck.latest_intact_checkpoint(tmp_path)
    assert best is None and damaged[0][0] == path


def test_optimizer_file_always_written_and_trainer_step_checked(tmp_path):
    path = ck.save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, None, {"x": 1})
    assert (path / ck.OPTIMIZER_FILE).is_file() and ck.load_checkpoint(path).optimizer_state is None
    bad = path / ck.TRAINER_FILE
    torch.save({"step": 4, "x": 1}, bad)
    _rewrite_meta(path, lambda m: m["files"].update({ck.TRAINER_FILE: {"bytes": bad.stat().st_size,
                                                                        "sha256": ck.file_sha256(bad)}}))
    with pytest.raises(ck.CheckpointError, match="trainer.pt does not match meta.json: step 4, expected 3"):
        ck.load_checkpoint(path)
    with pytest.raises(ValueError, match="step must be an int"):
        ck.save_checkpoint(tmp_path, -1, {"w": torch.zeros(2)}, None, {})


def test_latest_intact_skips_a_damaged_newest(tmp_path):
    m = _model()
    _save(tmp_path, 1, m)
    newest = _save(tmp_path, 2, m)
    (newest / ck.OPTIMIZER_FILE).write_bytes(b"garbage")
    best, damaged = ck.latest_intact_checkpoint(tmp_path)
    assert best.name == "step_00000001"
    assert [p.name for p, _ in damaged] == ["step_00000002"] and "optimizer.pt is corrupt" in damaged[0][1]


@pytest.mark.parametrize("stage", ["backed-up", "swapped"])
def test_resave_of_a_step_survives_a_crash_at_every_point(tmp_path, stage):
    """Re-saving step 2 (as a resumed, finished run does), killed between the renames: step 2 is still found
    complete (old or new copy), and a later save with keep_last=1 keeps a complete checkpoint."""
    script = textwrap.dedent(f"""
        import os, torch
        from intro2llm.training import checkpoint as ck
        root = {str(tmp_path)!r}
        ck.save_checkpoint(root, 2, {{"w": torch.zeros(3)}}, None, {{}})
        def crash(stage):
            if stage == {stage!r}:
                os._exit(3)  # no clean-up runs: as a kill would leave it
        ck._resave_hook = crash
        ck.save_checkpoint(root, 2, {{"w": torch.ones(3)}}, None, {{}})
    """)
    assert subprocess.run([sys.executable, "-c", script]).returncode == 3
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000002"]
    c = ck.load_checkpoint(ck.latest_checkpoint(tmp_path))
    assert float(c.model_state["w"][0]) == (0.0 if stage == "backed-up" else 1.0)
    ck.save_checkpoint(tmp_path, 3, {"w": torch.full((3,), 2.0)}, None, {}, keep_last=1)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_00000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]
    # and a re-save that is not interrupted leaves exactly the new copy
    ck.save_checkpoint(tmp_path, 3, {"w": torch.full((3,), 5.0)}, None, {}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]
    assert float(ck.load_checkpoint(tmp_path / "step_00000003").model_state["w"][0]) == 5.0


def test_cli_resume_uses_the_newest_intact_checkpoint(tmp_path, capsys):
    from intro2llm.cli import main
    from intro2llm.training.logging import read_metrics

    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps({"vocab_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}))
    out = tmp_path / "run"

    def train(*extra, steps):
        return main(["train", "--config", str(cfg), "--out", str(out), "--steps", str(steps), "--batch-size", "2",
                     "--seq-len", "8", "--synthetic-docs", "100", "--no-progress", "--no-tensorboard",
                     "--precision", "fp32", "--accuracy-samples", "0", "--warmup", "1", "--save-every", "1",
                     "--keep", "2", *extra])

    assert train(steps=3) == 0
    bad = out / "checkpoints" / "step_00000003" / ck.META_FILE
    _rewrite_meta(bad.parent, lambda m: m.update(files={}))
    capsys.readouterr()
    assert train("--resume", steps=4) == 0
    err = capsys.readouterr().err
    assert f"{bad} is corrupt" in err and "resuming from the newest intact checkpoint step_00000002" in err
    assert "resumed from step 2" in err
    assert (out / "checkpoints" / "damaged-step_00000003").is_dir()
    assert [p.name for p in ck.list_checkpoints(out / "checkpoints")] == ["step_00000003", "step_00000004"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]
