"""The vLLM side of the conformance suite, run in the vLLM environment: ``python run_vllm.py JOB.json OUT.json``.

The job (or a list of jobs, run one after another in this process) names the model folder, the requests (prompt
token ids with their steering), whether to compile, and optionally the prefix-cache and refusal checks;
STEERKIT_VECTORS (when set) names the plugin's vector folder. Writes each request's greedy tokens and first-token
top log-probabilities, in one mixed batch and each alone, the prefix-cache hits of an unsteered / steered /
steered-again / unsteered-again prompt, and the refusals' messages.
"""

import json
import sys


def run(job: dict) -> dict:
    """One model's requests (see the module docstring)."""
    from vllm import LLM, SamplingParams

    # on CPU, gpu_memory_utilization is the share of RAM the process may hold with its KV cache; kv_bytes sets the
    # cache's size outright (for several models in one process, whose size then counts against that share)
    memory = {"kv_cache_memory_bytes": job["kv_bytes"]} if "kv_bytes" in job else {"gpu_memory_utilization": 0.25}
    llm = LLM(model=job["model"], dtype="float32", max_model_len=512, enforce_eager=not job.get("compiled"), seed=0,
              **memory)  # fmt: skip

    def params(steering):
        extra = {"steering": steering} if steering else None
        return SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=job["logprobs"], extra_args=extra)

    def row(out):
        first = out.outputs[0].logprobs[0]
        return {"tokens": list(out.outputs[0].token_ids), "logprobs": {str(t): p.logprob for t, p in first.items()},
                "cached": out.num_cached_tokens}  # fmt: skip

    def generate(prompt, steering):
        return llm.generate(prompt, params(steering), use_tqdm=False)[0]

    reqs = job["requests"]
    batch = llm.generate([{"prompt_token_ids": r["ids"]} for r in reqs], [params(r["steering"]) for r in reqs],
                         use_tqdm=False)  # fmt: skip
    # each its own batch, salted so that none reuses the mixed batch's KV blocks
    alone = [generate({"prompt_token_ids": r["ids"], "cache_salt": f"alone-{i}"}, r["steering"])
             for i, r in enumerate(reqs)]  # fmt: skip
    result = {"batch": [row(o) for o in batch], "alone": [row(o) for o in alone]}
    if "prefix" in job:
        long, steering = job["prefix"]["ids"], job["prefix"]["steering"]
        result["prefix_cached"] = [row(generate({"prompt_token_ids": long}, s))["cached"]
                                   for s in ([], steering, steering, [])]  # fmt: skip
    result["refused"] = []
    for spec, _ in job.get("refused", []):
        try:
            generate({"prompt_token_ids": reqs[0]["ids"]}, spec)
            result["refused"].append({"refused": False, "message": ""})
        except Exception as err:  # noqa: BLE001  (the type and message are what the test checks)
            result["refused"].append({"refused": True, "type": type(err).__name__, "message": str(err)})
    return result


if __name__ == "__main__":  # vLLM may spawn its engine process
    import gc

    jobs = json.load(open(sys.argv[1]))
    results = []
    for job in jobs if isinstance(jobs, list) else [jobs]:  # a list: one model after another, in this process
        results.append(run(job))
        gc.collect()
    json.dump(results if isinstance(jobs, list) else results[0], open(sys.argv[2], "w"))
