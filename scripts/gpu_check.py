"""One command for a lent GPU: steerkit's pieces on the device, checked against the CPU, and timed at 1B scale.

    python scripts/gpu_check.py                        # on a GPU: a ~1.1B random-weight Llama in bf16 (minutes)
    python scripts/gpu_check.py --small --device cpu   # what the test suite runs (seconds), so this cannot rot

Each check runs one computation twice on a small random Llama: on the device in bfloat16 and on the CPU in
float32, and compares them within the tolerance in the table (bf16 rounding, not bugs, sets it). Without
``--small`` a ~1.1B-parameter Llama built from a config on the device adds timings: capture, extract,
greedy generation steered vs unsteered at batch 1 and 32, SAE training against the activation-generation
floor (a plain forward of the same blocks), evaluation, SAE-tuning steps, and a bake followed by a reload.
Nothing is downloaded: weights are random, the tokenizer is byte-level and built here, the corpus is the
embedded one (Python's own docstrings).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

import steerkit as sk  # noqa: E402

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
BIG = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
)
TEXTS = [
    "The committee met on Tuesday to discuss the budget for next year.",
    "A small boat drifted slowly across the quiet lake at dawn.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "She finished the marathon in just under four hours.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain is expected across the north of the country tonight.",
    "He fixed the bicycle chain with a borrowed pair of pliers.",
    "Prime numbers have exactly two distinct positive divisors.",
]


def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + end-of-text) built in memory: no download, any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|end|>"] = len(vocab)
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|end|>", pad_token="<|end|>")


def llama(shape: dict, vocab: int, seed: int = 0, device="cpu", dtype=torch.float32):
    """A Llama with random weights from ``shape``, built (and initialised) directly on ``device``."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def relative(a, b) -> float:
    a, b = torch.as_tensor(a).float().cpu(), torch.as_tensor(b).float().cpu()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, check: str, measure: str, value: float, limit: float, higher_is_ok: bool = False, big: str = ""):
        ok = value >= limit if higher_is_ok else value <= limit
        sign = ">=" if higher_is_ok else "<="
        self.rows.append((check, f"{measure} {value:.2e}", f"{sign} {limit:g}", "ok" if ok else "FAIL", big))

    def print(self, title: str) -> bool:
        header = ("check", "device vs CPU (small model)", "tolerance", "", "large model")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(5)]
        print(f"\n{title}\n")
        for row in [header, tuple("-" * w for w in widths), *self.rows]:
            print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        return all(r[3] == "ok" for r in self.rows)


def small_checks(device: torch.device, tok, corpus, table: Table, work: Path) -> dict:
    """Every check on a small model: device bf16 against CPU float32."""
    cpu = llama(SMALL, len(tok))
    dev = copy.deepcopy(cpu).to(device=device, dtype=torch.bfloat16)
    layers, pairs = [1, 3], sk.load_pairs("sentiment")[:24]
    table.add("capture", "max rel. error", relative(*(sk.capture(m, tok, TEXTS, layers) for m in (cpu, dev))), 5e-2)
    vecs = [sk.extract(m, tok, pairs, layers=layers) for m in (cpu, dev)]
    table.add("extract", "min cosine", min(vecs[0].cosine(vecs[1]).values()), 0.98, higher_is_ok=True)
    vec = vecs[0].select([1])
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True)
    real = ids[
        "attention_mask"
    ].bool()  # padding is never steered by hooks; a baked bias reaches it: compare real tokens
    logits = []
    for m in (cpu, dev):
        with torch.no_grad(), sk.steer(m, vec, alpha=1.0):
            logits.append(m(**{k: v.to(m.device) for k, v in ids.items()}).logits)
    table.add("steer", "max rel. error", relative(logits[0][real], logits[1][real]), 5e-2)
    settings = dict(d_sae=256, k=8, tokens=8192, ctx_len=64, batch_size=256, buffer_tokens=2048, progress=False)
    saes = [sk.train_sae(m, tok, corpus, 2, **settings) for m in (cpu, dev)]
    ev = [s.training_log[-1]["explained_variance"] for s in saes]
    table.add("train_sae", "abs. Δ explained variance", abs(ev[0] - ev[1]), 0.05)
    scores = [sk.evaluate_sae(m, tok, saes[0], 2, corpus, tokens=2048, progress=False) for m in (cpu, dev)]
    table.add(
        "evaluate_sae",
        "abs. Δ CE recovered",
        abs(scores[0]["ce_loss_recovered"] - scores[1]["ce_loss_recovered"]),
        0.05,
    )
    spliced = []
    for m in (cpu, dev):
        with torch.no_grad(), sk.splice(m, saes[0], 2):
            spliced.append(m(**{k: v.to(m.device) for k, v in ids.items()}).logits)
    table.add(
        "splice", "max rel. error", relative(spliced[0][real], spliced[1][real]), 0.1
    )  # through the SAE bottleneck
    losses = [
        sk.sae_tune(m, tok, saes[0], 2, TEXTS, epochs=1, batch_size=4, lr=1e-3, progress=False).history
        for m in (cpu, dev)
    ]
    table.add(
        "sae_tune", "first-step loss rel. error", abs(losses[0][0] - losses[1][0]) / max(losses[0][0], 1e-12), 0.1
    )
    cpu.save_pretrained(work / "small")
    tok.save_pretrained(work / "small")
    baked = sk.bake(work / "small", vec, 1.0, work / "small-baked")
    reloaded = AutoModelForCausalLM.from_pretrained(baked, dtype=torch.bfloat16, device_map=str(device)).eval()
    with torch.no_grad():
        got = reloaded(**{k: v.to(device) for k, v in ids.items()}).logits
    table.add("bake + reload", "max rel. error vs hooks", relative(logits[1][real], got[real]), 5e-2)
    return {"sae": saes[0], "vector": vec}


