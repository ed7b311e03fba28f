"""The appliers of the conformance suite, and the one check that holds each of them to the hooks' semantics.

Every applier runs the requests of ``cases.json`` (prompts x steering settings, greedy) and returns per request
a row: its greedy tokens (up to the first end-of-sequence token) and the log-probabilities of the first generated
position's top tokens, or None where it cannot express that steering (a baked checkpoint or a llama.cpp control
vector steers every position). The reference is ``sk.steer`` hooks under transformers' ``generate``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import threading
from pathlib import Path

import torch

import steerkit as sk
from steerkit.models import chat_prompt

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CASES = json.loads((HERE / "cases.json").read_text())
TABLE: list[dict] = []  # the agreement table, one row per applier checked in this session


def vectors(folder: Path) -> dict[str, sk.SteeringVector]:
    """The suite's vectors, written to ``folder`` (the vector folder of the servers and the plugin)."""
    sentiment = sk.SteeringVector.load(ROOT / "artifacts" / "sentiment.safetensors")
    spec = CASES["random"]
    g = torch.Generator().manual_seed(spec["seed"])
    random = {}
    for layer in spec["layers"]:
        v = torch.randn(sentiment.d_model, generator=g)
        random[layer] = v * sentiment[layer].norm() / v.norm()
    vecs = {"sentiment": sentiment, "random": sk.SteeringVector(random, metadata={"method": "random"})}
    for name, vec in vecs.items():
        vec.save(folder / f"{name}.safetensors")
    # a hand-made CAST condition, so that a request naming it reaches the appliers' own answer to conditions
    sk.Condition(sentiment[8], layer=8, threshold=0.0).save(folder / "cooking.condition.safetensors")
    return vecs


