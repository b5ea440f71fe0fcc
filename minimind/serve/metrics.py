"""The server's Prometheus metrics (`GET /metrics`), named as vLLM names its own with a `minimind:` prefix.

    minimind:num_requests_running          gauge      sequences holding a KV-cache row
    minimind:num_requests_waiting          gauge      sequences submitted and waiting for a row
    minimind:kv_cache_usage_perc           gauge      fraction (0-1) of the KV-cache rows (--max-batch-size) in use
    minimind:prompt_tokens_total           counter    prompt tokens prefilled
    minimind:generation_tokens_total       counter    tokens generated
    minimind:request_success_total         counter    sequences finished, by finished_reason ("stop", "length")
    minimind:time_to_first_token_seconds   histogram  submit -> first token, per sequence
    minimind:time_per_output_token_seconds histogram  first -> last token over the tokens after the first
    minimind:e2e_request_latency_seconds   histogram  submit -> finished, per sequence
    minimind:http_requests_total           counter    HTTP responses by endpoint (the route, e.g. /v1/completions)
                                                      and status
    minimind:prefix_cache_queries_total    counter    prompt tokens of sequences prefilled (vLLM's prefix_cache_queries)
    minimind:prefix_cache_hits_total       counter    of those, tokens the prefix cache gave instead of a prefill

A sequence is one choice of a request (`n` > 1 makes several). Engine metrics carry a `model_name` label (the
first served name), as vLLM's do, so its Grafana dashboards work after renaming the prefix. No label ever holds
request text: endpoints are route templates and anything unmatched is "other". Each app has its own
`CollectorRegistry`, so several apps in one process (tests) count apart.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from minimind.serve.scheduler import Event, Job, Scheduler, SchedulerObserver

# vLLM's buckets, so the same dashboards and alerts read the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics(SchedulerObserver):
    """The metrics of one app; observes its scheduler (set as `scheduler.observer`) and counts HTTP responses."""

    def __init__(self, scheduler: Scheduler, model_name: str):
        self.registry = CollectorRegistry()
        reg, label = self.registry, ["model_name"]

        def gauge(name: str, doc: str, read) -> None:
            Gauge(f"minimind:{name}", doc, label, registry=reg).labels(model_name).set_function(read)

        rows = scheduler.engine.max_batch_size
        gauge("num_requests_running", "Sequences holding a KV-cache row (decoding).", lambda: scheduler.running)
        gauge("num_requests_waiting", "Sequences submitted and waiting for a KV-cache row.", lambda: scheduler.waiting)
        gauge("kv_cache_usage_perc", "Fraction of the KV-cache rows in use (1 = --max-batch-size sequences).",
              lambda: scheduler.running / rows)
        self.prompt_tokens = Counter("minimind:prompt_tokens", "Prompt tokens prefilled.", label,
                                     registry=reg).labels(model_name)
        self.generation_tokens = Counter("minimind:generation_tokens", "Tokens generated.", label,
                                         registry=reg).labels(model_name)
        self.success = Counter("minimind:request_success", "Sequences finished, by finished_reason.",
                               [*label, "finished_reason"], registry=reg)
        self.model_name = model_name
        self.ttft = Histogram("minimind:time_to_first_token_seconds", "Seconds from submit to the first token.",
                              label, registry=reg, buckets=TTFT_BUCKETS).labels(model_name)
        self.tpot = Histogram("minimind:time_per_output_token_seconds",
                              "Seconds per generated token after the first, per finished sequence.", label,
                              registry=reg, buckets=TPOT_BUCKETS).labels(model_name)
        self.e2e = Histogram("minimind:e2e_request_latency_seconds", "Seconds from submit to finished.", label,
                             registry=reg, buckets=E2E_BUCKETS).labels(model_name)
        self.http = Counter("minimind:http_requests", "HTTP responses by endpoint (route template) and status.",
                            ["endpoint", "status"], registry=reg)
        self.prefix_queries = Counter("minimind:prefix_cache_queries", "Prompt tokens of sequences prefilled.",
                                      label, registry=reg).labels(model_name)
        self.prefix_hits = Counter("minimind:prefix_cache_hits", "Prompt tokens reused from the prefix cache.",
                                   label, registry=reg).labels(model_name)
        scheduler.observer = self

    def on_tokens(self, job: Job, new_tokens: int, first: bool) -> None:
        """Count prefilled and generated tokens; the first output gives the time to first token."""
        if first:
            self.prompt_tokens.inc(len(job.prompt_ids))
            self.ttft.observe(job.first_token_at - job.submitted_at)
            self.prefix_queries.inc(len(job.prompt_ids))
            self.prefix_hits.inc(job.cached_tokens)
        if new_tokens > 0:
            self.generation_tokens.inc(new_tokens)

    def on_end(self, job: Job, event: Event | None) -> None:
        """A sequence that finished (not cancelled or failed) counts as a success with its latencies."""
        if event is None or isinstance(event, BaseException):
            return
        now = time.monotonic()
        self.success.labels(self.model_name, event.finish_reason).inc()
        self.e2e.observe(now - job.submitted_at)
        if job.first_token_at is not None and job.completion_tokens > 1:
            self.tpot.observe((now - job.first_token_at) / (job.completion_tokens - 1))

    def count_http(self, endpoint: str, status: int) -> None:
        """One HTTP response (called by the request middleware of `serve/operator.py`)."""
        self.http.labels(endpoint, str(status)).inc()

    def response(self) -> Response:
        """The Prometheus text exposition of every metric."""
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

