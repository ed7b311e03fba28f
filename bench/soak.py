"""A bounded soak of ``steerkit serve`` on 127.0.0.1: 16 clients send 2,000 requests over about 10 minutes, a seeded
mix of steered, unsteered, streamed, cancelled-mid-stream, malformed and over-limit requests, and the server's
answers are checked against the documented status of each kind.

Reports completed / refused by kind / failed (a wrong status, any 5xx, a broken connection), latency p50 / p99 of
the answered kinds, and the server's RSS after a warm-up at full concurrency, every 10 s, and at the end. Targets:
no 5xx, every refusal its documented status, RSS growth under 50 MB. Stops by itself. Writes
``artifacts/soak/report.{md,json}``::

    .venv/bin/python bench/soak.py [--requests 2000] [--seconds 600] [--clients 16]
"""

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import psutil
import torch

from steerkit import SteeringVector
from steerkit.serve import launch

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
PROMPTS = ["Describe your morning.", "What is rain?", "Name a colour.", "How do boats float?", "Say hello."]
# kind -> (share of requests, the status the server must answer)
KINDS = {"steered": (0.3, 200), "unsteered": (0.2, 200), "streamed": (0.15, 200), "cancelled": (0.1, 200),
         "malformed": (0.15, 400), "too large": (0.04, 413), "too many messages": (0.03, 400),
         "no key": (0.03, 401)}  # fmt: skip


def folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="steerkit-soak-"))
    SteeringVector.load(ROOT / "artifacts" / "sentiment.safetensors").select([8]).save(path / "sentiment.safetensors")
    g = torch.Generator().manual_seed(0)
    SteeringVector({10: torch.randn(576, generator=g) * 30}).save(path / "random.safetensors")
    return path


def request(client: httpx.Client, url: str, kind: str, rng: random.Random) -> int:
    """Send one request of ``kind``; the status the server answered (a stream is read, or dropped, as the kind says)."""
    chat = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": rng.randint(4, 16)}
    if kind == "steered":
        vector = rng.choice(["sentiment", "random"])
        chat["steering"] = [{"vector": vector, "alpha": rng.choice([-0.5, 0.25, 0.5]),
                             "positions": rng.choice(["all", "prompt", "generated"])}]  # fmt: skip
    if kind in ("streamed", "cancelled"):
        with client.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True, "max_tokens": 24},
                           headers=AUTH) as reply:  # fmt: skip
            for i, _ in enumerate(reply.iter_lines()):
                if kind == "cancelled" and i == 2:
                    break  # the client goes away mid-stream
            return reply.status_code
    if kind == "malformed":
        body = rng.choice([b"{not json", b'{"messages": []}', json.dumps({**chat, "steering": [{"vector": "nope"}]}),
                           json.dumps({**chat, "max_tokens": -3}), b'{"messages": "hi"}'])  # fmt: skip
        return client.post(f"{url}/v1/chat/completions", content=body, headers=AUTH).status_code
    if kind == "too large":
        return client.post(f"{url}/v1/chat/completions", content=b" " * 70_000, headers=AUTH).status_code
    if kind == "too many messages":
        chat["messages"] = chat["messages"] * 40
    headers = {} if kind == "no key" else AUTH
    return client.post(f"{url}/v1/chat/completions", json=chat, headers=headers).status_code


