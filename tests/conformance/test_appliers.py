"""steerkit serve, a baked checkpoint and a llama.cpp control vector held to the hooks' semantics (``cases.json``);
the vLLM plugin's side is ``test_vllm.py``."""

import importlib.util

import appliers  # (this folder's helper module)
import pytest
import torch

from steerkit.models import EMBEDDED


def test_the_reference_is_steered(suite):
    """The cases steer: every steered request changes the reference's first-token distribution or its tokens."""
    _, _, _, _, reqs, refs = suite
    for i, r in enumerate(reqs):
        if r["steering"]:
            plain = refs[r["prompt"]]
            assert refs[i]["tokens"] != plain["tokens"] or not torch.equal(refs[i]["all"], plain["all"]), r


def test_steerkit_serve_engine_steers_like_hooks(suite):
    model, tok, folder, _, reqs, refs = suite
    got = appliers.engine(model, tok, folder, reqs)
    appliers.agreement("steerkit serve (engine)", "continuous batching, one hook per block, in-process", reqs,
                       refs, got["alone"], batch=got["batch"])  # fmt: skip


def test_steerkit_serve_over_http_steers_like_hooks(suite):
    """Through the server and the official openai client: the text and the first token's top log-probabilities."""
    import openai

    from steerkit.serve import launch

    model, tok, folder, _, reqs, refs = suite
    proc, url = launch(folder, "--device", "cpu")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        rows = []
        for r in reqs:
            extra = {"return_tokens_as_token_ids": True, **({"steering": r["steering"]} if r["steering"] else {})}
            out = client.completions.create(model="m", prompt=tok.decode(r["ids"]), max_tokens=16, temperature=0,
                                            logprobs=5, extra_body=extra)  # fmt: skip
            lp = out.choices[0].logprobs
            ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
            assert out.choices[0].text == tok.decode(ids, skip_special_tokens=True)
            first = {int(t.removeprefix("token_id:")): p for t, p in lp.top_logprobs[0].items()}
            assert lp.token_logprobs[0] == first[ids[0]] == max(first.values())  # greedy: the top token
            rows.append({"tokens": ids, "logprobs": first})
    finally:
        proc.terminate()
        proc.wait(30)
    appliers.agreement("steerkit serve (HTTP)", "`steerkit serve`, openai client, /v1/completions", reqs, refs, rows,
                       no_batch="one at a time (concurrency: test_serve.py)")  # fmt: skip


def test_a_baked_checkpoint_in_transformers_steers_like_hooks(suite, embedded_dir, tmp_path):
    _, _, _, vecs, reqs, refs = suite
    rows = appliers.baked(embedded_dir, vecs, reqs, tmp_path)
    unsteered = [refs[i] if not r["steering"] else None for i, r in enumerate(reqs)]  # the base is the reference
    appliers.agreement("baked checkpoint, transformers", "`sk.bake`, `AutoModelForCausalLM.from_pretrained`", reqs,
                       refs, rows, unsteered=unsteered, no_batch="n/a: one steering per checkpoint")  # fmt: skip


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed: `make llama-cpp` builds it (.ci/run does)")  # fmt: skip
def test_a_gguf_control_vector_in_llama_cpp_steers_like_hooks(suite, tmp_path):
    model, _, _, vecs, reqs, refs = suite
    src = EMBEDDED["smollm2-135m-instruct"].gguf_path()
    weights = appliers.f32_gguf(src, tmp_path / "model-f32.gguf")
    rows = appliers.llama_cpp(weights, tmp_path, vecs, reqs, appliers.eos_ids(model))
    appliers.agreement("GGUF control vector, llama.cpp", "`vec.to_gguf`, llama-cpp-python, F32 GGUF of the model",
                       reqs, refs, rows, no_batch="n/a: one control vector per context")  # fmt: skip
    assert sum(row is None for row in rows) == 2 * len(appliers.CASES["prompts"])  # prompt- or generated-only
