"""The monitoring stack's files, rendered from params (`monitor:`, `serve:`).

- `recording_rules(params)`, `alert_rules(params)`: Prometheus rule groups. The SLO targets,
  the burn-rate window pairs and every alert's threshold and duration come from params, so
  they are rendered, not templated by hand: a burn-rate alert needs one recording rule per
  window and one condition per window pair, which a template cannot derive. The committed
  `monitoring/rules/*.yml` are the rendering of the committed params.yaml (kept so by
  tests/monitoring/test_render.py, like dvc.yaml); `make monitor` renders the current params
  into .serving/monitoring/ and runs those.
- `prometheus_config(...)`, `alertmanager_config(...)`: the templates `monitoring/prometheus.yml`
  and `monitoring/alertmanager.yml` with the addresses, intervals and paths filled in.

    python -m monitoring.render            # rewrite monitoring/rules/ from ./params.yaml

Label sets of the recorded series (the prefix before the first colon names them):
  version:   plane, model, version, role      (role: stable | canary | shadow on the gateway's
                                                series; stable | canary | leaving on an engine's)
  tier:      plane, model, tier
  version_tier: plane, model, version, role, tier
  model:     plane, model
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.utils import floatToGoString

from pipelines.config import ConfigError, Params, load_params
from pipelines.serve_config import seconds
from serving.tls import trusted_ca

HERE = Path(__file__).resolve().parent
RULES_DIR = HERE / "rules"
RULE_FILES = ("recording.yml", "alerts.yml")
HEADER = "# Rendered from params.yaml by monitoring/render.py (python -m monitoring.render): edit params, not this file.\n"

V = "plane, model, version, role"  # a version's series
T = "plane, model, tier"  # a key tier's series
VT = "plane, model, version, role, tier"
DASHBOARD_WINDOW = "5m"  # the service views' rate window


def failure_selector() -> str:
    """The outcomes a version is blamed for (serving.routing.FAILURES), as a label matcher."""
    from serving.routing import FAILURES

    return f'outcome=~"{"|".join(sorted(FAILURES))}"'


def failures(labels: str, window: str) -> str:
    """Failed requests per second by `labels`, 0 (not absent) where requests were all answered:
    a failure's series exists only after the first failure, and a healthy stable must still
    have an error ratio to compare a canary's with."""
    everything = f"sum by ({labels}) (rate(gateway_backend_requests_total[{window}]))"
    return f"(sum by ({labels}) (rate(gateway_backend_requests_total{{{failure_selector()}}}[{window}])) or {everything} * 0)"


def le(bound: float, buckets: tuple[float, ...], key: str, metric: str) -> str:
    """The `le` label of the bucket a latency SLO reads, or a ConfigError naming the key."""
    if float(bound) not in {float(b) for b in buckets}:
        raise ConfigError(f"params.yaml: {key}: {bound:g} is not a bucket bound of {metric}; the share of requests under it is read off a bucket. Use one of {', '.join(f'{b:g}' for b in buckets)}")
    return floatToGoString(bound)


def rule(record: str, expr: str) -> dict[str, str]:
    return {"record": record, "expr": " ".join(expr.split())}


def ttft_rate(selector: str, window: str, suffix: str = "bucket") -> str:
    """Time to first token from the engines: the CPU engine's histogram, or vLLM's."""
    return f"rate(serving_time_to_first_token_seconds_{suffix}{selector}[{window}]) or rate(vllm:time_to_first_token_seconds_{suffix}{selector}[{window}])"


def slo_rules(params: Params, window: str) -> list[dict[str, str]]:
    """The three SLOs' bad-event ratios over one window, per version."""
    from serving.routing import LATENCY_BUCKETS
    from serving.server_metrics import LATENCY_BUCKETS as ENGINE_BUCKETS

    m = params.monitor
    latency_le = le(m.slo_p95_latency_s, LATENCY_BUCKETS, "monitor.slo_p95_latency_s", "gateway_backend_latency_seconds")
    ttft_le = le(m.slo_p95_ttft_s, ENGINE_BUCKETS, "monitor.slo_p95_ttft_s", "serving_time_to_first_token_seconds")
    return [
        rule(f"version:slo_errors:ratio_rate{window}", f"{failures(V, window)} / sum by ({V}) (rate(gateway_backend_requests_total[{window}]))"),
        rule(f"version:slo_slow_answers:ratio_rate{window}", f"""
            1 - sum by ({V}) (rate(gateway_backend_latency_seconds_bucket{{le="{latency_le}"}}[{window}]))
            / sum by ({V}) (rate(gateway_backend_latency_seconds_count[{window}]))"""),
        rule(f"version:slo_slow_first_tokens:ratio_rate{window}", f"""
            1 - sum by ({V}) ({ttft_rate(f'{{le="{ttft_le}"}}', window)})
            / sum by ({V}) ({ttft_rate("", window, "count")})"""),
    ]