def big_checks(device: torch.device, tok, corpus, table: Table, work: Path, sae_tokens: int) -> None:
    """Timings on a ~1.1B Llama in bf16 on the device, written into the table's last column."""
    model = llama(BIG, 32000, device=device, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    texts = [t + " " + u for t in TEXTS for u in TEXTS] * 4  # 256 texts of ~130 tokens
    layer = BIG["num_hidden_layers"] // 2
    sk.capture(model, tok, texts[:32], [layer], batch_size=32)  # warm-up: CUDA context, kernels, allocator
    seconds, _ = timed(lambda: sk.capture(model, tok, texts, [layer], batch_size=32), device)
    n_tokens = sum(len(ids) for ids in tok(texts)["input_ids"])
    rows = {r[0]: i for i, r in enumerate(table.rows)}

    def note(check: str, text: str) -> None:
        row = table.rows[rows[check]]
        table.rows[rows[check]] = (*row[:4], text)

    note("capture", f"{n_tokens / seconds:,.0f} tok/s ({params:.2f}B params)")
    seconds, vec = timed(lambda: sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[layer]), device)
    note("extract", f"{seconds:.1f} s, 70 pairs")
    gen: dict[tuple[int, bool], list[float]] = {}
    for _ in range(3):  # interleaved rounds after a warm-up round at each batch size; the median is reported
        for batch in (1, 32):
            prompts = (TEXTS * 4)[:batch]
            for steered in (False, True):
                context = sk.steer(model, vec, alpha=1.0) if steered else torch.no_grad()
                with context:
                    run = lambda p=prompts, b=batch: sk.generate(  # noqa: E731
                        model, tok, p, max_new_tokens=32, min_new_tokens=32, chat=False, batch_size=b
                    )
                    if (batch, steered) not in gen:
                        run()
                        gen[batch, steered] = []
                    seconds, _ = timed(run, device)
                gen[batch, steered].append(batch * 32 / seconds)
    gen = {key: sorted(rates)[1] for key, rates in gen.items()}
    ratios = {b: gen[b, True] / gen[b, False] for b in (1, 32)}
    note(
        "steer",
        "; ".join(f"batch {b}: {gen[b, True]:,.0f} vs {gen[b, False]:,.0f} tok/s ({ratios[b]:.2f}x)" for b in (1, 32)),
    )
    settings = dict(d_sae=16384, k=32, tokens=sae_tokens, ctx_len=128, batch_size=4096, model_batch=32, progress=False)
    seconds, sae = timed(lambda: sk.train_sae(model, tok, corpus, layer, autocast=True, **settings), device)
    batches = [b for _, b in zip(range(8), corpus.batches(tok, 128, 32), strict=False)]
    inner, full = model.model, model.model.layers

    def floor():
        inner.layers = torch.nn.ModuleList(full[: layer + 1])
        try:
            with torch.no_grad():
                for b in batches:
                    inner(input_ids=b.to(device), use_cache=False)
        finally:
            inner.layers = full

    floor_seconds, _ = timed(floor, device)
    floor_rate = 8 * 32 * 127 / floor_seconds
    note("train_sae", f"{sae_tokens / seconds:,.0f} tok/s training; forward floor {floor_rate:,.0f} tok/s")
    seconds, _ = timed(lambda: sk.evaluate_sae(model, tok, sae, layer, corpus, tokens=32768, progress=False), device)
    note("evaluate_sae", f"{32768 / seconds:,.0f} tok/s")
    tune = lambda: sk.sae_tune(model, tok, sae, layer, TEXTS * 4, epochs=1, batch_size=8, progress=False)  # noqa: E731
    seconds, _ = timed(tune, device)
    note("sae_tune", f"{seconds / 4:.2f} s per step (batch 8)")
    model.save_pretrained(work / "big")
    tok.save_pretrained(work / "big")
    seconds, baked = timed(lambda: sk.bake(work / "big", vec, 1.0, work / "big-baked"), device)
    reloaded = AutoModelForCausalLM.from_pretrained(baked, dtype=torch.bfloat16, device_map=str(device)).eval()
    ids = tok(TEXTS[:2], return_tensors="pt", padding=True).to(device)
    with torch.no_grad(), sk.steer(model, vec, alpha=1.0):
        hooked = model(**ids).logits
    with torch.no_grad():
        real = ids["attention_mask"].bool()
        error = relative(hooked[real], reloaded(**ids).logits[real])
    note("bake + reload", f"bake {seconds:.0f} s; baked vs hooks rel. error {error:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="only the small-model checks (seconds on a CPU)")
    parser.add_argument("--sae-tokens", type=int, default=1_048_576, help="SAE training tokens on the large model")
    args = parser.parse_args()
    device = sk.models.check_device(args.device)
    tok, corpus, table = byte_tokenizer(), sk.load_corpus("default"), Table()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory(prefix="steerkit-gpu-check-") as work:
        start = time.perf_counter()
        small_checks(device, tok, corpus, table, Path(work))
        if not args.small:
            big_checks(device, tok, corpus, table, Path(work), args.sae_tokens)
        elapsed = time.perf_counter() - start
    ok = table.print(f"steerkit on {name} ({device}), torch {torch.__version__}, {elapsed:.0f} s")
    print("\nreproduce: python scripts/gpu_check.py" + (" --small" if args.small else "") + f" --device {args.device}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
