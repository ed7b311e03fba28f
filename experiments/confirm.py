"""The confirmation set: 1000 one-step items from their own seed, scored once, after every choice was frozen.

Each claim below was fixed before this set was read: a model, the model it is compared with, and the sign the
test split found. The models are seed 0's (then the only seed with every condition run); α (stage 2) and the
learning rates (stage 3) are the frozen ones. Each model's generations are cached like any evaluation (split
"confirm"), so a second run only rewrites the report from the cache: the set is scored once.

    .venv/bin/python experiments/confirm.py   # about 3-5 minutes a model on 2 cores
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, write_report  # noqa: E402
from organisms import RUNS, ci, evaluate, signed, task  # noqa: E402
from reasoning_vector import frozen_alpha, load, vectors  # noqa: E402
from sae_tuning import HERE, LAYER, choose_lr, run_name  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit.evals.stats import mcnemar, paired_bootstrap  # noqa: E402
from steerkit.sae.splice import splice  # noqa: E402

M0 = "smollm2-135m-instruct"


def models() -> dict[str, Callable[[], tuple]]:
    """Name -> a function that builds (model, tokenizer); each name is its cache name in ``.cache/eval``."""
    alpha, lrs = frozen_alpha()["alpha"], choose_lr()

    def m1_plus(a: float):
        model, tok = sk.load_model(CACHE / "m1" / "model")
        vectors(0)["v"].add_to(model, a)
        return model, tok

    tuned = (run_name("grpo-0", "kl", lrs["kl"], 0), run_name(None, "ce", lrs["ce"], 0))
    return {
        "m0": lambda: sk.load_model(M0),
        "m1": lambda: sk.load_model(CACHE / "m1" / "model"),
        "grpo-0": lambda: sk.load_model(RUNS / "grpo-0" / "model"),
        "sft-0": lambda: sk.load_model(RUNS / "sft-0" / "model"),
        f"rv0-v{alpha:+g}": lambda: m1_plus(alpha),
        "rv0-v-1": lambda: m1_plus(-1.0),
        "splice-grpo-0": lambda: sk.load_model(M0),  # spliced while it is scored (``score``)
    } | {name: (lambda name=name: sk.load_model(HERE / "models" / name)) for name in tuned}


def claims() -> list[tuple[str, str, str]]:
    """(claim, treated, baseline): the comparisons this set confirms or not, each with the sign test found."""
    alpha, lrs = frozen_alpha()["alpha"], choose_lr()
    return [
        ("1: the GRPO organism beats its start", "grpo-0", "m0"),
        ("1: the SFT organism beats its start", "sft-0", "m0"),
        (f"2: M1 + {alpha:g}·v beats M1", f"rv0-v{alpha:+g}", "m1"),
        ("2: M1 − v is below M1", "rv0-v-1", "m1"),
        ("3: GRPO-0's SAE spliced into M0 beats M0", "splice-grpo-0", "m0"),
        ("3: the KL recipe with GRPO-0's SAE is below M0", run_name("grpo-0", "kl", lrs["kl"], 0), "m0"),
        ("3: LoRA-SFT beats M0", run_name(None, "ce", lrs["ce"], 0), "m0"),
    ]


def score(name: str, build: Callable[[], tuple]) -> dict:
    """The confirmation accuracy of one model (cached: a model is scored on this set once)."""
    spec, splits, _ = task()
    items = splits["confirm"]
    model, tok = build()
    if name.startswith("splice-"):
        with splice(model, HERE / "sae" / name.removeprefix("splice-"), LAYER):
            return evaluate(name, model, tok, items, "confirm", spec["example"], spec["budget"])
    return evaluate(name, model, tok, items, "confirm", spec["example"], spec["budget"])


def main() -> None:
    results = {}
    for name, build in models().items():
        results[name] = score(name, build)
        print(f"{name}: confirmation {results[name]['accuracy']:.3f}")
    lines = [
        "# Confirmation set (scored once)",
        "",
        f"{len(results['m0']['correct'])} one-step items from the confirmation seed, disjoint from train, "
        "validation and test; seed-0 models; α and learning rates frozen before test. Differences paired on "
        "items (95% bootstrap), McNemar p.",
        "",
        "| claim | test: difference | confirmation: treated | baseline | difference | McNemar p | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for claim, treated, base in claims():
        found = paired_bootstrap(load(treated, "test")["correct"], load(base, "test")["correct"])
        t, b = results[treated]["correct"], results[base]["correct"]
        diff, p = paired_bootstrap(t, b), mcnemar(t, b)
        holds = (diff[1] > 0 or diff[2] < 0) and (diff[0] > 0) == (found[0] > 0)
        rows.append({"claim": claim, "treated": treated, "baseline": base, "test": found, "diff": diff, "p": p,
                     "holds": holds})  # fmt: skip
        cells = [signed(found), ci(t), ci(b), signed(diff), f"{p:.2g}", "yes" if holds else "no"]
        lines.append(f"| {claim} | " + " | ".join(cells) + " |")
    lines += ["", "'holds': the interval excludes 0 on the side the test split found.", "",
              "Reproduce: `.venv/bin/python experiments/confirm.py`", ""]  # fmt: skip
    write_report("confirmation", {"claims": rows, "accuracy": {n: r["accuracy"] for n, r in results.items()}}, lines)


if __name__ == "__main__":
    main()
