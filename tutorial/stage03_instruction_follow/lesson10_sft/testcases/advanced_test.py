"""Lesson 10 advanced tests: Hugging Face's apply_chat_template as the oracle for rendering and the assistant mask,
packing without cross-contamination, the loss over supervised tokens only (fused, token-weighted), and a few SFT
steps that lower the loss."""

import json

import pytest
import torch
import torch.nn.functional as F

from intro2llm.configs import get_config
from intro2llm.data import chat, synthetic
from intro2llm.data.sft_dataset import IGNORE_INDEX, SFTDataset, collate, rows_from_pairs
from intro2llm.model.causal_lm import CausalLM
from intro2llm.tokenizer import BPETokenizer, ByteLevelBPETokenizer
from intro2llm.training.sft_trainer import SFTTrainer, resize_token_embeddings
from intro2llm.training.trainer import TrainerConfig

CHATS = [
    chat.messages("What is 12+35?", "It is 47."),
    chat.messages("Name a color.", "Blue.", "Another one?", "Red, or\ngreen.", system="You answer briefly."),
]


@pytest.fixture(scope="module")
def byte_tok():
    text = [t.render(c) for c in CHATS for t in chat.TEMPLATES.values()] * 3
    tok = ByteLevelBPETokenizer().train(text, vocab_size=300, special_tokens=["<|endoftext|>"],
                                        eos_token="<|endoftext|>")
    for name in chat.TEMPLATES:
        chat.ensure_special_tokens(tok, name)
    return tok


def hf_tokenizer(tok, template, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok.export_hf(tmp_path / "tokenizer.json")
    cfg = chat.hf_tokenizer_config(tok, template)
    return PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=cfg["chat_template"],
                                   eos_token=cfg.get("eos_token"))


