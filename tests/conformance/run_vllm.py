"""The vLLM side of the conformance suite, run in the vLLM environment: ``python run_vllm.py JOB.json OUT.json``.

The job names the model folder and the prompts (as token ids) with their steering; STEERKIT_VECTORS names the
vector folder. Writes each request's greedy tokens and first-token top log-probabilities, in one mixed batch and
each alone, the prefix-cache hits of an unsteered / steered / steered-again prompt, and the refusals' messages.
"""

import json
import sys

if __name__ == "__main__":  # vLLM spawns its engine process
    from vllm import LLM, SamplingParams

    job = json.load(open(sys.argv[1]))
    llm = LLM(
        model=job["model"], dtype="float32", max_model_len=512, enforce_eager=True, seed=0, gpu_memory_utilization=0.25
    )  # (on CPU: the share of RAM its KV cache takes)

    def params(steering):
        extra = {"steering": steering} if steering else None
        return SamplingParams(temperature=0, max_tokens=job["max_tokens"], logprobs=job["logprobs"], extra_args=extra)

    def row(out):
        first = out.outputs[0].logprobs[0]
        return {"tokens": list(out.outputs[0].token_ids), "logprobs": {str(t): p.logprob for t, p in first.items()},
                "cached": out.num_cached_tokens}  # fmt: skip

    reqs = job["requests"]
    batch = llm.generate([{"prompt_token_ids": r["ids"]} for r in reqs], [params(r["steering"]) for r in reqs],
                         use_tqdm=False)  # fmt: skip
    alone = [  # each its own batch, salted so that none reuses the mixed batch's KV blocks
        llm.generate({"prompt_token_ids": r["ids"], "cache_salt": f"alone-{i}"}, params(r["steering"]), use_tqdm=False)[
            0
        ]  # fmt: skip
        for i, r in enumerate(reqs)
    ]
    long, steering = job["prefix"]["ids"], job["prefix"]["steering"]
    prefix = [row(llm.generate({"prompt_token_ids": long}, params(s), use_tqdm=False)[0])["cached"]
              for s in ([], steering, steering, [])]  # fmt: skip
    refused = []
    for spec, _ in job["refused"]:
        try:
            llm.generate({"prompt_token_ids": reqs[0]["ids"]}, params(spec), use_tqdm=False)
            refused.append({"refused": False, "message": ""})
        except Exception as err:  # noqa: BLE001  (the type and message are what the test checks)
            refused.append({"refused": True, "type": type(err).__name__, "message": str(err)})
    result = {"batch": [row(o) for o in batch], "alone": [row(o) for o in alone], "prefix_cached": prefix,
              "refused": refused}  # fmt: skip
    json.dump(result, open(sys.argv[2], "w"))
