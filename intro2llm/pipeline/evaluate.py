"""The evaluation the pipeline runs after every stage, on the same held-out sets each time.

``EvalSets.build(size)`` fixes the sets once (seeded, independent of the training seed); ``evaluate_stage`` scores
one checkpoint directory on them:

- ``loss`` / ``perplexity``: mean next-token cross-entropy on the answers of held-out problems (`` c\\n`` and the end
  token after ``Q: a+b=?\\nA:``: the tokens every stage trains); ``text_loss`` over the whole text, prompt included
  (after SFT it grows large: the prompt tokens are no longer trained, and the model stops predicting them);
- ``accuracy``: greedy exact match on the held-out 2-digit additions (the set ``intro2llm sft`` reports: seed
  ``EVAL_SEED``), and ``accuracy_by_op`` on every arithmetic operation of the pretraining mix;
- ``reward``: mean ``synthetic.reward`` of those greedy answers (1 right, 0.1 well-formed but wrong, 0 else);
- ``preference_accuracy``: share of held-out (prompt, chosen, rejected) triples where the policy gives the chosen
  answer the higher log-probability (no reference model: this is the policy's own ranking);
- ``code_loss``: loss per token on a slice of Python standard-library source (a probe; characters the
  synthetic tokenizer does not know count as ``<unk>`` tokens, their share is ``code_unk_fraction``);
- ``humaneval``: a sandboxed HumanEval-format smoke run (greedy, the shortest few problems): pass@1 and how the
  samples ended (``intro2llm.evaluation.humaneval``), to show the harness runs end to end on the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

# Operations of the pretraining mix scored per operation (name -> SyntheticConfig fields).
OPS = {
    "add 2-digit": dict(ops=("+",), min_digits=2, max_digits=2),
    "add 1-2 digit": dict(ops=("+",), min_digits=1, max_digits=2),
    "sub 1-2 digit": dict(ops=("-",), min_digits=1, max_digits=2),
    "mul 1-2 digit": dict(ops=("*",), min_digits=1, max_digits=2),
}
HEADLINE = "add 2-digit"
SAMPLE_PROMPTS = 5


@dataclass
class EvalSets:
    """The held-out sets every stage is scored on."""

    by_op: dict[str, list[tuple[str, str]]]
    preferences: list[dict[str, str]]
    lm_pairs: list[tuple[str, str]]
    code_text: str
    humaneval: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def build(cls, n_accuracy: int = 200, n_per_op: int = 50, n_pref: int = 100, n_lm: int = 100,
              code_chars: int = 4000, n_humaneval: int = 3) -> EvalSets:
        from intro2llm.data import synthetic
        from intro2llm.training.dpo_cli import synthetic_split as dpo_split
        from intro2llm.training.sft_cli import EVAL_SEED

        by_op = {}
        for i, (name, cfg) in enumerate(OPS.items()):
            n = n_accuracy if name == HEADLINE else n_per_op
            seed = EVAL_SEED if name == HEADLINE else EVAL_SEED + 100 + i  # HEADLINE = intro2llm sft's held-out set
            by_op[name] = synthetic.prompts_and_answers(n, seed=seed, config=synthetic.SyntheticConfig(**cfg))
        prefs = dpo_split(1, n_pref, 0)[1]  # the held-out triples intro2llm dpo reports (seed EVAL_SEED)
        lm = [(p, f" {a}\n") for p, a in by_op[HEADLINE][:n_lm]]
        code = ""
        if code_chars > 0:
            from intro2llm.evaluation.cli import stdlib_corpus

            code = stdlib_corpus(code_chars)
        he: dict[str, dict] = {}
        if n_humaneval > 0:
            from intro2llm.evaluation.humaneval import read_problems

            problems = read_problems()
            he = {k: problems[k] for k in sorted(problems, key=lambda k: len(problems[k]["prompt"]))[:n_humaneval]}
        return cls(by_op, prefs, lm, code, he)


@torch.no_grad()
def _text_loss(model: Any, ids_list: list[list[int]], masks: list[list[bool]] | None = None) -> float:
    """Mean next-token loss over the tokens of the given id sequences (each scored on its own); with ``masks``, only
    over the tokens whose mask entry is True (a token is predicted from the ones before it)."""
    total, count = 0.0, 0
    max_pos = model.config.max_position_embeddings
    for i, ids in enumerate(ids_list):
        ids = ids[:max_pos]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids])
        logits = model(x).logits[0, :-1].float()  # (T-1, V)
        targets = x[0, 1:]
        if masks is not None:
            keep = torch.tensor(masks[i][1:len(ids)], dtype=torch.bool)
            logits, targets = logits[keep], targets[keep]
        total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += targets.numel()
    return total / max(count, 1)


@torch.no_grad()
def _response_logp(model: Any, tokenizer: Any, template: str, prompt: str, response: str) -> float:
    from intro2llm.data import chat

    ids, mask = chat.encode_conversation(tokenizer, template, chat.pair_to_messages(prompt, response))
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)  # (T-1, V)
    tok_lp = logp.gather(1, x[0, 1:, None])[:, 0]
    return float(tok_lp[torch.tensor(mask[1:])].sum())


def _humaneval(model: Any, tokenizer: Any, problems: dict[str, dict], max_new_tokens: int) -> dict:
    from intro2llm.evaluation.humaneval import evaluate_samples, generate_completions
    from intro2llm.evaluation.sandbox import SandboxUnavailableError

    try:
        samples = generate_completions(model, tokenizer, problems, 1, temperature=0.0, max_new_tokens=max_new_tokens)
        res = evaluate_samples(samples, k=(1,), timeout=5.0, n_workers=1, problems=problems)
    except SandboxUnavailableError as exc:
        return {"problems": len(problems), "error": f"sandbox unavailable: {exc}"}
    outcomes: dict[str, int] = {}
    for r in res["results"]:
        key = r["result"].split(":")[0]
        outcomes[key] = outcomes.get(key, 0) + 1
    return {"problems": len(problems), "pass@1": round(res["pass@k"].get("pass@1", 0.0), 4), "outcomes": outcomes}


def evaluate_stage(ckpt_dir: str, sets: EvalSets, humaneval_tokens: int = 32) -> dict:
    """Score the checkpoint in ``ckpt_dir`` on ``sets`` (see the module docstring); values rounded to 4 places."""
    from intro2llm.data import chat, synthetic
    from intro2llm.evaluation.cli import load_checkpoint
    from intro2llm.training.sft_trainer import chat_answers

    model, tok = load_checkpoint(ckpt_dir)
    model.eval()
    template = chat.read_chat_template_name(ckpt_dir) or "plain"
    res: dict[str, Any] = {}
    encoded = [chat.encode_conversation(tok, template, chat.pair_to_messages(p, r)) for p, r in sets.lm_pairs]
    loss = _text_loss(model, [ids for ids, _ in encoded], [mask for _, mask in encoded])
    res["loss"] = round(loss, 4)
    res["perplexity"] = round(math.exp(min(loss, 50.0)), 4)
    res["text_loss"] = round(_text_loss(model, [ids for ids, _ in encoded]), 4)
    by_op, samples = {}, []
    for name, pairs in sets.by_op.items():
        prompts = [p for p, _ in pairs]
        answers = chat_answers(model, tok, template, prompts)
        by_op[name] = round(synthetic.accuracy(prompts, answers), 4)
        if name == HEADLINE:
            rewards = [synthetic.reward(p, a) for p, a in zip(prompts, answers)]
            res["accuracy"] = by_op[name]
            res["reward"] = round(sum(rewards) / max(len(rewards), 1), 4)
            samples = [{"prompt": p, "answer": a.strip(), "expected": e}
                       for (p, e), a in zip(pairs[:SAMPLE_PROMPTS], answers[:SAMPLE_PROMPTS])]
    res["accuracy_by_op"] = by_op
    if sets.preferences:
        wins = [_response_logp(model, tok, template, t["prompt"], t["chosen"])
                > _response_logp(model, tok, template, t["prompt"], t["rejected"]) for t in sets.preferences]
        res["preference_accuracy"] = round(sum(wins) / len(wins), 4)
    if sets.code_text:
        ids = tok.encode(sets.code_text)
        unk = getattr(tok, "unk_token_id", None)
        T = model.config.max_position_embeddings
        res["code_loss"] = round(_text_loss(model, [ids[i:i + T] for i in range(0, len(ids), T)]), 4)
        res["code_unk_fraction"] = round(sum(i == unk for i in ids) / max(len(ids), 1), 4) if unk is not None \
            else None
    if sets.humaneval:
        res["humaneval"] = _humaneval(model, tok, sets.humaneval, humaneval_tokens)
    res["samples"] = samples
    return res