def service_rules(window: str) -> list[dict[str, str]]:
    """What the dashboards show, per version and per key tier, over `window`."""
    w = window
    return [
        rule(f"version_tier:gateway_requests:rate{w}", f"sum by ({VT}) (rate(gateway_backend_requests_total[{w}]))"),
        rule(f"version_tier:gateway_errors:rate{w}", failures(VT, w)),
        rule(f"version:gateway_requests:rate{w}", f"sum by ({V}) (version_tier:gateway_requests:rate{w})"),
        rule(f"version:gateway_error_ratio:rate{w}", f"sum by ({V}) (version_tier:gateway_errors:rate{w}) / version:gateway_requests:rate{w}"),
        rule(f"tier:gateway_requests:rate{w}", f"sum by ({T}) (version_tier:gateway_requests:rate{w})"),
        rule(f"tier:gateway_error_ratio:rate{w}", f"sum by ({T}) (version_tier:gateway_errors:rate{w}) / tier:gateway_requests:rate{w}"),
        *[
            rule(f"{level}:gateway_latency_seconds:p{q}_{w}", f"histogram_quantile(0.{q}, sum by ({labels}, le) (rate(gateway_backend_latency_seconds_bucket[{w}])))")
            for level, labels in (("version", V), ("tier", T)) for q in ("50", "95")
        ],
        *[rule(f"version:engine_ttft_seconds:p{q}_{w}", f"histogram_quantile(0.{q}, sum by ({V}, le) ({ttft_rate('', w)}))") for q in ("50", "95")],
        rule(f"tier:gateway_ttft_seconds:p95_{w}", f"histogram_quantile(0.95, sum by ({T}, le) (rate(gateway_time_to_first_token_seconds_bucket[{w}])))"),
        rule(f"version:engine_tokens:rate{w}", f"""
            sum by ({V}, kind) (rate(serving_tokens_total[{w}]))
            or label_replace(sum by ({V}) (rate(vllm:generation_tokens_total[{w}])), "kind", "completion", "", "")
            or label_replace(sum by ({V}) (rate(vllm:prompt_tokens_total[{w}])), "kind", "prompt", "", "")"""),
        rule(f"tier:gateway_tokens:rate{w}", f"sum by ({T}, kind) (rate(gateway_tokens_total[{w}]))"),
        rule("version_tier:gateway_tokens:increase1h", f"sum by ({VT}, kind) (increase(gateway_tokens_total[1h]))"),
        rule("model:gateway_queue_waiting:max", 'max by (plane, model) (gateway_queue{state="waiting"})'),
        rule("model:gateway_queue_in_flight:max", 'max by (plane, model) (gateway_queue{state="in_flight"})'),
        rule("version:engine_queue_depth:sum", f"sum by ({V}) (serving_queue_depth or vllm:num_requests_waiting)"),
        rule(f"tier:gateway_queue_wait_seconds:p95_{w}", f"histogram_quantile(0.95, sum by ({T}, le) (rate(gateway_queue_wait_seconds_bucket[{w}])))"),
        rule(f"tier:gateway_cache_hit_ratio:rate{w}", f"""
            sum by ({T}) (rate(gateway_cache_requests_total{{result="hit"}}[{w}]))
            / sum by ({T}) (rate(gateway_cache_requests_total[{w}]))"""),
    ]


def canary_rules(window: str) -> list[dict[str, str]]:
    """Canary vs stable over the canary window: the two roles side by side."""
    return [
        rule(f"version:gateway_error_ratio:rate{window}", f"{failures(V, window)} / sum by ({V}) (rate(gateway_backend_requests_total[{window}]))"),
        rule(f"version:gateway_latency_seconds:p95_{window}", f"histogram_quantile(0.95, sum by ({V}, le) (rate(gateway_backend_latency_seconds_bucket[{window}])))"),
    ]


def burn_windows(params: Params) -> list[str]:
    """Every window a burn-rate condition reads, shortest first."""
    found = {w for pair in params.monitor.burn_windows for w in (pair.long, pair.short)}
    return sorted(found, key=seconds)


def unique(rules: list[dict[str, str]]) -> list[dict[str, str]]:
    """One rule per recorded name (the canary window may equal the dashboards')."""
    seen: set[str] = set()
    return [r for r in rules if not (r["record"] in seen or seen.add(r["record"]))]


