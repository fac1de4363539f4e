"""``intro2llm train``: outputs loadable by evaluation, resume, and clear errors for bad data or checkpoints."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from intro2llm.cli import main
from intro2llm.training.logging import read_metrics

MICRO = {"vocab_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture
def micro_config(tmp_path):
    path = tmp_path / "micro.json"
    path.write_text(json.dumps(MICRO))
    return str(path)


def train(out, config, *extra, steps=4):
    return main(["train", "--config", config, "--out", str(out), "--steps", str(steps), "--batch-size", "4",
                 "--seq-len", "16", "--synthetic-docs", "500", "--no-progress", "--no-tensorboard",
                 "--precision", "fp32", "--accuracy-samples", "0", "--warmup", "1", *extra])


def test_cli_module_does_not_import_torch():
    code = "import sys, intro2llm.training.cli; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_train_synthetic_outputs_load_for_evaluation(tmp_path, micro_config):
    from intro2llm.data.prepare import load_tokenizer
    from intro2llm.model.causal_lm import CausalLM

    out = tmp_path / "run"
    assert train(out, micro_config, "--accuracy-samples", "4", "--eval-every", "2") == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(isinstance(r["loss"], float) and isinstance(r["lr"], float) for r in recs)
    assert "eval_loss" in recs[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and 0.0 <= summary["accuracy"] <= 1.0
    model = CausalLM.from_pretrained(out)
    tok = load_tokenizer(out)
    assert model.config.vocab_size == tok.vocab_size
    ids = torch.tensor([tok.encode("Q: 1+2=?\nA:")])
    # the exported weights are the trained ones: same loss as the last checkpoint's weights
    from intro2llm.training.checkpoint import latest_checkpoint, load_checkpoint

    ck = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    ref = CausalLM(model.config)
    ref.load_state_dict(ck.model_state)
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_resume_continues_and_refuses_silent_restart(tmp_path, micro_config, capsys):
    out = tmp_path / "run"
    assert train(out, micro_config, steps=3) == 0
    assert train(out, micro_config, steps=3) == 2  # checkpoints exist, no --resume: refuse to overwrite
    assert "--resume" in capsys.readouterr().err
    assert train(out, micro_config, "--resume", steps=5) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert train(tmp_path / "nothing", micro_config, "--resume") == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_with_damaged_checkpoint_names_the_file(tmp_path, micro_config, capsys, damage):
    out = tmp_path / "run"
    assert train(out, micro_config, steps=2) == 0
    target = out / "checkpoints" / "step_00000002" / "model.safetensors"
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(b"\0" * 16 + target.read_bytes()[16:])
    assert train(out, micro_config, "--resume", steps=4) == 2
    err = capsys.readouterr().err
    assert str(target) in err and damage in err


def test_bad_data_paths(tmp_path, micro_config, capsys):
    assert train(tmp_path / "a", micro_config, "--data", str(tmp_path / "missing")) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(tmp_path / "b", micro_config, "--data", str(empty)) == 2
    assert f"no .txt, .md, .py, .jsonl files under {str(empty)!r}" in capsys.readouterr().err
    # a shard dir whose ids exceed its declared vocabulary
    from intro2llm.data.pretrain_dataset import ShardWriter

    shards = tmp_path / "shards"
    with ShardWriter(shards, 100, eos_token_id=0) as w:
        w.add(list(np.arange(1, 99)) * 3)
    index = json.loads((shards / "index.json").read_text())
    index["vocab_size"] = 50
    (shards / "index.json").write_text(json.dumps(index))
    assert train(tmp_path / "c", micro_config, "--data", str(shards)) == 2
    assert ">= vocab_size 50" in capsys.readouterr().err


def test_train_on_text_file(tmp_path, micro_config):
    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 200)
    out = tmp_path / "run"
    assert train(out, micro_config, "--data", str(text), "--vocab-size", "300", steps=2) == 0
    assert (out / "tokenizer.json").exists() and len(read_metrics(out / "metrics.jsonl")) == 2
