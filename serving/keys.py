"""API keys, their tiers and scopes, from a YAML file (serve.keys_file): who may call the
gateway, what for, how often, and how urgently. `lifecycle keys create|list|revoke|rotate|migrate`
(registry/keys_cli.py) writes it; nobody needs to edit it by hand.

    version: 2
    secret: "<64 hex digits>"          # this file's HMAC key (made by `lifecycle keys create`)
    tiers:
      gold: {priority: 10, rpm: 600, tpm: 100000}
      free: {priority: 0, rpm: 60, tpm: 10000}
      review: {priority: 0, rpm: 60, tpm: 1000, feedback_any: true}
    keys:
      3f9a2c1d0b7e6a55:                # the key id: 16 hex digits of the key's sha256, as the record names it
        hash: "hmac-sha256:<hex>"      # HMAC-SHA256(secret, key): the key itself is never stored
        tier: gold
        scopes: [inference, feedback]  # of inference, feedback, admin, read-metrics
        expires: "2027-01-01T00:00:00+00:00"   # optional; after it the key gets 401

Keys are stored hashed with HMAC-SHA256 under a per-file secret (the stdlib's `hmac`): a key is
32 random bytes, so a fast keyed hash is enough (a slow password hash guards low-entropy
secrets people choose), and the per-file secret means a leaked file's hashes match no other
file's. A lookup is one HMAC and one dict probe, whatever the number of keys.

Scopes: `inference` (POST /v1/chat/completions, /v1/completions), `feedback` (POST
/v1/feedback), `admin` (every /admin route; a key without it gets 403 there even from
loopback), `read-metrics` (GET /metrics from off this machine on a keyed gateway).

A tier's optional `feedback_any: true` lets its keys send feedback (POST /v1/feedback) on any
completion; other keys may rate only the completions they asked for themselves.

The old plain format (`keys: {"sk-...": gold}`, no `secret`) still loads, its keys with scopes
inference and feedback, and a warning naming the file and the fix (`lifecycle keys migrate`).

Keys live in a file, never in argv (visible to every user in `ps`) nor in params.yaml
(committed); keep the file out of git and readable by the gateway's user only. Errors name the
bad tier or field and say how to fix it; a key is named by its id or first characters only, so
an error message or a log never carries a whole secret.

`KeyRing` is what a gateway holds: it re-reads the file when it changes (its inode, size or
mtime; the CLI replaces it atomically), so a created, revoked or rotated key takes effect on the
next request of every gateway reading that file, without a restart. A file that no longer
loads keeps the last good table (logged): a typo must not open or close the door.

A request's priority is its tier's; a priority header (`x-priority`) may lower it (a batch job
yielding to interactive traffic on the same key) but never raise it above the tier's.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("serving.keys")
PRIORITY_HEADER = "x-priority"
TIER_FIELDS = ("priority", "rpm", "tpm")
OPTIONAL_TIER_FIELDS = ("feedback_any",)
SCOPES = ("inference", "feedback", "admin", "read-metrics")
LEGACY_SCOPES = frozenset({"inference", "feedback"})  # what a plain-format key may do: what it did before scopes
KEY_FIELDS = ("hash", "tier", "scopes")
OPTIONAL_KEY_FIELDS = ("expires", "created", "note")
HASH_SCHEME = "hmac-sha256"
FILE_VERSION = 2


@dataclass(frozen=True)
class Tier:
    """What a key may do: its queue `priority` (higher is served first), requests per minute
    `rpm` and tokens per minute `tpm` (see serving.ratelimit.estimate_tokens)."""

    name: str
    priority: int
    rpm: int
    tpm: int
    feedback_any: bool = False  # may send feedback on any key's completions (serving/feedback.py)


@dataclass(frozen=True)
class KeyEntry:
    """One key as the file holds it: never the key itself."""

    id: str  # 16 hex digits of the key's sha256 (serving.record.schema.key_id)
    hash: str  # "hmac-sha256:<hex>" under the file's secret ("" for a plain-format key)
    tier: Tier
    scopes: frozenset[str]
    expires: datetime.datetime | None = None
    created: str | None = None
    note: str | None = None

    def expired(self, now: datetime.datetime | None = None) -> bool:
        return self.expires is not None and (now or datetime.datetime.now(datetime.UTC)) >= self.expires

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


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


def key_id(key: str) -> str:
    """The id of a key: as serving.record.schema.key_id names its rows (kept here without that import)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def keyed_hash(secret: bytes, key: str) -> str:
    return f"{HASH_SCHEME}:" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    """A fresh API key: 32 random bytes, URL-safe."""
    return "sk-" + secrets.token_urlsafe(32)


