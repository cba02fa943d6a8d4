"""Webhook notifications: delivered with the outcome's fields, retried past a 5xx, filtered by
`notify.events`, taken from the environment before params, and never fatal when the webhook is
down."""

import pytest

from pipelines.config import NotifyParams
from tasks.notify import notify
from tests.conftest import tiny_params
from tests.tasks.webhook import Webhook


@pytest.fixture
def hook():
    h = Webhook()
    yield h
    h.close()


def test_delivers_event_text_and_fields(hook):
    params = tiny_params(notify=NotifyParams(webhook_url=hook.url))
    assert notify(params, "promoted", "version 3 promoted", version="3", previous="2")
    (msg,) = hook.received
    assert msg["event"] == "promoted" and msg["version"] == "3" and msg["previous"] == "2"
    assert msg["model"] == params.registry.model_name and "version 3 promoted" in msg["text"]


def test_events_not_listed_are_not_sent(hook):
    params = tiny_params(notify=NotifyParams(webhook_url=hook.url, events=["gate_failed"]))
    assert not notify(params, "promoted", "x")
    assert notify(params, "gate_failed", "y")
    assert hook.events() == ["gate_failed"]


def test_environment_url_wins_over_params(hook, monkeypatch):
    monkeypatch.setenv("MY_HOOK", hook.url)
    params = tiny_params(notify=NotifyParams(webhook_url="http://127.0.0.1:9/never", webhook_url_env="MY_HOOK"))
    assert notify(params, "rolled_back", "v2 rolled back")
    assert hook.events() == ["rolled_back"]


def test_server_error_is_retried():
    hook = Webhook(fail_first=2, status=503)
    try:
        assert notify(tiny_params(notify=NotifyParams(webhook_url=hook.url)), "promoted", "x")
        assert hook.attempts == 3 and hook.events() == ["promoted"]
    finally:
        hook.close()


def test_refused_message_is_not_retried_and_not_fatal():
    hook = Webhook(fail_first=10, status=400)
    try:
        assert not notify(tiny_params(notify=NotifyParams(webhook_url=hook.url)), "promoted", "x")
        assert hook.attempts == 1
    finally:
        hook.close()


def test_unreachable_webhook_warns_and_returns(capsys):
    params = tiny_params(notify=NotifyParams(webhook_url="http://127.0.0.1:9/hook?token=s3cret", timeout_s=0.5))
    assert not notify(params, "promoted", "x")
    out = capsys.readouterr().out
    assert "not delivered to 127.0.0.1" in out and "s3cret" not in out
