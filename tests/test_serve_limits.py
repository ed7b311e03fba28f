"""steerkit serve on a network: the API key, every limit and refusal, slow clients, request deadlines, stop
sequences, /health and /metrics, and a graceful SIGTERM, each against a real server on 127.0.0.1."""

import json
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch

import steerkit as sk
from steerkit.serve import launch

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789"
LIMITS = ["--api-key", KEY, "--max-body-bytes", "50000", "--max-messages", "4", "--max-stop", "2", "--max-steering",
          "2", "--header-timeout", "1", "--body-timeout", "1", "--request-timeout", "4"]  # fmt: skip
AUTH = {"authorization": f"Bearer {KEY}"}
HI = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("vectors")
    sk.SteeringVector.load(ROOT / "artifacts" / "sentiment.safetensors").select([8]).save(
        path / "sentiment.safetensors"
    )
    sk.SteeringVector({10: torch.randn(576, generator=torch.Generator().manual_seed(0)) * 30}).save(
        path / "random.safetensors"
    )
    return path


@pytest.fixture(scope="module")
def server(folder, embedded_dir):
    proc, url = launch(folder, "--device", "cpu", *LIMITS)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def post(url, body, path="/v1/chat/completions", headers=AUTH, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=data, headers={"content-type": "application/json", **headers}, timeout=60,
                      **kwargs)  # fmt: skip


def test_every_route_but_health_needs_the_key(server):
    import openai

    for path in ("/v1/models", "/v1/steering/vectors", "/v1/steering/stats", "/metrics"):
        assert httpx.get(server + path).status_code == 401, path
        assert httpx.get(server + path, headers={"authorization": "Bearer wrong-key-0123456"}).status_code == 401
        assert httpx.get(server + path, headers=AUTH).status_code == 200, path
    assert httpx.get(server + "/health").json() == {"status": "ok"}
    reply = post(server, HI, headers={})
    assert reply.status_code == 401 and "API key" in reply.json()["error"]["message"]
    assert reply.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    assert client.chat.completions.create(model="m", **HI).choices[0].message.content


def test_each_limit_is_a_clear_refusal_naming_it(server):
    steer = {"vector": "sentiment", "alpha": 0.1}
    cases = [
        (post(server, b"x" * 60000), 413, "max_body_bytes"),
        (post(server, {**HI, "messages": HI["messages"] * 5}), 400, "5 messages: the server's limit is 4"),
        (post(server, {**HI, "stop": ["a", "b", "c"]}), 400, "3 stop sequences: the server's limit is 2"),
        (post(server, {**HI, "stop": [""]}), 400, "stop must be a string or a list of strings"),
        (post(server, {**HI, "steering": [steer] * 3}), 400, "3 steering entries: the server's limit is 2"),
        (post(server, {**HI, "n": 2}), 400, "n must be 1"),
        (post(server, {**HI, "seed": "x"}), 400, "seed='x': expected an int"),
        (
            post(server, {**HI, "max_tokens": 4000, "messages": [{"role": "user", "content": "word " * 7000}]}),
            400,
            "exceeds the model's context of 8192",
        ),  # fmt: skip
        (
            post(server, {**HI, "max_tokens": 4096, "messages": [{"role": "user", "content": "word " * 5000}]}),
            400,
            ": max_tokens can be at most",
        ),  # fmt: skip
        (
            post(server, {**HI, "messages": [{"role": "user", "content": "word " * 9000}]}),
            400,
            ": the prompt alone fills it",
        ),  # fmt: skip
    ]
    for reply, status, message in cases:
        assert reply.status_code == status and message in reply.json()["error"]["message"], (status, reply.text)
    # a body sent without a Content-Length (chunked) is counted as it arrives
    chunks = (b"x" * 25000 for _ in range(3))
    reply = httpx.post(server + "/v1/chat/completions", content=chunks, headers=AUTH, timeout=60)
    assert reply.status_code == 413
    assert post(server, HI).status_code == 200  # still answering


