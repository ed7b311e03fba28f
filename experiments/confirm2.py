"""The second confirmation set (round three): 1000 fresh one-step items, scored once, for claims fixed first.

The claims are read from ``experiments/claims2.json``, committed before this set was generated or read: each
names a treated and a baseline model (``MODELS``), a measure and the direction the test split found. A claim
holds when the set's paired 95% interval lies on that side (accuracy: of 0; length: of 0, relative to the
baseline; non-inferior: above −``MARGIN``). Every model is evaluated as on test (bf16, greedy) and cached under
``experiments/.cache/confirm2``, so a second run only rewrites the report. The first confirmation set
(``confirmation.md``) stays as it was.

    .venv/bin/python experiments/confirm2.py fix   # the claims, from the test split, before the set exists
    .venv/bin/python experiments/confirm2.py       # score them (about 1-2 minutes a model on 2 cores)
    .venv/bin/python experiments/confirm2.py fix 5 # a later stage's claims, a dated block, before it is scored

A stage that ran after the set was first scored adds its claims as a dated block (``later`` in the file), fixed
from its own test split before any of its models is scored here; the earlier blocks are not rewritten.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ARTIFACTS, CACHE, EVAL_BATCH, write_report  # noqa: E402
from control_vectors import EVAL_DTYPE, MARGIN  # noqa: E402
from efficiency import BUDGET, CONCISE_SYSTEM, ORGANISM, relative_lengths  # noqa: E402
from organisms import RUNS, ci, signed, task  # noqa: E402
from reasoning_vector_2b import vector  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.evals.stats import bootstrap, paired_bootstrap  # noqa: E402
from steerkit.evals.worked import SPLITS, SYSTEM, TaskConfig, grade_worked, render, worked_splits  # noqa: E402
from steerkit.steer import completions  # noqa: E402

CLAIMS = Path(__file__).resolve().parent / "claims2.json"
HERE = CACHE / "confirm2"
VECTORS = ARTIFACTS / "vectors"
M0 = "smollm2-135m-instruct"


@functools.cache
def items() -> list:
    """1000 one-step items from their own seed ("confirm2"), disjoint from every other split of the task."""
    spec = json.loads((ARTIFACTS / "task.json").read_text())
    return worked_splits(1, TaskConfig(**spec["config"]), {**SPLITS, "confirm2": 1000})["confirm2"]


def _m1_plus(alpha: float):
    model, tok = sk.load_model(CACHE / "m1" / "model")
    vector(0).add_to(model, alpha)
    return model, tok


def _steered(vector_file: str):
    """The stage's saved vector and the α frozen with it."""
    v = sk.SteeringVector.load(VECTORS / vector_file)
    return v, float(v.metadata["alpha"])


# name -> (build the model, the steering to apply or None, system prompt, token budget)
MODELS: dict[str, tuple[Callable[[], tuple], Callable[[], tuple] | None, str, int | None]] = {
    "m0": (lambda: sk.load_model(M0), None, SYSTEM, None),
    "m1": (lambda: sk.load_model(CACHE / "m1" / "model"), None, SYSTEM, None),
    "grpo-0": (lambda: sk.load_model(RUNS / "grpo-0" / "model"), None, SYSTEM, None),
    "sft-answer-0": (lambda: sk.load_model(RUNS / "sft-answer-0" / "model"), None, SYSTEM, None),
    "m1+v": (lambda: _m1_plus(1.0), None, SYSTEM, None),
    "m1-v": (lambda: _m1_plus(-1.0), None, SYSTEM, None),
    "m0+reasoning": (lambda: sk.load_model(M0), lambda: _steered("reasoning_control.safetensors"), SYSTEM, None),
    "verbose": (lambda: sk.load_model(ORGANISM / "model"), None, SYSTEM, BUDGET),
    "verbose+concise": (
        lambda: sk.load_model(ORGANISM / "model"),
        lambda: _steered("efficiency.safetensors"),
        SYSTEM,
        BUDGET,
    ),  # fmt: skip
    "verbose+prompt": (lambda: sk.load_model(ORGANISM / "model"), None, CONCISE_SYSTEM, BUDGET),
}


