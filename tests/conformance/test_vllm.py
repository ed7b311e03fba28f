"""The vLLM plugin (offline ``LLM`` eager and compiled, and vLLM's OpenAI server) and a baked checkpoint served by
plain vLLM, held to the hooks' semantics (``appliers.agreement``).

The vLLM side runs in its own environment (``make vllm-env``: vLLM pins transformers < 5.20) through
``run_vllm.py``. vLLM's CPU kernels are not bit-equal to transformers, so each tolerance is set from the unsteered
gap measured in the same run.
"""

import json
import os
import socket
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import appliers  # (this folder's helper module)
import pytest

import steerkit as sk
from steerkit.models import chat_prompt

VLLM_PYTHON = appliers.ROOT / ".venv-vllm" / "bin" / "python"
CASES = appliers.CASES
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: run `make vllm-env`")


def vllm_env(vectors=None, compiled: bool = False) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("STEERKIT_VECTORS", None)
    if vectors is not None:
        env["STEERKIT_VECTORS"] = str(vectors)
    if compiled:  # vLLM's CPU platform then compiles with one Dynamo trace and Dynamo's eager backend (no minutes
        env["VLLM_CPU_CI_ENV"] = "1"  # of inductor): the traced graph is what the hooks must survive
    return env


def run_vllm(tmp, job: dict | list[dict], eos: set[int], vectors=None, compiled: bool = False, env=None):
    """``run_vllm.py`` on ``job`` (or a list of jobs); rows with integer token ids, cut at the end-of-sequence
    token."""
    common = {"max_tokens": CASES["max_tokens"], "logprobs": CASES["logprobs"], "compiled": compiled}
    jobs = [{**common, **j} for j in (job if isinstance(job, list) else [job])]
    (tmp / "job.json").write_text(json.dumps(jobs if isinstance(job, list) else jobs[0]))
    proc = subprocess.run([str(VLLM_PYTHON), str(appliers.HERE / "run_vllm.py"), str(tmp / "job.json"),
                           str(tmp / "out.json")], env={**vllm_env(vectors, compiled), **(env or {})},
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp / "out.json").read_text())
    for result in out if isinstance(job, list) else [out]:
        for key in ("batch", "alone"):
            result[key] = [{**row, "tokens": appliers.cut(row["tokens"], eos),
                            "logprobs": {int(t): p for t, p in row["logprobs"].items()}}
                           for row in result[key]]  # fmt: skip
    return out


def long_prompt(tok) -> list[int]:
    return tok(chat_prompt(tok, " ".join(["Tell me about the history of the sea and its ships."] * 20)),
               add_special_tokens=False)["input_ids"]  # fmt: skip


@pytest.fixture(scope="module")
def plugin(suite, embedded_dir, tmp_path_factory):
    model, tok, folder, _, reqs, _ = suite
    job = {"model": str(embedded_dir), "requests": reqs, "refused": CASES["refused"],
           "prefix": {"ids": long_prompt(tok), "steering": CASES["steering"][1]}}  # fmt: skip
    return run_vllm(tmp_path_factory.mktemp("vllm-eager"), job, appliers.eos_ids(model), vectors=folder)


def test_the_plugin_steers_like_hooks(suite, plugin):
    _, _, _, _, reqs, refs = suite
    appliers.agreement("vLLM plugin, offline `LLM` (eager)", "`SamplingParams.extra_args`, `enforce_eager=True`",
                       reqs, refs, plugin["alone"], batch=plugin["batch"])  # fmt: skip


def test_the_plugin_steers_like_hooks_when_vllm_compiles_the_model(suite, embedded_dir, tmp_path):
    """Without ``enforce_eager`` vLLM traces the model once and replays the graph: the hooks' table must be read
    at run time, not frozen at trace time (a Python branch on the step's state would be)."""
    model, _, folder, _, reqs, refs = suite
    got = run_vllm(tmp_path, {"model": str(embedded_dir), "requests": reqs}, appliers.eos_ids(model), folder, True)
    appliers.agreement("vLLM plugin, offline `LLM` (compiled)", "one Dynamo trace of the model, replayed", reqs,
                       refs, got["alone"], batch=got["batch"])  # fmt: skip


def test_a_baked_checkpoint_served_by_plain_vllm_steers_like_hooks(suite, plugin, embedded_dir, tmp_path):
    """vLLM without the plugin serves a baked checkpoint (the two-vector, two-layer case) as the hooks steer."""
    model, _, _, vecs, reqs, refs = suite
    steering = CASES["steering"][5]
    out = sk.bake(embedded_dir, appliers.combined(vecs, steering), alpha=1.0, out=tmp_path / "baked")
    chosen = [i for i, r in enumerate(reqs) if r["steering"] == steering]
    job = {"model": str(out), "requests": [{"ids": reqs[i]["ids"], "steering": []} for i in chosen]}
    got = run_vllm(tmp_path, job, appliers.eos_ids(model))
    rows = [None] * len(reqs)
    for i, row in zip(chosen, got["alone"], strict=True):
        rows[i] = row
    appliers.agreement("baked checkpoint, vLLM", "`sk.bake`, vLLM without the plugin", reqs, refs, rows,
                       unsteered=plugin["alone"], no_batch="n/a: one steering per checkpoint")  # fmt: skip


