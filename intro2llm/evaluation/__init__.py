"""intro2llm.evaluation: measure models with the field's benchmarks (lesson 09).

- ``perplexity``: sliding-window perplexity and bits per byte.
- ``mmlu``: MMLU k-shot multiple choice (log-likelihood of the answer letter, or generate-then-parse).
- ``humaneval``: HumanEval sampling, execution and the unbiased pass@k estimator.
- ``sandbox``: the OS-level sandbox that executes model-written code (read its docstring).

Import the submodules directly; this package imports nothing heavy so that ``intro2llm eval --help`` is fast.
"""

__all__ = ["perplexity", "mmlu", "humaneval", "sandbox"]
