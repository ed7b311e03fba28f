"""Evaluation: first-token metrics, verifiable tasks, worked answers scored by their first answer, α sweeps."""

from steerkit.evals.logits import answer_metrics, entropy, kl, next_token_logprobs, option_token_ids
from steerkit.evals.sweep import sweep, write_csv
from steerkit.evals.tasks import TASKS, Item, grade, load_task, parse_answer, prompt, score
from steerkit.evals.worked import first_answer, grade_worked, score_worked, worked_splits

__all__ = [
    "TASKS",
    "Item",
    "answer_metrics",
    "entropy",
    "first_answer",
    "grade",
    "grade_worked",
    "kl",
    "load_task",
    "next_token_logprobs",
    "option_token_ids",
    "parse_answer",
    "prompt",
    "score",
    "score_worked",
    "sweep",
    "worked_splits",
    "write_csv",
]
