"""The worked-arithmetic task of the reasoning experiments: first-answer scorer, truncation, splits, stats."""

import itertools
import math
import re

import pytest
import torch

from steerkit.evals.stats import auroc_null, bootstrap, gain_recovered, mcnemar, paired_bootstrap, pass_at_k
from steerkit.evals.tasks import Item
from steerkit.evals.worked import (
    SYSTEM,
    TaskConfig,
    first_answer,
    grade_worked,
    messages,
    render,
    score_worked,
    trivial_baselines,
    worked_splits,
)
from steerkit.steer import completions
from tests.conftest import TEXTS

SMALL = {"confirm": 60, "test": 60, "val": 30, "train": 120}


def _item(answer: int) -> Item:
    return Item("q", str(answer), (str(answer),), "worked")


@pytest.mark.parametrize(
    ("text", "finished", "expected"),
    [
        ("3 + 4 = 7. The answer is 7.", True, 7),
        ("The answer is 12. Wait, the answer is 13. The answer is 13.", True, 12),  # the first, not the last
        ("5 - 9 = -4. The answer is -4", True, -4),
        ("The answer is 1,200.", True, 1200),
        ("I think it is 7.", True, None),
        ("The answer is", False, None),
        ("The answer is 1", False, None),  # cut off after the digits: maybe 12, 100, ...
        ("The answer is 1", True, 1),  # the model stopped there
        ("The answer is 12. And then", False, 12),
    ],
)
def test_first_answer(text, finished, expected):
    assert first_answer(text, finished) == expected


def test_score_and_grade_count_truncation_as_wrong():
    items = [_item(7), _item(7), _item(7), _item(7)]
    texts = ["The answer is 7.", "3 + 4 = 7, so", "3 + 4 = 7.", "The answer is 8."]
    finished = [True, False, True, True]
    assert score_worked(texts[1], False, items[1]).truncated
    assert not score_worked(texts[2], True, items[2]).truncated  # finished without an answer: unanswered
    graded = grade_worked(texts, finished, items)
    assert graded["correct"] == [True, False, False, False]
    assert (graded["accuracy"], graded["truncated"], graded["unanswered"], graded["n"]) == (0.25, 0.25, 0.25, 4)
    with pytest.raises(ValueError, match="expected equal"):
        grade_worked(texts, finished[:3], items)


def _solve(question: str) -> int:
    total = int(re.search(r"has (\d+)", question).group(1))
    for op, x in re.findall(r"(gets|gives away) (\d+)", question):
        total += int(x) if op == "gets" else -int(x)
    return total


@pytest.mark.parametrize("steps", [1, 2])
def test_splits_are_disjoint_seeded_and_solved(steps):
    splits = worked_splits(steps, sizes=SMALL)
    assert {k: len(v) for k, v in splits.items()} == SMALL
    questions = [it.question for items in splits.values() for it in items]
    assert len(set(questions)) == len(questions)
    assert splits == worked_splits(steps, sizes=SMALL)
    assert splits["test"] != worked_splits(steps, sizes=SMALL, seed=1)["test"]
    # held-out sets are drawn first: a bigger training split leaves them unchanged
    bigger = worked_splits(steps, sizes={**SMALL, "train": 300})
    assert all(bigger[k] == splits[k] for k in ("confirm", "test", "val"))
    # each split has its own seed: val is not the first items of test
    assert splits["val"][0].question != splits["test"][0].question
    for item in itertools.chain(*splits.values()):
        assert int(item.answer) == _solve(item.question) >= 0
        assert item.meta["steps"] == steps and len(re.findall(r"[+-] \d+ =", item.meta["solution"])) == steps
        assert score_worked(item.meta["solution"], True, item).correct


def test_ranges_are_respected_and_checked():
    config = TaskConfig(2, 20, 9)
    for item in worked_splits(1, config, SMALL)["train"]:
        start, x = map(int, re.findall(r"\d+", item.question)[:2])
        assert 2 <= start <= 20 and 1 <= x <= 9
    with pytest.raises(ValueError, match="low <= high"):
        TaskConfig(30, 10, 5)
    with pytest.raises(ValueError, match="too few distinct"):
        worked_splits(1, TaskConfig(3, 3, 1), {"test": 500})