class KeyTable:
    """Keys to their entries, found by their HMAC under the file's secret (a plain-format file:
    by their sha256). A lookup's timing depends on the digest of what was sent, which tells an
    attacker nothing about any real key."""

    def __init__(self, tiers: dict[str, Tier], entries: list[KeyEntry], secret: bytes | None = None, legacy: bool = False) -> None:
        self.tiers = dict(tiers)
        self.secret = secret
        self.legacy = legacy
        self._by_hash = {e.hash: e for e in entries}

    def __len__(self) -> int:
        return len(self._by_hash)

    def entries(self) -> list[KeyEntry]:
        return list(self._by_hash.values())

    def _hash(self, api_key: str) -> str:
        return keyed_hash(self.secret, api_key) if self.secret is not None else "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()

    def entry(self, api_key: str) -> KeyEntry | None:
        """The key's entry (expired or not), or None for an unknown key."""
        return self._by_hash.get(self._hash(api_key))

    def tier(self, api_key: str) -> Tier | None:
        """The key's tier, or None for an unknown or expired key (the gateway answers 401)."""
        found = self.entry(api_key)
        return None if found is None or found.expired() else found.tier

    def from_authorization(self, header: str | None) -> tuple[str, Tier] | None:
        """(key, tier) for an `Authorization: Bearer <key>` header naming a known, unexpired key, else None."""
        found = self.lookup(header)
        return None if found is None or found[1].expired() else (found[0], found[1].tier)

    def lookup(self, header: str | None) -> tuple[str, KeyEntry] | None:
        """(key, entry) for an `Authorization: Bearer <key>` header naming a key of this file
        (expired ones too: the caller says why it refuses), else None."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        found = self.entry(token) if scheme.lower() == "bearer" and token else None
        return None if found is None else (token, found)


class KeyRing:
    """A keys file as a gateway sees it: `table()` is the file's current table, re-read when the
    file changed (checked by one stat per call, so a revoked key is refused on the next request).
    A file that no longer loads keeps the last good table, logged once per change."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen = self._stamp()
        self._table = load_keys(self.path)  # a bad file at start fails the start

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def table(self) -> KeyTable:
        stamp = self._stamp()
        if stamp == self._seen:
            return self._table
        with self._lock:
            if stamp != self._seen:
                self._seen = stamp
                try:
                    self._table = load_keys(self.path)
                    log.info("keys file %s changed: %d key(s) now", self.path, len(self._table))
                except KeysFileError as exc:
                    log.error("keys file %s changed but does not load, the previous keys stay in force: %s", self.path, exc)
        return self._table

    # The KeyTable interface, on the current table: a FrontDoor holds either.
    def __len__(self) -> int:
        return len(self.table())

    @property
    def tiers(self) -> dict[str, Tier]:
        return self.table().tiers

    def tier(self, api_key: str) -> Tier | None:
        return self.table().tier(api_key)

    def from_authorization(self, header: str | None) -> tuple[str, Tier] | None:
        return self.table().from_authorization(header)

    def lookup(self, header: str | None) -> tuple[str, KeyEntry] | None:
        return self.table().lookup(header)


def request_priority(tier: Tier, header: str | None) -> int:
    """The priority a request waits with: the tier's, or the header's when that is lower."""
    if header is None or not header.strip():
        return tier.priority
    try:
        asked = int(header.strip())
    except ValueError:
        raise BadPriority(header) from None
    return min(asked, tier.priority)


EXAMPLE = "e.g.\ntiers:\n  free: {priority: 0, rpm: 60, tpm: 10000}\nkeys: {}\nthen `lifecycle keys create --tier free`"


