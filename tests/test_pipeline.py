"""``intro2llm pipeline`` end to end with tiny step counts: every artefact exists and loads.

One pipeline run (a 20k-parameter model, two steps per stage, a few held-out items: ``INTRO2LLM_PIPELINE_TINY``)
is interrupted by Ctrl-C after DPO has trained, resumed into a GRPO failure, and resumed again to the end; the
checks then cover the checkpoints (in ``transformers``), the tokenizer, metrics.jsonl, summary.json, the report's
numbers and the plots. The bad-input cases run no training.
"""

from __future__ import annotations

import json
import re

import pytest

from intro2llm.cli import main

MICRO = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
         "intermediate_size": 64, "max_position_embeddings": 256}
MODEL_STAGES = ("pretrain", "sft", "dpo", "grpo")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny pipeline run, reached through an interruption, a failure and two resumes."""
    import torch

    import intro2llm.pipeline.evaluate as ev

    mp = pytest.MonkeyPatch()
    mp.setenv("INTRO2LLM_PIPELINE_TINY", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 20k-parameter model gains nothing from more threads; a busy CI box loses a lot
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = tmp / "micro.json"
    cfg.write_text(json.dumps(MICRO))
    out = tmp / "run"
    real = ev.evaluate_stage
    log = {}

    def flaky(ckpt_dir, sets, **kw):
        if ckpt_dir.endswith("dpo") and "interrupted" not in log:
            log["interrupted"] = True
            raise KeyboardInterrupt
        if ckpt_dir.endswith("grpo") and "failed" not in log:
            log["failed"] = True
            raise RuntimeError("boom: a simulated failure")
        return real(ckpt_dir, sets, **kw)

    mp.setattr(ev, "evaluate_stage", flaky)
    argv = ["pipeline", "--out", str(out), "--config", str(cfg), "--no-progress"]
    log["rc"] = [main(argv)]
    log["state_after_interrupt"] = json.loads((out / "pipeline.json").read_text())
    log["rc"].append(main(argv + ["--resume"]))
    log["summary_after_failure"] = json.loads((out / "summary.json").read_text())
    log["report_after_failure"] = (out / "report.md").read_text()
    log["rc"].append(main(argv + ["--resume"]))
    mp.undo()
    torch.set_num_threads(threads)
    return out, log


def test_interrupt_failure_and_resume(run_dir):
    out, log = run_dir
    assert log["rc"] == [130, 1, 0]
    st = log["state_after_interrupt"]
    assert st["interrupted"] == "dpo"
    assert {s for s, r in st["results"].items() if r["status"] == "done"} == {"tokenizer", "pretrain", "sft"}
    failed = log["summary_after_failure"]
    assert failed["failed"]["stage"] == "grpo" and "boom" in failed["failed"]["error"]
    assert failed["stages"]["dpo"]["status"] == "done"
    assert "Stage `grpo` FAILED" in log["report_after_failure"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] is None and summary["interrupted"] is None
    assert all(summary["stages"][s]["status"] == "done" for s in ("tokenizer", *MODEL_STAGES))


def test_checkpoints_load_in_transformers(run_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from intro2llm.data.prepare import load_tokenizer
    from intro2llm.model.causal_lm import CausalLM

    out, _ = run_dir
    for stage in MODEL_STAGES:
        hf = AutoModelForCausalLM.from_pretrained(out / stage).eval()
        ours = CausalLM.from_pretrained(out / stage).eval()
        ids = torch.tensor([load_tokenizer(out / stage).encode("Q: 12+35=?\nA:")])
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def test_tokenizer_dirs_load_in_transformers(run_dir):
    from transformers import AutoTokenizer

    from intro2llm.data.prepare import load_tokenizer

    out, _ = run_dir
    text = "Q: 12+35=?\nA: 47\n"
    for d in ("tokenizer", *MODEL_STAGES):
        ours = load_tokenizer(out / d).encode(text)
        assert AutoTokenizer.from_pretrained(out / d).encode(text, add_special_tokens=False) == ours, d
    assert "chat_template" in json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())


def test_summary_metrics_and_report_agree(run_dir):
    from intro2llm.pipeline.report import COLUMNS, cell

    out, _ = run_dir
    summary = json.loads((out / "summary.json").read_text())
    for stage in MODEL_STAGES:
        row = summary["stages"][stage]
        for key in ("loss", "perplexity", "accuracy", "reward", "preference_accuracy", "seconds", "tokens_per_s"):
            assert isinstance(row[key], (int, float)), (stage, key)
        assert 0.0 <= row["accuracy"] <= 1.0 and row["perplexity"] >= 1.0
        assert set(row["accuracy_by_op"]) >= {"add 2-digit", "sub 1-2 digit", "mul 1-2 digit"}
        assert row["humaneval"]["problems"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for stage in MODEL_STAGES:
        assert any(r["stage"] == stage and r["event"] == "train" for r in rows), stage
        assert sum(r["stage"] == stage and r["event"] == "eval" for r in rows) == 1, stage
    table = {}
    for line in (out / "report.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in summary["stages"] and len(cells) == 2 + len(COLUMNS):
            table[cells[0]] = cells
    assert set(table) == set(summary["stages"])
    for stage, cells in table.items():
        assert cells[1] == summary["stages"][stage]["status"]
        for (_, key), got in zip(COLUMNS, cells[2:]):
            assert got == cell(summary["stages"][stage].get(key)), (stage, key)
    report = (out / "report.md").read_text()
    for png in ("loss_curves.png", "accuracy.png", "rl_curves.png", "samples.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_bad_input(tmp_path, capsys):
    rc = main(["pipeline", "--out", str(tmp_path / "a"), "--stages", "tokenizer,pretrian"])
    err = capsys.readouterr().err
    assert rc == 2 and "pretrian" in err and re.search(r"tokenizer, pretrain, sft, dpo, grpo, ppo", err)
    other = tmp_path / "b"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc = main(["pipeline", "--out", str(other)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a pipeline run" in err and (other / "notes.txt").read_text() == "mine"
    rc = main(["pipeline", "--out", str(tmp_path / "c"), "--resume"])
    assert rc == 2 and "no pipeline run" in capsys.readouterr().err
    rc = main(["pipeline", "--out", str(tmp_path / "d"), "--stages", "sft,dpo"])
    assert rc == 2 and "needs a model" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
