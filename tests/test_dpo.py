"""DPODataset (shared prompt, labels, truncation, bad input) and DPOTrainer (concatenated forward, fused log-probs
equal to full-logit ones, frozen reference bitwise unchanged, precomputed reference, reference-free, steps raise
the margin, export, resume)."""

from __future__ import annotations

import json

import pytest
import torch

from intro2llm.data import chat, synthetic
from intro2llm.data.dpo_dataset import DPODataset, collate, read_jsonl, synthetic_triples
from intro2llm.data.prepare import synthetic_tokenizer
from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.training.dpo_trainer import DPOTrainer, sequence_logps
from intro2llm.training.trainer import TrainerConfig


@pytest.fixture(scope="module")
def tok():
    return synthetic_tokenizer(list(synthetic.pretrain_documents(300, seed=0)))


def _model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return CausalLM(cfg)


def test_dataset_shares_the_prompt_and_labels_responses(tok):
    ds = DPODataset([("Q: 12+35=?\nA:", " 47\n", " 48\n")], tok)
    row = ds[0]
    c, r = row["chosen_input_ids"].tolist(), row["rejected_input_ids"].tolist()
    n = len(tok.encode("Q: 12+35=?\nA:"))
    assert c[:n] == r[:n] == tok.encode("Q: 12+35=?\nA:")
    assert c != r
    for side, text in (("chosen", " 47\n"), ("rejected", " 48\n")):
        labels = row[f"{side}_labels"].tolist()
        assert labels[:n] == [-100] * n, "prompt tokens are not scored"
        eos = chat.stop_token_id(tok, "plain")
        assert labels[n:] == tok.encode(text) + [eos], "response and its end token are scored"
    batch = collate([ds[0], ds[0]], pad_id=0)
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (2, len(c))


def test_dataset_truncation_and_counts(tok):
    rows = synthetic_triples(20, seed=1)
    ds = DPODataset(rows, tok, max_length=12, max_prompt_length=8)
    assert ds.stats["prompt_truncated"] == 20 and ds.stats["response_truncated"] > 0
    for i in range(len(ds)):
        for side in ("chosen", "rejected"):
            assert len(ds[i][f"{side}_input_ids"]) <= 12
            assert (ds[i][f"{side}_labels"] != -100).any()
    # responses cut to nothing: every pair dropped and counted, then a clear error
    with pytest.raises(ValueError, match="no DPO pair left"):
        DPODataset(rows, tok, max_length=5)  # the prompt alone is longer: no response token left


def test_dataset_bad_input(tok, tmp_path):
    with pytest.raises(ValueError, match="row 1: chosen equals rejected"):
        DPODataset([("Q: 1+1=?\nA:", " 2\n", " 3\n"), ("Q: 1+1=?\nA:", " 2\n", " 2\n")], tok)
    with pytest.raises(ValueError, match="empty rejected"):
        DPODataset([("Q: 1+1=?\nA:", " 2\n", "")], tok)
    with pytest.raises(ValueError, match="missing field"):
        DPODataset([{"prompt": "Q: 1+1=?\nA:", "chosen": " 2\n"}], tok)
    with pytest.raises(ValueError, match="template"):
        DPODataset([("Q: 1+1=?\nA:", " 2\n", " 3\n")], tok, template="nope")
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Q: 1+1=?\nA:", "chosen": " 2\n", "rejected": " 3\n"}) + "\n{bad\n")
    with pytest.raises(ValueError, match="d.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_sequence_logps_equal_full_logits(tok):
    model = _model(tok)
    ds = DPODataset(synthetic_triples(3, seed=2), tok)
    b = collate([ds[i] for i in range(3)], pad_id=0)
    ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])
    labels = torch.cat([b["chosen_labels"], b["rejected_labels"]])
    got, lengths = sequence_logps(model, ids, labels)
    logits = model(ids).logits[:, :-1].float()  # (2B, T-1, V)
    t = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0] * (t != -100)
    torch.testing.assert_close(got, lp.sum(-1), atol=1e-4, rtol=1e-5)
    assert torch.equal(lengths, (t != -100).sum(-1))


def _trainer(tok, tmp_path, steps=6, **kw):
    cfg = TrainerConfig(steps=steps, batch_size=4, micro_batch_size=2, lr=3e-3, warmup_steps=0, schedule="constant",
                        weight_decay=0.0, out_dir=str(tmp_path), progress=False, tensorboard=False, wandb=False,
                        device="cpu")
    ds = DPODataset(synthetic_triples(16, seed=3), tok)
    return DPOTrainer(_model(tok), cfg, ds, **kw)


def test_training_raises_the_margin_and_keeps_the_reference(tok, tmp_path):
    tr = _trainer(tok, tmp_path / "run", beta=0.5)
    ref = tr.ref_model
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    hist = tr.train()
    assert all(k in hist[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"))
    assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5), "policy == reference at step 1"
    assert hist[-1]["rewards/margins"] > 0.05 and hist[-1]["loss"] < hist[0]["loss"]
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before[k]), f"reference parameter {k} changed"
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "tokenizer_config.json").exists()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert "rewards/margins" in json.loads(lines[-1])


def test_precomputed_reference_equals_live_reference(tok, tmp_path):
    live = _trainer(tok, tmp_path / "a", steps=2)
    pre = _trainer(tok, tmp_path / "b", steps=2, precompute_ref=True)
    assert pre.ref_model is None and set(pre.ref_logps["train"]) == {"chosen", "rejected"}
    h_live, h_pre = live.train(), pre.train()
    for a, b in zip(h_live, h_pre):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=1e-5)


def test_reference_free_and_resume(tok, tmp_path):
    tr = _trainer(tok, tmp_path / "rf", steps=2, reference_free=True)
    assert tr.ref_model is None and not tr.ref_logps
    h = tr.train()
    assert h[0]["rewards/chosen"] != 0.0  # rewards are β log π: no reference subtracted
    # resume: 2 more steps from the checkpoint continue exactly like an uninterrupted 4-step run
    full = _trainer(tok, tmp_path / "full", steps=4, reference_free=True).train()
    again = _trainer(tok, tmp_path / "rf", steps=4, reference_free=True)
    again.resume()
    rest = again.train()
    assert [r["loss"] for r in rest] == pytest.approx([r["loss"] for r in full[2:]], abs=1e-6)


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_cli_synthetic_run_resume_and_errors(tok, tmp_path, capsys):
    from intro2llm.cli import main

    ckpt = tmp_path / "ckpt"
    _model(tok).save_pretrained(ckpt)
    tok.save(ckpt / "tokenizer.json")
    out = tmp_path / "dpo"
    common = ["dpo", "--ckpt", str(ckpt), "--data", "synthetic", "--out", str(out), "--num-train", "32",
              "--batch-size", "4", "--accuracy-samples", "4", "--no-progress", "--no-tensorboard", "--device", "cpu",
              "--lr", "1e-3", "--save-every", "2"]
    assert main(common + ["--steps", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"eval_before", "eval_after", "accuracy_before", "accuracy_after"} <= set(summary)
    assert summary["eval_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy == reference
    assert (out / "model.safetensors").exists() and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(common + ["--steps", "3", "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    assert main(common + ["--steps", "3"]) == 2  # a run is already there
    assert "--resume" in capsys.readouterr().err
    assert main(["dpo", "--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q: 1+1=?\nA:", "chosen": " 2\n", "rejected": " 2\n"}) + "\n")
    assert main(["dpo", "--ckpt", str(ckpt), "--data", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "chosen equals rejected" in capsys.readouterr().err
