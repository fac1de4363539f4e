"""``intro2llm chat --ckpt DIR``: talk to a checkpoint in the terminal, with streaming and history.

    intro2llm chat --ckpt runs/pipeline/sft
    intro2llm chat --ckpt DIR --user-format 'Q: {}=?\\nA:'      # type "12+35", the model sees the synthetic prompt
    printf '12+35\\n/reset\\n7*8\\n/exit\\n' | intro2llm chat --ckpt DIR --user-format 'Q: {}=?\\nA:'

Each line you type is one user turn. The conversation so far is rendered with the checkpoint's chat template
(``tokenizer_config.json``'s ``intro2llm_chat_template``, default ``plain``; ``intro2llm.data.chat``) plus the
generation prompt, and the reply streams token by token (``CausalLM.stream_generate``: KV cache, sampling) until
the template's stop token or ``--max-new-tokens``. Commands: ``/reset`` clears the history, ``/exit`` (or end of
input, Ctrl-D) quits; Ctrl-C stops a reply early (it is then not added to the history). When the history no longer
fits the model's context, the oldest turns are dropped (a note on stderr says so).

Input from a pipe works the same way (no ``>>>`` prompt is printed), which is how the tests drive it. Only replies
go to stdout; notes and ``--show-prompt`` (the rendered prompt of each turn) go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``chat`` command."""
    p = subparsers.add_parser("chat", help="interactive streaming chat with a checkpoint (its chat template)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint dir (config.json, *.safetensors, tokenizer; or LoRA "
                   "adapters: adapter_config.json)")
    p.add_argument("--template", default=None, help="chat template (default: the checkpoint's, else 'plain')")
    p.add_argument("--system", default=None, help="system prompt (first message of every conversation)")
    p.add_argument("--user-format", default="{}", help="how a typed line becomes the user message; '{}' is the "
                   "line, '\\n' a newline (e.g. 'Q: {}=?\\nA:' for the synthetic arithmetic task)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.7 to sample")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the top tokens of mass p")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest reply, in tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same seed replays the same chat)")
    p.add_argument("--show-prompt", action="store_true", help="print each turn's rendered prompt on stderr")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"intro2llm chat: error: {msg}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> str | None:
    if not args.temperature >= 0.0 or args.temperature == float("inf"):
        return f"--temperature must be a finite number >= 0, got {args.temperature}"
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        return f"--top-p must be in (0, 1], got {args.top_p}"
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if "{}" not in args.user_format:
        return f"--user-format must contain '{{}}' (where the typed line goes), got {args.user_format!r}"
    return None


def _load(ckpt: str):
    """(model, tokenizer) of a full checkpoint or of a LoRA adapter directory."""
    from intro2llm.data.prepare import load_tokenizer

    if (Path(ckpt) / "adapter_config.json").is_file():
        from intro2llm.training.peft_args import load_adapted_model

        return load_adapted_model(ckpt).eval(), load_tokenizer(ckpt)
    from intro2llm.evaluation.cli import load_checkpoint

    return load_checkpoint(ckpt)


class _Streamer:
    """Prints the text of a growing id list as it grows; holds back a trailing incomplete UTF-8 character."""

    def __init__(self, tokenizer, out) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def put(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        stable = len(text.rstrip("\ufffd"))  # U+FFFD at the end may be half a character: wait for the rest
        if stable > self.printed:
            self.out.write(text[self.printed:stable])
            self.out.flush()
            self.printed = stable

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed:] + ("" if text.endswith("\n") else "\n"))
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    """Handler of ``intro2llm chat``; returns the exit code."""
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    try:
        import torch

        from intro2llm.data import chat

        model, tok = _load(args.ckpt)
        template = chat.get_template(args.template or chat.read_chat_template_name(args.ckpt) or "plain")
        stop = chat.stop_token_id(tok, template)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as exc:
        return _fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if model.config.vocab_size < tok.vocab_size:
        return _fail(f"{args.ckpt}: the tokenizer has {tok.vocab_size} ids but the model only "
                     f"{model.config.vocab_size}")
    fmt = args.user_format.replace("\\n", "\n").replace("\\t", "\t")
    system = [{"role": "system", "content": args.system}] if args.system else []
    generator = torch.Generator().manual_seed(args.seed)
    limit = model.config.max_position_embeddings
    interactive = sys.stdin.isatty()
    out = sys.stdout
    print(f"chat with {args.ckpt} (template {template.name!r}; /reset clears the history, /exit quits)",
          file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        if interactive:
            out.write(">>> ")
            out.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            out.write("\n")
            return 0
        if not line:  # end of input
            return 0
        line = line.rstrip("\r\n")
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            history = []
            print("[history cleared]", file=sys.stderr)
            continue
        if command.startswith("/"):
            print(f"unknown command {command!r}: /reset clears the history, /exit quits", file=sys.stderr)
            continue
        if not command:
            continue
        user = {"role": "user", "content": fmt.replace("{}", line)}
        try:
            while True:
                ids = chat.encode_prompt(tok, template, system + history + [user])
                if len(ids) + args.max_new_tokens <= limit or not history:
                    break
                history = history[2:]  # the oldest user/assistant pair
                print("[the oldest turn was dropped: the conversation no longer fits the context]", file=sys.stderr)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        room = min(args.max_new_tokens, limit - len(ids))
        if room < 1:
            print(f"error: this message alone ({len(ids)} tokens) fills the model's context of {limit} tokens",
                  file=sys.stderr)
            continue
        if args.show_prompt:
            print(f"[prompt] {template.render(system + history + [user], add_generation_prompt=True)!r}",
                  file=sys.stderr)
        streamer = _Streamer(tok, out)
        try:
            for nxt in model.stream_generate(
                torch.tensor([ids]), room, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
                top_k=args.top_k, top_p=args.top_p, eos_token_id=stop, generator=generator,
            ):
                token = int(nxt[0])
                if token == stop:
                    break
                streamer.put(token)
        except KeyboardInterrupt:
            streamer.finish()
            print("[interrupted: this reply is not kept in the history]", file=sys.stderr)
            continue
        streamer.finish()
        reply = tok.decode(streamer.ids, skip_special_tokens=True)  # special-token text may not be content
        if reply:
            history += [user, {"role": "assistant", "content": reply}]
        else:
            print("[empty reply: not kept in the history]", file=sys.stderr)
