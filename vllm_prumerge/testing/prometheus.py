"""Reading vLLM's `/metrics` (Prometheus text format), with prometheus_client's own parser.

The one home of this for tests and benchmarks.
"""

from __future__ import annotations

import urllib.request

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_prometheus(text: str) -> Samples:
    """Prometheus text -> {sample name: [(labels, value), ...]} (e.g. a histogram's
    `..._bucket`, `..._count` and `..._sum` samples under their own names)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def fetch_metrics(base_url: str, timeout: float = 10.0) -> Samples:
    """GET `{base_url}/metrics` and parse it."""
    with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout) as response:
        return parse_prometheus(response.read().decode())


def metric_total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0.0 when none)."""
    return sum(
        value
        for sample_labels, value in samples.get(name, [])
        if all(sample_labels.get(k) == v for k, v in labels.items())
    )


def metric_max(samples: Samples, name: str) -> float | None:
    """Largest sample named `name` over all label sets (None when absent)."""
    values = [value for _, value in samples.get(name, [])]
    return max(values) if values else None


def histogram_buckets(samples: Samples, name: str, **labels: str) -> dict[float, float]:
    """Cumulative bucket counts of histogram `name` by upper edge (`+Inf` as `math.inf`),
    summed over label sets that include `labels`."""
    buckets: dict[float, float] = {}
    for sample_labels, value in samples.get(name + "_bucket", []):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            edge = float(sample_labels["le"])
            buckets[edge] = buckets.get(edge, 0.0) + value
    return dict(sorted(buckets.items()))
