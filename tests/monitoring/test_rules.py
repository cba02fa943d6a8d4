"""The rules and configuration files: rendered from params, committed up to date, accepted by
promtool and amtool, and unit-tested with promtool (monitoring/tests/alerts_test.yml: one test
case per alert, firing on the series it is meant for and quiet on a healthy one)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from monitoring import render
from pipelines.config import ConfigError, Params, load_params
from tests.conftest import ROOT
from tests.monitoring.conftest import need

ALERTS = {"ErrorBudgetBurn", "LatencyBudgetBurn", "TTFTBudgetBurn", "EngineDown", "GatewayDown", "QueueSaturated", "RecordRowsDropped", "CanaryWorseThanStable", "OnlineQualityDrop", "DriftDetected"}


def test_the_committed_rules_are_the_rendering_of_the_committed_params():
    """Seen red: with params.yaml's monitor.slo_error_ratio changed to 0.02 and the rules not
    re-rendered, "monitoring/rules/alerts.yml is stale: run python -m monitoring.render"."""
    rendered = render.rules(load_params(ROOT / "params.yaml"))
    for name, text in rendered.items():
        assert (render.RULES_DIR / name).read_text() == text, f"monitoring/rules/{name} is stale: run python -m monitoring.render"


def test_every_alert_has_a_promtool_test_case():
    declared = {r["alert"] for g in yaml.safe_load((render.RULES_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = {t["name"] for t in yaml.safe_load((ROOT / "monitoring/tests/alerts_test.yml").read_text())["tests"]}
    assert declared == ALERTS and tested == ALERTS


def test_promtool_checks_the_rules_and_their_unit_tests_pass():
    """Seen red, both directions: with "timeout" taken out of serving.routing.FAILURES before
    rendering, the ErrorBudgetBurn case failed (version 3's timeouts no longer burned: its
    ticket alert was expected and missing); with serve.queue_max_waiting 2, the QueueSaturated
    case failed because the healthy plane "other" (3 waiting) fired too."""
    promtool = need("promtool")
    checked = subprocess.run([promtool, "check", "rules", *map(str, sorted(render.RULES_DIR.glob("*.yml")))], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts_test.yml"], cwd=ROOT / "monitoring/tests", capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_rules_rendered_from_other_params_pass_promtool_and_use_their_windows(tmp_path):
    params = Params.model_validate({"monitor": {"burn_windows": [{"long": "20s", "short": "5s", "burn_rate": 10, "severity": "page"}], "canary_window": "10s"}})
    paths = render.write_rules(params, tmp_path)
    checked = subprocess.run([need("promtool"), "check", "rules", *map(str, paths)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = (tmp_path / "recording.yml").read_text()
    assert "version:slo_errors:ratio_rate20s" in text and "version:slo_errors:ratio_rate5s" in text and "ratio_rate1h" not in text
    alerts = {r["alert"]: r for g in yaml.safe_load((tmp_path / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert "> 0.1 and version:slo_errors:ratio_rate5s > 0.1" in alerts["ErrorBudgetBurn"]["expr"]  # 10 x the 0.01 budget


def test_a_latency_slo_between_buckets_is_refused_naming_the_key():
    params = Params.model_validate({"monitor": {"slo_p95_latency_s": 3}})
    with pytest.raises(ConfigError, match=r"monitor.slo_p95_latency_s: 3 is not a bucket bound of gateway_backend_latency_seconds.*2.5, 5"):
        render.rules(params)


def test_bad_monitor_params_fail_before_anything_starts():
    with pytest.raises(ValueError, match="short window 1h must be shorter than long window 5m"):
        Params.model_validate({"monitor": {"burn_windows": [{"long": "5m", "short": "1h", "burn_rate": 2, "severity": "page"}]}})
    with pytest.raises(ValueError, match="String should match pattern"):
        Params.model_validate({"monitor": {"scrape_interval": "15 seconds"}})


def test_the_rendered_prometheus_and_alertmanager_configs_are_valid(tmp_path):
    params = load_params(ROOT / "params.yaml")
    rules = render.write_rules(params, tmp_path / "rules")
    (tmp_path / "prometheus.yml").write_text(render.prometheus_config(params, rules, [tmp_path / "plane/targets.json"]))
    (tmp_path / "alertmanager.yml").write_text(render.alertmanager_config(params))
    checked = subprocess.run([need("promtool"), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    amtool = shutil.which("amtool")
    if amtool:
        checked = subprocess.run([amtool, "check-config", str(tmp_path / "alertmanager.yml")], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    assert all(a.startswith("127.0.0.1:") for job in config["scrape_configs"] for sc in job.get("static_configs", []) for a in sc["targets"]), "loopback only"


def test_the_dashboards_name_only_series_the_rules_record_or_the_exporters_export():
    """Every recorded series a panel reads is recorded for any params (their windows are fixed),
    so the committed dashboards work whatever the SLO windows are."""
    from monitoring.panels import dashboards

    recorded = {r["record"] for g in render.recording_rules(Params())["groups"] for r in g["rules"]}
    other = {r["record"] for g in render.recording_rules(Params.model_validate({"monitor": {"canary_window": "1m", "burn_windows": [{"long": "2m", "short": "30s", "burn_rate": 5, "severity": "ticket"}]}}))["groups"] for r in g["rules"]}
    import re

    for board in dashboards().values():
        for panel in board["panels"]:
            for target in panel["targets"]:
                for name in re.findall(r"\b[a-z_]+:[a-z_]+:[a-z0-9_]+\b", target["expr"]):
                    assert name in recorded and name in other, f"{board['title']} / {panel['title']} reads {name}, which the rules do not always record"
