"""Stage 3: SAE-tuning (Resa, Wang et al. 2025) from a GRPO organism into M0.

Source: the stage-1 GRPO organism of a seed; target: M0, the start it was trained from (Resa's target is the
base its source came from). Block 13 of 30 (45% of the depth, Resa's choice), fixed in advance.

SAEs, all trained alike (``SAE``): TopK, k = 32, d_sae = 4608, ``SAE_TOKENS`` tokens from the model in bf16,
dead window 100k tokens, on the embedded prose corpus with a task text after every ``TASK_EVERY`` documents: a
training prompt followed by the model's own solution (the first 480 training questions, two samples each at
T = 0.8). Three of them:
    grpo-SEED  the GRPO organism with its own samples: the SAE that carries the source's features
    m0         M0 with M0's own samples (control: the source, or any SAE trained on the task?)
    prose      M0 on prose alone (control: bench/sae_quality.py's recipe at this stage's budget)

SAE-tuning (``sk.sae_tune``, Resa's KL recipe): the frozen SAE spliced into M0 at block 13, LoRA (r 32, α 128,
every linear layer), 2 epochs, batch 8, loss KL(M0 ‖ M0 + SAE + LoRA) over the first ``TUNE_ITEMS`` training
prompts with their gold worked solutions, no labels; the LoRA is then merged and the SAE removed. Control
without an SAE: LoRA-SFT, cross-entropy on the same gold solutions, same adapter. Each loss's lr is chosen on
validation from ``LRS`` (seed 0; the KL recipe with the GRPO SAE) and frozen in ``.cache/sae_tuning/lr.json``
before any test run; the SAE controls use the KL lr. Fidelity is measured where the SAE is used: each validation
prompt with its gold solution as its own row, in the organism and in M0.

    .venv/bin/python experiments/sae_tuning.py samples SEED  # the GRPO organism's own solutions (minutes)
    .venv/bin/python experiments/sae_tuning.py sae NAME      # grpo-SEED | m0 | prose (about 10 minutes each)
    .venv/bin/python experiments/sae_tuning.py fidelity      # every SAE trained so far, in the organism and M0
    .venv/bin/python experiments/sae_tuning.py val           # the lr choice on validation
    .venv/bin/python experiments/sae_tuning.py test SEED     # frozen lrs: the tuned model and controls on test
    .venv/bin/python experiments/sae_tuning.py report
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from common import ARTIFACTS, CACHE, mean_sd, write_report  # noqa: E402
from organisms import RUNS, ci, evaluate, signed, task  # noqa: E402
from reasoning_vector import load  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.data.corpus import Corpus, load_corpus  # noqa: E402
from steerkit.evals.stats import gain_recovered, mcnemar, paired_bootstrap  # noqa: E402
from steerkit.evals.worked import render  # noqa: E402
from steerkit.sae.splice import splice  # noqa: E402
from steerkit.sae.tune import save_checkpoint  # noqa: E402
from steerkit.steer import completions  # noqa: E402

LAYER, SAE_TOKENS, TASK_EVERY = 13, 1_000_000, 2
SAE = dict(arch="topk", d_sae=8 * 576, k=32, tokens=SAE_TOKENS, dead_window=100_000, autocast=True)
N_QUESTIONS, SAMPLES, TEMPERATURE = 480, 2, 0.8
LRS = {"kl": (1e-5, 1e-4, 5e-4), "ce": (1e-4, 5e-4)}  # kl's 1e-5 added after 1e-4 fell to 0.03 on validation
TUNE_ITEMS, TUNE = 512, dict(epochs=2, batch_size=8, autocast=True, merge=True)  # 128 steps, ~8 min here
HERE = CACHE / "sae_tuning"
USAGE = "sae_tuning.py samples SEED | sae grpo-SEED|m0|prose | fidelity | val | test SEED | report"


def organism(name: str) -> Path | str:
    return "smollm2-135m-instruct" if name in ("m0", "prose") else RUNS / name / "model"


def own_texts(name: str, tok) -> list[str]:
    """Training prompts followed by the model's own sampled solutions (``name`` = m0 or grpo-SEED), cached."""
    spec, splits, _ = task()
    items = splits["train"][:N_QUESTIONS]
    path = HERE / f"samples-{name}.json"
    if name == "m0":  # stage 4 sampled M0 already: its first SAMPLES solutions per question
        rows = json.loads((CACHE / "own" / "samples.json").read_text())
        solutions = [row["texts"][:SAMPLES] for row in rows[:N_QUESTIONS]]
    elif path.is_file():
        solutions = json.loads(path.read_text())
    else:
        model = sk.load_model(organism(name))[0]
        torch.manual_seed(int(name.split("-")[1]))
        prompts = [render(tok, it, spec["example"]) for it in items]
        gen = {"do_sample": True, "temperature": TEMPERATURE, "top_p": 1.0, "num_return_sequences": SAMPLES}
        outs = completions(model, tok, prompts, spec["budget"], 64 // SAMPLES, **gen)
        solutions = [outs[q * SAMPLES : (q + 1) * SAMPLES] for q in range(len(items))]
        write_text(json.dumps(solutions), path, force=True)
    return [render(tok, it, spec["example"]) + s for it, sols in zip(items, solutions, strict=True) for s in sols]


def sae_corpus(texts: list[str]) -> Corpus:
    """The embedded prose corpus with one of ``texts`` (cycled) after every ``TASK_EVERY`` documents."""
    prose = load_corpus("default")
    if not texts:
        return prose

    def documents():
        cycle = itertools.cycle(texts)
        for i, doc in enumerate(prose.documents("train")):
            yield doc
            if i % TASK_EVERY == TASK_EVERY - 1:
                yield next(cycle)

    return Corpus(f"prose + {len(texts)} task texts", documents)


def train_sae(name: str) -> Path:
    out = HERE / "sae" / name
    if (out / "training_log.json").is_file():
        print(f"{out} exists: delete it to retrain")
        return out
    model, tok = sk.load_model(organism(name), dtype=torch.bfloat16)
    texts = [] if name == "prose" else own_texts(name, tok)
    start = time.perf_counter()
    sk.train_sae(model, tok, sae_corpus(texts), LAYER, out=out, force=True, **SAE)
    seconds = time.perf_counter() - start
    fraction = task_fraction(tok, texts)
    write_text(json.dumps({"seconds": seconds, "task_token_fraction": fraction}), out.with_suffix(".json"), force=True)
    print(f"SAE {name}: {seconds / 60:.1f} min, task text {fraction:.1%} of the tokens")
    return out


def task_fraction(tok, texts: list[str]) -> float:
    """Share of task-text tokens in the corpus' first ``SAE_TOKENS`` tokens."""
    if not texts:
        return 0.0
    known, counts, total = set(texts), [0, 0], 0
    for doc in sae_corpus(texts).documents("train"):
        n = len(tok(doc, add_special_tokens=False)["input_ids"]) + 1
        counts[doc in known] += n
        total += n
        if total >= SAE_TOKENS:
            break
    return counts[1] / total


def val_texts(tok) -> list[str]:
    spec, splits, _ = task()
    return [render(tok, it, spec["example"]) + it.meta["solution"] for it in splits["val"]]


def hosts(sae: str) -> tuple[str, str]:
    """Where an SAE's fidelity is measured: its GRPO organism (GRPO-0 for the M0 and prose SAEs), then M0."""
    return (sae if sae.startswith("grpo-") else "grpo-0", "m0")


def fidelity() -> dict:
    """Each SAE's metrics on the validation prompts + gold solutions (one row each), in its ``hosts``."""
    path = HERE / "fidelity.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    saes = sorted(p.name for p in (HERE / "sae").glob("*") if (p / "training_log.json").is_file())
    todo = [(host, name) for name in saes for host in hosts(name) if f"{name} in {host}" not in result]
    for host in sorted({host for host, _ in todo}):
        model, tok = sk.load_model(organism(host))
        texts = val_texts(tok)
        for name in [name for h, name in todo if h == host]:
            metrics = sk.evaluate_sae(model, tok, HERE / "sae" / name, LAYER, texts=texts)
            metrics.pop("latent_frequency")
            result[f"{name} in {host}"] = metrics
            write_text(json.dumps(result, indent=1), path, force=True)
            print(f"{name} in {host}: EV {metrics['explained_variance']:.3f}, KL {metrics['kl_spliced']:.3f}")
    return result


def run_name(sae: str | None, loss: str, lr: float, seed: int) -> str:
    """The cache name of one tuned model (``loss`` "splice": M0 with ``sae`` spliced in, nothing trained)."""
    return f"splice-{sae}" if loss == "splice" else f"st-{sae or 'none'}-{loss}-lr{lr:g}-s{seed}"


def tuned(sae: str | None, loss: str, lr: float, split: str, seed: int = 0) -> dict:
    """Accuracy on ``split`` of M0 SAE-tuned with ``sae`` (None: LoRA-SFT), cached with the training log."""
    name = run_name(sae, loss, lr, seed)
    spec, splits, _ = task()
    saved = HERE / "models" / name
    if load(name, split) is None:
        if saved.is_dir():
            model, tok = sk.load_model(saved)
        else:
            m0, tok = sk.load_model("smollm2-135m-instruct")
            items = splits["train"][:TUNE_ITEMS]
            data = [(render(tok, it, spec["example"]), it.meta["solution"] + tok.eos_token) for it in items]
            start = time.perf_counter()
            path = None if sae is None else HERE / "sae" / sae
            model = sk.sae_tune(m0, tok, path, LAYER, data, loss=loss, lr=lr, seed=seed, **TUNE)
            log = {"seconds": time.perf_counter() - start, "history": model.history}
            save_checkpoint(model, tok, saved, force=True)
            write_text(json.dumps(log), HERE / "runs" / f"{name}.json", force=True)
        evaluate(name, model, tok, splits[split], split, spec["example"], spec["budget"])
    return load(name, split) | {"name": name}


def choose_lr() -> dict:
    """Validation accuracy at each lr for the KL recipe (GRPO-0's SAE) and for LoRA-SFT; frozen at first call."""
    path = HERE / "lr.json"
    if path.is_file():
        return json.loads(path.read_text())
    table = {"kl": {f"{lr:g}": tuned("grpo-0", "kl", lr, "val")["accuracy"] for lr in LRS["kl"]}}
    table["ce"] = {f"{lr:g}": tuned(None, "ce", lr, "val")["accuracy"] for lr in LRS["ce"]}
    choice = {loss: float(max(accs, key=accs.get)) for loss, accs in table.items()} | {"val": table}
    write_text(json.dumps(choice, indent=1), path, force=True)
    print(f"frozen: {choice}")
    return choice


def spliced(sae: str, split: str) -> dict:
    """Accuracy on ``split`` of M0 with ``sae`` spliced in at ``LAYER`` and nothing trained (cached)."""
    spec, splits, _ = task()
    name = run_name(sae, "splice", 0.0, 0)
    if load(name, split) is None:
        m0, tok = sk.load_model("smollm2-135m-instruct")
        with splice(m0, HERE / "sae" / sae, LAYER):
            evaluate(name, m0, tok, splits[split], split, spec["example"], spec["budget"])
    return load(name, split) | {"name": name}


def conditions(seed: int) -> dict[str, tuple[str | None, str]]:
    """Label -> (SAE, loss); loss "splice" is M0 with the SAE spliced in and nothing trained."""
    return {
        f"M0 + GRPO-{seed} SAE spliced, no tuning": (f"grpo-{seed}", "splice"),
        "M0 + M0 SAE spliced, no tuning (control)": ("m0", "splice"),
        f"SAE-tuned, GRPO-{seed} SAE": (f"grpo-{seed}", "kl"),
        "SAE-tuned, M0 SAE (control)": ("m0", "kl"),
        "LoRA-SFT, no SAE (control)": (None, "ce"),
        "SAE-tuned, prose SAE (control)": ("prose", "kl"),
    }


def test(seed: int) -> None:
    lrs = choose_lr()
    for sae, loss in conditions(seed).values():
        if loss == "splice":
            spliced(sae, "val")
            result = spliced(sae, "test")
        else:
            result = tuned(sae, loss, lrs[loss], "test", seed)
        print(f"{result['name']}: test {result['accuracy']:.3f}")


def report() -> None:
    lrs = choose_lr()
    fid = fidelity()
    m0, m0_val = load("m0", "test"), load("m0", "val")
    seeds = sorted(int(p.name.split("-")[1]) for p in (HERE / "sae").glob("grpo-*") if p.is_dir())
    lines = [
        "# Stage 3: SAE-tuning (Resa) from the GRPO organism into M0",
        "",
        "Paper (Wang et al. 2025, Resa): an SAE trained on a lightly GRPO-trained source, spliced frozen into the "
        "target (R1-Distill-Qwen-1.5B) while LoRA is trained with KL to the target itself, recovers most of the "
        "source's reasoning gain (AIME/AMC/MATH) for about $1 of compute.",
        f"Here: source = the stage-1 GRPO organism, target = M0, block {LAYER} of 30. SAEs: TopK k = 32, "
        f"d_sae = 4608, {SAE_TOKENS:,} tokens (prose with a task text after every {TASK_EVERY} documents), dead window "
        f"100k. KL recipe: LoRA r 32 / α 128 on every linear layer, 2 epochs, batch 8, on {TUNE_ITEMS} training "
        "prompts with gold solutions; merged, SAE removed. "
        f"lr chosen on validation: KL {lrs['kl']:g}, LoRA-SFT {lrs['ce']:g} (table below), frozen before test.",
        "Intervals: 95% bootstrap over the 1000 test items; differences to M0 paired on items, McNemar p; "
        "'of GRPO's gain' = (tuned − M0) / (GRPO − M0) on the same items.",
        "",
        "## SAEs",
        "",
        "| SAE | minutes | task tokens | train EV (last) | dead (last) | EV / KL spliced / CE rec. in its GRPO "
        "organism (GRPO-0 for m0, prose) | EV / KL spliced / CE rec. in M0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(p.name for p in (HERE / "sae").glob("*") if (p / "training_log.json").is_file()):
        last = json.loads((HERE / "sae" / name / "training_log.json").read_text())[-1]
        meta = json.loads((HERE / "sae" / f"{name}.json").read_text())
        cells = [
            f"{m['explained_variance']:.3f} / {m['kl_spliced']:.3f} / {m['ce_loss_recovered']:.3f}"
            for m in (fid[f"{name} in {host}"] for host in hosts(name))
        ]
        lines.append(
            f"| {name} | {meta['seconds'] / 60:.1f} | {meta['task_token_fraction']:.1%} | "
            f"{last['explained_variance']:.3f} | {last['dead_fraction']:.3f} | {cells[0]} | {cells[1]} |"
        )
    lines += ["", "## lr on validation (seed 0)", "", "| loss | validation accuracy by lr | chosen |", "|---|---|---|"]
    for loss, accs in lrs["val"].items():
        lines.append(f"| {loss} | " + ", ".join(f"{lr}: {a:.3f}" for lr, a in accs.items()) + f" | {lrs[loss]:g} |")
    lines.append(f"\nM0 on validation: {m0_val['accuracy']:.3f}.")
    for sae in ("grpo-0", "m0"):
        if (r := load(f"splice-{sae}", "val")) is not None:
            lines.append(f"M0 with the {sae} SAE spliced in, no tuning: {r['accuracy']:.3f}.")
    data: dict = {"lr": lrs, "fidelity": fid, "seeds": {}}
    bars = []
    for seed in seeds:
        grpo = load(f"grpo-{seed}", "test")
        lines += [
            "",
            f"## Test, seed {seed}",
            "",
            "| model | test (1000) | − M0 (paired) | McNemar p | of GRPO's gain | truncated |",
            "|---|---|---|---|---|---|",
            f"| M0 | {ci(m0['correct'])} | - | - | 0 | {m0['truncated']:.3f} |",
            f"| GRPO-{seed} (source) | {ci(grpo['correct'])} | "
            f"{signed(paired_bootstrap(grpo['correct'], m0['correct']))} | "
            f"{mcnemar(grpo['correct'], m0['correct']):.2g} | 1 | {grpo['truncated']:.3f} |",
        ]
        rows = {}
        for label, (sae, loss) in conditions(seed).items():
            r = load(run_name(sae, loss, lrs.get(loss, 0.0), seed), "test")
            if r is None:
                lines.append(f"| {label} | not run | | | | |")
                continue
            diff = paired_bootstrap(r["correct"], m0["correct"])
            frac = gain_recovered(r["correct"], m0["correct"], grpo["correct"])
            rows[label] = {"accuracy": r["accuracy"], "minus_m0": diff, "gain_recovered": frac,
                           "mcnemar_p": mcnemar(r["correct"], m0["correct"]), "truncated": r["truncated"]}  # fmt: skip
            lines.append(
                f"| {label} | {ci(r['correct'])} | {signed(diff)} | {rows[label]['mcnemar_p']:.2g} | "
                f"{signed(frac)} | {r['truncated']:.3f} |"
            )
            bars.append((f"{label.split(' (')[0]}\nseed {seed}", seed, diff))
        data["seeds"][seed] = rows
    if len(seeds) > 1:
        lines += ["", f"## Over seeds {seeds}", "", "| condition | runs | − M0, mean ± s.d. | of GRPO's gain, "
                  "mean ± s.d. |", "|---|---|---|---|"]  # fmt: skip
        for i, label in enumerate(conditions(seeds[0])):
            done = []  # (result, run name) of this condition in each seed that ran it
            for s in seeds:
                lab, (sae, loss) = list(conditions(s).items())[i]
                if lab in data["seeds"][s]:
                    done.append((data["seeds"][s][lab], run_name(sae, loss, lrs.get(loss, 0.0), s)))
            if len(done) < 2:
                continue
            one_model = len({name for _, name in done}) == 1
            cells = [
                label.replace(f"GRPO-{seeds[0]}", "GRPO-seed"),
                "1 model for every seed" if one_model else str(len(done)),
                f"{done[0][0]['minus_m0'][0]:+.3f}" if one_model else mean_sd(r["minus_m0"][0] for r, _ in done),
                mean_sd((r["gain_recovered"][0] for r, _ in done), "+.2f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.32 * len(bars)))
    for i, (_, seed, (mean, low, high)) in enumerate(bars):
        ax.errorbar(mean, i, xerr=[[mean - low], [high - mean]], fmt="o", color=f"C{seeds.index(seed)}", capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set(xlabel="test accuracy − M0 (paired, 95% bootstrap)", title="SAE-tuning into M0 and its controls")
    fig.tight_layout()
    fig.savefig(ARTIFACTS / "sae_tuning.png", dpi=120)
    write_report("sae_tuning", data, lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["samples"] and len(args) == 2 and args[1].isdigit():
        print(len(own_texts(f"grpo-{args[1]}", sk.load_model("smollm2-135m-instruct")[1])), "texts")
    elif args[:1] == ["sae"] and len(args) == 2:
        train_sae(args[1])
    elif args == ["fidelity"]:
        fidelity()
    elif args == ["val"]:
        choose_lr()
    elif args[:1] == ["test"] and len(args) == 2 and args[1].isdigit():
        test(int(args[1]))
    elif args == ["report"]:
        report()
    else:
        raise SystemExit(f"usage: {USAGE}")
