"""The GRPO loop of the reasoning experiments (experiments/grpo.py) on a tiny random model."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TEXTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from grpo import (  # noqa: E402
    GRPOConfig,
    answer_mask,
    group_advantages,
    grpo_loss,
    question_batches,
    token_logprobs,
    train,
    update,
)


def test_group_advantages_hand_values():
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    std = (0.75 * 0.25) ** 0.5  # population std of one 1 and three 0s
    torch.testing.assert_close(adv[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert adv[1].abs().max() == 0  # nothing to learn from a group that all agree


def test_answer_mask_stops_after_the_first_eos():
    completion = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 8], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(answer_mask(completion, torch.tensor([2])), expected)


def test_token_logprobs_with_left_padding_equal_unpadded(tiny_llama, tok):
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in (TEXTS[0], TEXTS[2], TEXTS[3])]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = token_logprobs(tiny_llama, ids, mask, 2)
        for n, r in enumerate(rows):
            alone = tiny_llama(torch.tensor([r])).logits[0, -3:-1].log_softmax(-1)
            torch.testing.assert_close(batched[n], alone.gather(-1, torch.tensor(r[-2:])[:, None]).squeeze(-1),
                                       rtol=1e-4, atol=1e-4)  # fmt: skip


def test_grpo_loss_gradient_is_the_advantage_weighted_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv, mask = torch.tensor([2.0, -1.0]), torch.tensor([[1, 1], [1, 0]])
    grpo_loss(logp, logp.detach(), adv, mask, beta=0.5).backward()  # KL 0 at ref = policy, and its gradient 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-2.0 / 2 / 2, -2.0 / 2 / 2], [1.0 / 2, 0.0]]))
    with torch.no_grad():
        assert float(grpo_loss(logp, logp, adv, mask, 0.5)) == pytest.approx(-(2.0 - 1.0) / 2)  # −mean(A), KL 0


def test_update_raises_rewarded_answers_and_lowers_the_others(tiny_llama, tok):
    policy = copy.deepcopy(tiny_llama)
    prompt = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    answers = [[11, 12, 13], [21, 22, 23], [31, 32, 2], [41, 42, 43]]  # the third stops at EOS (id 2)
    sequences = torch.tensor([prompt + a for a in answers])
    prompt_mask = torch.ones(len(answers), len(prompt), dtype=torch.long)
    answer_tokens = torch.tensor([[1, 1, 1]] * 4)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])

    def logps(model):
        with torch.no_grad():
            return token_logprobs(model, sequences, torch.cat([prompt_mask, answer_tokens], 1), 3).sum(1)

    before = logps(policy)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    config = GRPOConfig(group=4, beta=0.0, micro_batch=3)  # two micro-batches, gradients accumulated
    stats = update(policy, tiny_llama, optimizer, sequences, prompt_mask, answer_tokens, rewards, config)
    change = logps(policy) - before
    assert change[0] > 0 and change[2] > 0 and change[1] < 0 and change[3] < 0, change
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)  # measured before the step, policy == reference
    assert torch.equal(logps(tiny_llama), before)  # the reference is not trained


def test_train_runs_and_reports(tiny_llama, tok):
    policy = copy.deepcopy(tiny_llama)
    config = GRPOConfig(steps=3, questions=2, group=4, lr=1e-3, budget=3, micro_batch=4)
    history = train(policy, tiny_llama, tok, TEXTS[:3], lambda i, text, done: float(len(text) % 2), config)
    assert len(history) == 3 and all(h["truncated"] == 1.0 and h["length"] == 3.0 for h in history)
    assert any(p.ne(q).any() for p, q in zip(policy.parameters(), tiny_llama.parameters(), strict=True))


def test_question_batches_cover_every_prompt_before_repeating():
    config = GRPOConfig(steps=7, questions=4, seed=3)
    batches = question_batches(10, config)
    assert len(batches) == 7 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epoch by epoch
    assert question_batches(10, config) == batches  # seeded: a control can replay what a run saw
    assert question_batches(10, GRPOConfig(steps=7, questions=4, seed=4)) != batches
