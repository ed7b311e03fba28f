"""Evaluation: first-token metrics, verifiable tasks, α sweeps."""

from steerkit.evals.logits import answer_metrics, entropy, kl, next_token_logprobs, option_token_ids
from steerkit.evals.sweep import sweep, write_csv
from steerkit.evals.tasks import TASKS, Item, grade, load_task, parse_answer, prompt, score

__all__ = [
    "TASKS",
    "Item",
    "answer_metrics",
    "entropy",
    "grade",
    "kl",
    "load_task",
    "next_token_logprobs",
    "option_token_ids",
    "parse_answer",
    "prompt",
    "score",
    "sweep",
    "write_csv",
]
