"""The record under load: 32 clients against a serving plane (the plane's app in this process, a
real CPU engine behind it, keys with tiers, the response cache on) for a bounded time, sending
chats and text completions, streamed or not, some answered from the cache, with personal data
planted in every prompt. Then the plane stops (its shutdown flushes the record) and the record
must hold exactly one row per answered request, under the id each client got, with no planted
value left in any stored prompt or answer; once with the SQLite default and once against a real
PostgreSQL server."""

from __future__ import annotations

import itertools
import json
import os
import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from pipelines.clean import find_pii
from pipelines.config import RecordParams, ServeParams
from serving.background import ThreadedServer
from serving.plane import Plane, create_plane_app
from serving.record import key_id, open_store
from tests.conftest import tiny_params
from tests.serving.conftest import sample, scrape
from tests.serving.postgres_server import new_database, postgres_url  # noqa: F401  (a module-scoped real PostgreSQL)

PUBLIC = "reverse-digits"
CLIENTS = 32
SECONDS = float(os.environ.get("RECORD_TEST_SECONDS", "20"))  # bounded: the machine is shared
GOLD, FREE = "sk-gold-plane-0123456789", "sk-free-plane-0123456789"
# What pipelines/clean.py redacts, one kind a prompt: (planted value, its placeholder).
PLANTED = [
    ("jane.doe@example.com", "<EMAIL>"),
    ("+1 202-555-0143", "<PHONE>"),
    ("2001:db8:85a3::8a2e:370:7334", "<IPV6>"),
    ("4111 1111 1111 1111", "<CARD>"),
]
NO_CACHE = {"cache-control": "no-cache"}


