"""Stage 1: model organisms from one start M0 (the embedded model): SFT on gold worked solutions and GRPO on
the same training questions, three seeds each, update norms matched within 2x.

Each run is cached under ``experiments/.cache/organisms/{kind}-{seed}`` (checkpoint + training log) and each
evaluation under ``experiments/.cache/eval``, so the stage can be run in pieces of under 30 minutes:

    .venv/bin/python experiments/organisms.py grpo 0     # one GRPO seed (about 30 minutes)
    .venv/bin/python experiments/organisms.py sft-lr     # SFT seed 0 at each candidate lr; choose one
    .venv/bin/python experiments/organisms.py sft 1      # another SFT seed at the chosen lr
    .venv/bin/python experiments/organisms.py report     # evaluate what exists, write the report

The task (number ranges, prompt, budget) is the one the gate chose (``artifacts/reasoning_transfer/task.json``).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, EVAL_BATCH, finetune, mean_sd, plain, write_report  # noqa: E402
from grpo import GRPOConfig, question_batches, train  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit import plots  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.evals.stats import bootstrap, paired_bootstrap  # noqa: E402
from steerkit.evals.worked import HARD_SPLITS, TaskConfig, grade_worked, render, score_worked, worked_splits  # noqa: E402
from steerkit.sae.tune import save_checkpoint  # noqa: E402
from steerkit.steer import completions  # noqa: E402

SEEDS = (0, 1, 2)
GRPO = GRPOConfig(steps=45, questions=8, group=8, lr=1e-5, beta=0.04, temperature=0.8)
SFT_EPOCHS, SFT_LRS = 1, (3e-6, 6e-6)  # lr candidates: update norm within 2x of GRPO seed 0, then best val
ANSWER_LRS = (1e-5, 3e-5, 1e-4)  # sft-answer (stage 2b): the same rule against GRPO seed 0; frozen for seeds ≥ 1
RUNS = CACHE / "organisms"
USAGE = (
    "organisms.py grpo SEED | organisms.py sft-lr | organisms.py sft SEED | organisms.py sft-answer-lr 0 "
    "| organisms.py sft-answer SEED | organisms.py report"
)


def task() -> tuple[dict, dict[str, list], list]:
    """The gate's task: its description, the one-step splits and the two-step test split."""
    spec = json.loads((ARTIFACTS / "task.json").read_text())
    config = TaskConfig(**spec["config"])
    return spec, worked_splits(1, config), worked_splits(2, config, HARD_SPLITS)["test"]


def update_norm(model, start) -> float:
    """‖θ − θ₀‖ over every parameter (float32)."""
    return float(sum(((p.float() - q.float()) ** 2).sum() for p, q in zip(model.parameters(), start.parameters(),
                                                                           strict=True)) ** 0.5)  # fmt: skip


def sft_lr(kind: str = "sft", seed: int = 0) -> float:
    path = RUNS / ("sft_lr.json" if kind == "sft" else f"{kind}_lr-{seed}.json")
    if not path.is_file():
        raise SystemExit(f"no {kind} learning rate chosen yet: run `organisms.py grpo {seed}`, then the lr choice")
    return json.loads(path.read_text())["chosen"]


def grpo_seen(n_items: int, seed: int) -> list[int]:
    """The training questions the GRPO run of ``seed`` saw, in its order (one entry per step and question)."""
    return [i for batch in question_batches(n_items, replace(GRPO, seed=seed)) for i in batch]


