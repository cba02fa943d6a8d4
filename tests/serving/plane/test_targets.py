"""What the plane tells Prometheus to scrape (serving/plane/targets.py): the gateway and each
replica with the labels the rules group by. That the plane rewrites the file on a supervisor's
restart, and Prometheus follows without a reload, is tests/monitoring/test_alert_path.py."""

from __future__ import annotations

import json

from serving.plane.targets import scrape_address, scrape_targets, write_targets


def test_each_replica_is_a_target_labelled_with_its_version_and_role(tmp_path):
    replicas = [("v1-r0", "1", "http://127.0.0.1:4001"), ("v1-r1", "1", "http://127.0.0.1:4002"), ("v2-r0", "2", "http://127.0.0.1:4003/"), ("v0-r0", "0", "http://127.0.0.1:4004")]
    groups = scrape_targets("m", "plane", "127.0.0.1:8000", replicas, stable="1", canary="2")
    assert groups[0] == {"targets": ["127.0.0.1:8000"], "labels": {"job": "gateway", "model": "m", "plane": "plane"}}
    engines = {g["labels"]["replica"]: (g["targets"], g["labels"]["role"], g["labels"]["version"]) for g in groups[1:]}
    assert engines == {
        "v1-r0": (["127.0.0.1:4001"], "stable", "1"), "v1-r1": (["127.0.0.1:4002"], "stable", "1"),
        "v2-r0": (["127.0.0.1:4003"], "canary", "2"), "v0-r0": (["127.0.0.1:4004"], "leaving", "0"),  # draining after a promotion
    }
    write_targets(tmp_path / "targets.json", groups)
    assert json.loads((tmp_path / "targets.json").read_text()) == groups
    assert not list(tmp_path.glob("*.tmp")), "written in one step"
    assert scrape_targets("m", "plane", None, [], None, None) == []


def test_a_wildcard_bind_is_scraped_on_loopback():
    assert scrape_address("0.0.0.0", 8000) == "127.0.0.1:8000" and scrape_address("127.0.0.2", 80) == "127.0.0.2:80"