def fix_claims() -> None:
    """Write ``claims2.json`` from the test split's results, before the set exists (refuses to rewrite it)."""
    if CLAIMS.exists():
        raise SystemExit(f"{CLAIMS} is fixed already: claims are not rewritten after they are made")
    test = lambda name: json.loads((CACHE / "eval" / f"2b-{name}-test.json").read_text())["correct"]  # noqa: E731
    own = lambda name: json.loads((CACHE / "own" / f"{name}.json").read_text())["correct"]  # noqa: E731
    alpha = sk.SteeringVector.load(VECTORS / "reasoning_control.safetensors").metadata["alpha"]
    found = {  # claim -> (treated, baseline, the test split's paired difference)
        "1: GRPO-0 beats M0 (a set-up check)": ("grpo-0", "m0", test("grpo-0"), test("m0")),
        "2b: GRPO-0 vs SFT-answer-0 (the paper's ordering)": (
            "grpo-0",
            "sft-answer-0",
            test("grpo-0"),
            test("sft-answer-0"),
        ),  # fmt: skip
        "2b: M1 + v vs M1 (the paper's α = 1)": ("m1+v", "m1", test("v0+1"), test("m1")),
        "2b: M1 − v vs M1 (the paper's subtraction)": ("m1-v", "m1", test("v0-1"), test("m1")),
        "4: M0 + α·v (correct − wrong) vs M0": (
            "m0+reasoning",
            "m0",
            own(f"reasoning-test{float(alpha):+g}"),
            own("m0-test"),
        ),  # fmt: skip
    }
    claims = []
    for claim, (treated, base, t, b) in found.items():
        diff = paired_bootstrap(t, b)
        claims.append({"claim": claim, "treated": treated, "baseline": base, "measure": "accuracy",
                       "direction": "+" if diff[0] > 0 else "-", "test": diff})  # fmt: skip
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_text(json.dumps({"fixed": stamp, "claims": claims}, indent=1) + "\n", CLAIMS)
    print(f"{len(claims)} claims fixed in {CLAIMS}")


def _rel_length(treated: dict, base: dict) -> tuple[float, float, float]:
    return bootstrap(relative_lengths(treated, base))


def stage5_claims() -> list[dict]:
    """Stage 5's claims from its test split: V + α·v against V (length; accuracy within the margin) and against
    "Be concise." (length)."""
    ef = json.loads((ARTIFACTS / "efficiency.json").read_text())
    alpha = ef["alpha"]
    own = lambda name: json.loads((CACHE / "own" / f"{name}.json").read_text())  # noqa: E731
    steered, v, prompt = own(f"eff-test{alpha:+g}"), own("eff-v-test"), own("eff-prompt-test")
    found = [  # (claim, treated, baseline, measure, the test split's interval)
        ("5: V + α·v vs V (length)", "verbose+concise", "verbose", "length", _rel_length(steered, v)),
        ("5: V + α·v keeps V's accuracy (margin)", "verbose+concise", "verbose", "non-inferior",
         paired_bootstrap(steered["correct"], v["correct"])),
        ('5: V + α·v vs "Be concise." (length)', "verbose+concise", "verbose+prompt", "length",
         _rel_length(steered, prompt)),
    ]  # fmt: skip
    sign = lambda m, diff: "+" if m == "non-inferior" or diff[0] > 0 else "-"  # noqa: E731
    return [{"claim": c, "treated": t, "baseline": b, "measure": m, "test": diff, "direction": sign(m, diff)}
            for c, t, b, m, diff in found]  # fmt: skip


LATER = {"5": stage5_claims}  # stage -> its claims from test, fixed as a dated block


def fix_later(stage: str) -> None:
    """Append ``stage``'s claims to ``claims2.json`` as a dated block (refuses a stage already fixed)."""
    spec = json.loads(CLAIMS.read_text())
    if any(block["stage"] == stage for block in spec.get("later", [])):
        raise SystemExit(f"stage {stage}'s claims are fixed already in {CLAIMS}: they are not rewritten")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    spec.setdefault("later", []).append({"stage": stage, "fixed": stamp, "claims": LATER[stage]()})
    write_text(json.dumps(spec, indent=1) + "\n", CLAIMS, force=True)
    print(f"stage {stage}: {len(spec['later'][-1]['claims'])} claims fixed in {CLAIMS}")


