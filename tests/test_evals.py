import math
import re

import pytest
import torch

import steerkit as sk
from steerkit import plots
from steerkit.evals import (
    answer_metrics,
    entropy,
    kl,
    load_task,
    next_token_logprobs,
    option_token_ids,
    parse_answer,
    prompt,
    score,
)
from tests.conftest import TEXTS


def test_kl_and_entropy_hand_values():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.9, 0.1]]).log()
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(kl(p, q)[0]) == pytest.approx(expected, rel=1e-5)
    assert float(kl(p, p)[0]) == pytest.approx(0, abs=1e-7)
    assert float(entropy(torch.full((1, 4), 0.25).log())[0]) == pytest.approx(math.log(4), rel=1e-6)


def test_answer_metrics_hand_values():
    probs = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.3, 0.2]])
    m = answer_metrics(probs.log(), [[1, 2], [2, 3]], [0, 1])
    torch.testing.assert_close(m["mass_correct"], torch.tensor([0.6, 0.2]))
    torch.testing.assert_close(m["mass_incorrect"], torch.tensor([0.2, 0.3]))
    assert m["correct"].tolist() == [True, False]


@pytest.mark.parametrize("side", ["left", "right"])
def test_next_token_logprobs_match_single_runs(tiny_llama, tok, side, monkeypatch):
    monkeypatch.setattr(tok, "padding_side", side)
    batched = next_token_logprobs(tiny_llama, tok, TEXTS, batch_size=4)
    for n, text in enumerate(TEXTS):
        ids = tok([text], add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = tiny_llama(ids).logits[0, -1].log_softmax(-1)
        torch.testing.assert_close(batched[n], ref, rtol=1e-4, atol=1e-4)


def _check_arithmetic(question: str) -> int:
    total = int(re.search(r"has (\d+)", question).group(1))
    for op, x in re.findall(r"(gets|gives away) (\d+)", question):
        total += int(x) if op == "gets" else -int(x)
    return total


def test_tasks_are_seeded_and_correct():
    for steps in (1, 2, 3):
        items = load_task("arithmetic", n=30, seed=4, steps=steps)
        assert items == load_task("arithmetic", n=30, seed=4, steps=steps)
        assert items != load_task("arithmetic", n=30, seed=5, steps=steps)
        for it in items:
            assert int(it.answer) == _check_arithmetic(it.question) and it.answer in it.options
            assert len({o[0] for o in it.options}) == len(it.options) == 4
            assert len(re.findall(r"gets|gives away", it.question)) == steps
    for it in load_task("deduction", n=20):
        kind = re.search(r"is an? (\w+)\. What", it.question).group(1)
        plural = {"cat": "Cats", "wolf": "Wolves", "mouse": "Mice", "sheep": "Sheep", "lion": "Lions"}[kind]
        assert re.search(rf"{plural} are afraid of (\w+)\.", it.question).group(1) == it.answer
    for it in load_task("induction", n=20):
        seq = [int(x) for x in re.findall(r"\d+", it.question.split(":")[1])]
        assert int(it.answer) == seq[-1] + (seq[1] - seq[0])


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"valid tasks are \['arithmetic', 'deduction', 'induction'\]"):
        load_task("algebra")
    with pytest.raises(ValueError, match="at least one"):
        load_task("arithmetic", n=0)


def test_score_free_form():
    item = load_task("arithmetic", n=1, seed=1)[0]
    assert score(f" {item.answer}.", item) == (True, item.answer)
    assert score(f"First 3 + 4 = 7, so the total is {item.answer} {item.question.split()[3]}.", item)[0]
    assert score(" I am not sure.", item) == (False, None)  # unparsable: wrong, and reported as None
    word = load_task("deduction", n=1)[0]
    assert score(f" {word.answer.capitalize()}.", word) == (True, word.answer)
    assert parse_answer("it is 3.50 dollars", numeric=True) == "3.5"


def test_grade_counts_unparsed():
    from steerkit.evals import grade

    items = load_task("arithmetic", n=3, seed=2)
    result = grade([f" {items[0].answer}", " no idea", " 100000"], items)
    assert result == {"accuracy": 1 / 3, "correct": 1, "unparsed": 1, "n": 3}
    with pytest.raises(ValueError, match="one each"):
        grade([" 1"], items)


def test_prompt_and_option_tokens(tok):
    num = load_task("arithmetic", n=1)[0]
    text = prompt(tok, num)
    assert text.endswith("<|im_start|>assistant\nThe answer is ") and num.question in text
    ids = option_token_ids(tok, num.options, numeric=True)
    assert [tok.decode([i]) for i in ids] == [o[0] for o in num.options]
    word = load_task("deduction", n=1)[0]
    assert prompt(tok, word).endswith("The answer is")
    assert len(set(option_token_ids(tok, word.options, numeric=False))) == 4
    with pytest.raises(ValueError, match="distinct first tokens"):
        option_token_ids(tok, ["12", "13"], numeric=True)


