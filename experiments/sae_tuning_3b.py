"""Stage 3b: SAE-tuning as Resa released it (Wang et al. 2025), beside stage 3's variant.

Resa's ``scripts/train/sae_tuning.py``, ``sae_tuning.yaml`` and ``preprocess.py``, followed here: the SAE is
trained on the source's block output over question + final answer only (no reasoning trace), in the task's
chat format ("The answer is N." as the assistant turn), on every position (``every_token``: the splice
replaces every token, so the SAE must have learned the first one, an attention sink; an SAE that left it out
moves M0 by 3.5 nats a token when spliced there, against 0.04 when the first token is kept); it is spliced into
the target at every token under ``no_grad``; a LoRA (r 32, α 128) is trained with KL to the adapter-free
target, batch 1, 2 epochs over ``TUNE_ITEMS`` prompts of that same text (``TuneConfig.resa()``); the learning
rate comes from {1e-6, 3e-6, 1e-5} on validation, extended past a winning edge. Source: GRPO-0 (stage 1);
target: M0; block 13 of 30. Departure: ``TUNE_ITEMS`` is 100, not the 1,000 planned (Resa: its whole trigger
set), because a tuning step takes 1.1 s on this machine's two cores (37 minutes a model at 1,000).

Controls, each tuned alike: M0's own SAE on the same text, the prose SAE (stage 3's recipe), and LoRA-SFT on the
same answer-only text without an SAE (its lr on its own grid). Reported: Resa's measure (tuned accuracy as a
share of GRPO-0's) and the share of GRPO-0's gain over M0, each with a paired bootstrap interval, over
``SEEDS`` tuning seeds with t-intervals, and Holm over the comparisons. Evaluated in float32: a LoRA trained at
lr 1e-6 moves weights by less than bf16 can represent.

    .venv/bin/python experiments/sae_tuning_3b.py sae grpo-0   # the source's answer-text SAE (~5 min)
    .venv/bin/python experiments/sae_tuning_3b.py sae m0       # control: M0's answer-text SAE (~5 min)
    .venv/bin/python experiments/sae_tuning_3b.py sae prose    # control: the prose SAE (~5 min)
    .venv/bin/python experiments/sae_tuning_3b.py val          # lr grids (~4 minutes a tuned model; 36 in all)
    .venv/bin/python experiments/sae_tuning_3b.py test SEED    # the frozen lrs: four conditions (~22 min)
    .venv/bin/python experiments/sae_tuning_3b.py test SEED grpo-0 m0   # only these SAEs' conditions
    .venv/bin/python experiments/sae_tuning_3b.py report
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import CACHE, interior_choice, plain, write_report  # noqa: E402
from organisms import RUNS, ci, evaluate, signed, task  # noqa: E402
from sae_tuning import LAYER, SAE, organism  # noqa: E402

import steerkit as sk  # noqa: E402
from steerkit._io import write_text  # noqa: E402
from steerkit.data.corpus import Corpus, load_corpus  # noqa: E402
from steerkit.evals.logits import kl as logit_kl  # noqa: E402
from steerkit.evals.stats import gain_recovered, holm, mcnemar, paired_bootstrap, performance_share, t_interval  # noqa: E402
from steerkit.evals.worked import render  # noqa: E402
from steerkit.sae import load_sae, splice  # noqa: E402
from steerkit.sae.tune import TuneConfig, save_checkpoint  # noqa: E402

TUNE_ITEMS, SEEDS = 100, (0, 1, 2)
LRS = {"kl": (1e-6, 3e-6, 1e-5), "ce": (1e-5, 3e-5, 1e-4)}
MAX_EXTRA = 2  # grid steps added past a winning edge (each a tuned model, about 5 minutes here)
HERE = CACHE / "sae_tuning_3b"
SAES = ("grpo-0", "m0", "prose", "none")  # "none": the LoRA-SFT control
USAGE = "sae_tuning_3b.py sae grpo-0|m0|prose | val | test SEED [grpo-0 m0 prose none] | report"


def answer_texts(tok, items) -> list[tuple[str, str]]:
    """(prompt, "The answer is N." + end of turn) per item: Resa's question + final answer, no trace."""
    spec = task()[0]
    return [(render(tok, it, spec["example"]), f"The answer is {it.answer}." + tok.eos_token) for it in items]


def train_sae(name: str) -> Path:
    """``grpo-0`` / ``m0``: the model's block output over the training questions' answer texts (cycled to
    ``SAE["tokens"]``); ``prose``: the embedded prose corpus, as stage 3."""
    out = HERE / "sae" / name
    if (out / "training_log.json").is_file():
        print(f"{out} exists: delete it to retrain")
        return out
    model, tok = sk.load_model(organism(name), dtype=torch.bfloat16)
    if name == "prose":
        corpus = load_corpus("default")
    else:
        texts = [p + a for p, a in answer_texts(tok, task()[1]["train"])]
        corpus = Corpus(f"answer texts x {len(texts)}", lambda: (t for _ in range(20) for t in texts))
    start = time.perf_counter()
    sk.train_sae(model, tok, corpus, LAYER, out=out, force=True, **SAE, every_token=True)
    write_text(json.dumps({"seconds": time.perf_counter() - start}), out.with_suffix(".json"), force=True)
    return out