def run(kind: str, seed: int, lr: float | None = None) -> Path:
    """Train one organism into ``RUNS/{kind}-{seed}`` (an SFT lr candidate: ``RUNS/sft-lr{lr}-{seed}``)."""
    out = RUNS / (f"{kind}-{seed}" if lr is None else f"{kind}-lr{lr:g}-{seed}")
    if (out / "train.json").is_file():
        print(f"{out} exists: delete it to rerun")
        return out
    spec, splits, _ = task()
    m0, tok = sk.load_model("smollm2-135m-instruct")
    model = copy.deepcopy(m0)
    train_items = splits["train"]
    prompts = [render(tok, it, spec["example"]) for it in train_items]
    start = time.perf_counter()
    if kind == "grpo":
        config = GRPOConfig(**{**asdict(GRPO), "seed": seed, "budget": spec["budget"]})

        def reward(i: int, text: str, finished: bool) -> float:
            return float(score_worked(text, finished, train_items[i]).correct)

        log = {"config": asdict(config), "history": train(model, m0, tok, prompts, reward, config)}
    elif kind == "sft":
        pairs = [(p, it.meta["solution"] + tok.eos_token) for p, it in zip(prompts, train_items, strict=True)]
        lr = sft_lr() if lr is None else lr
        log = {"epochs": SFT_EPOCHS, "lr": lr, "losses": finetune(model, tok, pairs, SFT_EPOCHS, lr, seed)}
    elif kind == "sft-answer":  # the paper's SFT: final answers only, on GRPO's questions in GRPO's batches
        seen = grpo_seen(len(train_items), seed)
        pairs = [(prompts[i], f"The answer is {train_items[i].answer}." + tok.eos_token) for i in seen]
        lr = sft_lr(kind, 0) if lr is None else lr  # chosen on seed 0's validation, frozen for the other seeds
        losses = finetune(model, tok, pairs, 1, lr, seed, batch_size=GRPO.questions, shuffle=False)
        log = {"epochs": 1, "lr": lr, "examples": len(pairs), "losses": losses}
    else:
        raise SystemExit(f"unknown organism {kind!r}: expected grpo, sft or sft-answer")
    log.update(seconds=time.perf_counter() - start, update_norm=update_norm(model, m0))
    save_checkpoint(model, tok, out / "model", force=True)
    write_text(json.dumps(log, indent=1), out / "train.json", force=True)
    print(f"{kind} seed {seed}: {log['seconds']:.0f} s, update norm {log['update_norm']:.3f}")
    return out


def select_sft_lr(kind: str = "sft", seed: int = 0) -> None:
    """Train ``kind`` at each candidate lr; keep those whose update norm is within 2x of the GRPO run's of
    ``seed`` and choose the best on validation; the chosen run becomes ``{kind}-{seed}``."""
    grpo_norm = json.loads((RUNS / f"grpo-{seed}" / "train.json").read_text())["update_norm"]
    spec, splits, _ = task()
    tok = sk.load_model("smollm2-135m-instruct")[1]
    rows = []
    for lr in SFT_LRS if kind == "sft" else ANSWER_LRS:
        out = run(kind, seed, lr)
        val = evaluate(out.name, sk.load_model(out / "model")[0], tok, splits["val"], "val", spec["example"],
                       spec["budget"])  # fmt: skip
        norm = json.loads((out / "train.json").read_text())["update_norm"]
        rows.append({"lr": lr, "update_norm": norm, "ratio_to_grpo": norm / grpo_norm, "val": val["accuracy"]})
    eligible = [r for r in rows if 0.5 <= r["ratio_to_grpo"] <= 2.0]
    if not eligible:
        raise SystemExit(f"no SFT lr gives an update norm within 2x of GRPO's {grpo_norm:.3f}: {rows}")
    chosen = max(eligible, key=lambda r: r["val"])["lr"]
    (RUNS / f"{kind}-lr{chosen:g}-{seed}").rename(RUNS / f"{kind}-{seed}")
    (CACHE / "eval" / f"{kind}-lr{chosen:g}-{seed}-val.json").rename(CACHE / "eval" / f"{kind}-{seed}-val.json")
    record = RUNS / ("sft_lr.json" if kind == "sft" else f"{kind}_lr-{seed}.json")
    write_text(json.dumps({"grpo_norm": grpo_norm, "candidates": rows, "chosen": chosen}, indent=1), record,
               force=True)  # fmt: skip
    print(f"{kind} lr {chosen:g}: {rows}")


def evaluate(name: str, model, tok, items, split: str, example: str, budget: int) -> dict:
    """Greedy generations of the budget on ``items``, graded; cached per (model, split)."""
    path = CACHE / "eval" / f"{name}-{split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    prompts = [render(tok, it, example) for it in items]
    outs = completions(model, tok, prompts, budget, EVAL_BATCH, return_finished=True)
    result = grade_worked([t for t, _ in outs], [f for _, f in outs], items)
    result["examples"] = [t for t, _ in outs[:5]]
    write_text(json.dumps(result), path, force=True)
    return result


def ci(values) -> str:
    return plain(bootstrap([float(v) for v in values]))


def signed(interval: tuple[float, float, float]) -> str:
    return "{:+.3f} [{:+.3f}, {:+.3f}]".format(*interval)


