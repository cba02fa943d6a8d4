"""Keys shared by the serving processes and every client of them inside this project (kept free
of torch imports, so the gateway stays a light process).

Keys come from the environment, never from argv (visible to every user in `ps`):
- `$SERVING_API_KEY`: what a spawned server requires (serving.server reads it, and the launcher
  hands it to vLLM as `$VLLM_API_KEY`), so every internal client (the gateway's proxy, the
  canary's probes, health waits, the release's synthetic users) sends it whenever it is set.
- `$SERVING_ADMIN_KEY`: lets a non-loopback client use the gateway's /admin routes.
"""

from __future__ import annotations

import os
import secrets

API_KEY_ENV = "SERVING_API_KEY"
ADMIN_KEY_ENV = "SERVING_ADMIN_KEY"


def env_key(name: str, env: dict[str, str] | None = None) -> str | None:
    """The key in `name` (of `env`, default this process's environment); None when unset or empty."""
    return (os.environ if env is None else env).get(name) or None


def backend_key(env: dict[str, str] | None = None) -> str | None:
    """The Bearer key the serving processes require, if any ($SERVING_API_KEY)."""
    return env_key(API_KEY_ENV, env)


def bearer_headers(key: str | None) -> dict[str, str]:
    """`Authorization: Bearer <key>`, or nothing without a key."""
    return {"authorization": f"Bearer {key}"} if key else {}


def bearer_matches(header: str, key: str) -> bool:
    """Whether an Authorization header carries `key` as its Bearer token."""
    scheme, _, token = header.partition(" ")
    # compare_digest: the time taken does not reveal how much of a guessed key was right.
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), key.encode())
