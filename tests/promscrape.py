"""Scraping a /metrics endpoint in tests: GET it, parse it with prometheus_client's own parser
(as Prometheus reads it), look samples up by name and labels."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    """Every sample of one GET /metrics, parsed by prometheus_client's own text parser."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def rpcs(samples: Samples, service: str, method: str, code: str) -> float:
    return val(samples, "mint_rpc_requests_total", service=service, method=method, code=code)


def rpc_latency_count(samples: Samples, service: str, method: str) -> float:
    return val(samples, "mint_rpc_latency_seconds_count", service=service, method=method)