def report() -> None:
    spec, splits, hard = task()
    m0, tok = sk.load_model("smollm2-135m-instruct")
    names = ["m0"] + sorted(p.name for p in RUNS.glob("*-*") if (p / "train.json").is_file() and "-lr" not in p.name)
    evals, logs = {}, {}
    for name in names:
        model = m0 if name == "m0" else sk.load_model(RUNS / name / "model")[0]
        if name != "m0":
            logs[name] = json.loads((RUNS / name / "train.json").read_text())
        for split, items in (("val", splits["val"]), ("test", splits["test"]), ("hard", hard)):
            evals[name, split] = evaluate(name, model, tok, items, split, spec["example"], spec["budget"])
    lines = [
        "# Stage 1: model organisms",
        "",
        f"Start M0: smollm2-135m-instruct. Training questions: {len(splits['train'])} one-step items. "
        f"Greedy decoding, budget {spec['budget']} new tokens, first-answer scorer (truncated = wrong).",
        f"GRPO: {GRPO.steps} steps x {GRPO.questions} questions x {GRPO.group} samples at T = {GRPO.temperature}, "
        f"lr {GRPO.lr}, beta (KL to M0) {GRPO.beta}, reward = exact answer. SFT: {SFT_EPOCHS} epoch(s) on the gold "
        f"worked solutions, lr {sft_lr():g}, chosen among {', '.join(f'{c:g}' for c in SFT_LRS)}: update norm within "
        "2x of GRPO seed 0's, then the best validation accuracy (table below).",
        "Intervals: 95% bootstrap over items; differences to M0 paired on items.",
        "",
        "| model | update norm | minutes | val (200) | test (1000) | test - M0 (paired) | two-step test (500) "
        "| truncated (test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base_test = evals["m0", "test"]["correct"]
    for name in names:
        val, test, hard_r = evals[name, "val"], evals[name, "test"], evals[name, "hard"]
        log = logs.get(name, {})
        diff = "-" if name == "m0" else signed(paired_bootstrap(test["correct"], base_test))
        lines.append(
            f"| {name} | {log.get('update_norm', 0):.2f} | {log.get('seconds', 0) / 60:.1f} | {ci(val['correct'])} "
            f"| {ci(test['correct'])} | {diff} | {ci(hard_r['correct'])} | {test['truncated']:.3f} |"
        )
    for kind in ("sft", "grpo"):
        runs = [n for n in names if n.startswith(kind)]
        if len(runs) > 1:
            accs = mean_sd((evals[n, "test"]["accuracy"] for n in runs), ".3f")
            lines.append(f"\n{kind}: test accuracy over {len(runs)} seeds {accs} (s.d.)")
    selection = json.loads((RUNS / "sft_lr.json").read_text())
    lines += ["", "SFT learning rate (seed 0, validation):", "", "| lr | update norm | / GRPO seed 0's | val |"]
    lines += ["|---|---|---|---|"]
    lines += [f"| {r['lr']:g} | {r['update_norm']:.2f} | {r['ratio_to_grpo']:.2f} | {r['val']:.3f} |"
              for r in selection["candidates"]]  # fmt: skip
    grpo_runs = [n for n in names if n.startswith("grpo")]
    if grpo_runs:
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        for n in grpo_runs:
            rewards = torch.tensor([h["reward"] for h in logs[n]["history"]])
            smooth = torch.nn.functional.avg_pool1d(rewards[None, None], 5, 1, 2, count_include_pad=False)[0, 0]
            ax.plot(smooth, label=f"{n} (5-step mean)")
        ax.set(xlabel="GRPO step", ylabel="mean reward of the samples", title="GRPO training reward")
        ax.legend(fontsize=7)
        fig.tight_layout()
        plots.save_figure(fig, ARTIFACTS / "organisms.png", force=True)
        lines += ["", "![GRPO reward](organisms.png)"]
    lines += ["", f"Reproduce: `.venv/bin/python experiments/{USAGE}` (in that order).", ""]
    data = {"evals": {f"{n}/{s}": r for (n, s), r in evals.items()}, "logs": logs}
    write_report("organisms", data, lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["report"]:
        report()
    elif args == ["sft-lr"]:
        select_sft_lr()
    elif len(args) == 2 and args[0] == "sft-answer-lr" and args[1].isdigit():
        select_sft_lr("sft-answer", int(args[1]))
    elif len(args) == 2 and args[1].isdigit():
        run(args[0], int(args[1]))
    else:
        raise SystemExit(f"usage: {USAGE}")