# vLLM model classes beside Llama (the embedded model), as tiny random checkpoints: head_dim 64 for vLLM's CPU
# attention, weights drawn wider than the default so that the next token is not a near-tie everywhere
TINY_ARCHS = ["mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"]
TINY_STEERING = [[], [{"vector": "v", "alpha": 1.0, "layers": [1]}],
                 [{"vector": "v", "alpha": -1.0, "layers": [1], "positions": "prompt"}],
                 [{"vector": "v", "alpha": 1.0, "layers": [1, 2], "positions": "generated"}]]  # fmt: skip


def test_the_plugin_steers_every_architecture_it_knows_like_hooks(suite, tmp_path):
    """Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma 2 and Gemma 3 (vLLM's own classes for each), one after another
    in one vLLM process: first-token log-probabilities and greedy tokens against hooks in transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    _, tok, _, _, _, _ = suite
    folder = tmp_path / "vectors"
    g = torch.Generator().manual_seed(0)
    vecs = {"v": sk.SteeringVector({layer: torch.randn(128, generator=g) * 4 for layer in (1, 2)})}
    vecs["v"].save(folder / "v.safetensors")
    reqs = [{"ids": tok(chat_prompt(tok, p), add_special_tokens=False)["input_ids"], "steering": s, "prompt": i}
            for s in TINY_STEERING for i, p in enumerate(CASES["prompts"][:2])]  # fmt: skip
    jobs, refs = [], {}
    for arch in TINY_ARCHS:
        torch.manual_seed(0)
        config = tiny_config(arch, len(tok), hidden=128, heads=2, kv_heads=1, ffn=256, ctx=512)
        config.initializer_range = 0.2
        model = AutoModelForCausalLM.from_config(config).eval()
        model.save_pretrained(tmp_path / arch)
        tok.save_pretrained(tmp_path / arch)
        refs[arch] = [appliers.hooks(model, vecs, r["ids"], r["steering"]) for r in reqs]
        jobs.append({"model": str(tmp_path / arch), "requests": reqs, "kv_bytes": 2**28})
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # the engine in this process: seconds a model, not half a minute
    got = run_vllm(tmp_path, jobs, {tok.eos_token_id}, vectors=folder, env=env)
    for arch, result in zip(TINY_ARCHS, got, strict=True):
        appliers.agreement(f"vLLM plugin, tiny random {arch}", "offline `LLM`, eager", reqs, refs[arch],
                           result["alone"], batch=result["batch"])  # fmt: skip


def test_the_prefix_cache_is_keyed_on_steering(suite, plugin):
    _, tok, _, _, _, _ = suite
    unsteered, steered, steered_again, unsteered_again = plugin["prefix_cached"]
    assert unsteered == 0 and steered == 0  # a steered prompt never reuses unsteered blocks
    assert steered_again > 0 and unsteered_again > 0  # identical requests still share
    assert steered_again < len(long_prompt(tok))


def test_bad_steering_is_refused_with_the_reason(plugin):
    for (spec, expected), row in zip(CASES["refused"], plugin["refused"], strict=True):
        assert row["refused"], spec
        assert row["type"] == "VLLMValidationError" and expected in row["message"], (spec, row)


@pytest.fixture(scope="module")
def server(suite, embedded_dir, tmp_path_factory):
    """vLLM's OpenAI server on a free port of 127.0.0.1 with the plugin's vector folder: its base URL."""
    folder = suite[2]
    log_dir = tmp_path_factory.mktemp("vllm-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # (vllm-cpu 0.32.0's `vllm` script looks up the metadata of a distribution named vllm and fails: the module runs)
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_dir), "--host",
           "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
           "--served-model-name", "smollm", "--gpu-memory-utilization", "0.25"]  # fmt: skip
    log = open(log_dir / "vllm.log", "w")
    proc = subprocess.Popen(cmd, env=vllm_env(folder), stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (log_dir / "vllm.log").read_text()[-4000:]
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=1):
                    break
            except OSError:
                time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_the_openai_client_steers_like_hooks(suite, server):
    """Through vLLM's OpenAI server (``vllm_xargs``), sent at once: tokens and first-token log-probabilities."""
    import openai

    model, _, _, _, reqs, refs = suite
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)

    def ask(r: dict) -> dict:
        extra = {"return_tokens_as_token_ids": True}
        if r["steering"]:
            extra["vllm_xargs"] = {"steering": json.dumps(r["steering"])}
        out = client.completions.create(model="smollm", prompt=r["ids"], max_tokens=CASES["max_tokens"],
                                        temperature=0, logprobs=5, extra_body=extra)  # fmt: skip
        lp = out.choices[0].logprobs
        ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
        first = {int(t.removeprefix("token_id:")): p for t, p in lp.top_logprobs[0].items()}
        return {"tokens": appliers.cut(ids, appliers.eos_ids(model)), "logprobs": first}

    with ThreadPoolExecutor(8) as pool:
        rows = list(pool.map(ask, reqs))
    appliers.agreement("vLLM plugin, OpenAI server", "`vllm_xargs` with the openai client, 8 at once", reqs, refs,
                       rows, no_batch="concurrent (in the rows)")  # fmt: skip


@pytest.mark.parametrize("case", range(len(CASES["refused"])))
def test_the_openai_client_gets_a_400_naming_the_problem(server, case):
    import openai

    spec, expected = CASES["refused"][case]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       extra_body={"vllm_xargs": {"steering": json.dumps(spec)}})  # fmt: skip
    assert err.value.status_code == 400 and expected in str(err.value)
