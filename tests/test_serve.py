"""steerkit serve: the official openai client against a real server on 127.0.0.1 (started and stopped here),
per-request vectors decoded together, streaming, faults; and CAST conditions in the library and the server."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import steerkit as sk
from steerkit import condition as cast
from steerkit.serve import launch

PROMPTS = ["Describe your morning.", "How was the movie?", "Tell me about your weekend.", "What is rain?"]


@pytest.fixture(scope="module")
def vectors(smollm, tmp_path_factory):
    model, tok = smollm
    folder = tmp_path_factory.mktemp("vectors")
    sk.extract(model, tok, sk.load_pairs("sentiment"), layers=[8]).save(folder / "sentiment.safetensors")
    sk.extract(model, tok, sk.load_pairs("concise"), layers=[4]).save(folder / "concise.safetensors")
    g = torch.Generator().manual_seed(0)
    sk.SteeringVector({10: torch.randn(576, generator=g) * 30}).save(folder / "random.safetensors")
    pos, neg = cast.condition_prompts("cooking", "train")
    found = cast.find_condition(
        model,
        tok,
        cast.extract_condition(model, tok, pos, neg, layers=range(2, 10)),
        *cast.condition_prompts("cooking", "val"),
    )
    found.save(folder / "cooking.condition.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(vectors):
    proc, url = launch(vectors, "--device", "cpu", "--max-batch", "8", "--max-queue", "8")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def _client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


STEERING = [
    [{"vector": "sentiment", "alpha": 0.5, "layers": [8]}],
    [{"vector": "concise", "alpha": 1.0}],
    [{"vector": "random", "alpha": 0.5, "positions": "generated"}],
    None,
]


def test_concurrent_requests_with_different_vectors_equal_generate_alone(server, vectors, smollm):
    url, _ = server
    model, tok = smollm
    client = _client(url)
    jobs = [(PROMPTS[i % 4], STEERING[i % 4]) for i in range(8)]  # 3 vectors and unsteered, twice each
    before = httpx.get(f"{url}/v1/steering/stats").json()

    def ask(job):
        prompt, steering = job
        extra = {"steering": steering} if steering else {}
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            max_tokens=12,
            temperature=0,
            messages=[{"role": "user", "content": prompt}],
            extra_body=extra,
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(ask, jobs))
    after = httpx.get(f"{url}/v1/steering/stats").json()
    assert after["steps"] - before["steps"] < 8 * 12  # decoded together, not one request after another
    for (prompt, steering), text in zip(jobs, texts, strict=True):
        if steering is None:
            expected = sk.generate(model, tok, [prompt], max_new_tokens=12)[0]["unsteered"]
        else:
            entry = steering[0]
            vec = sk.SteeringVector.load(vectors / f"{entry['vector']}.safetensors")
            expected = sk.generate(
                model,
                tok,
                [prompt],
                vector=vec,
                alpha=entry["alpha"],
                max_new_tokens=12,
                positions=entry.get("positions", "all"),
            )[0]["steered"]
        assert text == expected, (prompt, steering)
    assert len(set(texts[:4])) == 4  # the steering changed something


def test_a_streamed_request_gives_the_non_streamed_text(server, smollm):
    url, _ = server
    _, tok = smollm
    client = _client(url)
    kwargs = dict(
        model="m",
        max_tokens=16,
        messages=[{"role": "user", "content": PROMPTS[1]}],
        extra_body={"steering": [{"vector": "sentiment", "alpha": -0.5}]},
    )
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs)]
    assert "".join(pieces) == whole and len(pieces) > 3
    text = client.completions.create(model="m", prompt="Once upon a time", max_tokens=8).choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="m", prompt="Once upon a time", max_tokens=8, stream=True)
    )
    assert text == streamed and text
    # OpenAI's include_usage: a last chunk with no choices and the counts; ignore_eos (vLLM's) runs to max_tokens
    chunks = list(client.completions.create(model="m", prompt="Hi.", max_tokens=40, stream=True, extra_body={
        "ignore_eos": True}, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    assert chunks[-1].usage.prompt_tokens == len(tok("Hi.", add_special_tokens=False)["input_ids"])


def test_models_and_vectors_are_listed(server):
    url, _ = server
    assert _client(url).models.list().data[0].id == "smollm2-135m-instruct"
    listed = {row["name"] for row in httpx.get(f"{url}/v1/steering/vectors").json()["data"]}
    assert listed == {"sentiment", "concise", "random", "cooking"}


def _post(url, body, path="/v1/chat/completions"):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return httpx.post(url + path, content=data, headers={"content-type": "application/json"}, timeout=60)


def test_bad_requests_are_clear_errors(server):
    url, _ = server
    ok = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        ("{not json", "not valid JSON"),
        ({**ok, "steering": [{"vector": "joy"}]}, "no vector 'joy'; loaded: ['concise', 'random', 'sentiment']"),
        (
            '{"messages": [{"role": "user", "content": "hi"}], "steering": [{"vector": "sentiment", "alpha": NaN}]}',
            "not a finite number",
        ),
        ({**ok, "steering": [{"vector": "sentiment", "alpha": 1e39}]}, "not finite in float32"),
        ({**ok, "steering": [{"vector": "sentiment", "layers": [3]}]}, "layers [3] are not in vector 'sentiment'"),
        ({**ok, "steering": [{"vector": "sentiment", "path": "/etc/passwd"}]}, "unknown fields ['path']"),
        ({**ok, "messages": [{"role": "user", "content": "word " * 9000}]}, "exceeds the model's context"),
        ({**ok, "max_tokens": 0}, "max_tokens=0"),
        ({"messages": []}, "non-empty list"),
    ]
    for body, message in cases:
        reply = _post(url, body)
        assert reply.status_code == 400 and message in reply.json()["error"]["message"], (body, reply.text)
    assert _post(url, ok).status_code == 200  # still answering


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    url, _ = server
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 400, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        assert next(lines).startswith("data:")
    for _ in range(100):  # the engine drops the row at its next step
        if httpx.get(f"{url}/v1/steering/stats").json()["active"] == 0:
            break
        time.sleep(0.1)
    assert httpx.get(f"{url}/v1/steering/stats").json()["active"] == 0
    assert _post(url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


def test_the_queue_limit_answers_429_and_mixed_faults_leave_memory_flat(server):
    import psutil

    url, proc = server
    process = psutil.Process(proc.pid)
    good = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    bodies = [
        good,
        {**good, "steering": [{"vector": "random", "alpha": 0.5}]},
        "{bad",
        {**good, "max_tokens": -1},
        {**good, "steering": [{"vector": "nope"}]},
    ]

    def fire(i):
        return _post(url, bodies[i % len(bodies)]).status_code

    with ThreadPoolExecutor(40) as pool:  # 40 at once against 8 rows + 8 waiting: some must be turned away
        burst = list(pool.map(fire, range(40)))
    assert 429 in burst and 200 in burst
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(fire, range(50)))  # warm up allocations
    before = process.memory_info().rss
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(fire, range(200)))
    after = process.memory_info().rss
    assert codes.count(200) == 80 and codes.count(400) == 120
    assert after - before < 60 * 2**20, (before, after)  # flat: no per-request growth
    assert _post(url, good).status_code == 200


def test_conditions_steer_only_the_prompts_they_fire_on(smollm, vectors):
    """CAST in one batch: cooking prompts get the sentiment vector, the others stay exactly unsteered."""
    model, tok = smollm
    condition = cast.Condition.load(vectors / "cooking.condition.safetensors")
    test_pos, test_neg = cast.condition_prompts("cooking", "test")
    fired = condition.predict(model, tok, test_pos + test_neg)
    truth = torch.tensor([True] * len(test_pos) + [False] * len(test_neg))
    assert cast.f1(fired, truth) > 0.8  # held-out prompts, never seen by extraction or the threshold search
    sentiment = sk.SteeringVector.load(vectors / "sentiment.safetensors")
    prompts = [test_pos[0], test_neg[0], test_pos[1], test_neg[1]]
    plain = sk.generate(model, tok, prompts, max_new_tokens=10)
    with sk.steer(model, sentiment, alpha=1.0, condition=condition):
        conditioned = sk.generate(model, tok, prompts, max_new_tokens=10)
    with sk.steer(model, sentiment, alpha=1.0):
        always = sk.generate(model, tok, prompts, max_new_tokens=10)
    for i, expected_fire in enumerate([True, False, True, False]):
        assert bool(fired[[0, len(test_pos), 1, len(test_pos) + 1][i]]) == expected_fire
        if expected_fire:
            assert conditioned[i]["unsteered"] != plain[i]["unsteered"]
        else:
            assert conditioned[i]["unsteered"] == plain[i]["unsteered"]
            assert always[i]["unsteered"] != plain[i]["unsteered"]  # the vector would have changed it


def test_a_condition_travels_with_a_server_request(server, smollm, vectors):
    """The server decides a request's condition as ``steer(..., condition=)`` does, on the prompt or only on
    the generated tokens; a prompt it does not fire on stays unsteered."""
    url, _ = server
    model, tok = smollm
    client = _client(url)
    condition = cast.Condition.load(vectors / "cooking.condition.safetensors")
    sentiment = sk.SteeringVector.load(vectors / "sentiment.safetensors")
    pos, neg = cast.condition_prompts("cooking", "test")

    def ask(prompt, steer):
        extra = {"steering": steer} if steer else {}
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model="m", max_tokens=10, messages=messages, extra_body=extra)
        return reply.choices[0].message.content

    for positions in ("all", "generated"):
        steering = [{"vector": "sentiment", "alpha": 1.0, "condition": "cooking", "positions": positions}]
        with sk.steer(model, sentiment, alpha=1.0, positions=positions, condition=condition):
            expected = [row["unsteered"] for row in sk.generate(model, tok, [pos[0], neg[0]], max_new_tokens=10)]
        assert ask(pos[0], steering) == expected[0] != ask(pos[0], None)
        assert ask(neg[0], steering) == expected[1] == ask(neg[0], None)  # the condition does not fire
    bad = {"messages": [{"role": "user", "content": "hi"}], "steering": [{"vector": "sentiment", "condition": "x"}]}
    reply = _post(url, bad)
    assert reply.status_code == 400 and "no condition 'x'; loaded: ['cooking']" in reply.json()["error"]["message"]


def test_condition_files_round_trip_and_refuse_other_files(vectors, tmp_path):
    condition = cast.Condition.load(vectors / "cooking.condition.safetensors")
    assert condition.f1 > 0.8 and condition.metadata["searched_layers"] == list(range(2, 10))
    again = cast.Condition.load(condition.save(tmp_path / "again.condition.safetensors"))
    assert torch.equal(again.direction, condition.direction)
    assert (again.layer, again.threshold, again.comparator) == (
        condition.layer,
        condition.threshold,
        condition.comparator,
    )
    with pytest.raises(ValueError, match="is not a steerkit condition file"):
        cast.Condition.load(vectors / "sentiment.safetensors")
    with pytest.raises(ValueError, match="comparator='above'"):
        cast.Condition(condition.direction, 3, 0.1, "above")
    with pytest.raises(ValueError, match="finite and non-zero"):
        cast.Condition(torch.zeros(576), 3, 0.1)
    with pytest.raises(FileNotFoundError, match="bundled sets are \\['cooking'\\]"):
        cast.condition_prompts("baking")


def test_serve_refuses_a_missing_or_empty_vector_folder(tmp_path, capsys, embedded_dir):
    from steerkit import cli

    for folder, message in ((tmp_path / "none", f"no vector folder at {tmp_path / 'none'}"),
                            (tmp_path, "holds no steering vectors")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", "--vectors", str(folder), "--device", "cpu"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_condition_command_writes_a_condition_generate_uses(tmp_path, capsys, embedded_dir):
    from steerkit import cli

    out = tmp_path / "cooking.condition.safetensors"
    cli.main(["condition", "-s", "cooking", "-o", str(out), "--layers", "5-7", "--device", "cpu"])
    printed = capsys.readouterr().out
    condition = cast.Condition.load(out)
    assert condition.layer in (5, 6, 7) and f"val F1 {condition.f1:.3f}" in printed and "test F1" in printed
    vector = tmp_path / "v.safetensors"
    sk.SteeringVector({8: torch.ones(576) * 3}).save(vector)
    prompts = ["-p", "How long should I boil eggs?", "-p", "How do I learn chess?"]
    cli.main(["generate", "-v", str(vector), *prompts, "--condition", str(out), "--max-new-tokens", "6"])
    rows = capsys.readouterr().out.split(">>> ")[1:]
    unsteered, steered = zip(*[[line.split(": ", 1)[1] for line in r.splitlines()[1:3]] for r in rows], strict=True)
    assert steered[0] != unsteered[0] and steered[1] == unsteered[1]  # only the cooking question is steered
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["condition", "-s", "cooking", "-o", str(tmp_path / "c.safetensors")])
    assert exit_info.value.code == 2 and "expected a name ending in .condition.safetensors" in capsys.readouterr().err


def test_logprobs_come_in_openai_shapes_with_the_models_values(server, smollm):
    """Chat (``logprobs``, ``top_logprobs``) and completions (``logprobs``, streamed too): greedy picks the top
    token, the first value is the model's own log-softmax, and streamed offsets index the whole text."""
    from steerkit.models import chat_prompt

    url, _ = server
    model, tok = smollm
    client = _client(url)
    messages = [{"role": "user", "content": PROMPTS[3]}]
    reply = client.chat.completions.create(model="m", max_tokens=6, messages=messages, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(c.token for c in content) == reply.choices[0].message.content
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert all(c.logprob == c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    ids = tok(chat_prompt(tok, PROMPTS[3]), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1).max()
    assert abs(content[0].logprob - float(expected)) < 1e-4
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=8, logprobs=2,
                                            stream=True))  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    scored = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    pieces = [(t, o) for lp in scored for t, o in zip(lp.tokens, lp.text_offset, strict=True)]
    assert len(pieces) == 8 and "".join(t for t, _ in pieces) == text
    assert [o for _, o in pieces] == [len("".join(t for t, _ in pieces[:i])) for i in range(8)]
    bad = [({"prompt": "Hi", "logprobs": 21}, "logprobs=21: expected an int in 0..20"),
           ({"prompt": "Hi", "return_tokens_as_token_ids": "yes"}, "expected true or false")]  # fmt: skip
    for body, message in bad:
        reply = _post(url, {**body, "max_tokens": 2}, "/v1/completions")
        assert reply.status_code == 400 and message in reply.json()["error"]["message"], reply.text
    reply = _post(url, {"messages": messages, "top_logprobs": 2})
    assert reply.status_code == 400 and "top_logprobs needs logprobs: true" in reply.json()["error"]["message"]
