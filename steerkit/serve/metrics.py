"""``/metrics`` in Prometheus' text format, through prometheus_client with a registry of the app's own: requests
and errors by kind, prompt and generated tokens, request latency, and, read at each scrape, the queue depth,
the running requests and how full the batch is (what vLLM and TGI expose)."""

from __future__ import annotations

ERROR_KINDS = {400: "invalid_request", 401: "authentication", 404: "not_found", 405: "method", 408: "timeout",
               413: "too_large", 422: "invalid_request", 429: "busy", 500: "server", 503: "shutting_down",
               504: "timeout"}  # fmt: skip
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/steering/vectors", "/v1/steering/stats",
          "/health", "/metrics"}  # fmt: skip


class Metrics:
    """The server's counters, and gauges read from ``engine`` when scraped."""

    def __init__(self, engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("steerkit_requests", "HTTP responses by route and status", ["route", "status"],
                                registry=self.registry)  # fmt: skip
        self.errors = Counter("steerkit_errors", "Refused or failed requests by kind", ["kind"], registry=self.registry)
        self.prompt_tokens = Counter("steerkit_prompt_tokens", "Prompt tokens of answered requests",
                                     registry=self.registry)  # fmt: skip
        self.generation_tokens = Counter("steerkit_generation_tokens", "Generated tokens", registry=self.registry)
        self.latency = Histogram("steerkit_request_seconds", "Seconds from a completion request to its last token",
                                 registry=self.registry,
                                 buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))  # fmt: skip
        gauges = {
            "steerkit_queue_depth": ("Requests waiting for a row of the batch", lambda: engine.waiting.qsize()),
            "steerkit_running_requests": ("Requests in the batch", lambda: len(engine.active)),
            "steerkit_batch_occupancy": ("Running requests / max batch", lambda: len(engine.active) / engine.max_batch),
        }
        for name, (about, read) in gauges.items():
            Gauge(name, about, registry=self.registry).set_function(read)

    def response(self, path: str, status: int) -> None:
        """Count one response (paths outside the API are one route, so a scanner cannot grow the label set)."""
        self.requests.labels(path if path in ROUTES else "other", str(status)).inc()
        if status >= 400:
            self.errors.labels(ERROR_KINDS.get(status, str(status))).inc()

    def completion(self, prompt: int, generated: int, seconds: float) -> None:
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        self.latency.observe(seconds)

    def text(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
