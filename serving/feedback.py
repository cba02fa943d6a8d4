"""POST /v1/feedback: what a user says about an answer, by the id the answer carried (its `id`,
the `x-completion-id` header), stored PII-redacted beside the record of every answer
(serving/record/feedback.py holds the tables and the read an export uses).

    {"completion_id": "chatcmpl-…", "rating": -1, "correction": "3 2 1", "reason": "wrong order", "tags": ["order"]}
    {"completion_id": "chatcmpl-…", "preferred": "chatcmpl-…"}      # another answer to the same prompt
    {"completion_id": "chatcmpl-…", "signal": "regenerated"}        # implicit: regenerated, copied, abandoned

Explicit feedback (rating, correction, preferred, reason, tags) and implicit signals are stored
apart (`kind`), and signals are never labels by default. The answer is 201 with the stored id
(`fb-…`), or 200 with the same id for a repeat by the same key on the same completion (what it
sends replaces what it sent before). A key may rate only the completions it asked for, unless
its tier has `feedback_any: true` (serving/keys.py). Every refusal is OpenAI's error shape with
`param` naming the field at fault, and stores nothing: 400 a bad field, 403 a foreign
completion, 404 an unknown or expired completion, 413 an oversized body.

The completion's row may still be in the recorder's buffer when its feedback arrives (the
client rated faster than the writer's next batch): the feedback then waits for that row
(`Recorder.wait_written`, at most feedback.wait_for_record_s).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from serving.protocol import APIError
from serving.record.feedback import EXPLICIT, IMPLICIT, SCALES, SIGNALS, Feedback, feedback_id
from serving.record.recorder import Recorder, redact_text, storable
from serving.record.schema import Row
from serving.record.store import Store, close_quietly

FIELDS = ("completion_id", "rating", "correction", "preferred", "reason", "tags", "signal")
EXPLICIT_FIELDS = ("rating", "correction", "preferred", "reason", "tags")
MAX_TAG_CHARS = 64


@dataclass(frozen=True)
class FeedbackPolicy:
    """What the endpoint accepts (params `feedback:`, pipelines/serve_config.py FeedbackParams)."""

    rating_scale: str = "thumbs"
    max_age_s: float = 7 * 86400
    max_body_bytes: int = 65_536
    wait_for_record_s: float = 5
    max_tags: int = 16

    @classmethod
    def from_params(cls, feedback) -> "FeedbackPolicy | None":
        """From the `feedback:` params section; None when it is disabled."""
        if not feedback.enabled:
            return None
        return cls(feedback.rating_scale, feedback.max_age_days * 86400, feedback.max_body_bytes, feedback.wait_for_record_s, feedback.max_tags)


@dataclass(frozen=True)
class Caller:
    """Who sends the feedback: the key's id as the record stores it, its tier, its scope."""

    key_id: str | None
    tier: str
    feedback_any: bool = False


@dataclass(frozen=True)
class FeedbackRequest:
    completion_id: str
    rating: int | None = None
    correction: str | None = None
    preferred: str | None = None
    reason: str | None = None
    tags: tuple[str, ...] | None = None
    signal: str | None = None


def bad(param: str | None, message: str, code: str = "invalid_value", status: int = 400) -> APIError:
    return APIError(status, message, code=code, param=param)


def parse(raw: bytes, policy: FeedbackPolicy) -> FeedbackRequest:
    """The body, checked field by field before anything is looked up or stored."""
    if len(raw) > policy.max_body_bytes:
        raise bad(None, f"the feedback body is {len(raw)} bytes; at most {policy.max_body_bytes} are accepted (feedback.max_body_bytes)", "request_too_large", 413)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[...]]]] nested past the parser's limit
        raise bad(None, f"the body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(None, "the body must be a JSON object with completion_id and any of rating, correction, preferred, reason, tags (or signal)")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r}; a feedback takes {', '.join(FIELDS)}", "unknown_field")
    completion_id = body.get("completion_id")
    if not isinstance(completion_id, str) or not completion_id.strip():
        raise bad("completion_id", "completion_id is required: the `id` of the chat or completion answer (its x-completion-id header)", "missing_field")
    rating = body.get("rating")
    if rating is not None:
        allowed = SCALES[policy.rating_scale]
        if isinstance(rating, bool) or not isinstance(rating, int) or rating not in allowed:
            scale = "+1 or -1" if policy.rating_scale == "thumbs" else "an integer from 1 to 5"
            raise bad("rating", f"rating must be {scale} (feedback.rating_scale: {policy.rating_scale}), got {json.dumps(rating)}", "invalid_rating")
    correction = body.get("correction")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()):
        raise bad("correction", "correction must be the answer it should have been: a non-empty string", "empty_correction")
    preferred = body.get("preferred")
    if preferred is not None:
        if not isinstance(preferred, str) or not preferred.strip():
            raise bad("preferred", "preferred must be the id of another completion for the same prompt")
        if preferred == completion_id:
            raise bad("preferred", "preferred names the rated completion itself: name another completion for the same prompt")
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise bad("reason", f"reason must be a string, got {type(reason).__name__}")
    tags = body.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() and len(t) <= MAX_TAG_CHARS for t in tags):
            raise bad("tags", f"tags must be a list of non-empty strings of at most {MAX_TAG_CHARS} characters")
        if len(tags) > policy.max_tags:
            raise bad("tags", f"{len(tags)} tags; at most {policy.max_tags} (feedback.max_tags)")
        tags = tuple(dict.fromkeys(t.strip() for t in tags))
    signal = body.get("signal")
    given = [f for f in EXPLICIT_FIELDS if body.get(f) is not None]
    if signal is not None:
        if signal not in SIGNALS:
            raise bad("signal", f"signal must be one of {', '.join(SIGNALS)}, got {json.dumps(signal)}", "invalid_signal")
        if given:
            raise bad("signal", f"an implicit signal comes alone: send {', '.join(given)} in a feedback of its own", "mixed_feedback")
    elif not given:
        raise bad(None, f"nothing to store: send any of {', '.join(EXPLICIT_FIELDS)}, or a signal ({', '.join(SIGNALS)})", "empty_feedback")
    return FeedbackRequest(completion_id, rating, correction, preferred, reason, tags, signal)


