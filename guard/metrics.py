"""Every Prometheus metric of the server, declared once against an injected registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from guard.batcher import BatchStats

# 1 ms .. 5 s: the guard's budget is milliseconds, timeouts are seconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# RAP scores in the units of the bundle's statistic (guard.core.rap; higher = more suspicious): minus a
# probability drop (prob) sits in [-1, 0.1]; the log-odds statistics (floored and logodds: minus a drop in nats;
# perturbed: logit p(y|x+RAP)) in about [-10, 10].
SCORE_BUCKETS = (
    *(-10.0, -5.0, -3.0, -2.0, -1.0, -0.5, -0.3, -0.2, -0.15, -0.1, -0.05, -0.02, -0.01),
    *(-0.005, -0.0025, -0.001, 0.0, 0.01, 0.1, 1.0, 2.0, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 8.0, 10.0),
)


disable_created_metrics()  # *_created series double the exposition and no dashboard here uses them


class GuardMetrics:
    """`registry` is what the service port's /metrics serves; `scrape_registry`, served only on
    `metrics_port`, adds the per-request score observations to it."""

    def __init__(self, registry: CollectorRegistry, backend: str) -> None:
        self.registry = registry
        self.scrape_registry = CollectorRegistry()
        self.scrape_registry.register(registry)  # a registry is a collector: everything, collected at scrape time
        self.backend = backend
        self.requests = Counter(
            "guard_requests_total",
            "Requests by decision (allow, block, error) and mode.",
            ["decision", "mode"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "guard_request_duration_seconds",
            "Request latency, guard included.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "guard_inference_duration_seconds",
            "Backend time per batch; pass is 1, 2, R (the reader), S (the switch pass) or fused (several).",
            ["pass", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "guard_queue_duration_seconds",
            "Longest wait of a row in the batcher queue, per batch.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "guard_batch_size", "Rows per backend call.", buckets=BATCH_BUCKETS, registry=registry
        )
        self.pending = Gauge(
            "guard_pending_requests", "Rows waiting in the batcher queue (read at scrape time).", registry=registry
        )
        self.flags = Counter(
            "guard_flags_total",
            "Flagged texts by the detector that flagged them: rap, features (the distance), token (a blocklisted "
            "token), reader (a clean reader disputes the label), switch (the label collapses under an untrained "
            "rare word); a text several flag counts for each.",
            ["detector"],
            registry=registry,
        )
        self.rejections = Counter(
            "guard_rejections_total",
            "Requests answered with an error instead of a verdict or an upstream answer, by reason (error_type).",
            ["reason"],
            registry=registry,
        )
        self.http_responses = Counter(
            "guard_http_responses_total",
            "Responses by HTTP status code, the guard's own and forwarded ones (probes and scrapes left out).",
            ["status"],
            registry=registry,
        )
        self.batcher_restarts = Gauge(
            "guard_batcher_restarts", "Times the batcher worker died and was restarted.", registry=registry
        )
        self.rap_score = Histogram(
            "guard_rap_score",
            "Live RAP scores (compare with calibration to see drift). Served on metrics_port only, never on "
            "the service port's /metrics: two scrapes around one request would give its score to any client.",
            ["label"],
            buckets=SCORE_BUCKETS,
            registry=self.scrape_registry,
        )
        self.calibrated_frr = Gauge(
            "guard_calibrated_frr", "FRR target the thresholds were set for.", ["label"], registry=registry
        )
        self.calibrated_far = Gauge(
            "guard_calibrated_far",
            "FAR measured at calibration/evaluation time, per attack.",
            ["attack"],
            registry=registry,
        )
        self.false_accept_ratio = Gauge(
            "guard_false_accept_ratio",
            "Live FAR over the recent window, by source (feedback, probe).",
            ["source"],
            registry=registry,
        )
        self.false_reject_ratio = Gauge(
            "guard_false_reject_ratio",
            "Live FRR over the recent window, by source (feedback, canary).",
            ["source"],
            registry=registry,
        )
        self.failure_mode_allowed = Counter(
            "guard_failure_mode_allowed_total",
            "Requests let through unchecked by failure_mode=open.",
            ["reason"],
            registry=registry,
        )
        self.upstream_duration = Histogram(
            "guard_upstream_request_duration_seconds",
            "Upstream call latency in sidecar mode.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.model_info = Gauge(
            "guard_model_info",
            "Constant 1, labelled with the served model and bundle.",
            ["model", "bundle_sha"],
            registry=registry,
        )

        self.detectors = Gauge(
            "guard_detectors",
            "Constant 1, labelled with the detectors that check inputs (none: a bare, unchecked classifier).",
            ["detectors"],
            registry=registry,
        )
        self.connections_dropped = Counter(
            "guard_connections_dropped_total",
            "Connections the server closed without an answer, by reason: head_timeout (no complete request head "
            "within read_timeout_s), shed (the oldest awaiting a head, closed at the open-connection bound), "
            "refused (at the bound with no connection awaiting a head), invalid_head (a 400 for a head that does "
            "not parse or is too large).",
            ["reason"],
            registry=registry,
        )
        self.batch_tokens = Counter(
            "guard_batch_tokens",
            "Tokens sent to the backend, by kind: real (the rows' own) or padding (added to make the batch "
            "rectangular). Padded share = padding / (real + padding).",
            ["kind"],
            registry=registry,
        )

    def watch_batcher(self, pending: Callable[[], float], restarts: Callable[[], float]) -> None:
        """Queue length and restarts are read from the batcher when scraped, never stale."""
        self.pending.set_function(pending)
        self.batcher_restarts.set_function(restarts)

    def observe_batch(self, stats: BatchStats) -> None:
        tag = next(iter(stats.tags)) if len(stats.tags) == 1 else "fused"
        self.inference_duration.labels(tag, self.backend).observe(stats.compute_seconds)
        self.queue_duration.observe(stats.queue_seconds)
        self.batch_size.observe(stats.rows)
        self.batch_tokens.labels("real").inc(stats.real_tokens)
        self.batch_tokens.labels("padding").inc(stats.padded_tokens - stats.real_tokens)
