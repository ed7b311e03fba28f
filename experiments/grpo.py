"""GRPO (Shao et al. 2024, DeepSeekMath), written out: sample a group of answers per question, reward the
exact answer, normalise rewards within each group, and take a policy-gradient step with a KL penalty to the
starting model. One update per batch of samples (so the clipped ratio of PPO is always 1 and is left out).

    loss = mean over samples of  mean over answer tokens of  [ -A · logπ(t) + β · KL_k3(π ‖ π_ref)(t) ]
    A    = (r − mean(group)) / (std(group) + ε),  KL_k3 = exp(ref − logπ) − (ref − logπ) − 1
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from steerkit.batching import pad_batch, pad_id


@dataclass
class GRPOConfig:
    """Options of one GRPO run (TRL's names where they exist)."""

    steps: int = 60
    questions: int = 8  # per step
    group: int = 8  # samples per question (TRL: num_generations)
    lr: float = 1e-5
    beta: float = 0.04  # KL to the starting model
    temperature: float = 1.0
    budget: int = 48  # max new tokens
    micro_batch: int = 16  # sequences per forward/backward
    seed: int = 0


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Rewards [questions, group] normalised within each group; a group whose rewards are all equal gets 0."""
    mean, std = rewards.mean(1, keepdim=True), rewards.std(1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


def answer_mask(completion: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """1 on a completion's tokens up to and including its first end-of-sequence token, 0 after."""
    is_eos = torch.isin(completion, eos).int()
    after = (is_eos.cumsum(1) - is_eos) > 0
    return (~after).int()


def token_logprobs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n_answer: int) -> torch.Tensor:
    """log π(token) of the last ``n_answer`` tokens of each row, positions counted over unpadded tokens (as
    ``generate`` counts them for left-padded prompts)."""
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=n_answer + 1).logits
    return logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, -n_answer:, None]).squeeze(-1)


def grpo_loss(
    logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """The GRPO objective for one batch of answers [rows, tokens] (sequence mean, then batch mean)."""
    ratio = torch.exp(logp - logp.detach())  # 1, with the policy gradient as its gradient
    delta = ref_logp - logp
    per_token = -ratio * advantages[:, None] + beta * (torch.exp(delta) - delta - 1)
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def update(
    policy: nn.Module,
    ref: nn.Module,
    optimizer: torch.optim.Optimizer,
    sequences: torch.Tensor,
    prompt_mask: torch.Tensor,
    answers: torch.Tensor,
    rewards: torch.Tensor,
    config: GRPOConfig,
) -> dict:
    """One GRPO step on sampled ``sequences`` [questions·group, prompt + answer] (a question's samples
    consecutive): ``prompt_mask`` marks the prompts' real tokens, ``answers`` the answer tokens to learn."""
    adv = group_advantages(rewards.view(-1, config.group)).flatten()
    full_mask = torch.cat([prompt_mask, answers], 1)
    n = answers.shape[1]
    policy.train()
    optimizer.zero_grad(set_to_none=True)
    loss_total, kl_total = 0.0, 0.0
    for s in range(0, len(sequences), config.micro_batch):
        rows = slice(s, s + config.micro_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                ref_logp = token_logprobs(ref, sequences[rows], full_mask[rows], n)
            logp = token_logprobs(policy, sequences[rows], full_mask[rows], n)
        share = len(logp) / len(sequences)
        loss = grpo_loss(logp, ref_logp, adv[rows], answers[rows], config.beta) * share
        loss.backward()
        delta = (ref_logp - logp).detach()
        kl = ((torch.exp(delta) - delta - 1) * answers[rows]).sum() / answers[rows].sum().clamp(min=1)
        loss_total, kl_total = loss_total + float(loss.detach()), kl_total + float(kl) * share
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0))
    optimizer.step()
    policy.eval()
    return {"loss": loss_total, "kl": kl_total, "grad_norm": grad_norm}


def question_batches(n_prompts: int, config: GRPOConfig) -> list[list[int]]:
    """The prompt indices of each step, in order: seeded shuffles of all prompts, epoch after epoch (what a
    run saw, so that a control can be trained on exactly the same questions)."""
    rng = random.Random(config.seed)
    order: list[int] = []
    batches = []
    for _ in range(config.steps):
        if len(order) < config.questions:
            order += rng.sample(range(n_prompts), n_prompts)
        batches.append(order[: config.questions])
        order = order[config.questions :]
    return batches


def train(
    policy: nn.Module,
    ref: nn.Module,
    tok,
    prompts: Sequence[str],
    reward: Callable[[int, str, bool], float],
    config: GRPOConfig,
) -> list[dict]:
    """Run ``config.steps`` GRPO steps on ``prompts`` (in a seeded order, epoch after epoch); ``reward(i,
    text, finished)`` scores an answer to prompt ``i``. Sampling and forwards under bf16 autocast on the CPU.
    Returns one row of statistics per step."""
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=0.0)
    eos = torch.tensor([tok.eos_token_id])
    history = []
    bar = tqdm(question_batches(len(prompts), config), desc="GRPO", total=config.steps)
    for batch in bar:
        ids, mask, _ = pad_batch(tok([prompts[i] for i in batch], add_special_tokens=False)["input_ids"],
                                 pad_id(tok), "left")  # fmt: skip
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = policy.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                  temperature=config.temperature, max_new_tokens=config.budget,
                                  num_return_sequences=config.group, pad_token_id=pad_id(tok))  # fmt: skip
        completion = out[:, ids.shape[1] :]
        answers = answer_mask(completion, eos)
        finished = torch.isin(completion, eos).any(1)
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        rewards = torch.tensor([reward(batch[n // config.group], t, bool(f))
                                for n, (t, f) in enumerate(zip(texts, finished, strict=True))])  # fmt: skip
        stats = update(policy, ref, optimizer, out, mask.repeat_interleave(config.group, 0), answers, rewards, config)
        history.append({
            **stats, "reward": float(rewards.mean()), "truncated": float((~finished).float().mean()),
            "length": float(answers.sum(1).float().mean()),
            "solved_groups": int((rewards.view(-1, config.group).amax(1) > 0).sum()),
        })  # fmt: skip
        bar.set_postfix(reward=f"{history[-1]['reward']:.2f}", kl=f"{stats['kl']:.3f}")
    return history
