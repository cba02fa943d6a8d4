"""API keys and their tiers, from a YAML file (serve.keys_file): who may call the gateway, how
often, and how urgently.

    tiers:
      gold: {priority: 10, rpm: 600, tpm: 100000}
      free: {priority: 0, rpm: 60, tpm: 10000}
      review: {priority: 0, rpm: 60, tpm: 1000, feedback_any: true}
    keys:
      "sk-...": gold

A tier's optional `feedback_any: true` lets its keys send feedback (POST /v1/feedback) on any
completion; other keys may rate only the completions they asked for themselves.

Keys live in a file, never in argv (visible to every user in `ps`) nor in params.yaml
(committed); keep the file out of git and readable by the gateway's user only. Errors name the
bad tier or field and say how to fix it; a key is named by its first characters only, so an
error message or a log never carries a whole secret.

A request's priority is its tier's; a priority header (`x-priority`) may lower it (a batch job
yielding to interactive traffic on the same key) but never raise it above the tier's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PRIORITY_HEADER = "x-priority"
TIER_FIELDS = ("priority", "rpm", "tpm")
OPTIONAL_TIER_FIELDS = ("feedback_any",)


@dataclass(frozen=True)
class Tier:
    """What a key may do: its queue `priority` (higher is served first), requests per minute
    `rpm` and tokens per minute `tpm` (see serving.ratelimit.estimate_tokens)."""

    name: str
    priority: int
    rpm: int
    tpm: int
    feedback_any: bool = False  # may send feedback on any key's completions (serving/feedback.py)


class KeysFileError(ValueError):
    """The keys file is missing or malformed; the message names the place and the fix."""


class BadPriority(ValueError):
    """The priority header is not an integer: 400, in OpenAI's error shape."""

    status = 400

    def __init__(self, value: str) -> None:
        message = f"the {PRIORITY_HEADER} header must be an integer, got {value!r}"
        super().__init__(message)
        self.headers: dict[str, str] = {}
        self.error = {"error": {"message": message, "type": "invalid_request_error", "code": "invalid_priority"}}


def redact(key: str) -> str:
    """Enough of a key to find it in the file, not enough to use it."""
    return key[:6] + "…" if len(key) > 6 else "…"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyTable:
    """Keys to tiers. Keys are held as sha256 digests: a lookup's timing depends on the digest
    of what was sent, which tells an attacker nothing about any real key."""

    def __init__(self, tiers: dict[str, Tier], keys: dict[str, str]) -> None:
        self.tiers = dict(tiers)
        self._by_digest = {digest(key): self.tiers[tier] for key, tier in keys.items()}

    def __len__(self) -> int:
        return len(self._by_digest)

    def tier(self, api_key: str) -> Tier | None:
        """The key's tier, or None for an unknown key (the gateway answers 401)."""
        return self._by_digest.get(digest(api_key))

    def from_authorization(self, header: str | None) -> tuple[str, Tier] | None:
        """(key, tier) for an `Authorization: Bearer <key>` header naming a known key, else None."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        tier = self.tier(token) if scheme.lower() == "bearer" and token else None
        return None if tier is None else (token, tier)


def request_priority(tier: Tier, header: str | None) -> int:
    """The priority a request waits with: the tier's, or the header's when that is lower."""
    if header is None or not header.strip():
        return tier.priority
    try:
        asked = int(header.strip())
    except ValueError:
        raise BadPriority(header) from None
    return min(asked, tier.priority)


def load_keys(path: str | Path) -> KeyTable:
    """Read and check a keys file (format in the module docstring); KeysFileError names what is wrong."""
    path = Path(path)
    example = "e.g.\ntiers:\n  free: {priority: 0, rpm: 60, tpm: 10000}\nkeys:\n  \"sk-...\": free"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KeysFileError(f"keys file {path} not found: create it ({example}) or point serve.keys_file elsewhere") from None
    except yaml.YAMLError as exc:
        raise KeysFileError(f"keys file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != {"tiers", "keys"}:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise KeysFileError(f"keys file {path} must be a mapping with exactly 'tiers' and 'keys', found {found}; {example}")
    return KeyTable(_tiers(path, raw["tiers"]), _keys(path, raw["keys"], raw["tiers"]))


def _tiers(path: Path, raw: Any) -> dict[str, Tier]:
    if not isinstance(raw, dict) or not raw:
        raise KeysFileError(f"{path}: 'tiers' must map tier names to {{priority, rpm, tpm}}, got {raw!r}")
    tiers = {}
    for name, fields in raw.items():
        where = f"{path}: tiers.{name}"
        if not isinstance(fields, dict):
            raise KeysFileError(f"{where} must be a mapping {{priority: <int>, rpm: <int>, tpm: <int>}}, got {fields!r}")
        unknown = sorted(set(fields) - set(TIER_FIELDS) - set(OPTIONAL_TIER_FIELDS))
        missing = [f for f in TIER_FIELDS if f not in fields]
        if unknown or missing:
            raise KeysFileError(f"{where}: unknown field(s) {unknown}, missing field(s) {missing}; a tier has exactly {', '.join(TIER_FIELDS)} (and optionally {', '.join(OPTIONAL_TIER_FIELDS)})")
        if not isinstance(fields.get("feedback_any", False), bool):
            raise KeysFileError(f"{where}.feedback_any must be true or false, got {fields['feedback_any']!r}")
        for field in TIER_FIELDS:
            value = fields[field]
            if isinstance(value, bool) or not isinstance(value, int) or (field != "priority" and value < 1):
                need = "an integer" if field == "priority" else "a whole number >= 1"
                raise KeysFileError(f"{where}.{field} must be {need}, got {value!r}")
        tiers[str(name)] = Tier(str(name), fields["priority"], fields["rpm"], fields["tpm"], fields.get("feedback_any", False))
    return tiers


def _keys(path: Path, raw: Any, tiers: dict[str, Any]) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise KeysFileError(f"{path}: 'keys' must map API keys to tier names, got {type(raw).__name__}")
    keys = {}
    for key, tier in raw.items():
        if not isinstance(key, str) or not key.strip() or key != key.strip() or " " in key:
            raise KeysFileError(f"{path}: keys[{redact(str(key))}] is not a usable API key: quote it as a non-empty string without spaces")
        if tier not in tiers:
            raise KeysFileError(f"{path}: keys[{redact(key)}] names tier {tier!r}, which is not under 'tiers' ({', '.join(map(str, tiers))})")
        keys[key] = str(tier)
    return keys