def recording_rules(params: Params) -> dict[str, Any]:
    service = unique(service_rules(DASHBOARD_WINDOW) + canary_rules(params.monitor.canary_window))
    slo = [r for window in burn_windows(params) for r in slo_rules(params, window)]
    return {"groups": [{"name": "lifecycle-service", "rules": service}, {"name": "lifecycle-slo", "rules": slo}]}


SLOS = (  # alert name, recorded bad-event ratio, what it measures, budget key
    ("ErrorBudgetBurn", "slo_errors", "error ratio", "slo_error_ratio"),
    ("LatencyBudgetBurn", "slo_slow_answers", "p95 latency", None),
    ("TTFTBudgetBurn", "slo_slow_first_tokens", "p95 time to first token", None),
)
P95_BUDGET = 0.05  # a p95 SLO: 5 % of requests may be slower than the threshold


def budget_of(params: Params, key: str | None) -> float:
    return getattr(params.monitor, key) if key else P95_BUDGET


def burn_alerts(params: Params) -> list[dict[str, Any]]:
    """One alert per SLO and severity, firing while any of its window pairs burns (SRE
    workbook's multi-window, multi-burn-rate alerts)."""
    m = params.monitor
    alerts = []
    for name, ratio, what, key in SLOS:
        budget = budget_of(params, key)
        target = {
            "slo_errors": f"at most {m.slo_error_ratio:g} of requests fail",
            "slo_slow_answers": f"95 % of answers within {m.slo_p95_latency_s:g} s",
            "slo_slow_first_tokens": f"95 % of first tokens within {m.slo_p95_ttft_s:g} s",
        }[ratio]
        for severity in ("page", "ticket"):
            pairs = [w for w in m.burn_windows if w.severity == severity]
            if not pairs:
                continue
            conditions = [
                f"(version:{ratio}:ratio_rate{w.long} > {w.burn_rate * budget:.6g} and version:{ratio}:ratio_rate{w.short} > {w.burn_rate * budget:.6g})"
                for w in pairs
            ]
            windows = ", ".join(f"{w.long}/{w.short} x{w.burn_rate:g}" for w in pairs)
            alerts.append({
                "alert": name,
                "expr": " or ".join(conditions),
                "labels": {"severity": severity, "slo": ratio.removeprefix("slo_")},
                "annotations": {
                    "summary": f"version {{{{ $labels.version }}}} ({{{{ $labels.role }}}}) of {{{{ $labels.model }}}} burns its {what} budget",
                    "description": f"SLO {target}: bad-event ratio {{{{ $value | humanizePercentage }}}} over the long window, budget {budget:g}, window pairs {windows}.",
                },
            })
    return alerts


