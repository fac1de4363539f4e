"""Bad inputs to the CLIs (issue 19): each is one line on stderr and exit code 2, never a traceback or a silent
wrong number."""

from __future__ import annotations

import json

import pytest
import torch

from intro2llm.cli import main


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("extra,needle", [
    (["--keep", "0"], "--keep must be >= 1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--min-lr", "-1"], "--min-lr must be a finite number >= 0"),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--device", "meta"], "not meta"),
    (["--device", "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"], "--device"),
])
def test_train_refuses_bad_options(tmp_path, capsys, extra, needle):
    rc = main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--no-progress", "--no-tensorboard", *extra])
    assert rc == 2
    _one_line_error(capsys, needle)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_trainer_config_refuses_non_finite_values():
    from intro2llm.training.trainer import TrainerConfig

    for kwargs, needle in (({"lr": float("inf")}, "lr must be a finite"), ({"keep_last": 0}, "keep_last"),
                           ({"weight_decay": float("nan")}, "weight_decay"), ({"min_lr": float("inf")}, "min_lr")):
        with pytest.raises(ValueError, match=needle):
            TrainerConfig(**kwargs).validate()


@pytest.fixture
def ckpt(tmp_path):
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.config import ModelConfig
    from intro2llm.tokenizer import ByteLevelBPETokenizer

    path = tmp_path / "ckpt"
    torch.manual_seed(0)
    CausalLM(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(path)
    ByteLevelBPETokenizer().save(path / "tokenizer.json")
    corpus = tmp_path / "c.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 4)
    return path, corpus


def test_eval_errors_are_one_line(ckpt, tmp_path, capsys):
    path, corpus = ckpt
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    pass\n"}) + "\n")
    assert main(["eval", "humaneval", "--samples", str(samples), "--timeout", "inf"]) == 2
    _one_line_error(capsys, "timeout must be a positive finite number")
    assert main(["eval", "humaneval", "--samples", str(samples), "--timeout", "-1"]) == 2
    _one_line_error(capsys, "timeout")
    # a truncated weights file
    weights = next(path.glob("*.safetensors"))
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    assert main(["eval", "ppl", "--ckpt", str(path), "--data", str(corpus)]) == 2
    _one_line_error(capsys, "model weights could not be read")
    weights.write_bytes(good)
    # tokenizer.json that is a directory, too deeply nested, or of an abstract type
    tok = path / "tokenizer.json"
    state = tok.read_text()
    tok.unlink()
    tok.mkdir()
    assert main(["eval", "ppl", "--ckpt", str(path), "--data", str(corpus)]) == 2
    _one_line_error(capsys, "tokenizer.json")
    tok.rmdir()
    tok.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["eval", "ppl", "--ckpt", str(path), "--data", str(corpus)]) == 2
    _one_line_error(capsys, "nested too deeply")
    tok.write_text(json.dumps(dict(json.loads(state), type="BaseTokenizer")))
    assert main(["eval", "ppl", "--ckpt", str(path), "--data", str(corpus)]) == 2
    _one_line_error(capsys, "abstract tokenizer type")


def test_ppl_never_reports_negative_bytes(ckpt, tmp_path, capsys):
    """A tokenizer whose tokens decode to more text than the source (an unknown character decodes as
    "<unk>"): bits per byte are not reported (they were negative before), with a warning; a faithful tokenizer
    still gets them."""
    from intro2llm.evaluation.perplexity import evaluate_perplexity, scored_bytes
    from intro2llm.tokenizer import BPETokenizer

    path, corpus = ckpt
    lossy = BPETokenizer().train("ab ab", 8)
    text = "€€€€ ab"
    ids = lossy.encode(text)
    assert len(lossy.decode(ids).encode()) > len(text.encode())  # the case that gave negative bytes
    assert scored_bytes(lossy, text, ids) is None
    lossy.save(path / "tokenizer.json")
    (tmp_path / "x.txt").write_text("€" * 30 + " ab" * 10)
    assert main(["eval", "ppl", "--ckpt", str(path), "--data", str(tmp_path / "x.txt")]) == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["bits_per_byte"] is None and res["n_bytes"] is None and "warning" in captured.err
    assert res["perplexity"] > 0
    with pytest.raises(ValueError, match="n_bytes must be a positive int"):
        evaluate_perplexity(lambda x: torch.zeros(*x.shape, 4), [1, 2, 3], n_bytes=-4)


def test_tokenizer_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    import io

    from intro2llm.tokenizer import ByteLevelBPETokenizer

    good = tmp_path / "tok.json"
    ByteLevelBPETokenizer().save(good)
    deep = tmp_path / "deep.json"
    deep.write_text("{" * 1 + '"a":' + "[" * 100_000 + "]" * 100_000 + "}")
    abstract = tmp_path / "abstract.json"
    abstract.write_text(json.dumps(dict(json.loads(good.read_text()), type="BaseTokenizer")))
    cases = ((tmp_path, "is a directory"), (deep, "nested too deeply"), (abstract, "abstract tokenizer type"))
    for path, needle in cases:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hello")))
        assert main(["tokenizer", "encode", "--tokenizer", str(path)]) == 2
        _one_line_error(capsys, needle)
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, hello world\n" * 20)
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300", "--out",
                 str(tmp_path / "t.json"), "--pattern", r"\w+", "--quiet"]) == 2
    _one_line_error(capsys, "does not cover the text")