def _raw(url: str, data: bytes, wait: float) -> bytes:
    """Send ``data`` on a raw connection, wait, and read what the server says before it closes."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        time.sleep(wait)
        s.settimeout(10)
        received = b""
        while chunk := s.recv(4096):
            received += chunk
        return received


def test_slow_clients_are_cut_off(server):
    head = _raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Ty", 2)
    assert head.startswith(b"HTTP/1.1 408") and b"request head took too long" in head
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    slow = _raw(server, request + body[:10], 2)
    assert slow.startswith(b"HTTP/1.1 408") and b"body_timeout" in slow
    whole = _raw(server, request.replace(b"HTTP/1.1", b"HTTP/1.0") + body, 0)  # a prompt client is answered
    assert whole.startswith(b"HTTP/1.1 200")


def test_a_request_past_its_deadline_ends_with_504_or_an_error_event(server):
    long = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 4000, "ignore_eos": True}
    started = time.monotonic()
    reply = post(server, long)
    assert reply.status_code == 504 and "request_timeout" in reply.json()["error"]["message"]
    assert time.monotonic() - started < 30
    with httpx.stream("POST", server + "/v1/chat/completions", json={**long, "stream": True}, headers=AUTH,
                      timeout=60) as streamed:  # fmt: skip
        lines = [line for line in streamed.iter_lines() if line.startswith("data:")]
    assert "request_timeout" in lines[-2] and lines[-1] == "data: [DONE]"
    assert post(server, HI).status_code == 200


def test_stop_sequences_cut_the_text_streamed_or_not(server):
    plain = post(server, {**HI, "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    word = plain.split()[2]  # a word the unstopped completion contains
    body = {**HI, "max_tokens": 24, "stop": [word, "zzzz-never"]}
    stopped = post(server, body).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == plain[: plain.index(word)]
    with httpx.stream("POST", server + "/v1/chat/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as streamed:  # fmt: skip
        chunks = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == stopped["message"]["content"] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_metrics_count_requests_errors_and_tokens(server):
    post(server, HI)
    post(server, {**HI, "n": 2})
    text = httpx.get(server + "/metrics", headers=AUTH).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['steerkit_requests_total{route="/v1/chat/completions",status="200"}'] >= 1
    assert samples['steerkit_errors_total{kind="invalid_request"}'] >= 1
    assert samples['steerkit_errors_total{kind="authentication"}'] >= 1
    assert samples["steerkit_generation_tokens_total"] >= 1 and samples["steerkit_prompt_tokens_total"] >= 1
    assert samples["steerkit_queue_depth"] == 0 and "steerkit_batch_occupancy" in samples
    assert samples["steerkit_request_seconds_count"] >= 1
    httpx.get(server + "/nowhere/" + "x" * 50, headers=AUTH)
    text = httpx.get(server + "/metrics", headers=AUTH).text
    assert "/nowhere" not in text and 'route="other"' in text  # unknown paths do not grow the label set


def test_sigterm_drains_then_ends_streams_with_an_error_event_and_exits_0(folder, embedded_dir):
    proc, url = launch(folder, "--device", "cpu", "--shutdown-timeout", "2")
    body = {"messages": [{"role": "user", "content": "Tell a story."}], "max_tokens": 3000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as streamed:
        lines = streamed.iter_lines()
        assert next(lines).startswith("data:")
        proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        rest = [line for line in lines if line.startswith("data:")]
    assert "shutting down" in rest[-2] and rest[-1] == "data: [DONE]"
    assert 1.5 < time.monotonic() - sent_at < 30  # it ran on for the grace period, then ended
    assert proc.wait(timeout=60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health")


def test_a_public_address_without_a_key_warns_and_cors_is_off_unless_asked(folder, embedded_dir):
    proc, url = launch(folder, "--device", "cpu", "--host", "0.0.0.0", "--allowed-origins", "https://app.example")
    try:
        preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
        reply = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert reply.headers["access-control-allow-origin"] == "https://app.example"
        other = httpx.options(url + "/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "without an API key" in err
    proc, url = launch(folder, "--device", "cpu")
    try:
        reply = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in reply.headers
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "without an API key" not in err
