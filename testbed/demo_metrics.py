"""The end of step 8: the agent's own series answered by a real Prometheus, as in the seed.

Role: Debian's ``prometheus`` (started in step 1 by :mod:`testbed.prometheus`) scrapes the
``istio-cni-node`` pod its ``prometheus.io/*`` annotations point at; here PromQL asks it
for the install gauge, the informer events and the
plugin's requests (the late pod of step 7 made some), and the answers go into ``facts``.
"""

from __future__ import annotations

from typing import Any

from testbed import prometheus
from testbed.demo_cluster import DemoError
from testbed.demo_steps import Walkthrough, command, note, show

QUERIES = (
    "istio_cni_install_ready",
    "sum by (type) (nodeagent_reconcile_events_total)",
    "sum by (response_code) (istio_cni_plugin_requests_total)",
)


def metrics_from_prometheus(w: Walkthrough) -> None:
    note("the agent's metrics, scraped by Debian's Prometheus from the pod the chart's "
         "prometheus.io/* annotations point at:")  # fmt: skip
    answers: dict[str, list[dict[str, Any]]] = {}
    try:
        targets = prometheus.wait_series(w.bed, 'up{namespace="istio-cni"} == 1')
        for expr in QUERIES:
            command(f"curl -s 'http://127.0.0.1:{prometheus.PORT}/api/v1/query' "
                    f"--data-urlencode 'query={expr}'")  # fmt: skip
            answers[expr] = prometheus.wait_series(w.bed, expr)
            show("\n".join(f"{r.get('metric')} => {r.get('value', [0, '?'])[1]}"
                           for r in answers[expr]))  # fmt: skip
    except prometheus.PrometheusError as e:
        raise DemoError(str(e)) from None
    ready = answers["istio_cni_install_ready"]
    if not ready or ready[0]["value"][1] != "1":
        raise DemoError(f"istio_cni_install_ready is not 1 in Prometheus: {ready}")
    w.facts["metrics"] = {"targets": targets, "answers": answers}