def splice_kl(names=("grpo-0", "m0", "prose"), n: int = 50) -> dict:
    """Per SAE, KL(M0 ‖ M0 with the SAE spliced at every token) in nats a token over ``n`` validation answer
    texts: how far the splice that tuning starts from moves the target (cached in ``kl.json``)."""
    path = HERE / "kl.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tok = sk.load_model("smollm2-135m-instruct")
    ids = [tok(p + a, return_tensors="pt")["input_ids"] for p, a in answer_texts(tok, task()[1]["val"][:n])]

    def logps() -> list[torch.Tensor]:
        with torch.no_grad():
            return [torch.log_softmax(model(x).logits.float(), -1) for x in ids]

    base, kl = logps(), {}
    for name in names:
        with splice(model, load_sae(HERE / "sae" / name), LAYER, skip_first=False, max_norm=float("inf")):
            spliced = logps()
        kl[name] = float(sum(logit_kl(b[0], q[0]).mean() for b, q in zip(base, spliced, strict=True)) / n)
    write_text(json.dumps(kl), path, force=True)
    return kl


def name_of(sae: str | None, loss: str, lr: float, seed: int) -> str:
    return f"3b-{sae or 'none'}-{loss}-lr{lr:g}-s{seed}"


def tuned(sae: str | None, loss: str, lr: float, split: str, seed: int = 0) -> dict:
    """Accuracy on ``split`` of M0 tuned with Resa's recipe (``sae`` None: LoRA-SFT), merged, SAE removed."""
    name = name_of(sae, loss, lr, seed)
    path = CACHE / "eval" / f"{name}-{split}.json"
    if path.is_file():
        return json.loads(path.read_text())
    spec, splits, _ = task()
    saved = HERE / "models" / name
    if saved.is_dir():
        model, tok = sk.load_model(saved)
    else:
        m0, tok = sk.load_model("smollm2-135m-instruct")
        data = answer_texts(tok, splits["train"][:TUNE_ITEMS])
        config = TuneConfig.resa(loss=loss, lr=lr, seed=seed, autocast=True)
        start = time.perf_counter()
        model = sk.sae_tune(m0, tok, None if sae is None else HERE / "sae" / sae, LAYER, data, merge=True,
                            config=config)  # fmt: skip
        save_checkpoint(model, tok, saved, force=True)
        log = {"seconds": time.perf_counter() - start, "history": model.history}
        write_text(json.dumps(log), HERE / "runs" / f"{name}.json", force=True)
    return evaluate(name, model, tok, splits[split], split, spec["example"], spec["budget"])


def choose_lr() -> dict:
    """Per loss, the validation accuracy at each lr (grid extended past a winning edge); frozen at first call."""
    path = HERE / "lr.json"
    if path.is_file():
        return json.loads(path.read_text())
    choice = {}
    for loss, sae in (("kl", "grpo-0"), ("ce", None)):
        best, scores, interior = interior_choice(lambda lr, s=sae, lo=loss: tuned(s, lo, lr, "val")["accuracy"],
                                                 LRS[loss], geometric=True, max_extra=MAX_EXTRA)  # fmt: skip
        choice[loss] = {"lr": best, "interior": interior, "val": {f"{lr:g}": a for lr, a in scores.items()}}
    write_text(json.dumps(choice, indent=1), path, force=True)
    return choice


CONDITIONS = {  # label -> (SAE, loss)
    "SAE-tuned, GRPO-0 SAE (Resa as released)": ("grpo-0", "kl"),
    "control: SAE-tuned, M0 SAE": ("m0", "kl"),
    "control: SAE-tuned, prose SAE": ("prose", "kl"),
    "control: LoRA-SFT on the answer text, no SAE": (None, "ce"),
}


def test(seed: int, only: list[str]) -> None:
    """The conditions at ``seed`` (those whose SAE is in ``only``, "none" for LoRA-SFT, when given)."""
    lrs = choose_lr()
    for sae, loss in CONDITIONS.values():
        if only and (sae or "none") not in only:
            continue
        r = tuned(sae, loss, lrs[loss]["lr"], "test", seed)
        print(f"{name_of(sae, loss, lrs[loss]['lr'], seed)}: test {r['accuracy']:.3f}")


def reference(name: str, source) -> dict:
    """M0 or GRPO-0 on test, float32 (cached as ``3b32-{name}``)."""
    spec, splits, _ = task()
    path = CACHE / "eval" / f"3b32-{name}-test.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tok = sk.load_model(source)
    return evaluate(f"3b32-{name}", model, tok, splits["test"], "test", spec["example"], spec["budget"])


