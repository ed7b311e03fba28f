"""Helpers of the reasoning-transfer experiments (experiments/common.py) that choose values for the reports."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from common import interior_choice  # noqa: E402


def test_interior_choice_extends_the_grid_past_a_winning_edge():
    tried = []

    def score(x):
        tried.append(x)
        return -((x - 2.2) ** 2)  # best at 2.2: beyond the grid's top edge 1

    choice, scores, interior = interior_choice(score, [-1, -0.5, 0.5, 1])
    assert (choice, interior) == (2.0, True) and tried[-2:] == [2.0, 2.5]  # 1.5, 2.0 and 2.5 were added
    assert set(scores) == {-1, -0.5, 0.5, 1, 1.5, 2.0, 2.5}


def test_interior_choice_geometric_steps_and_giving_up_at_the_limit():
    choice, scores, interior = interior_choice(lambda lr: lr, [1e-6, 3e-6, 1e-5], geometric=True, max_extra=2)
    assert sorted(scores) == pytest.approx([1e-6, 3e-6, 1e-5, 1e-5 * 10 / 3, 1e-5 * (10 / 3) ** 2])
    assert choice == max(scores) and not interior  # still rising at the limit: reported, not hidden
    choice, scores, interior = interior_choice(lambda a: -abs(a), [-2, -1, 1, 2])
    assert choice == -1 and interior and len(scores) == 4  # a tie goes to the smaller value; nothing added
    with pytest.raises(ValueError, match="at least two values"):
        interior_choice(abs, [1])


def test_operations_reads_the_gold_and_the_first_written_operation():
    from control_vectors import operations

    from steerkit.evals.worked import TaskConfig, worked_splits

    items = worked_splits(1, TaskConfig(), {"val": 40})["val"]
    add = next(it for it in items if "+" in it.meta["expression"])
    sub = next(it for it in items if "-" in it.meta["expression"])
    texts = ["3 - 1 = 2. 4 + 4 = 8. The answer is 8.", "No idea. The answer is 5.", sub.meta["solution"]]
    assert operations(texts, [add, add, sub]) == [("+", "-"), ("+", None), ("-", "-")]


def test_verbose_solutions_state_the_gold_answer_with_a_check():
    from efficiency import verbose

    from steerkit.evals.worked import TaskConfig, score_worked, worked_splits

    for item in worked_splits(1, TaskConfig(), {"val": 30})["val"]:
        text = verbose(item)
        assert item.meta["expression"].rstrip(".") in text and "Check:" in text
        assert score_worked(text, True, item).correct  # the first stated answer is the gold one
        assert len(text) > 2 * len(item.meta["solution"])  # something for the direction to shorten


def test_a_later_stages_claims_are_appended_dated_and_never_rewritten(tmp_path, monkeypatch):
    import json

    import confirm2

    path = tmp_path / "claims2.json"
    path.write_text(json.dumps({"fixed": "2026-12-06 15:14 UTC", "claims": [{"claim": "first"}]}))
    made = [{"claim": "5: shorter", "treated": "verbose+concise", "baseline": "verbose", "measure": "length"}]
    monkeypatch.setattr(confirm2, "CLAIMS", path)
    monkeypatch.setitem(confirm2.LATER, "x", lambda: made)
    confirm2.fix_later("x")
    spec = json.loads(path.read_text())
    assert spec["claims"] == [{"claim": "first"}] and spec["fixed"] == "2026-12-06 15:14 UTC"
    assert [(b["stage"], b["claims"]) for b in spec["later"]] == [("x", made)] and "UTC" in spec["later"][0]["fixed"]
    with pytest.raises(SystemExit, match="fixed already"):
        confirm2.fix_later("x")
    assert json.loads(path.read_text()) == spec


def test_structured_nulls_pair_each_recipe_across_seeds_and_build_the_weight_difference(tmp_path, monkeypatch):
    import copy

    import reasoning_vector_2b as rv
    import torch

    from tests.conftest import make_tiny

    base = make_tiny("llama", 64)
    models = {}
    for k, name in enumerate(("grpo-0", "grpo-1", "sft-answer-0")):  # sft-answer-1 missing: no SFT pair
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (k + 1))
        model.save_pretrained(tmp_path / name / "model")
        models[name] = model
    monkeypatch.setattr(rv, "RUNS", tmp_path)
    assert rv.structured(0) == []
    [(name, label, build)] = rv.structured(1)
    assert (name, label) == ("sn-grpo0-1", "θ_GRPO-0 − θ_GRPO-1")
    target = copy.deepcopy(models["grpo-1"])
    build().add_to(target, 1.0)  # θ_GRPO-1 + (θ_GRPO-0 − θ_GRPO-1) = θ_GRPO-0
    for p, q in zip(target.parameters(), models["grpo-0"].parameters(), strict=True):
        torch.testing.assert_close(p, q)
