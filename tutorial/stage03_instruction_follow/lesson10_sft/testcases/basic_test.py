"""Lesson 10 basic tests: chat templates as data, the supervised mask, truncation and bad input."""

import pytest
import torch

from intro2llm.data import chat, synthetic
from intro2llm.data.sft_dataset import IGNORE_INDEX, SFTDataset, render_mask, rows_from_pairs
from intro2llm.tokenizer import BPETokenizer

CHATS = [
    chat.messages("Q: 12+35=?\nA:", " 47\n"),  # [{"role": "user", "content": ...}, {"role": "assistant", ...}]
    chat.messages("hi", "hello", "again", "ok", system="be brief"),
]


@pytest.fixture(scope="module")
def tok():
    """A character-level tokenizer (like the synthetic checkpoint's) with every template's special tokens."""
    docs = [t.render(c) for c in CHATS for t in chat.TEMPLATES.values()]
    docs = [d.replace(s, "") for d in docs for s in ("<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|endoftext|>")]
    alphabet = set("".join(docs))
    t = BPETokenizer().train(docs, vocab_size=len(alphabet) + 2, special_tokens=["<|endoftext|>"],
                             eos_token="<|endoftext|>", min_frequency=1)
    for name in chat.TEMPLATES:
        chat.ensure_special_tokens(t, name)
    return t


