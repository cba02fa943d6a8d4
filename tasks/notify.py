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

log = logging.getLogger("notify")
ATTEMPTS = 3


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
    problem = ""
    for attempt in range(ATTEMPTS):
        try:
            r = httpx.post(url, json=body, timeout=params.notify.timeout_s)
            if r.is_success:
                return True
            problem = f"HTTP {r.status_code} {r.text[:200]}"
            if r.status_code < 500 and r.status_code != 429:
                break  # the webhook refused the message itself: asking again changes nothing
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5 * 2**attempt)
    # The URL may hold a secret token (Slack's does): name only its host.
    log.warning("notification '%s' not delivered to %s: %s", event, httpx.URL(url).host, problem)
    print(f"warning: notification '{event}' not delivered to {httpx.URL(url).host}: {problem}")
    return False