def report() -> None:
    lrs, kl = choose_lr(), splice_kl()
    m0 = reference("m0", "smollm2-135m-instruct")
    grpo = reference("grpo-0", RUNS / "grpo-0" / "model")
    rows, p_values, names = {}, [], []
    for label, (sae, loss) in CONDITIONS.items():
        seeds = [s for s in SEEDS if (CACHE / "eval" / f"{name_of(sae, loss, lrs[loss]['lr'], s)}-test.json").is_file()]
        runs = [tuned(sae, loss, lrs[loss]["lr"], "test", s) for s in seeds]
        per_seed = [{"accuracy": r["accuracy"], "share": performance_share(r["correct"], grpo["correct"]),
                     "gain": gain_recovered(r["correct"], m0["correct"], grpo["correct"]),
                     "minus_m0": paired_bootstrap(r["correct"], m0["correct"]),
                     "p": mcnemar(r["correct"], m0["correct"])} for r in runs]  # fmt: skip
        rows[label] = {"seeds": seeds, "runs": per_seed}
        p_values += [r["p"] for r in per_seed]
        names += [(label, k) for k in range(len(per_seed))]
    adjusted = holm(p_values)
    for (label, k), q in zip(names, adjusted, strict=True):
        rows[label]["runs"][k]["holm"] = q
    lines = [
        "# Stage 3b: SAE-tuning as Resa released it",
        "",
        "Paper (Wang et al. 2025, Resa): an SAE on a lightly RL-trained source, spliced frozen into the target "
        "while a LoRA learns with KL to the adapter-free target; the tuned target reaches over 97% of the RL "
        "model's accuracy (a share of its *performance*).",
        f"Here: source GRPO-0, target M0, block {LAYER}; SAEs as stage 3's (TopK k 32, d_sae 4608, "
        f'{SAE["tokens"]:,} tokens) on question + "The answer is N." text (prose for the prose control); '
        f"TuneConfig.resa(): every token spliced under no_grad, LoRA r 32 / α 128, batch 1, 2 epochs over "
        f"{TUNE_ITEMS} answer texts (Resa: its whole trigger set). Each SAE spliced into M0 at every token moves "
        "it by " + ", ".join(f"{name} {v:.3f}" for name, v in kl.items()) + " nats a token (KL on 50 validation "
        "answer texts). lr on validation (grid extended past a winning edge): "
        + "; ".join(
            f"{loss} {c['lr']:g} ({'interior' if c['interior'] else 'edge'}; "
            + ", ".join(f"{lr}: {a:.3f}" for lr, a in c["val"].items())
            + ")"
            for loss, c in lrs.items()
        )
        + ".",
        f"Test (1000 items, float32): M0 {ci(m0['correct'])}, GRPO-0 {ci(grpo['correct'])}. Per seed: accuracy, "
        "Resa's share of GRPO-0's accuracy, the share of its gain over M0 (95% paired bootstrap), McNemar p "
        f"against M0 and Holm over the {len(p_values)} runs; over seeds, the mean with its t-interval.",
        "",
        "| condition | seed | accuracy | − M0 | of GRPO-0's accuracy (Resa) | of GRPO-0's gain | Holm p |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        for s, r in zip(row["seeds"], row["runs"], strict=True):
            lines.append(f"| {label} | {s} | {r['accuracy']:.3f} | {signed(r['minus_m0'])} | {plain(r['share'])} "
                         f"| {signed(r['gain'])} | {r['holm']:.2g} |")  # fmt: skip
        if len(row["runs"]) > 1:
            share = t_interval([r["share"][0] for r in row["runs"]])
            gain = t_interval([r["gain"][0] for r in row["runs"]])
            lines.append(f"| {label} | mean of {len(row['runs'])} | - | - | {plain(share)} | {signed(gain)} | - |")
    lines += ["", "Reproduce: `.venv/bin/python experiments/sae_tuning_3b.py sae grpo-0`, `sae m0`, `sae prose`, "
              "`val`, `test SEED` for each seed, `report`.", ""]  # fmt: skip
    data = {"lr": lrs, "splice_kl": kl, "m0": m0["accuracy"], "grpo": grpo["accuracy"], "rows": rows}
    write_report("sae_tuning_3b", data, lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["sae"] and len(args) == 2 and args[1] in ("grpo-0", "m0", "prose"):
        train_sae(args[1])
    elif args == ["val"]:
        choose_lr()
    elif args[:1] == ["test"] and len(args) >= 2 and args[1].isdigit() and set(args[2:]) <= set(SAES):
        test(int(args[1]), args[2:])
    elif args == ["report"]:
        report()
    else:
        raise SystemExit(f"usage: {USAGE}")
