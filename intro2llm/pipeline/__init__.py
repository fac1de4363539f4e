"""``intro2llm pipeline``: the whole course in one command — tokenizer → pretrain → SFT → DPO → GRPO (→ PPO).

Each stage runs the stage's own command (``intro2llm train|sft|dpo|grpo|ppo``) with that command's default settings
(``--fast`` only scales the step counts down), then the pipeline scores the stage's checkpoint on the same held-out
sets (``evaluate.py``) and rewrites ``DIR/summary.json``, ``DIR/report.md``, ``DIR/metrics.jsonl`` and the plots
(``report.py``). ``runner.py`` holds the stage order, resuming and failure handling; ``cli.py`` the command line.
This package imports no torch at the top level (``intro2llm --help`` stays fast).
"""

STAGES = ("tokenizer", "pretrain", "sft", "dpo", "grpo", "ppo")
DEFAULT_STAGES = ("tokenizer", "pretrain", "sft", "dpo", "grpo")