def alert_rules(params: Params) -> dict[str, Any]:
    m, serve = params.monitor, params.serve
    cw = m.canary_window
    saturated = []
    if serve.queue_max_waiting:
        saturated.append(f"model:gateway_queue_waiting:max >= {m.queue_saturation * serve.queue_max_waiting:.6g}")
    saturated.append('sum by (plane, model) (rate(gateway_queue{state="rejected_full"}[5m])) > 0')
    alerts = burn_alerts(params) + [
        {
            "alert": "EngineDown", "expr": 'up{job="engine"} == 0', "for": m.engine_down_for,
            "labels": {"severity": "page"},
            "annotations": {"summary": "engine {{ $labels.replica }} (version {{ $labels.version }}, {{ $labels.role }}) of {{ $labels.model }} does not answer its scrape", "description": f"{{{{ $labels.instance }}}} unreachable for {m.engine_down_for}; the plane's supervisor restarts a dead engine on a new port, which replaces this target."},
        },
        {
            "alert": "GatewayDown", "expr": 'up{job="gateway"} == 0', "for": m.engine_down_for,
            "labels": {"severity": "page"},
            "annotations": {"summary": "the gateway of {{ $labels.model }} ({{ $labels.plane }}) does not answer its scrape", "description": f"{{{{ $labels.instance }}}} unreachable for {m.engine_down_for}."},
        },
        {
            "alert": "QueueSaturated", "expr": " or ".join(f"({s})" for s in saturated), "for": m.queue_for,
            "labels": {"severity": "ticket"},
            "annotations": {"summary": "the gateway queue of {{ $labels.model }} is saturated", "description": f"waiting requests at {m.queue_saturation:g} of serve.queue_max_waiting ({serve.queue_max_waiting}) or requests refused with 429 for {m.queue_for}: {{{{ $value | printf `%.3g` }}}}."},
        },
        {
            "alert": "RecordRowsDropped", "expr": "sum by (plane, model, reason) (increase(gateway_record_dropped_total[5m])) > 0",
            "labels": {"severity": "ticket"},
            "annotations": {"summary": "the record of every answer of {{ $labels.model }} ({{ $labels.plane }}) is losing rows ({{ $labels.reason }})", "description": "{{ $value | printf `%.0f` }} answered completions not recorded over 5m. buffer_full: rows came faster than the redactor wrote them for longer than record.buffer_rows holds (gateway_record_batches_total says which redactor made the batches); store_error: the store refused a batch (the gateway's log names it). Requests were answered all the same."},
        },
        {
            "alert": "CanaryWorseThanStable",
            "expr": (
                f'(version:gateway_error_ratio:rate{cw}{{role="canary"}} > on (plane, model) group_left () '
                f'(max by (plane, model) (version:gateway_error_ratio:rate{cw}{{role="stable"}}) + {m.canary_error_ratio_margin:g}))'
                f' or (version:gateway_latency_seconds:p95_{cw}{{role="canary"}} > on (plane, model) group_left () '
                f'(max by (plane, model) (version:gateway_latency_seconds:p95_{cw}{{role="stable"}}) * {m.canary_latency_ratio:g}))'
            ),
            "for": m.canary_for,
            "labels": {"severity": "page"},
            "annotations": {"summary": "canary version {{ $labels.version }} of {{ $labels.model }} is worse than stable", "description": f"over {cw}: error ratio more than {m.canary_error_ratio_margin:g} above stable's, or p95 latency more than {m.canary_latency_ratio:g}x stable's (value {{{{ $value | printf `%.3g` }}}}) for {m.canary_for}."},
        },
        {
            "alert": "OnlineQualityDrop", "expr": f"lifecycle_online_quality_score < {m.quality_min:g}", "for": m.quality_for,
            "labels": {"severity": "ticket"},
            "annotations": {"summary": "online quality of {{ $labels.model }} version {{ $labels.version }} dropped", "description": f"score {{{{ $value | printf `%.3g` }}}} below monitor.quality_min {m.quality_min:g} for {m.quality_for} (scheduled online-quality check)."},
        },
        {
            "alert": "DriftDetected", "expr": "lifecycle_drift_score > on (model, check) lifecycle_drift_threshold", "for": m.drift_for,
            "labels": {"severity": "ticket"},
            "annotations": {"summary": "{{ $labels.model }}: live prompts drifted ({{ $labels.check }})", "description": f"drift score {{{{ $value | printf `%.3g` }}}} above its threshold for {m.drift_for} (scheduled drift check)."},
        },
    ]
    return {"groups": [{"name": "lifecycle-alerts", "rules": alerts}]}


def rules(params: Params) -> dict[str, str]:
    """{file name: YAML text} of both rule files."""
    dump = lambda doc: HEADER + yaml.safe_dump(doc, sort_keys=False, width=10_000)  # noqa: E731
    return {"recording.yml": dump(recording_rules(params)), "alerts.yml": dump(alert_rules(params))}


def write_rules(params: Params, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in rules(params).items():
        (out / name).write_text(text)
        paths.append(out / name)
    return paths


def fill(template: str, **values: Any) -> str:
    """A template's ${names} filled in; a name left unfilled is an error, not a silent blank."""
    return string.Template((HERE / template).read_text()).substitute(**{k: str(v) for k, v in values.items()})


def prometheus_config(params: Params, rule_files: list[Path], target_files: list[Path]) -> str:
    m = params.monitor
    timeout = m.scrape_interval if seconds(m.scrape_interval) < 10 else "10s"  # a scrape may not outlast its interval
    trusted = trusted_ca(params.serve)
    # Absolute: Prometheus resolves a relative ca_file against its configuration's folder.
    serving_tls = f"\n    tls_config:\n      ca_file: {json.dumps(str(Path(trusted).resolve()))}" if trusted else ""
    return fill(
        "prometheus.yml", serving_tls=serving_tls,
        scrape_interval=m.scrape_interval, scrape_timeout=timeout, evaluation_interval=m.evaluation_interval,
        rule_files=yaml.safe_dump([str(p) for p in rule_files], default_flow_style=True).strip(),
        target_files=yaml.safe_dump([str(p) for p in target_files], default_flow_style=True).strip(),
        alertmanager=f"127.0.0.1:{m.alertmanager_port}", receiver=f"127.0.0.1:{m.receiver_port}", prometheus=f"127.0.0.1:{m.prometheus_port}",
    )


def alertmanager_config(params: Params) -> str:
    m = params.monitor
    return fill("alertmanager.yml", receiver=f"127.0.0.1:{m.receiver_port}", group_wait=m.group_wait, group_interval=m.group_interval, repeat_interval=m.repeat_interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m monitoring.render", description="Render the Prometheus rules from params (monitor:, serve:) into monitoring/rules/.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=RULES_DIR)
    args = parser.parse_args(argv)
    try:
        paths = write_rules(load_params(args.params), args.out)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