def requests(tok) -> list[dict]:
    """Every (steering, prompt) pair of the cases as prompt token ids, steering-major."""
    return [
        {"ids": tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"], "steering": s, "prompt": i}
        for s in CASES["steering"]
        for i, p in enumerate(CASES["prompts"])
    ]


def combined(vecs: dict, steering: list[dict]) -> sk.SteeringVector | None:
    """The one vector a request's steering amounts to when it steers every position (what a baked checkpoint and
    a llama.cpp control vector apply); None if an entry steers only the prompt or only the generated tokens."""
    if not steering or any(e.get("positions", "all") != "all" for e in steering):
        return None
    directions: dict[int, torch.Tensor] = {}
    for e in steering:
        for layer in e["layers"]:
            directions[layer] = directions.get(layer, 0) + e["alpha"] * vecs[e["vector"]][layer]
    return sk.SteeringVector(directions, {"method": "conformance"})


def cut(tokens: list[int], eos: set[int]) -> list[int]:
    """Tokens up to (not including) the first end-of-sequence token: engines differ in whether they return it."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


def top(logprobs: torch.Tensor) -> dict[int, float]:
    values, index = logprobs.topk(CASES["logprobs"])
    return dict(zip(index.tolist(), values.tolist(), strict=True))


# --- the reference ---------------------------------------------------------------------------------------------


def hooks(model, vecs: dict, ids: list[int], steering: list[dict]) -> dict:
    """Greedy tokens and first-token log-probabilities under ``sk.steer`` hooks, one context per entry."""
    with contextlib.ExitStack() as stack:
        for e in steering:
            stack.enter_context(sk.steer(model, vecs[e["vector"]], e["alpha"], layers=e["layers"],
                                         positions=e.get("positions", "all")))  # fmt: skip
        return plain(model, ids)


def plain(model, ids: list[int]) -> dict:
    """Greedy tokens and first-token log-probabilities of transformers' ``generate``, batch size 1, and at each
    step the margin between the two most likely tokens (where engines' rounding may break a tie either way)."""
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=CASES["max_tokens"], do_sample=False, output_logits=True,
                         return_dict_in_generate=True)  # fmt: skip
    steps = [torch.log_softmax(logits[0].float(), -1) for logits in out.logits]
    margins = [float(two[0] - two[1]) for two in (step.topk(2).values for step in steps)]
    return {"tokens": cut(out.sequences[0, len(ids) :].tolist(), eos_ids(model)), "logprobs": top(steps[0]),
            "all": steps[0], "margins": margins}  # fmt: skip


# --- steerkit serve's engine -----------------------------------------------------------------------------------


def engine(model, tok, folder: Path, reqs: list[dict]) -> dict[str, list[dict]]:
    """``steerkit serve``'s engine (in this process, on ``model``): each request alone, then all of them at once."""
    from steerkit import arch
    from steerkit.hooks import block_dtype
    from steerkit.serve import Engine, Library, Request, parse_steering

    library = Library(folder, arch.hidden_size(model), arch.num_layers(model))
    eng = Engine(model, tok, library, max_batch=len(reqs), max_queue=len(reqs))

    def submit(r: dict) -> tuple[threading.Event, list]:
        done, events = threading.Event(), []

        def emit(event: dict) -> None:
            events.append(event)
            if "token" not in event:
                done.set()

        entries = parse_steering(r["steering"], library, lambda i: block_dtype(model, i))
        eng.submit(Request(r["ids"], CASES["max_tokens"], entries, emit, logprobs=CASES["logprobs"]))
        return done, events

    def row(events: list) -> dict:
        assert "error" not in events[-1], events[-1]
        scored = [e for e in events if "token" in e]
        return {"tokens": [e["token"] for e in scored], "logprobs": dict(scored[0]["top"]) if scored else {}}

    try:
        alone = []
        for r in reqs:
            done, events = submit(r)
            assert done.wait(120)
            alone.append(row(events))
        pending = [submit(r) for r in reqs]
        for done, _ in pending:
            assert done.wait(300)
        return {"alone": alone, "batch": [row(events) for _, events in pending]}
    finally:
        eng.close()


# --- a baked checkpoint in transformers --------------------------------------------------------------------------


def baked(base: Path, vecs: dict, reqs: list[dict], tmp: Path) -> list[dict | None]:
    """Each steering that is a constant at every position baked into a checkpoint, loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    rows: list[dict | None] = [None] * len(reqs)
    for k, steering in enumerate(CASES["steering"]):
        vec = combined(vecs, steering)
        if vec is None:
            continue
        out = sk.bake(base, vec, alpha=1.0, out=tmp / f"baked-{k}")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        for i, r in enumerate(reqs):
            if r["steering"] == steering:
                rows[i] = plain(model, r["ids"])
        del model
    return rows


# --- a GGUF control vector in llama.cpp --------------------------------------------------------------------------


def f32_gguf(src: Path, out: Path) -> Path:
    """``src`` (a quantized GGUF model) with every tensor dequantized to float32: the weights transformers
    dequantizes from the same file, so llama.cpp and the reference run one model."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_uint32(name, int(gguf.LlamaFileType.ALL_F32))
        elif field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), field.types[0])
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def llama_cpp(model_gguf: Path, folder: Path, vecs: dict, reqs: list[dict], eos: set[int]) -> list[dict | None]:
    """Each request in llama.cpp (llama-cpp-python) with its steering written as a control-vector GGUF by
    ``vec.to_gguf`` and read back as llama.cpp's ``llama_control_vector_load`` does (``direction.{i}`` at offset
    ``n_embd·(i − 1)``, F32), then applied with ``llama_set_adapter_cvec``; greedy decoding by hand."""
    import gguf
    import llama_cpp as lc
    import numpy as np

    llm = lc.Llama(str(model_gguf), n_ctx=512, logits_all=True, verbose=False, seed=0)
    n_embd, n_layer = llm.n_embd(), lc.llama_model_n_layer(llm.model)

    def apply(path: Path | None) -> None:
        if path is None:
            assert lc.llama_set_adapter_cvec(llm.ctx, None, 0, n_embd, -1, -1) == 0
            return
        buffer = np.zeros(n_embd * (n_layer - 1), dtype=np.float32)
        for tensor in gguf.GGUFReader(str(path)).tensors:
            layer = int(tensor.name.removeprefix("direction."))
            buffer[n_embd * (layer - 1) : n_embd * layer] = tensor.data
        pointer = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        assert lc.llama_set_adapter_cvec(llm.ctx, pointer, buffer.size, n_embd, 1, n_layer - 1) == 0

    def greedy(ids: list[int]) -> dict:
        llm.reset()
        llm.eval(ids)
        first = torch.log_softmax(torch.from_numpy(np.array(llm.scores[len(ids) - 1])), -1)
        tokens = []
        while len(tokens) < CASES["max_tokens"]:
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            if token in eos:
                break
            tokens.append(token)
            llm.eval([token])
        return {"tokens": tokens, "logprobs": top(first)}

    rows: list[dict | None] = []
    try:
        for k, r in enumerate(reqs):
            vec = combined(vecs, r["steering"])
            if r["steering"] and (vec is None or not set(vec.layers) <= set(range(1, n_layer - 1))):
                rows.append(None)  # llama.cpp steers every position of blocks 1 .. n_layer - 2
                continue
            path = None if vec is None else vec.to_gguf(folder / f"request-{k}.gguf", force=True)
            apply(path)
            rows.append(greedy(r["ids"]))
    finally:
        llm.close()
    return rows


