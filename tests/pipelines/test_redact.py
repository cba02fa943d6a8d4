"""pipelines/redact.py: what is shown and logged of a URL or a config keeps where it points and
loses its credentials."""

from pipelines.redact import holds_secret, redact_url, redacted, url_host


def test_a_url_loses_its_password_and_credential_query_values_and_keeps_the_rest():
    """Seen red: with SECRET_QUERY matching no name -> "...access_token=abc#top" came back as it was."""
    assert redact_url("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("https://u:pw@mlflow.example/api?experiment=3&access_token=abc#top") == "https://u:***@mlflow.example/api?experiment=3&access_token=***#top"
    signed = redact_url("https://bucket.s3.amazonaws.com/data.jsonl?X-Amz-Credential=AK%2F1&X-Amz-Signature=ff00&X-Amz-Expires=60")
    assert "AK" not in signed and "ff00" not in signed and "X-Amz-Expires=60" in signed
    for plain in ("sqlite:////tmp/mlflow.db", "http://127.0.0.1:5000", "postgresql://u@h/db", "data/raw.jsonl", "redis://h:6379/0", "postgresql://u@h/db?options=-c%20search_path%3Dx"):
        assert redact_url(plain) == plain and not holds_secret(plain)
    assert holds_secret("postgresql://u:pw@h/db") and holds_secret("http://h/hook?token=t")


def test_a_config_dump_is_redacted_wherever_a_url_sits_and_a_webhook_keeps_only_its_host():
    config = {
        "record": {"store": "postgresql://u:pw@db/records", "retention_days": 30},
        "notify": {"webhook_url": "https://hooks.slack.com/services/T0/B0/SECRET", "events": ["promoted"]},
        "data": {"sources": [{"path": "https://h/x.jsonl?sig=SECRET2"}, {"path": "data/local.csv"}]},
    }
    out = redacted(config)
    assert out["record"] == {"store": "postgresql://u:***@db/records", "retention_days": 30}
    assert out["notify"] == {"webhook_url": "https://hooks.slack.com/***", "events": ["promoted"]}
    assert out["data"]["sources"] == [{"path": "https://h/x.jsonl?sig=***"}, {"path": "data/local.csv"}]
    assert url_host("https://u:pw@h:8443/a/b?c=d") == "https://h:8443/***"