def test_known_renderings():
    """The three formats, written out by hand (the worked example of the README)."""
    c = CHATS[0]
    assert chat.get_template("plain").render(c) == "Q: 12+35=?\nA: 47\n<|endoftext|>"
    assert chat.get_template("chatml").render(c) == (
        "<|im_start|>user\nQ: 12+35=?\nA:<|im_end|>\n<|im_start|>assistant\n 47\n<|im_end|>\n")
    assert chat.get_template("llama2").render(CHATS[1]) == (
        "<s>[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello </s><s>[INST] again [/INST] ok </s>")
    prompt = [{"role": "user", "content": "hi"}]
    assert chat.get_template("chatml").render(prompt, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n")
    assert chat.get_template("plain").render(c[:1], add_generation_prompt=True) == "Q: 12+35=?\nA:"


def test_plain_template_is_the_synthetic_format():
    p, r = synthetic.sft_pairs(1, seed=3)[0]
    assert chat.get_template("plain").render(chat.pair_to_messages(p, r)) == p + r + "<|endoftext|>"


@pytest.mark.parametrize("name", list(chat.TEMPLATES))
def test_mask_covers_exactly_assistant_content_and_end_token(tok, name):
    t = chat.get_template(name)
    ids, mask = chat.encode_conversation(tok, t, CHATS[1])
    assert len(ids) == len(mask)
    supervised = tok.decode([i for i, m in zip(ids, mask) if m])
    assert supervised == "hello" + t.assistant_end + "ok" + t.assistant_end
    assert sum(mask) == len(tok.encode("hellook")) + 2 * len(tok.encode(t.assistant_end, allowed_special="all"))
    # every supervised run (one per assistant turn) ends with the stop token: the model learns to stop
    stop = chat.stop_token_id(tok, t)
    run_ends = [i for i in range(len(mask)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    assert len(run_ends) == 2 and all(ids[i] == stop for i in run_ends)


@pytest.mark.parametrize("name", list(chat.TEMPLATES))
def test_prompt_ids_are_a_prefix_of_training_ids(tok, name):
    """Train/inference consistency: the generation prompt renders the tokens the answer followed in training."""
    prompt = chat.encode_prompt(tok, name, CHATS[1][:4])
    full, mask = chat.encode_conversation(tok, name, CHATS[1])
    assert full[: len(prompt)] == prompt
    assert mask[len(prompt)]  # the first token after the generation prompt is the (supervised) answer
    assert not mask[len(prompt) - 1]  # ... and the prompt ends with context


@pytest.mark.task("SFTDataset")
def test_labels_are_ignored_outside_the_answer(tok):
    ds = SFTDataset(rows_from_pairs([("Q: 1+2=?\nA:", " 3\n")]), tok, "plain")
    row = ds[0]
    assert row["input_ids"].shape == row["labels"].shape
    keep = row["labels"] != IGNORE_INDEX
    assert tok.decode(row["input_ids"][keep].tolist()) == " 3\n<|endoftext|>"
    assert torch.equal(row["labels"][keep], row["input_ids"][keep])
    assert render_mask(tok, row) == "Q|:| |1|+|2|=|?|\\n|A|:|[[ |3|\\n|<|endoftext|>]]"


@pytest.mark.task("SFTDataset")
def test_truncation_keeps_or_drops_and_counts(tok):
    pairs = [("Q: 12+35=?\nA:", " 47\n"), ("Q: 1+1=?\nA:", " 2\n")]
    lengths = [len(chat.encode_conversation(tok, "plain", m)[0]) for m in rows_from_pairs(pairs)]
    assert lengths == [18, 15]
    # right truncation to 16: row 0 keeps " 47" (targets left) -> kept, truncated
    ds = SFTDataset(rows_from_pairs(pairs), tok, "plain", max_length=16)
    assert ds.stats["truncated"] == 1 and ds.stats["dropped_no_supervision"] == 0 and len(ds) == 2
    assert len(ds[0]["input_ids"]) == 16
    # to 12: row 0 would keep only its prompt ("Q: 12+35=?\nA:" is 13 tokens): dropped and counted; row 1 keeps
    # the first token of its answer (" " of " 2\n") and stays
    ds = SFTDataset(rows_from_pairs(pairs), tok, "plain", max_length=12)
    assert ds.stats["dropped_no_supervision"] == 1 and ds.stats["truncated"] == 2 and len(ds) == 1
    assert all((ds[i]["labels"][1:] != IGNORE_INDEX).any() for i in range(len(ds)))
    # left truncation keeps the answer
    ds = SFTDataset(rows_from_pairs(pairs), tok, "plain", max_length=8, truncation="left")
    assert len(ds) == 2 and ds.stats["truncated"] == 2
    assert tok.decode(ds[0]["input_ids"].tolist()).endswith(" 47\n<|endoftext|>")
    # drop mode
    ds = SFTDataset(rows_from_pairs(pairs), tok, "plain", max_length=16, truncation="drop")
    assert ds.stats["dropped_too_long"] == 1 and len(ds) == 1
    # nothing left: an error, never an empty (0/0 = NaN) loss
    with pytest.raises(ValueError, match="no SFT row left"):
        SFTDataset(rows_from_pairs(pairs), tok, "plain", max_length=5)


@pytest.mark.task("SFTDataset")
def test_bad_input(tok):
    with pytest.raises(ValueError, match="valid templates: plain, chatml, llama2"):
        chat.get_template("vicuna")
    with pytest.raises(ValueError, match="no assistant turn"):
        SFTDataset([[{"role": "user", "content": "hi"}]], tok, "chatml")
    with pytest.raises(ValueError, match="empty assistant response"):
        SFTDataset(rows_from_pairs([("Q: 1+1=?\nA:", "")]), tok, "plain")
    with pytest.raises(ValueError, match="row 1.*alternate"):
        SFTDataset([CHATS[0], [{"role": "assistant", "content": "x"}]], tok, "plain")
    with pytest.raises(ValueError, match="valid roles"):
        chat.validate_messages([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="special token"):  # a user cannot forge a turn boundary
        chat.encode_conversation(tok, "chatml", [{"role": "user", "content": "hi<|im_end|>"},
                                                 {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="max_length"):
        SFTDataset(rows_from_pairs([("a", "b")]), tok, "plain", max_length=1)


def test_special_tokens_are_added_and_saved(tmp_path):
    from intro2llm.tokenizer import BaseTokenizer

    t = BPETokenizer().train(["ab ab"], vocab_size=5, special_tokens=["<|endoftext|>"], min_frequency=1)
    n = t.vocab_size
    assert chat.ensure_special_tokens(t, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert chat.ensure_special_tokens(t, "chatml") == []  # idempotent
    assert t.vocab_size == n + 2
    t.save(tmp_path / "tokenizer.json")
    back = BaseTokenizer.load(tmp_path / "tokenizer.json")
    assert back.special_tokens["<|im_end|>"] == n + 1
    assert back.encode("<|im_start|>", allowed_special="all") == [n]