def read_raw(path: str | Path) -> dict[str, Any]:
    """The file's YAML mapping, checked for its top-level shape only."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KeysFileError(f"keys file {path} not found: create it ({EXAMPLE}) or point serve.keys_file elsewhere") from None
    except yaml.YAMLError as exc:
        raise KeysFileError(f"keys file {path} is not valid YAML: {exc}") from None
    allowed = {"tiers", "keys", "secret", "version"}
    if not isinstance(raw, dict) or not {"tiers", "keys"} <= set(raw) or set(raw) - allowed:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise KeysFileError(f"keys file {path} must be a mapping with 'tiers' and 'keys' (and, hashed, 'version' and 'secret'), found {found}; {EXAMPLE}")
    return raw


def load_keys(path: str | Path) -> KeyTable:
    """Read and check a keys file (format in the module docstring); KeysFileError names what is wrong."""
    path = Path(path)
    raw = read_raw(path)
    tiers = _tiers(path, raw["tiers"])
    if "secret" not in raw:
        if raw.get("version") not in (None, 1):
            raise KeysFileError(f"{path}: version {raw.get('version')!r} needs a 'secret' (the file's HMAC key): recreate the file with `lifecycle keys create --file {path}`")
        entries = _legacy_keys(path, raw["keys"], tiers)
        if entries:
            log.warning("keys file %s holds %d key(s) in plain text (scopes inference, feedback): hash them with `lifecycle keys migrate --file %s`", path, len(entries), path)
        return KeyTable(tiers, entries, None, legacy=True)
    secret = raw["secret"]
    if not isinstance(secret, str) or len(secret) < 32:
        raise KeysFileError(f"{path}: 'secret' must be a hex string of at least 32 digits (the file's HMAC key), got {redact(str(secret))}; `lifecycle keys create` writes one")
    try:
        secret_bytes = bytes.fromhex(secret)
    except ValueError:
        raise KeysFileError(f"{path}: 'secret' is not hexadecimal; `lifecycle keys create` writes one") from None
    if raw.get("version") != FILE_VERSION:
        raise KeysFileError(f"{path}: a hashed keys file has 'version: {FILE_VERSION}', got {raw.get('version')!r}")
    return KeyTable(tiers, _hashed_keys(path, raw["keys"], tiers), secret_bytes)


def require_fields(where: str, fields: dict, required: tuple[str, ...], optional: tuple[str, ...], what: str) -> None:
    """Raise KeysFileError naming `where`'s unknown and missing fields and what belongs there."""
    unknown = sorted(set(fields) - set(required) - set(optional))
    missing = [f for f in required if f not in fields]
    if unknown or missing:
        raise KeysFileError(f"{where}: unknown field(s) {unknown}, missing field(s) {missing}; {what} {', '.join(required)} (and optionally {', '.join(optional)})")


def _tiers(path: Path, raw: Any) -> dict[str, Tier]:
    if not isinstance(raw, dict) or not raw:
        raise KeysFileError(f"{path}: 'tiers' must map tier names to {{priority, rpm, tpm}}, got {raw!r}")
    tiers = {}
    for name, fields in raw.items():
        where = f"{path}: tiers.{name}"
        if not isinstance(fields, dict):
            raise KeysFileError(f"{where} must be a mapping {{priority: <int>, rpm: <int>, tpm: <int>}}, got {fields!r}")
        require_fields(where, fields, TIER_FIELDS, OPTIONAL_TIER_FIELDS, "a tier has exactly")
        if not isinstance(fields.get("feedback_any", False), bool):
            raise KeysFileError(f"{where}.feedback_any must be true or false, got {fields['feedback_any']!r}")
        for f in TIER_FIELDS:
            value = fields[f]
            if isinstance(value, bool) or not isinstance(value, int) or (f != "priority" and value < 1):
                need = "an integer" if f == "priority" else "a whole number >= 1"
                raise KeysFileError(f"{where}.{f} must be {need}, got {value!r}")
        tiers[str(name)] = Tier(str(name), fields["priority"], fields["rpm"], fields["tpm"], fields.get("feedback_any", False))
    return tiers


def _legacy_keys(path: Path, raw: Any, tiers: dict[str, Tier]) -> list[KeyEntry]:
    if not isinstance(raw, dict):
        raise KeysFileError(f"{path}: 'keys' must map API keys to tier names, got {type(raw).__name__}")
    entries = []
    for key, tier in raw.items():
        if isinstance(tier, dict):
            raise KeysFileError(f"{path}: keys[{redact(str(key))}] is a hashed entry but the file has no 'secret': it was cut or hand-edited; restore it or recreate the keys with `lifecycle keys create --file {path}`")
        if not isinstance(key, str) or not key.strip() or key != key.strip() or " " in key:
            raise KeysFileError(f"{path}: keys[{redact(str(key))}] is not a usable API key: quote it as a non-empty string without spaces")
        if tier not in tiers:
            raise KeysFileError(f"{path}: keys[{redact(key)}] names tier {tier!r}, which is not under 'tiers' ({', '.join(map(str, tiers))})")
        entries.append(KeyEntry(key_id(key), "sha256:" + hashlib.sha256(key.encode()).hexdigest(), tiers[tier], LEGACY_SCOPES))
    return entries


def parse_expiry(value: Any, where: str) -> datetime.datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime.datetime):  # YAML reads an unquoted timestamp itself
        stamp = value
    else:
        try:
            stamp = datetime.datetime.fromisoformat(str(value))
        except ValueError:
            raise KeysFileError(f"{where}.expires must be an ISO 8601 time such as 2027-01-01T00:00:00+00:00, got {value!r}") from None
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.UTC)