def to_feedback(req: FeedbackRequest, caller: Caller, policy: FeedbackPolicy, now: float) -> Feedback:
    """The row to store: texts redacted and made storable as the record's are."""
    kind = IMPLICIT if req.signal else EXPLICIT

    def clean(text: str | None) -> str | None:
        return None if text is None else storable(redact_text(text))

    tags = None if req.tags is None else json.dumps([clean(t) for t in req.tags], ensure_ascii=False)
    return Feedback(
        id=feedback_id(req.completion_id, caller.key_id, kind, req.signal), completion_id=req.completion_id, key_id=caller.key_id, tier=caller.tier,
        kind=kind, signal=req.signal, rating=req.rating, scale=policy.rating_scale if req.rating is not None else None, correction=clean(req.correction),
        preferred=req.preferred, reason=clean(req.reason), tags=tags, created=now, updated=now, revision=1,
    )


class FeedbackDesk:
    """The endpoint's own connection to the record's store, used from one thread of its own (a
    store is used from one thread at a time), opened on first use and again after a failure."""

    def __init__(self, open_store: Callable[[], Store], recorder: Recorder, policy: FeedbackPolicy) -> None:
        self.open_store, self.recorder, self.policy = open_store, recorder, policy
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="feedback-store")
        self._store: Store | None = None

    def _call(self, method: Callable[..., Any], args: tuple) -> Any:
        try:
            if self._store is None:
                self._store = self.open_store()
            return method(self._store, *args)
        except Exception as exc:
            close_quietly(self._store)
            self._store = None
            raise APIError(503, f"the record's store cannot take feedback now ({type(exc).__name__}: {str(exc)[:200]}); retry later", code="record_unavailable", error_type="server_error", headers={"Retry-After": "1"}) from None

    async def run(self, method: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._call, method, args)

    async def completion(self, completion_id: str, param: str) -> Row:
        """The recorded completion, waiting for it while it is still in the recorder's buffer."""
        if self.recorder.holds(completion_id) and not await asyncio.to_thread(self.recorder.wait_written, completion_id, self.policy.wait_for_record_s):
            raise APIError(503, f"completion {completion_id!r} is still waiting to be written to the record; retry in a moment", code="record_busy", error_type="server_error", headers={"Retry-After": "1"}, param=param)
        row = await self.run(Store.find, completion_id)
        if row is None:
            raise bad(param, f"no recorded completion {completion_id!r}: send the `id` an answer of this gateway carried (completions of keys or tiers opted out of the record take no feedback)", "completion_not_found", 404)
        return row

    async def take(self, raw: bytes, caller: Caller) -> tuple[Feedback, bool]:
        """Check and store one feedback: (stored, created)."""
        req = parse(raw, self.policy)
        now = time.time()
        row = await self.completion(req.completion_id, "completion_id")
        self._check(row, caller, now, "completion_id")
        if req.preferred is not None:
            other = await self.completion(req.preferred, "preferred")
            self._check(other, caller, now, "preferred")
            if (other.endpoint, other.prompt) != (row.endpoint, row.prompt):
                raise bad("preferred", f"completion {req.preferred!r} answered another prompt than {req.completion_id!r}: preferred names another answer to the same prompt", "different_prompt")
            if not other.answer:
                raise bad("preferred", f"completion {req.preferred!r} has no answer to prefer (status {other.status})", "no_answer")
        return await self.run(Store.put_feedback, to_feedback(req, caller, self.policy, now))

    def _check(self, row: Row, caller: Caller, now: float, param: str) -> None:
        if row.key_id != caller.key_id and not caller.feedback_any:
            raise bad(param, f"completion {row.id!r} was asked for with another key: a key may send feedback only on its own completions (a tier with feedback_any: true may send it on any)", "foreign_completion", 403)
        if row.ts < now - self.policy.max_age_s:
            raise bad(param, f"completion {row.id!r} is older than {self.policy.max_age_s / 86400:g} days: feedback is taken only on recent answers (feedback.max_age_days)", "completion_expired", 404)

    def close(self) -> None:
        def shut() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None

        self.executor.submit(shut).result(timeout=30)
        self.executor.shutdown(wait=True)


def answer(stored: Feedback) -> dict[str, Any]:
    """The endpoint's 2xx body (201 when new, 200 for a repeat)."""
    return {
        "id": stored.id, "object": "feedback", "completion_id": stored.completion_id, "kind": stored.kind, "revision": stored.revision,
        "created": int(stored.created), "updated": int(stored.updated),
    }