def test_prompt_has_the_example_and_no_forced_prefix(tok):
    item = worked_splits(1, sizes={"val": 1})["val"][0]
    text = render(tok, item)
    assert text.endswith("<|im_start|>assistant\n") and item.question in text
    assert text.count("The answer is") == 1  # the example's, before the question
    assert len(messages(item, "system")) == 2
    with pytest.raises(ValueError, match="'turn' or 'system'"):
        messages(item, "user")
    concise = render(tok, item, system="Be brief.")
    assert "Be brief." in concise and SYSTEM not in concise and concise.endswith(text[-200:])


def test_auroc_null_separates_signal_from_noise():
    g = torch.Generator().manual_seed(0)
    noise = lambda: torch.randn(40, generator=g)  # noqa: E731
    shared = noise()  # each pair's members share a question: a common part the null must not mistake for signal
    observed, p, null = auroc_null(shared + 1.5 + noise(), shared + noise(), n=200)
    assert observed > 0.65 and p < 0.01 and len(null) == 200
    assert 0.4 < sum(null) / len(null) < 0.6
    observed, p, _ = auroc_null(shared + noise(), shared + noise(), n=200)
    assert p > 0.05
    with pytest.raises(ValueError, match="equal 1-D"):
        auroc_null([1.0, 2.0, 3.0], [1.0, 2.0])


def test_trivial_baselines_hand_values():
    train = [Item("a", "5", ("5",), "w"), Item("b", "5", ("5",), "w"), Item("c", "6", ("6",), "w")]
    items = [
        Item("Tom has 5. Tom gets 3 more.", "5", ("5",), "w"),
        Item("Ann has 9. Ann gives away 2.", "2", ("2",), "w"),
    ]
    assert trivial_baselines(train, items) == {"most_common_train_answer": 0.5, "first_number": 0.5, "last_number": 0.5}


def test_pass_at_k_matches_enumeration():
    for n, c, k in [(8, 1, 1), (8, 3, 2), (8, 0, 4), (6, 6, 3), (5, 2, 5)]:
        draws = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))
    with pytest.raises(ValueError, match="n=4, c=5"):
        pass_at_k(4, 5, 1)


def test_mcnemar_and_paired_bootstrap():
    a, b = [False] * 6 + [True] * 10, [True] * 6 + [True] * 10
    assert mcnemar(a, b) == pytest.approx(2 / 2**6)  # six discordant, all one way
    assert mcnemar(a, a) == 1.0
    balanced = [True, False] * 5, [False, True] * 5
    assert mcnemar(*balanced) == pytest.approx(min(1.0, 2 * sum(math.comb(10, i) for i in range(6)) / 2**10))
    assert paired_bootstrap([1.0, 0.0], [1.0, 0.0]) == (0.0, 0.0, 0.0)
    mean, low, high = paired_bootstrap([1.0] * 30 + [0.0] * 70, [0.0] * 100)
    assert mean == pytest.approx(0.3) and low < 0.3 < high and low > 0.15
    assert bootstrap([0.0, 1.0] * 50, seed=1) == bootstrap([0.0, 1.0] * 50, seed=1)


def test_gain_recovered():
    base = [0.0] * 100
    reference = [1.0] * 40 + [0.0] * 60  # +0.40 over the base
    treated = [1.0] * 10 + [0.0] * 90  # +0.10: a quarter of the gain
    point, low, high = gain_recovered(treated, base, reference)
    assert point == pytest.approx(0.25) and 0.1 < low < 0.25 < high < 0.45
    assert gain_recovered(reference, base, reference)[:2] == pytest.approx((1.0, 1.0))
    wide = gain_recovered(treated[::4], base[::4], reference[::4])  # a quarter of the items: a wider interval
    assert wide[2] - wide[1] > high - low
    with pytest.raises(ValueError, match="does not beat the base"):
        gain_recovered(treated, reference, base)
    with pytest.raises(ValueError, match="different lengths"):
        gain_recovered(treated, base[:50], reference)


def test_completions_report_whether_each_row_finished(tiny_llama, tok):
    plain = completions(tiny_llama, tok, TEXTS[:3], 6, 3)
    # stop at the token the first row emits second: that row finishes early, its text is cut there
    ids = tiny_llama.generate(**tok(TEXTS[:1], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    stop = int(ids[0, -5])
    rows = completions(tiny_llama, tok, TEXTS[:3], 6, 3, return_finished=True, eos_token_id=stop)
    assert rows[0][1] is True and len(rows[0][0]) < len(plain[0])
    for (text, finished), reference in zip(rows[1:], plain[1:], strict=True):
        assert reference.startswith(text) if finished else text == reference