def _hashed_keys(path: Path, raw: Any, tiers: dict[str, Tier]) -> list[KeyEntry]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise KeysFileError(f"{path}: 'keys' must map key ids to {{hash, tier, scopes}}, got {type(raw).__name__}")
    entries = []
    for kid, fields in raw.items():
        where = f"{path}: keys.{redact(str(kid)) if not isinstance(fields, dict) else kid}"
        if not isinstance(fields, dict):
            raise KeysFileError(f"{where} is a plain-text key in a hashed file: remove it and issue one with `lifecycle keys create --file {path}`")
        require_fields(where, fields, KEY_FIELDS, OPTIONAL_KEY_FIELDS, "a key has")
        if not isinstance(fields["hash"], str) or not fields["hash"].startswith(HASH_SCHEME + ":"):
            raise KeysFileError(f"{where}.hash must be '{HASH_SCHEME}:<hex>' (written by `lifecycle keys create`), got {str(fields['hash'])[:20]!r}")
        if fields["tier"] not in tiers:
            raise KeysFileError(f"{where} names tier {fields['tier']!r}, which is not under 'tiers' ({', '.join(map(str, tiers))})")
        scopes = fields["scopes"]
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
            raise KeysFileError(f"{where}.scopes must be a non-empty list of {', '.join(SCOPES)}, got {scopes!r}")
        entries.append(KeyEntry(str(kid), fields["hash"], tiers[fields["tier"]], frozenset(scopes), parse_expiry(fields.get("expires"), where),
                                fields.get("created") and str(fields["created"]), fields.get("note")))
    return entries


# --- writing (the CLI) -----------------------------------------------------------------------------


@dataclass
class KeysDocument:
    """A keys file being changed by `lifecycle keys`: its YAML mapping, saved atomically."""

    path: Path
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path, create: bool = False) -> "KeysDocument":
        path = Path(path)
        if not path.exists() and create:
            return cls(path, {"version": FILE_VERSION, "secret": secrets.token_hex(32), "tiers": {"free": {"priority": 0, "rpm": 60, "tpm": 10000}}, "keys": {}})
        raw = read_raw(path)
        load_keys(path)  # the whole file checks before anything is changed
        if "secret" not in raw:
            legacy = [k for k in (raw.get("keys") or {})]
            if legacy:
                raise KeysFileError(f"keys file {path} holds plain-text keys: hash them first with `lifecycle keys migrate --file {path}`")
            raw = {**raw, "version": FILE_VERSION, "secret": secrets.token_hex(32), "keys": {}}
        raw["keys"] = raw.get("keys") or {}
        return cls(path, raw)

    @property
    def secret(self) -> bytes:
        return bytes.fromhex(self.raw["secret"])

    def add(self, tier: str, scopes: list[str], expires: datetime.datetime | None, note: str | None = None) -> tuple[str, str]:
        """A new key: (its id, the key itself, which is not kept)."""
        if tier not in self.raw["tiers"]:
            raise KeysFileError(f"{self.path}: no tier {tier!r} (tiers: {', '.join(map(str, self.raw['tiers']))}); add it under 'tiers' first")
        bad = sorted(set(scopes) - set(SCOPES))
        if bad or not scopes:
            raise KeysFileError(f"unknown scope(s) {bad or scopes}: scopes are {', '.join(SCOPES)}")
        key = new_key()
        entry: dict[str, Any] = {"hash": keyed_hash(self.secret, key), "tier": tier, "scopes": sorted(set(scopes), key=SCOPES.index),
                                 "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        if expires is not None:
            entry["expires"] = expires.isoformat(timespec="seconds")
        if note:
            entry["note"] = note
        self.raw["keys"][key_id(key)] = entry
        return key_id(key), key

    def remove(self, kid: str) -> dict[str, Any]:
        if kid not in self.raw["keys"]:
            raise KeysFileError(f"{self.path}: no key with id {kid!r}; `lifecycle keys list` shows the ids")
        return self.raw["keys"].pop(kid)

    def save(self) -> None:
        """Write to a temporary file beside it and rename: a gateway never reads half a file,
        and the new inode tells every gateway to reload."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "# API keys (serving/keys.py): written by `lifecycle keys`; keys are stored hashed. Keep out of git.\n" + yaml.safe_dump(self.raw, sort_keys=False)
        fd, tmp = tempfile.mkstemp(prefix=".keys-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        load_keys(self.path)


def migrate(path: str | Path) -> list[str]:
    """Hash a plain-format file's keys in place (each keeps its tier, gets scopes inference and
    feedback, as before): the clients keep their keys. Returns the key ids."""
    path = Path(path)
    raw = read_raw(path)
    table = load_keys(path)
    if not table.legacy:
        raise KeysFileError(f"keys file {path} is hashed already: nothing to migrate")
    secret = secrets.token_hex(32)
    keys = {}
    for key, tier in raw["keys"].items():
        keys[key_id(key)] = {"hash": keyed_hash(bytes.fromhex(secret), key), "tier": tier, "scopes": sorted(LEGACY_SCOPES, key=SCOPES.index)}
    doc = KeysDocument(path, {"version": FILE_VERSION, "secret": secret, "tiers": raw["tiers"], "keys": keys})
    doc.save()
    return list(keys)
