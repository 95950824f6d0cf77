"""The server's Prometheus metrics, in a registry of their own (one per app, so that several
servers in one process, as in tests, do not share counters)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Request outcomes, as the ``outcome`` label of ``lenvm_requests_total``.
OUTCOMES = ("ok", "invalid", "unauthorized", "rejected", "cancelled", "aborted", "error")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lenvm_requests",
            "HTTP requests by endpoint and outcome (ok, invalid: 4xx, unauthorized, rejected: queue or "
            "stream limit or shutting down, cancelled: the client went away, aborted: cut by shutdown, "
            "error: 5xx)",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "lenvm_prompt_tokens", "Prompt tokens of generation requests", registry=r
        )
        self.generated_tokens = Counter(
            "lenvm_generated_tokens", "Tokens in the answers returned (EOS included)", registry=r
        )
        self.discarded_tokens = Counter(
            "lenvm_discarded_tokens",
            "Tokens decoded and then discarded: retries' resampled ends, best_of's other attempts",
            registry=r,
        )
        self.queue_depth = Gauge(
            "lenvm_queue_depth",
            "Answers (each best_of attempt one) waiting for a row of the batch",
            registry=r,
        )
        self.running = Gauge("lenvm_running_requests", "Rows in the running batch", registry=r)
        self.open_streams = Gauge("lenvm_open_streams", "Streaming responses in progress", registry=r)
        self.step_seconds = Histogram(
            "lenvm_step_seconds", "Time of one decoding step of the batch", buckets=STEP_BUCKETS, registry=r
        )
        self.first_token_seconds = Histogram(
            "lenvm_time_to_first_token_seconds",
            "From a generation request's arrival to its first token (to its answer when it is held back)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "lenvm_request_seconds",
            "From a generation request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for endpoint in ("completions", "chat"):  # the common series exist from the start
            for outcome in OUTCOMES:
                self.requests.labels(endpoint, outcome)

    def render(self) -> bytes:
        return generate_latest(self.registry)