class Clients:
    """32 clients, each sending in turn: a chat, a streamed chat, a text completion and a
    repeated greedy chat (answered from the cache after its first time), until the deadline.
    Every answer is kept: (status, x-completion-id, the ids in its body, whether it streamed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[dict] = []
        self.lock = threading.Lock()
        self.counter = itertools.count()

    def run(self, i: int, deadline: float) -> None:
        key = GOLD if i % 2 else FREE
        with httpx.Client(timeout=300, headers={"authorization": f"Bearer {key}"}) as http:
            while time.monotonic() < deadline:
                n = next(self.counter)
                value, _ = PLANTED[(n // 4) % len(PLANTED)]  # every kind of request carries every kind of value
                kind = ("chat", "stream", "text", "cached")[n % 4]
                text = f"{n % 10} {(n // 10) % 10} {(n // 100) % 10} reach me at {value}"
                try:
                    answer = self.one(http, kind, text, key)
                except httpx.HTTPError as exc:
                    answer = {"kind": kind, "status": 0, "error": repr(exc)}
                with self.lock:
                    self.answers.append(answer)

    def one(self, http: httpx.Client, kind: str, text: str, key: str) -> dict:
        chat = {"model": PUBLIC, "messages": [{"role": "user", "content": text}], "max_tokens": 6}
        if kind == "text":
            r = http.post(f"{self.url}/v1/completions", json={"model": PUBLIC, "prompt": text, "max_tokens": 6}, headers=NO_CACHE)
            return self.seen(kind, key, r, [r.json().get("id")] if r.status_code == 200 else [])
        if kind == "cached":  # one prompt for everyone: the cache answers all but the first of each version
            r = http.post(f"{self.url}/v1/chat/completions", json={**chat, "messages": [{"role": "user", "content": f"1 2 3 from {PLANTED[0][0]}"}], "temperature": 0})
            return self.seen(kind, key, r, [r.json().get("id")] if r.status_code == 200 else [], cache=r.headers.get("x-gateway-cache") == "hit")
        if kind == "chat":
            r = http.post(f"{self.url}/v1/chat/completions", json=chat, headers=NO_CACHE)
            return self.seen(kind, key, r, [r.json().get("id")] if r.status_code == 200 else [])
        with http.stream("POST", f"{self.url}/v1/chat/completions", json={**chat, "stream": True}) as r:
            events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and line[5:].strip() != "[DONE]"]
        usage_seen = any(e.get("usage") is not None or not e.get("choices") for e in events)
        return self.seen(kind, key, r, [e.get("id") for e in events], usage_seen=usage_seen)

    @staticmethod
    def seen(kind: str, key: str, r: httpx.Response, body_ids: list, **extra) -> dict:
        return {"kind": kind, "key": key, "status": r.status_code, "id": r.headers.get("x-completion-id"), "body_ids": body_ids, **extra}

    def drive(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        threads = [threading.Thread(target=self.run, args=(i, deadline)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=seconds + 600)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_32_clients_every_answer_recorded_once_and_redacted(backend, model_dir, tmp_path, request):
    """Seen red: (1) with the cache-hit branch of Proxy.forward not calling tap.answered, the
    record held 107 rows for 135 answered requests (SQLite); (2) with the prompt stored
    unredacted (json.dumps instead of redacted_json), the planted phone number was found in a
    stored prompt (PostgreSQL). Before `storable`, PostgreSQL refused the rows whose answer held
    a NUL byte (the tiny model's), and this test found the record 22 rows short."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(f'tiers:\n  gold: {{priority: 1, rpm: 100000, tpm: 100000000}}\n  free: {{priority: 0, rpm: 100000, tpm: 100000000}}\nkeys:\n  "{GOLD}": gold\n  "{FREE}": free\n')
    store = None if backend == "sqlite" else new_database(request.getfixturevalue("postgres_url"), "plane_record")
    serve = ServeParams(replicas=1, max_new_tokens=8, startup_timeout_s=300, supervise_interval_s=0.5, keys_file=str(keys), cache_entries=256, queue_max_waiting=256)
    plane = Plane(tiny_params(serve=serve, record=RecordParams(store=store)), tmp_path / "plane", resolve=lambda version: Path(model_dir))
    plane.start(champion="1")
    clients = Clients("")
    try:
        app = create_plane_app(plane)
        with ThreadedServer(app) as server:
            clients.url = server.root_url
            clients.drive(SECONDS)
            assert app.state.record.flush(120)
            metrics = scrape(server.root_url)
    finally:
        plane.stop_all()  # the app's shutdown stopped the engines already: this covers a failed start

    answered = [a for a in clients.answers if a["status"] == 200]
    assert answered and [a for a in clients.answers if a["status"] != 200] == [], "every request answered"
    kinds = {k: sum(a["kind"] == k for a in answered) for k in ("chat", "stream", "text", "cached")}
    assert all(kinds.values()) and any(a.get("cache") for a in answered), kinds
    for a in answered:
        assert a["id"] and set(a["body_ids"]) == {a["id"]}, f"the body's id is the header's: {a}"
        if a["kind"] == "stream":
            assert not a["usage_seen"], "the usage the record asked the engine for never reaches the client"

    rows = open_store(store or tmp_path / "plane" / "record.sqlite3").query()
    ids = [r.id for r in rows]
    assert len(ids) == len(set(ids)) == len(answered), f"{len(rows)} rows for {len(answered)} answered requests"
    assert set(ids) == {a["id"] for a in answered}, "exactly the answered requests, under the ids the clients got"
    assert sample(metrics, "gateway_record_written_total") == len(answered) and sample(metrics, "gateway_record_dropped_total", reason="buffer_full") == 0

    by_id = {a["id"]: a for a in answered}
    placeholders = set()
    for r in rows:
        a = by_id[r.id]
        stored = (r.prompt, r.answer or "", r.params)
        assert not [value for value, _ in PLANTED for s in stored if value in s], r
        assert all(find_pii(s) == [] for s in stored), f"no personal data in any spelling: {r}"
        placeholders |= set(re.findall(r"<[A-Z0-9]+>", r.prompt))
        assert (r.status, r.version, r.model) == (200, "1", PUBLIC)
        assert r.tier == ("gold" if a["key"] == GOLD else "free") and r.key_id == key_id(a["key"])
        assert r.endpoint == ("text" if a["kind"] == "text" else "chat") and r.stream == (a["kind"] == "stream")
        assert r.cache_hit == bool(a.get("cache")) and r.replica == ("cache" if a.get("cache") else "v1-r0")
        if not r.cache_hit:
            assert r.completion_tokens and r.prompt_tokens, f"tokens from the engine's usage (asked of it for streams): {r}"
    assert placeholders >= {p for _, p in PLANTED}, placeholders
