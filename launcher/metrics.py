"""A small Prometheus registry (counters, gauges, histograms) rendered in text format 0.0.4.

Metric names, labels, buckets and descriptions follow the Rust router's (``tgi_request_count``,
``tgi_batch_current_size``, ...; ``router/src/server.rs`` and ``backends/v3``); counters carry no
``_total`` suffix, as metrics-exporter-prometheus renders them. Series TGI lacks:
``tgi_kv_blocks_free`` / ``tgi_kv_blocks_total`` (the router's block allocator).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]


# The Rust router's buckets (``router/src/server.rs``): every histogram whose name ends in
# "duration" gets 35 geometric buckets from 0.00015 s (x1.5 each); prompt lengths 100 steps of
# max_input_tokens / 100; generated and max_new_tokens 100 steps of max_total_tokens / 100;
# batch sizes 1..1024.
def _geometric(start: float, factor: float, n: int) -> tuple[float, ...]:
    out, value = [], start
    for _ in range(n):  # repeated multiplication, as the router computes them (same floats)
        value *= factor
        out.append(value)
    return tuple(out)


DURATION_BUCKETS = _geometric(0.0001, 1.5, 35)
BATCH_SIZE_BUCKETS = tuple(float(x) for x in range(1, 1025))


def length_buckets(limit: int) -> tuple[float, ...]:
    return tuple(limit / 100 * (x + 1) for x in range(100))


# TGI's descriptions (``metrics::describe_*`` in server.rs), and ours for the series TGI lacks.
HELP = {
    "tgi_request_count": "Total number of requests",
    "tgi_request_success": "Number of successful requests",
    "tgi_request_failure": "Number of failed requests, by error type",
    "tgi_request_duration": "Total time spent processing the request",
    "tgi_request_validation_duration": "Time spent validating the request",
    "tgi_request_queue_duration": "Time spent in the queue per request",
    "tgi_request_inference_duration": "Request inference duration",
    "tgi_request_mean_time_per_token_duration": "Mean time per token per request",
    "tgi_request_generated_tokens": "Generated tokens per request",
    "tgi_request_input_length": "Input token length per request",
    "tgi_request_max_new_tokens": "Maximum new tokens per request",
    "tgi_queue_size": "Current queue size",
    "tgi_batch_current_size": "Current batch size",
    "tgi_batch_current_max_tokens": "Maximum tokens for the current batch",
    "tgi_batch_max_total_tokens": "Maximum amount of tokens in total",
    "tgi_batch_next_size": "Batch size of the next batch",
    "tgi_batch_concat": "New batches joined to a running one, by reason",
    "tgi_batch_inference_count": "Inference calls per method (prefill or decode)",
    "tgi_batch_inference_success": "Number of successful inference calls per method (prefill or decode)",
    "tgi_batch_inference_failure": "Number of failed inference calls per method (prefill or decode)",
    "tgi_batch_inference_duration": "Batch inference duration",
    "tgi_batch_forward_duration": "Batch forward duration per method (prefill or decode)",
    "tgi_batch_decode_duration": "Time spent decoding a batch per method (prefill or decode)",
    "tgi_batch_filter_duration": "Time spent filtering batches and sending generated tokens per method (prefill or decode)",
    "tgi_batch_concat_duration": "Time spent concatenating batches (shard-reported)",
    "tgi_kv_blocks_free": "Free KV blocks in the router's allocator",
    "tgi_kv_blocks_total": "KV blocks the router's allocator can hand out",
}


def _key(labels: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _fmt_labels(labels: Labels, extra: tuple[str, str] | None = None) -> str:
    items = list(labels) + ([extra] if extra else [])
    if not items:
        return ""
    body = ",".join(f'{k}="{v}"' for k, v in items)
    return "{" + body + "}"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1


class Metrics:
    """Counters, gauges and histograms; histogram buckets as the Rust router sets them, the
    token-count ones scaled by the served limits."""

    def __init__(self, max_input_tokens: int = 1024, max_total_tokens: int = 2048) -> None:
        self.buckets = {
            "tgi_request_input_length": length_buckets(max_input_tokens),
            "tgi_request_generated_tokens": length_buckets(max_total_tokens),
            "tgi_request_max_new_tokens": length_buckets(max_total_tokens),
            "tgi_batch_next_size": BATCH_SIZE_BUCKETS,
        }
        self.counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.gauges: dict[str, dict[Labels, float]] = defaultdict(dict)
        self.histograms: dict[str, dict[Labels, _Histogram]] = defaultdict(dict)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        series = self.counters[name]
        key = _key(labels)
        series[key] = series.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[name][_key(labels)] = float(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        series = self.histograms[name]
        key = _key(labels)
        if key not in series:
            buckets = self.buckets.get(name)
            if buckets is None:
                if not name.endswith("duration"):
                    raise AssertionError(f"no buckets for the histogram {name!r}")
                buckets = DURATION_BUCKETS
            series[key] = _Histogram(buckets)
        series[key].observe(value)

    def counter_value(self, name: str, **labels: str) -> float:
        return self.counters.get(name, {}).get(_key(labels), 0.0)

    def gauge_value(self, name: str, **labels: str) -> float:
        return self.gauges.get(name, {}).get(_key(labels), 0.0)

    def render(self) -> str:
        lines: list[str] = []
        for kind, store in (("counter", self.counters), ("gauge", self.gauges)):
            for name in sorted(store):
                lines.append(f"# HELP {name} {HELP.get(name, name)}")
                lines.append(f"# TYPE {name} {kind}")
                for labels, value in sorted(store[name].items()):
                    lines.append(f"{name}{_fmt_labels(labels)} {_fmt(value)}")
        for name in sorted(self.histograms):
            lines.append(f"# HELP {name} {HELP.get(name, name)}")
            lines.append(f"# TYPE {name} histogram")
            for labels, hist in sorted(self.histograms[name].items(), key=lambda kv: kv[0]):
                cumulative = 0
                for bound, count in zip(hist.buckets + (math.inf,), hist.counts):
                    cumulative += count
                    le = ("le", _fmt(bound))
                    lines.append(f"{name}_bucket{_fmt_labels(labels, le)} {cumulative}")
                lines.append(f"{name}_sum{_fmt_labels(labels)} {_fmt(hist.sum)}")
                lines.append(f"{name}_count{_fmt_labels(labels)} {hist.count}")
        return "\n".join(lines) + "\n"
