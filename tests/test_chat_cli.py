"""``intro2llm chat``: piped turns stream our greedy replies; history grows, ``/reset`` clears it, ``/exit`` ends."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from intro2llm.cli import main
from intro2llm.data import chat, synthetic
from intro2llm.data.prepare import synthetic_tokenizer
from intro2llm.interop.hf import export_model
from intro2llm.model import CausalLM, ModelConfig

FMT = "Q: {}=?\\nA:"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random checkpoint with the synthetic tokenizer and the plain template (weights spread so greedy
    replies are far from ties)."""
    path = tmp_path_factory.mktemp("chat") / "ckpt"
    tok = synthetic_tokenizer(list(synthetic.pretrain_documents(200, seed=0)))
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                                 eos_token_id=tok.eos_token_id)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    export_model(model, path, tok, template="plain")
    return path, model, tok


def _greedy_reply(model, tok, msgs, n):
    ids = chat.encode_prompt(tok, "plain", msgs)
    stop = chat.stop_token_id(tok, "plain")
    out = model.generate(torch.tensor([ids]), n, eos_token_id=stop)[0, len(ids):].tolist()
    return tok.decode(out[: out.index(stop)] if stop in out else out)


def _prompts(err: str) -> list[str]:
    return [eval(line[len("[prompt] "):]) for line in err.splitlines() if line.startswith("[prompt] ")]  # noqa: S307


def test_piped_turns_history_reset_exit(ckpt, monkeypatch, capsys):
    path, model, tok = ckpt
    stdin = "12+35\n7*8\n/reset\n3-9\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    n = 12
    assert main(["chat", "--ckpt", str(path), "--user-format", FMT, "--max-new-tokens", str(n), "--show-prompt"]) == 0
    out, err = capsys.readouterr()
    q = [{"role": "user", "content": f"Q: {x}=?\nA:"} for x in ("12+35", "7*8", "3-9")]
    r1 = _greedy_reply(model, tok, [q[0]], n)
    h1 = [q[0], {"role": "assistant", "content": r1}]
    r2 = _greedy_reply(model, tok, h1 + [q[1]], n)
    r3 = _greedy_reply(model, tok, [q[2]], n)  # after /reset: no history
    expected = "".join(r if r.endswith("\n") else r + "\n" for r in (r1, r2, r3))
    assert out == expected
    prompts = _prompts(err)
    template = chat.get_template("plain")
    assert prompts == [template.render([q[0]], add_generation_prompt=True),
                       template.render(h1 + [q[1]], add_generation_prompt=True),
                       template.render([q[2]], add_generation_prompt=True)]
    assert "12+35" in prompts[1] and "12+35" not in prompts[2]  # history kept, then cleared
    assert "[history cleared]" in err and "never read" not in out + err


def test_sampling_is_seeded_and_flags_are_checked(ckpt, monkeypatch, capsys):
    path, _, _ = ckpt
    outs = []
    for seed in (1, 1, 2):
        monkeypatch.setattr(sys, "stdin", io.StringIO("12+35\n40+2\n"))
        assert main(["chat", "--ckpt", str(path), "--user-format", FMT, "--temperature", "1.5", "--top-p", "0.95",
                     "--max-new-tokens", "16", "--seed", str(seed)]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0] != outs[2]  # same seed, same chat; another seed, another one
    for bad, msg in ((["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"),
                     (["--max-new-tokens", "0"], "--max-new-tokens"), (["--user-format", "Q:"], "--user-format")):
        assert main(["chat", "--ckpt", str(path), *bad]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    assert main(["chat", "--ckpt", str(path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_long_history_drops_oldest_turns(ckpt, monkeypatch, capsys):
    path, _, _ = ckpt
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{i}+{i}\n" for i in range(10, 22))))
    assert main(["chat", "--ckpt", str(path), "--user-format", FMT, "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert "oldest turn was dropped" in err and out.count("\n") >= 12


def test_real_pipe_into_the_command(ckpt):
    path, model, tok = ckpt
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    res = subprocess.run([sys.executable, "-m", "intro2llm", "chat", "--ckpt", str(path), "--user-format", FMT,
                          "--max-new-tokens", "8"], input="12+35\n/exit\n", capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    reply = _greedy_reply(model, tok, [{"role": "user", "content": "Q: 12+35=?\nA:"}], 8)
    assert res.stdout == (reply if reply.endswith("\n") else reply + "\n")
