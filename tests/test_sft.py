"""`intro2llm sft` end to end on a small random checkpoint: the mask preview, bad input (exit 2, one line), a short
run with resume, and a result that intro2llm's evaluation loader and transformers both read."""

import json

import pytest
import torch

from intro2llm.configs import get_config
from intro2llm.data import synthetic
from intro2llm.data.prepare import synthetic_tokenizer
from intro2llm.model.causal_lm import CausalLM


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tok = synthetic_tokenizer(list(synthetic.pretrain_documents(500, seed=0)))
    cfg = get_config("tiny").replace(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=128, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    CausalLM(cfg).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


class Result:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


@pytest.fixture
def sft(capsys):
    """Run ``intro2llm sft ARGS`` in this process (the CLI's main; a subprocess would re-import torch each time)."""
    from intro2llm.cli import main

    def run(*args):
        capsys.readouterr()
        rc = main(["sft", *map(str, args)])
        out, err = capsys.readouterr()
        return Result(rc, out, err)

    return run


def test_show_mask(ckpt, sft):
    r = sft("--ckpt", ckpt, "--show-mask", "--num-train", 20, "--accuracy-samples", 5)
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("Q|:| |") and first.endswith("\\n|<|endoftext|>]]")
    stats = json.loads(r.stdout.splitlines()[-1])
    assert stats["template"] == "plain" and stats["samples"] == 20


@pytest.mark.parametrize("args, message", [
    (["--template", "vicuna"], "valid templates: plain, chatml, llama2"),
    (["--data", "missing.jsonl"], "does not exist"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--max-length", "8"], "no SFT row left"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, sft, args, message):
    r = sft("--ckpt", ckpt, "--out", tmp_path / "o", "--num-train", 20, "--accuracy-samples", 5, *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_jsonl_without_assistant_turn_is_an_error(ckpt, tmp_path, sft):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Q: 1+1=?\nA:"}]}) + "\n")
    r = sft("--ckpt", ckpt, "--out", tmp_path / "o", "--data", data)
    assert r.returncode == 2 and "SFT row 0" in r.stderr and "no assistant turn" in r.stderr


def test_run_resume_and_load(ckpt, tmp_path, sft):
    out = tmp_path / "run"
    common = ["--ckpt", ckpt, "--out", out, "--num-train", 64, "--accuracy-samples", 8, "--batch-size", 8,
              "--save-every", 2, "--no-progress", "--no-tensorboard", "--template", "chatml"]
    r = sft(*common, "--steps", 2)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout.splitlines()[-1])
    assert first["steps"] == 2 and 0.0 <= first["accuracy"] <= 1.0 and "accuracy_before" in first
    r = sft(*common, "--steps", 4, "--resume")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["steps"] == 4
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3, 4]
    # our evaluation loader and transformers read the result; the chat template added two tokens
    from intro2llm.evaluation.cli import load_checkpoint

    model, tok = load_checkpoint(str(out))
    assert tok.special_tokens["<|im_end|>"] == model.config.vocab_size - 1
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["intro2llm_chat_template"] == "chatml" and "{%- generation -%}" in cfg["chat_template"]
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 2, 3, model.config.vocab_size - 1]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


def test_loss_equals_trl_sft_trainer(ckpt, tmp_path):
    """Same weights, same ids and completion mask: our SFT loss == TRL SFTTrainer.compute_loss (completion only)."""
    pytest.importorskip("trl", reason="trl is the oracle (test extra)")
    from datasets import Dataset
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    from intro2llm.data.sft_dataset import SFTDataset, collate, rows_from_pairs
    from intro2llm.evaluation.cli import load_checkpoint
    from intro2llm.training.sft_trainer import SFTTrainer
    from intro2llm.training.trainer import TrainerConfig

    model, tok = load_checkpoint(str(ckpt))
    ds = SFTDataset(rows_from_pairs(synthetic.sft_pairs(4, seed=7)), tok, "plain")
    batch = collate([ds[i] for i in range(4)], tok.eos_token_id)
    ours = SFTTrainer(model, TrainerConfig(steps=1, batch_size=4, progress=False, tensorboard=False, wandb=False,
                                           device="cpu"), ds).compute_loss(batch)

    V = model.config.vocab_size
    word_level = Tokenizer(WordLevel({str(i): i for i in range(V)}, unk_token="0"))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token=str(tok.eos_token_id),
                                     eos_token=str(tok.eos_token_id))
    rows = [ds[i] for i in range(4)]
    data = Dataset.from_dict({"input_ids": [r["input_ids"].tolist() for r in rows],
                              "completion_mask": [(r["labels"] != -100).long().tolist() for r in rows]})
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True,
                     completion_only_loss=True, max_length=None, save_strategy="no")
    trl = TRLSFTTrainer(model=LlamaForCausalLM.from_pretrained(ckpt), args=args, train_dataset=data,
                        processing_class=hf_tok)
    inputs = next(iter(trl.get_train_dataloader()))
    theirs = trl.compute_loss(trl.model, inputs)
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-5, rtol=1e-5)
