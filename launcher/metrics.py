"""A small Prometheus registry (counters, gauges, histograms) rendered in text format 0.0.4.

Metric names follow the Rust router's (``tgi_request_count``, ``tgi_batch_current_size``, ...);
counters carry no ``_total`` suffix, as metrics-exporter-prometheus renders them.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import defaultdict

Labels = tuple[tuple[str, str], ...]

DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
COUNT_BUCKETS = tuple(float(2**i) for i in range(16))
# Histograms measured in tokens or requests rather than seconds.
COUNT_HISTOGRAMS = {
    "tgi_request_input_length",
    "tgi_request_generated_tokens",
    "tgi_request_max_new_tokens",
    "tgi_batch_next_size",
    "tgi_request_skipped_tokens",
}

HELP = {
    "tgi_request_count": "Requests received",
    "tgi_request_success": "Requests that finished successfully",
    "tgi_request_failure": "Requests that failed, by error type",
    "tgi_request_duration": "End-to-end request duration (s)",
    "tgi_request_validation_duration": "Time spent validating and tokenizing (s)",
    "tgi_request_queue_duration": "Time spent waiting in the queue (s)",
    "tgi_request_inference_duration": "Time from entering a batch to the last token (s)",
    "tgi_request_mean_time_per_token_duration": "Inference time divided by generated tokens (s)",
    "tgi_request_generated_tokens": "Generated tokens per request",
    "tgi_request_input_length": "Prompt tokens per request",
    "tgi_request_max_new_tokens": "max_new_tokens per request",
    "tgi_queue_size": "Requests waiting in the queue",
    "tgi_batch_current_size": "Requests in the running batch",
    "tgi_batch_current_max_tokens": "Token capacity the running batch may grow to",
    "tgi_batch_next_size": "Size of each new batch taken from the queue",
    "tgi_batch_concat": "New batches joined to a running one, by reason",
    "tgi_batch_inference_count": "Prefill/Decode calls",
    "tgi_batch_inference_success": "Prefill/Decode calls that succeeded",
    "tgi_batch_inference_failure": "Prefill/Decode calls that failed",
    "tgi_batch_inference_duration": "Router-side wall time of a Prefill/Decode step (s)",
    "tgi_batch_forward_duration": "Shard-reported forward time of a step (s)",
    "tgi_batch_decode_duration": "Shard-reported post-processing time of a step (s)",
    "tgi_batch_filter_duration": "Router time sending tokens and filtering after a step (s)",
    "tgi_batch_concat_duration": "Shard-reported batch concatenation time (s)",
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
    def __init__(self) -> None:
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
            buckets = COUNT_BUCKETS if name in COUNT_HISTOGRAMS else DURATION_BUCKETS
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