def score(name: str) -> dict:
    """One model's graded generations on the set, with token lengths (cached: the set is scored once)."""
    path = HERE / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    build, steering, system, budget = MODELS[name]
    spec = task()[0]
    model, tok = build()
    model = model.to(EVAL_DTYPE)
    chosen = items()
    prompts = [render(tok, it, spec["example"], system) for it in chosen]
    with sk.steer(model, *steering()) if steering else contextlib.nullcontext():
        outs = completions(model, tok, prompts, budget or spec["budget"], EVAL_BATCH, return_finished=True)
    result = grade_worked([t for t, _ in outs], [f for _, f in outs], chosen)
    result["lengths"] = [len(tok(t, add_special_tokens=False)["input_ids"]) for t, _ in outs]
    write_text(json.dumps(result), path, force=True)
    return result


def verdict(claim: dict, treated: dict, base: dict) -> tuple[str, tuple[float, float, float], bool]:
    """(what was measured, its paired interval, whether the claim holds) for one claim."""
    if claim["measure"] == "length":
        interval = _rel_length(treated, base)
        return "length / baseline's − 1", interval, interval[2] < 0 if claim["direction"] == "-" else interval[1] > 0
    interval = paired_bootstrap(treated["correct"], base["correct"])
    if claim["measure"] == "non-inferior":
        return "accuracy difference", interval, interval[1] > -MARGIN
    holds = interval[1] > 0 if claim["direction"] == "+" else interval[2] < 0
    return "accuracy difference", interval, holds


def main() -> None:
    spec = json.loads(CLAIMS.read_text())
    blocks = [{"stage": "2b, 4", "fixed": spec["fixed"], "claims": spec["claims"]}, *spec.get("later", [])]
    claims = [{**claim, "fixed": block["fixed"]} for block in blocks for claim in block["claims"]]
    results = {}
    for claim in claims:
        for name in (claim["treated"], claim["baseline"]):
            if name not in results:
                results[name] = score(name)
                print(f"{name}: accuracy {results[name]['accuracy']:.3f}")
    lines = [
        "# Second confirmation set (round three, scored once)",
        "",
        f'{len(items())} one-step items from a fresh seed (split "confirm2"), disjoint from train, validation, '
        "test and the first confirmation set. Claims fixed in `experiments/claims2.json` from each stage's test "
        "split before that stage's models were scored here ("
        + "; ".join(f"stage{'s' * (',' in b['stage'])} {b['stage']}: {b['fixed']}" for b in blocks)
        + "; the first block before the set was generated). Models as on test (bf16, greedy); intervals 95% "
        "paired bootstrap over items.",
        "",
        "| claim | measure | treated | baseline | test: difference | difference [95%] | holds |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for claim in claims:
        t, b = results[claim["treated"]], results[claim["baseline"]]
        measure, interval, holds = verdict(claim, t, b)
        rows.append({**claim, "interval": interval, "holds": holds})
        cells = [claim["claim"], measure, f"{claim['treated']} {ci(t['correct'])}",
                 f"{claim['baseline']} {ci(b['correct'])}", signed(claim["test"]) if "test" in claim else "-",
                 signed(interval), "yes" if holds else "no"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    held = sum(r["holds"] for r in rows)
    lines += [
        "",
        f"{held} of {len(rows)} claims hold.",
        "",
        "Reproduce: `.venv/bin/python experiments/confirm2.py`",
        "",
    ]
    write_report("confirmation2", {"claims": rows, "accuracy": {n: r["accuracy"] for n, r in results.items()}}, lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["fix"]:
        fix_claims()
    elif sys.argv[1:2] == ["fix"] and len(sys.argv) == 3 and sys.argv[2] in LATER:
        fix_later(sys.argv[2])
    elif not sys.argv[1:]:
        main()
    else:
        stages = "|".join(LATER)
        raise SystemExit(f"usage: confirm2.py fix [{stages}] (write claims from test) | confirm2.py (score them)")