def test_sweep_on_tiny_model(tiny_llama, tok):
    g = torch.Generator().manual_seed(0)
    vec = sk.SteeringVector({0: 3 * torch.randn(32, generator=g), 2: 3 * torch.randn(32, generator=g)})
    rows = sk.sweep(tiny_llama, tok, vec, "arithmetic", alphas=[-1, 0, 1], n=6)
    assert [(r["layer"], r["alpha"]) for r in rows] == [(0, -1.0), (0, 0.0), (0, 1.0), (2, -1.0), (2, 0.0), (2, 1.0)]
    assert all(r["kl"] == 0 for r in rows if r["alpha"] == 0) and all(r["kl"] > 0 for r in rows if r["alpha"])
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["mass_correct"] <= 1 for r in rows)
    together = sk.sweep(tiny_llama, tok, vec, TEXTS, alphas=[2], together=True)
    assert together[0]["layer"] == "0+2" and "accuracy" not in together[0]
    with pytest.raises(ValueError, match="not a finite number"):
        sk.sweep(tiny_llama, tok, vec, TEXTS, alphas=[0, float("nan")])
    with pytest.raises(ValueError, match="alphas is empty"):
        sk.sweep(tiny_llama, tok, vec, TEXTS, alphas=[])
    with pytest.raises(ValueError, match="empty"):
        sk.sweep(tiny_llama, tok, vec, [], alphas=[1])


def test_plots_write_png(tmp_path):
    rows = [{"alpha": a, "layer": 3, "kl": a * a, "entropy": 1.0, "accuracy": 0.5} for a in (-1, 0, 1)]
    vec = sk.SteeringVector({1: torch.ones(4), 2: torch.ones(4)}, {"separation": {"1": 0.7, "2": 0.9}})
    stats = {"layers": {0: {"norm": 1.0, "relative": 0.1}, None: {"norm": 2.0, "relative": 0.2}}}
    figures = {
        "sweep.png": lambda p: plots.sweep_metrics(rows, path=p),
        "sep.png": lambda p: plots.separation(vec, path=p),
        "pca.png": lambda p: plots.pca_scatter(torch.randn(5, 4), torch.randn(5, 4) + 3, layer=2, path=p),
        "len.png": lambda p: plots.length_accuracy([{"label": "a", "length": 10, "accuracy": 0.5}], path=p),
        "tv.png": lambda p: plots.task_vector_layers(stats, path=p),
    }
    for name, draw in figures.items():
        draw(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_files_roundtrip_and_malformed_lines(tmp_path):
    from steerkit.evals.tasks import save_task

    items = load_task("arithmetic", n=5, steps=1, seed=3)
    path = save_task(items, tmp_path / "split.jsonl")
    assert load_task(str(path)) == items
    bad = tmp_path / "bad.jsonl"
    bad.write_text(path.read_text().splitlines()[0] + '\n{"question": "What is 2 + 2?"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with 'question' and 'answer'"):
        load_task(str(bad))
    bad.write_text('{"question": "Q?", "answer": "4", "options": ["5", "6"]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*contain the answer '4'"):
        load_task(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        load_task(str(bad))
    with pytest.raises(FileNotFoundError, match="no task file"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_t_interval_and_holm_against_hand_computations():
    from steerkit.evals.stats import holm, t_interval

    mean, low, high = t_interval([1.0, 2.0, 3.0])  # sd 1, t(0.975, 2 df) = 4.303 (from a table)
    assert mean == 2.0 and abs(low - (2 - 4.303 / 3**0.5)) < 1e-3 and abs(high - (2 + 4.303 / 3**0.5)) < 1e-3
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # 3 x 0.01; 2 x 0.03; max(0.06, 0.04)
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError, match="at least two values"):
        t_interval([1.0])


def test_empirical_p_ranks_an_effect_among_null_controls():
    from steerkit.evals.stats import empirical_p

    null = [0.01 * i for i in range(20)]  # 0.00 … 0.19
    assert empirical_p(0.5, null) == pytest.approx((1.0, 1 / 21))  # above every control: the smallest p
    assert empirical_p(0.095, null) == pytest.approx((0.5, 11 / 21))  # in the middle of the null
    assert empirical_p(-1.0, null) == pytest.approx((0.0, 1.0))
    with pytest.raises(ValueError, match="null distribution is empty"):
        empirical_p(0.1, [])


def test_performance_share_is_a_share_of_accuracy_not_of_gain():
    from steerkit.evals.stats import gain_recovered, performance_share

    base = [1] * 40 + [0] * 60  # 0.40
    reference = [1] * 50 + [0] * 50  # 0.50
    treated = [1] * 45 + [0] * 55  # 0.45: 90% of the reference's accuracy, half of its gain
    mean, low, high = performance_share(treated, reference)
    assert mean == pytest.approx(0.9) and low < 0.9 < high
    assert gain_recovered(treated, base, reference)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="different lengths"):
        performance_share([1, 0], [1])
    with pytest.raises(ValueError, match="scores 0"):
        performance_share([1, 0], [0, 0])
