"""Secrets out of what is shown and logged: URLs without their credentials, configs without them.

A URL may carry a secret three ways: a password in its userinfo (postgresql://u:PASSWORD@h/db,
https://u:PASSWORD@mlflow), a token in its query (?token=..., S3's X-Amz-Signature=...), or a
token in its path (Slack's https://hooks.slack.com/services/T../B../TOKEN). The first two have a
place that can be masked; the third has not, so a webhook URL is shown as its host only.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

MASK = "***"
# Query parameter names that hold a credential (case-insensitive, matched anywhere in the name):
# token, access_token, api_key, apikey, key, secret, password, sig/signature (S3, Azure SAS), auth.
SECRET_QUERY = re.compile(r"token|key|secret|pass|pwd|sig|auth|credential", re.IGNORECASE)
# Config fields whose whole value is a URL with its secret in the path: shown as their host only.
HOST_ONLY_FIELDS = frozenset({"webhook_url"})


def redact_url(url: str) -> str:
    """`url` without its password and without the values of credential-like query parameters,
    for messages, logs and /admin/state. Anything that is not a URL comes back unchanged."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, hash_sign, fragment = rest.partition("#")
    rest, question, query = rest.partition("?")
    userinfo, at, host = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(SECRET_QUERY.search(k) for k, _ in pairs):  # else the query stays byte for byte
        query = urlencode([(k, MASK if SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*/:")
    return f"{scheme}{sep}{rest}{question}{query}{hash_sign}{fragment}"


def holds_secret(url: str) -> bool:
    """Whether `url` carries a password or a credential-like query value."""
    return redact_url(url) != url


def url_host(url: str) -> str:
    """Only where a URL goes (scheme://host[:port]/...), for URLs whose path is the secret."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return MASK
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1].split("?", 1)[0]
    return f"{scheme}://{host}/{MASK}"


def redacted(config: Any, field: str | None = None) -> Any:
    """A dumped config (dicts, lists, strings) with every URL's credentials masked and webhook
    URLs reduced to their host: what is logged as MLflow params and the effective config."""
    if isinstance(config, dict):
        return {k: redacted(v, k) for k, v in config.items()}
    if isinstance(config, list):
        return [redacted(v, field) for v in config]
    if isinstance(config, str) and "://" in config:
        return url_host(config) if field in HOST_ONLY_FIELDS else redact_url(config)
    return config
