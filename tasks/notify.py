"""Notifications: one JSON POST per release outcome (gate failed, rolled back, promoted,
shadowed) to the webhook in params (`notify.webhook_url`, or the variable it names).

The body carries `text` (what Slack, Mattermost and Teams incoming webhooks display) beside
structured fields (`event`, `model`, `version`, ...) for anything else that listens. A webhook
that is down never fails or holds up the run: three attempts, then a warning in the run's log."""

from __future__ import annotations

import datetime
import logging
import os
import time

import httpx

from pipelines.config import Params
from pipelines.redact import url_host

log = logging.getLogger("notify")
ATTEMPTS = 3


class HideURL(logging.Filter):
    """httpx logs every request's full URL at INFO, and a webhook's URL is its secret (Slack's
    token is in its path): while the webhook is called, its URL is logged as its host only."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.shown = str(httpx.URL(url)), url_host(url)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(str(a) == self.url for a in record.args):
            record.args = tuple(self.shown if str(a) == self.url else a for a in record.args)
        return True


def webhook_url(params: Params) -> str | None:
    return os.environ.get(params.notify.webhook_url_env) or params.notify.webhook_url


def notify(params: Params, event: str, message: str, **fields) -> bool:
    """POST `{event, text, model, at, **fields}`; True when the webhook took it (2xx)."""
    url = webhook_url(params)
    if not url or event not in params.notify.events:
        return False
    body = {
        "event": event,
        "text": f"[{params.registry.model_name}] {message}",
        "model": params.registry.model_name,
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **fields,
    }
    hide = HideURL(url)
    logging.getLogger("httpx").addFilter(hide)
    try:
        return _post(url, body, params.notify.timeout_s, event)
    finally:
        logging.getLogger("httpx").removeFilter(hide)


def _post(url: str, body: dict, timeout_s: float, event: str) -> bool:
    problem = ""
    for attempt in range(ATTEMPTS):
        try:
            r = httpx.post(url, json=body, timeout=timeout_s)
            if r.is_success:
                return True
            problem = f"HTTP {r.status_code} {r.text[:200]}"
            if r.status_code < 500 and r.status_code != 429:
                break  # the webhook refused the message itself: asking again changes nothing
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}".replace(url, url_host(url))
        time.sleep(0.5 * 2**attempt)
    # The URL may hold a secret token (Slack's does): name only its host.
    log.warning("notification '%s' not delivered to %s: %s", event, httpx.URL(url).host, problem)
    print(f"warning: notification '{event}' not delivered to {httpx.URL(url).host}: {problem}")
    return False