# --- the check ---------------------------------------------------------------------------------------------------


def gap(ref: dict, row: dict) -> float:
    """Largest |Δ log p| over the tokens the applier returned for the first generated position."""
    return max(abs(float(ref["all"][int(t)]) - p) for t, p in row["logprobs"].items())


def diverges(a: list[int], b: list[int]) -> int:
    """The first position where two token lists differ (one ending counts)."""
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def agreement(applier: str, how: str, reqs: list[dict], refs: list[dict], rows: list[dict | None],
              unsteered: list[dict | None] | None = None, batch: list[dict] | None = None,
              no_batch: str = "—") -> dict:  # fmt: skip
    """Hold ``rows`` (one per request, None where the applier does not apply) to the hooks reference and add the
    applier's line to the agreement table.

    - First-token log-probabilities within a tolerance of 10x the unsteered gap between this applier's engine
      and transformers (measured here, on the unsteered requests of ``rows`` or ``unsteered``), at least 1e-3.
    - Greedy tokens identical on every steered request whose prompt's unsteered runs agree, but for a tie: the
      first differing token is one where the reference's two most likely tokens are within the tolerance.
    - ``batch`` (the same requests decoded together): tokens equal to each alone, log-probabilities within 1e-3;
      ``no_batch`` says in the table why there is none.
    """
    unsteered = unsteered or rows
    plain_gaps = [gap(refs[i], row) for i, row in enumerate(unsteered) if row is not None and not reqs[i]["steering"]]
    tolerance = max(10 * max(plain_gaps), 1e-3)
    steered = [i for i, row in enumerate(rows) if row is not None and reqs[i]["steering"]]
    assert steered, f"{applier} ran no steered request"
    worst = max(gap(refs[i], rows[i]) for i in steered)
    assert worst <= tolerance, (applier, worst, tolerance)
    # the measuring stick can fail: steering moves the reference's first-token distribution far beyond it
    plain_ref = {r["prompt"]: refs[i] for i, r in enumerate(reqs) if not r["steering"]}
    moved = [float((refs[i]["all"] - plain_ref[reqs[i]["prompt"]]["all"]).abs().max()) for i in steered
             if any(e.get("positions", "all") != "generated" for e in reqs[i]["steering"])]  # fmt: skip
    assert min(moved) > 10 * tolerance, (applier, min(moved), tolerance)
    agreed = {r["prompt"] for i, r in enumerate(reqs) if not r["steering"] and unsteered[i] is not None
              and unsteered[i]["tokens"] == refs[i]["tokens"]}  # fmt: skip
    compared = [i for i in steered if reqs[i]["prompt"] in agreed]
    equal = [i for i in compared if rows[i]["tokens"] == refs[i]["tokens"]]
    ties = [refs[i]["margins"][diverges(rows[i]["tokens"], refs[i]["tokens"])] for i in compared if i not in equal]
    assert all(margin <= tolerance for margin in ties), (applier, ties, tolerance)
    assert len(agreed) == len({r["prompt"] for r in reqs}), f"{applier}: the unsteered runs disagree on a prompt"
    mixed = no_batch
    if batch is not None:
        for i, (together, alone) in enumerate(zip(batch, rows, strict=True)):
            assert together["tokens"] == alone["tokens"], (applier, reqs[i]["steering"])
            assert max(abs(together["logprobs"][t] - p) for t, p in alone["logprobs"].items()) < 1e-3
        mixed = f"equal ({len(batch)} requests)"
    line = {"applier": applier, "how": how, "requests": f"{len(steered)} steered + {len(plain_gaps)} unsteered",
            "unsteered gap": max(plain_gaps), "tolerance": tolerance, "steered gap": worst,
            "greedy 16 tokens equal": f"{len(equal)}/{len(compared)}" + "".join(
                f" + tie at margin {m:.1e}" for m in ties), "mixed batch": mixed}  # fmt: skip
    TABLE.append(line)
    return line


def table_markdown() -> str:
    """The agreement table of this session, one line per applier."""
    head = ["applier", "how", "requests", "unsteered gap", "tolerance", "steered gap", "greedy 16 tokens equal",
            "mixed batch"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in TABLE:
        cells = [f"{row[k]:.1e}" if isinstance(row[k], float) else str(row[k]) for k in head]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