def warm_up(url: str, clients: int) -> None:
    """Two rounds of full batches of every answered kind, so that the baseline RSS is the server's at load (the
    allocator's high-water mark for the largest batch), and growth after it is what a leak would add."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> None:
        with httpx.Client(timeout=120) as session:
            request(session, url, ["steered", "unsteered", "streamed"][i % 3], random.Random(i))

    for _ in range(2):
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(clients * 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    proc, url = launch(folder(), "--device", "cpu", "--api-key", KEY, "--max-batch", "16", "--max-queue", "64",
                       "--max-body-bytes", "65536", "--max-messages", "32", timeout=300)  # fmt: skip
    server = psutil.Process(proc.pid)
    outcomes: list[tuple[str, int, float]] = []
    errors: Counter = Counter()
    lock = threading.Lock()
    issued = iter(range(args.requests))
    stop_at = time.monotonic() + args.seconds
    pace = args.seconds / args.requests * args.clients  # each client's interval, so the run spans the time given

    def client(seed: int) -> None:
        rng = random.Random(seed)
        names, weights = zip(*((k, v[0]) for k, v in KINDS.items()), strict=True)
        with httpx.Client(timeout=120) as session:
            for _ in issued:
                if time.monotonic() > stop_at:
                    return
                kind = rng.choices(names, weights)[0]
                started = time.monotonic()
                try:
                    status = request(session, url, kind, rng)
                except httpx.HTTPError as err:
                    with lock:
                        errors[f"{kind}: {type(err).__name__}"] += 1
                    continue
                took = time.monotonic() - started
                with lock:
                    outcomes.append((kind, status, took))
                time.sleep(max(0.0, pace - took) * rng.random() * 2)

    try:
        warm_up(url, args.clients)
        rss_start = server.memory_info().rss
        started = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        trace = []  # (seconds, RSS) every 10 s: a leak climbs, an allocator's high-water mark levels off
        while any(t.is_alive() for t in threads):
            trace.append((time.monotonic() - started, server.memory_info().rss))
            time.sleep(10)
        wall = time.monotonic() - started
        rss_end = server.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(60)
    report(outcomes, errors, rss_start, rss_end, wall, args, trace)


def report(outcomes, errors, rss_start: int, rss_end: int, wall: float, args, trace: list) -> None:
    from steerkit._io import atomic_path

    by_kind: dict[str, list] = defaultdict(list)
    for kind, status, took in outcomes:
        by_kind[kind].append((status, took))
    lines = [f"# steerkit serve soak: {len(outcomes)} requests in {wall:.0f} s from {args.clients} clients", "",
             "| kind | sent | documented status | answered so | other statuses | latency p50 / p99 s |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    wrong = 0
    for kind, (_, expected) in KINDS.items():
        rows = by_kind.get(kind, [])
        right = [took for status, took in rows if status == expected]
        other = Counter(status for status, _ in rows if status != expected)
        wrong += sum(other.values())
        p50 = statistics.median(right) if right else float("nan")
        p99 = sorted(right)[min(len(right) - 1, int(0.99 * len(right)))] if right else float("nan")
        lines.append(f"| {kind} | {len(rows)} | {expected} | {len(right)} | {dict(other) or '-'} | "
                     f"{p50:.2f} / {p99:.2f} |")  # fmt: skip
    fives = sum(1 for _, status, _ in outcomes if status >= 500)
    growth = (rss_end - rss_start) / 2**20
    lines += ["", f"completed (200): {sum(1 for _, s, _ in outcomes if s == 200)}; refused as documented: "
              f"{sum(1 for k, s, _ in outcomes if s == KINDS[k][1] != 200)}; failed (a wrong status or a broken "
              f"connection): {wrong + sum(errors.values())}; 5xx: {fives}",
              f"connection errors: {dict(errors) or 'none'}",
              f"server RSS after warm-up {rss_start / 2**20:.0f} MB, at the end {rss_end / 2**20:.0f} MB "
              f"(growth {growth:+.1f} MB; target < 50)",
              "RSS over the run (s: MB): "
              + ", ".join(f"{t:.0f}: {m / 2**20:.0f}" for t, m in trace[:: max(1, len(trace) // 12)]),
              f"targets: no 5xx {'met' if not fives else 'MISSED'}; every refusal its documented status "
              f"{'met' if not wrong else 'MISSED'}; RSS growth {'met' if growth < 50 else 'MISSED'}",
              "", f"reproduce: `.venv/bin/python bench/soak.py --requests {args.requests} --seconds {args.seconds:g} "
              f"--clients {args.clients}`"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    data = {"outcomes": outcomes, "errors": dict(errors), "rss_start": rss_start, "rss_end": rss_end, "wall": wall,
            "rss_trace": trace}  # fmt: skip
    for name, content in (("report.md", text), ("report.json", json.dumps(data) + "\n")):
        with atomic_path(ROOT / "artifacts" / "soak" / name, force=True) as tmp:
            Path(tmp).write_text(content)


if __name__ == "__main__":
    main()