@pytest.mark.parametrize("name", list(chat.TEMPLATES))
def test_jinja_template_renders_our_text_and_supervised_characters(name):
    """transformers' Jinja renderer on our chat_template: the same text, and its {% generation %} spans are exactly
    the characters our mask supervises (assistant content + end token)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    t = chat.get_template(name)
    for conv in CHATS:
        rendered, spans = render_jinja_template([conv], chat_template=t.jinja(), return_assistant_tokens_mask=True)
        assert rendered[0] == t.render(conv)
        ours, pos = [], 0
        for text, _, supervised in t.segments(conv):
            if supervised:
                if ours and ours[-1][1] == pos:
                    ours[-1] = (ours[-1][0], pos + len(text))
                else:
                    ours.append((pos, pos + len(text)))
            pos += len(text)
        assert [tuple(s) for s in spans[0]] == ours


@pytest.mark.parametrize("name", ["plain", "chatml"])
def test_apply_chat_template_gives_our_ids_and_mask(byte_tok, name, tmp_path):
    """With a real tokenizer (PreTrainedTokenizerFast from our byte-level BPE): same ids, same assistant mask, same
    generation prompt. (Llama-2's "[INST] " ends in a space that whole-text BPE merges into the next word, while we
    encode template text and contents separately so that the prompt ids are a prefix of the training ids — the
    reason TRL also tokenizes prompt and completion separately.)"""
    hf = hf_tokenizer(byte_tok, name, tmp_path)
    t = chat.get_template(name)
    for conv in CHATS:
        assert hf.apply_chat_template(conv, tokenize=False) == t.render(conv)
        out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = chat.encode_conversation(byte_tok, t, conv)
        assert out["input_ids"] == ids
        assert [bool(m) for m in out["assistant_masks"]] == mask
        prompt = conv[:-1]
        assert hf.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"] == chat.encode_prompt(byte_tok, t, prompt)


def test_chat_template_is_written_to_the_tokenizer_config(byte_tok, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    chat.write_chat_template(tmp_path, byte_tok, "chatml")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 64  # kept
    assert cfg["chat_template"] == chat.get_template("chatml").jinja()
    assert chat.read_chat_template_name(tmp_path) == "chatml"


# ------------------------------------------------------------------------------------------------ model side
@pytest.fixture(scope="module")
def char_tok():
    docs = list(synthetic.pretrain_documents(300, seed=0))
    alphabet = set("".join(docs))
    return BPETokenizer().train(docs, vocab_size=len(alphabet) + 2, special_tokens=["<|endoftext|>"],
                                eos_token="<|endoftext|>", min_frequency=1)


def small_model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = get_config("tiny").replace(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     max_position_embeddings=128)
    return CausalLM(cfg)


def sft_config(**kw):
    base = dict(steps=1, batch_size=4, lr=3e-3, warmup_steps=0, schedule="constant", weight_decay=0.0,
                progress=False, tensorboard=False, wandb=False, device="cpu")
    return TrainerConfig(**(base | kw))


@pytest.mark.task("SFTDataset")
def test_packed_logits_equal_unpacked(char_tok):
    ds = SFTDataset(rows_from_pairs(synthetic.sft_pairs(6, seed=1)), char_tok, "plain")
    packed = SFTDataset(rows_from_pairs(synthetic.sft_pairs(6, seed=1)), char_tok, "plain", max_length=64,
                        packing=True)
    assert len(packed) < len(ds)  # several samples share a row
    model = small_model(char_tok.vocab_size).eval()
    seen = 0
    for r in range(len(packed)):
        row = packed[r]
        with torch.no_grad():
            logits = model(row["input_ids"][None], position_ids=row["position_ids"][None],
                           segment_ids=row["segment_ids"][None]).logits[0]
        for s in row["segment_ids"].unique().tolist():
            where = (row["segment_ids"] == s).nonzero().squeeze(1)
            ids = row["input_ids"][where]
            assert row["position_ids"][where].tolist() == list(range(len(where)))
            with torch.no_grad():
                alone = model(ids[None]).logits[0]
            torch.testing.assert_close(logits[where], alone, atol=2e-5, rtol=1e-4)
            seen += 1
    assert seen == 6
    # a sample's first token is never a target from the previous sample
    row = packed[0]
    starts = (row["position_ids"] == 0).nonzero().squeeze(1)
    assert (row["labels"][starts] == IGNORE_INDEX).all()


@pytest.mark.task("SFTDataset")
def test_packing_changes_the_output_without_segments(char_tok):
    """Control: without segment ids the second sample does see the first one (the test above can fail)."""
    packed = SFTDataset(rows_from_pairs(synthetic.sft_pairs(6, seed=1)), char_tok, "plain", max_length=64,
                        packing=True)
    row = packed[0]
    model = small_model(char_tok.vocab_size).eval()
    with torch.no_grad():
        mixed = model(row["input_ids"][None], position_ids=row["position_ids"][None]).logits[0]
        isolated = model(row["input_ids"][None], position_ids=row["position_ids"][None],
                         segment_ids=row["segment_ids"][None]).logits[0]
    second = row["segment_ids"] == 2
    assert not torch.allclose(mixed[second], isolated[second], atol=1e-4)


@pytest.mark.task("SFTTrainer.compute_loss", "SFTDataset")
def test_loss_is_the_mean_over_supervised_tokens_only(char_tok):
    ds = SFTDataset(rows_from_pairs(synthetic.sft_pairs(4, seed=2)), char_tok, "plain")
    batch = collate([ds[i] for i in range(4)], char_tok.eos_token_id)
    model = small_model(char_tok.vocab_size)
    trainer = SFTTrainer(model, sft_config(), ds)
    loss = trainer.compute_loss(batch)
    logits = model(batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    manual = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)
    assert trainer.count_tokens(batch) == int(keep.sum())
    # the answer tokens are a small share of the row: an all-token loss is a different number
    assert keep.sum() < 0.5 * (batch["attention_mask"][:, 1:].sum())
    assert not torch.isclose(manual, F.cross_entropy(logits[batch["attention_mask"][:, 1:] == 1],
                                                     batch["input_ids"][:, 1:][batch["attention_mask"][:, 1:] == 1]))


@pytest.mark.task("SFTTrainer.compute_loss", "SFTDataset")
def test_right_padding_does_not_change_a_rows_loss(char_tok):
    ds = SFTDataset(rows_from_pairs([("Q: 1+2=?\nA:", " 3\n"), ("Q: 12+34=?\nA:", " 46\n")]), char_tok, "plain")
    model = small_model(char_tok.vocab_size)
    trainer = SFTTrainer(model, sft_config(batch_size=2), ds)
    short = collate([ds[0]], char_tok.eos_token_id)
    padded = collate([ds[0]], char_tok.eos_token_id, width=len(ds[1]["input_ids"]) + 3)
    torch.testing.assert_close(trainer.compute_loss(short), trainer.compute_loss(padded))


@pytest.mark.task("SFTTrainer.compute_loss", "SFTDataset")
def test_token_weighted_accumulation_equals_one_batch(char_tok):
    """Rows have different numbers of supervised tokens; 4 micro-batches of 1 == 1 batch of 4 (token-weighted)."""
    pairs = [("Q: 1+2=?\nA:", " 3\n"), ("Q: 99*99=?\nA:", " 9801\n"), ("Q: 5-7=?\nA:", " -2\n"),
             ("Q: 12+34=?\nA:", " 46\n")]
    ds = SFTDataset(rows_from_pairs(pairs), char_tok, "plain")
    params = []
    for mb in (4, 1):
        t = SFTTrainer(small_model(char_tok.vocab_size), sft_config(micro_batch_size=mb), ds, seed=0)
        t.train()
        params.append(torch.cat([p.detach().flatten() for p in t.raw_model.parameters()]))
    torch.testing.assert_close(params[0], params[1], atol=2e-6, rtol=1e-5)


@pytest.mark.task("SFTTrainer.compute_loss", "SFTDataset")
def test_a_few_sft_steps_lower_the_supervised_loss(char_tok, tmp_path):
    ds = SFTDataset(rows_from_pairs(synthetic.sft_pairs(64, seed=3)), char_tok, "plain", max_length=32,
                    packing=True)
    heldout = SFTDataset(rows_from_pairs(synthetic.sft_pairs(16, seed=4)), char_tok, "plain")
    t = SFTTrainer(small_model(char_tok.vocab_size), sft_config(steps=25, batch_size=4, out_dir=str(tmp_path)),
                   ds, eval_dataset=heldout, tokenizer=char_tok)
    before = t.evaluate()
    hist = t.train()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert t.last_eval < 0.8 * before
    # the export is a Hugging Face directory with the chat template
    assert (tmp_path / "config.json").exists() and (tmp_path / "model.safetensors").exists()
    assert chat.read_chat_template_name(tmp_path) == "plain"
    back = CausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(back.lm_head.weight, t.raw_model.lm_head.weight)


def test_resize_token_embeddings_keeps_old_tokens(char_tok):
    model = small_model(char_tok.vocab_size).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = model(ids).logits
    assert resize_token_embeddings(model, char_tok.vocab_size + 2) == 2
    with torch.no_grad():
        after = model(ids).logits
    assert after.shape[-1] == char_tok.vocab_size + 2 and model.config.vocab_size == char_tok.vocab_size + 2
    torch.testing.assert_close(after[..., :-2], before)
    model(torch.tensor([[char_tok.vocab_size + 1]]))  # the new ids are valid inputs
