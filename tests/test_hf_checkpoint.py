"""Checkpoint directories load end to end in the Hugging Face stack (issue 16).

``interop.hf.export_model`` writes our tokenizer (``intro2llm_tokenizer.json``), the Hugging Face ``tokenizer.json``
+ ``tokenizer_config.json`` (chat template) + ``generation_config.json``: ``AutoTokenizer.from_pretrained(DIR)``
must give our ids and our decoded text for every tokenizer class, ``AutoModelForCausalLM.from_pretrained(DIR)``
our greedy generations, and our own readers must still read directories written before (our format under
``tokenizer.json``) and directories holding only Hugging Face's files.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import sysconfig

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face oracle needs transformers (test extra)")

from intro2llm.data import chat, synthetic  # noqa: E402
from intro2llm.data.prepare import EOS_TOKEN, load_tokenizer, synthetic_tokenizer  # noqa: E402
from intro2llm.interop.hf import export_model, export_tokenizer  # noqa: E402
from intro2llm.model import CausalLM, ModelConfig  # noqa: E402
from intro2llm.tokenizer import BaseTokenizer, BPETokenizer, ByteLevelBPETokenizer  # noqa: E402

TEXTS = [
    "Q: 12+35=?\nA: 47\n",
    "Q: 9*9=?\nA: 81\n<|endoftext|>Q: 3-7=?\nA: -4\n<|endoftext|>",
    "   leading spaces\tand\ttabs  \r\n\n\n trailing   ",
    "unicode: é ü 漢字 🙂 Ω ∑ — “quotes”",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n    pass\n",
    "<|endoftext|><|endoftext|>",
    "",
    "x",
]


def _stdlib_text(chars: int) -> str:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "os.py"), encoding="utf-8") as f:
        return f.read()[:chars]


@functools.cache
def _tokenizers():
    """Built on first use (not at collection time); tests copy before they change one."""
    docs = list(synthetic.pretrain_documents(300, seed=0))
    corpus = _stdlib_text(30_000) + " é ü 漢字 🙂 "
    return {
        "char-synthetic": synthetic_tokenizer(docs),  # the main job's tokenizer: no merges, <unk> for the rest
        "char-bpe": BPETokenizer().train(corpus, 400, special_tokens=[EOS_TOKEN], eos_token=EOS_TOKEN),
        "char-bpe-cl100k": BPETokenizer("cl100k").train(corpus, 350, special_tokens=[EOS_TOKEN], eos_token=EOS_TOKEN),
        "byte-level": ByteLevelBPETokenizer().train(corpus, 400, special_tokens=[EOS_TOKEN], eos_token=EOS_TOKEN),
    }


TOKENIZER_NAMES = ["char-synthetic", "char-bpe", "char-bpe-cl100k", "byte-level"]


def _ids(enc):
    return list(enc["input_ids"] if not isinstance(enc, list) else enc)


@pytest.mark.parametrize("template", [None, "chatml"])
@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_auto_tokenizer_gives_our_ids_and_text(tmp_path, name, template):
    from transformers import AutoTokenizer

    tok = _tokenizers()[name]
    if template is not None:
        tok = copy.deepcopy(tok)
        assert chat.ensure_special_tokens(tok, template)  # <|im_start|>, <|im_end|> appended
    export_tokenizer(tmp_path, tok, template=template)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert len(hf) == tok.vocab_size
    assert hf.eos_token == EOS_TOKEN and hf.eos_token_id == tok.eos_token_id
    texts = TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"] if template else TEXTS
    for text in texts:
        ours = tok.encode(text, allowed_special="all")
        theirs = hf(text, add_special_tokens=True)["input_ids"]
        assert theirs == ours, (name, text)
        assert hf.decode(theirs, skip_special_tokens=False) == tok.decode(ours)
        assert hf.decode(theirs, skip_special_tokens=True) == tok.decode(ours, skip_special_tokens=True)
    # the chat template renders what ours renders (multi-turn, generation prompt)
    msgs = [{"role": "user", "content": "Q: 1+2=?\nA:"}, {"role": "assistant", "content": " 3\n"},
            {"role": "user", "content": "Q: 30+4=?\nA:"}]
    rendered = hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert rendered == chat.get_template(template or "plain").render(msgs, add_generation_prompt=True)
    assert hf(rendered)["input_ids"] == chat.encode_prompt(tok, template or "plain", msgs)
    # our reader: the new file, then a directory holding only Hugging Face's files (roles from tokenizer_config)
    back = load_tokenizer(tmp_path)
    assert type(back) is type(tok) and back.encode(TEXTS[1], allowed_special="all") == tok.encode(
        TEXTS[1], allowed_special="all")
    os.remove(tmp_path / "intro2llm_tokenizer.json")
    hf_only = load_tokenizer(tmp_path)
    assert type(hf_only) is type(tok) and hf_only.roles == tok.roles
    for text in texts:
        assert hf_only.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")


def test_old_directories_still_load(tmp_path):
    """Before the Hugging Face export, our own format was written under the name ``tokenizer.json``."""
    tok = _tokenizers()["char-bpe"]
    tok.save(tmp_path / "tokenizer.json")
    back = load_tokenizer(tmp_path)
    assert back.encode(TEXTS[4]) == tok.encode(TEXTS[4]) and back.roles == tok.roles
    assert BaseTokenizer.from_pretrained(tmp_path / "tokenizer.json").vocab_size == tok.vocab_size
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="intro2llm_tokenizer.json or tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def _tiny_model(vocab_size: int, eos: int) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                                 eos_token_id=eos)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # spread logits: greedy choices far from ties (as tests/test_interop_hf.py)
    return model


@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_auto_model_greedy_generation_matches_ours(tmp_path, template):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = copy.deepcopy(_tokenizers()["char-synthetic"])
    chat.ensure_special_tokens(tok, template)
    model = _tiny_model(tok.vocab_size, tok.eos_token_id)
    export_model(model, tmp_path, tok, template=template)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    stop = chat.stop_token_id(tok, template)
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert stops[0] == stop and tok.eos_token_id in stops
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for user in ("Q: 12+35=?\nA:", "Q: 7*8=?\nA:"):
        msgs = [{"role": "user", "content": user}]
        prompt = hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        hf_ids = torch.tensor([hf_tok(prompt)["input_ids"]])
        ours_ids = torch.tensor([chat.encode_prompt(tok, template, msgs)])
        assert torch.equal(hf_ids, ours_ids)
        n = 24
        theirs = hf_model.generate(hf_ids, max_new_tokens=n, do_sample=False)[0, hf_ids.shape[1]:].tolist()
        ours = model.generate(ours_ids, n)[0, ours_ids.shape[1]:].tolist()
        cut = next((i + 1 for i, t in enumerate(ours) if t in stops), len(ours))  # HF stops at its eos ids
        assert theirs == ours[:cut]
        assert hf_tok.decode(theirs) == tok.decode(ours[:cut])


def test_train_command_output_loads_in_transformers(tmp_path):
    """The directory ``intro2llm train`` writes (the pipeline's pretrain stage) is a Hugging Face checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from intro2llm.cli import main

    cfg = tmp_path / "micro.json"
    cfg.write_text(json.dumps({"vocab_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--seq-len", "16", "--synthetic-docs", "300", "--no-progress", "--no-tensorboard", "--precision",
                 "fp32", "--accuracy-samples", "0", "--warmup", "1"]) == 0
    for name in ("intro2llm_tokenizer.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    ours_tok, ours = load_tokenizer(out), CausalLM.from_pretrained(out).eval()
    hf_tok, hf = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = "Q: 12+35=?\nA:"
    ids = hf_tok(prompt)["input_ids"]
    assert ids == ours_tok.encode(prompt)
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, ours(torch.tensor([ids])).logits,
                                   rtol=1e-4, atol=1e-4)
