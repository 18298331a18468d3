"""Prometheus objects (vLLM-style names, prefix idp_); the engine's stats come in via record_*."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from idp_core.generate import GenResult

disable_created_metrics()  # no *_created series: they only add noise to dashboards

# Buckets span a GPU (milliseconds) and this CPU (seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
SELECTION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                     0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """All series carry `model` and `method` (idp | prompt | none | concat | lora).

    A finished request is labelled with its own method (`GenResult.method`). Series that belong
    to no single request (queue gauges, batch sizes, errors before admission) carry
    `default_method`: the server's mode (idp | lora | none), which is also a request method.
    """

    def __init__(self, model: str, default_method: str,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model, self.default_method = model, default_method
        r, base = self.registry, ["model", "method"]
        self.ttft = Histogram("idp_time_to_first_token_seconds", "Time to first token",
                              base, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("idp_inter_token_latency_seconds", "Time between output tokens",
                             base, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("idp_e2e_request_latency_seconds", "Arrival to last token",
                             base, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("idp_request_queue_time_seconds", "Arrival to admission",
                                    base, buckets=LATENCY_BUCKETS, registry=r)
        self.selection = Histogram("idp_prompt_selection_seconds", "IDP selection pass",
                                   base, buckets=SELECTION_BUCKETS, registry=r)
        self.batch_size = Histogram("idp_batch_size", "Rows per decode step", base,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.running = Gauge("idp_num_requests_running", "Requests in the batch", base,
                             registry=r)
        self.waiting = Gauge("idp_num_requests_waiting", "Requests queued", base, registry=r)
        self.prompt_tokens = Counter("idp_prompt_tokens", "Input tokens", base, registry=r)
        self.generation_tokens = Counter("idp_generation_tokens", "Output tokens", base,
                                         registry=r)
        self.selected = Counter("idp_prompt_selected", "Prompt used per request",
                                [*base, "prompt"], registry=r)
        self.success = Counter("idp_request_success", "Finished requests",
                               [*base, "finished_reason"], registry=r)
        self.errors = Counter("idp_request_errors", "Failed requests", [*base, "type"],
                              registry=r)
        self.running.labels(model, default_method).set(0)
        self.waiting.labels(model, default_method).set(0)

    def record_step(self, batch_size: int, running: int, waiting: int) -> None:
        labels = (self.model, self.default_method)
        self.batch_size.labels(*labels).observe(batch_size)
        self.running.labels(*labels).set(running)
        self.waiting.labels(*labels).set(waiting)

    def record_queue(self, running: int, waiting: int) -> None:
        self.running.labels(self.model, self.default_method).set(running)
        self.waiting.labels(self.model, self.default_method).set(waiting)

    def record_finished(self, result: GenResult, *, arrival: float, admitted: float,
                        finished: float) -> None:
        labels = (self.model, result.method)
        self.queue_time.labels(*labels).observe(max(0.0, admitted - arrival))
        self.e2e.labels(*labels).observe(max(0.0, finished - arrival))
        if result.token_times:
            self.ttft.labels(*labels).observe(max(0.0, result.token_times[0] - arrival))
            for a, b in zip(result.token_times, result.token_times[1:], strict=False):
                self.itl.labels(*labels).observe(b - a)
        if result.method == "idp":
            self.selection.labels(*labels).observe(result.selection_s)
        self.prompt_tokens.labels(*labels).inc(len(result.input_ids))
        self.generation_tokens.labels(*labels).inc(len(result.output_ids))
        self.selected.labels(*labels, result.prompt_used).inc()
        self.success.labels(*labels, result.finish_reason).inc()

    def record_error(self, kind: str, method: str | None = None) -> None:
        self.errors.labels(self.model, method or self.default_method, kind).inc()
