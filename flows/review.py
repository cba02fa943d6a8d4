"""The review of what users said about answers (POST /v1/feedback, serving/record/feedback.py):
a Prefect flow that reads a batch of unreviewed explicit feedback, shows it in the Prefect UI
(prompt, served answer, correction, preferred answer, rating) and pauses until a person decides:
accept, edit (with the corrected answer) or reject, per item or in bulk.

    python -m flows.review [--batch-size 20] [--store URL]    # then open the paused run in the Prefect UI

The form (`ReviewInput`) asks for the reviewer's name, a bulk decision for every item left
without its own (`all_items`: accept or reject), and one entry per item. Every decision is
stored in the record's `reviews` table with who (the name typed) and when (the time the flow
read it), for the revision of the feedback the reviewer saw: a user who changes their feedback
afterwards makes a new revision, which waits for the next review. Items left without a
decision stay unreviewed. With review.auto_accept_ratings, feedback that is only a rating (no
correction, no preferred answer) is accepted without a person. Implicit signals are never
reviewed: they are not labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Literal

from prefect import flow, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.input import RunInput
from pydantic import BaseModel, Field

from flows.watch import open_record
from pipelines.config import ConfigError, load_params
from pipelines.redact import holds_secret, redact_url

AUTO_REVIEWER = "auto (review.auto_accept_ratings)"
VERBS = {"accept": "accepted", "edit": "edited", "reject": "rejected"}
CELL = 120  # characters of a prompt or answer shown in the form's table


class ItemDecision(BaseModel):
    feedback_id: str = Field(description="The feedback this decision is about (fb-...): leave as it is.")
    decision: Literal["accept", "edit", "reject"] | None = Field(None, description="accept: the user's feedback is a label; edit: it is, with your correction below; reject: it is not. Empty: the bulk decision (all_items), or none.")
    correction: str | None = Field(None, description="With 'edit': the answer it should have been.")
    note: str | None = Field(None, description="Why, if worth saying (stored with the decision).")


class ReviewInput(RunInput):
    reviewer: str = Field(min_length=1, description="Your name: recorded with every decision you make here.")
    all_items: Literal["accept", "reject"] | None = Field(None, description="Bulk: the decision for every item that has none of its own. Empty: items without a decision stay unreviewed.")
    items: list[ItemDecision] = Field(default_factory=list, description="One entry per feedback in the table above.")


def rating_only(item) -> bool:
    f = item.feedback
    return f.rating is not None and f.correction is None and f.preferred is None


def cell(text: str | None, width: int = CELL) -> str:
    if text is None:
        return ""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def describe(items: list) -> str:
    """The form's description (markdown, shown above it in the Prefect UI): one row per item."""
    from flows.watch import row_prompt

    lines = [
        f"### {len(items)} feedback item(s) to review",
        "Decide each item below (accept / edit / reject), or set **all_items** for every item without its own decision. "
        "An edit needs the corrected answer. Your name goes with every decision.",
        "",
        "| # | feedback | version | rating | prompt | served answer | correction | preferred answer | reason, tags |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, item in enumerate(items, 1):
        f, c = item.feedback, item.completion
        rating = "" if f.rating is None else f"{f.rating:+d}" if f.scale == "thumbs" else f"{f.rating}/5"
        notes = ", ".join(filter(None, [f.reason, *f.tag_list]))
        lines.append(f"| {n} | `{f.id}` | {c.version} | {rating} | {cell(row_prompt(c))} | {cell(c.answer)} | {cell(f.correction)} | {cell(item.preferred_answer)} | {cell(notes)} |")
    return "\n".join(lines)


def decide(items: list, answer: ReviewInput, decided: float, flow_run_id: str | None) -> tuple[list, list[str]]:
    """The reviews the form's answer makes (one per decided item, on the revision shown), and
    what was left undecided or could not be taken (an edit without a correction; an unknown id)."""
    from serving.record.feedback import Review
    from serving.record.recorder import redact_text, storable

    shown = {i.feedback.id: i for i in items}
    own = {d.feedback_id: d for d in answer.items}
    problems = [f"{fid}: not in this review's batch, ignored" for fid in own if fid not in shown]
    reviews = []
    for fid, item in shown.items():
        mine = own.get(fid)
        verb = (mine.decision if mine is not None else None) or answer.all_items
        if verb is None:
            problems.append(f"{fid}: no decision, left for the next review")
            continue
        correction = mine.correction if mine is not None else None
        if verb == "edit" and not (correction and correction.strip()):
            problems.append(f"{fid}: 'edit' without a correction, left for the next review")
            continue
        note = mine.note if mine is not None else None
        reviews.append(Review(
            feedback_id=fid, revision=item.feedback.revision, decision=VERBS[verb], correction=storable(redact_text(correction)) if verb == "edit" else None,
            reviewer=answer.reviewer.strip(), decided=decided, flow_run_id=flow_run_id, note=storable(redact_text(note)) if note else None,
        ))
    return reviews, problems


# A flow's parameters are stored with its run in Prefect (and argv is visible in `ps`).
STORE_SECRET = (
    "store {} holds a password: it would be kept with the flow run's parameters and shown in `ps`. "
    "Put the URL in $LIFECYCLE_RECORD_URL (record.store_env) and leave --store/store out"
)


@flow(name="review-feedback", log_prints=True)
def review_feedback(batch_size: int | None = None, store: str | None = None) -> dict:
    """Review one batch of unreviewed explicit feedback; returns the decisions' counts."""
    from prefect.runtime import flow_run

    from serving.record.feedback import FeedbackFilters, Review

    if store and holds_secret(store):
        raise ValueError(STORE_SECRET.format(redact_url(store)))
    params = load_params()
    policy = params.review
    with open_record(params, store) as record:
        batch = list(record.iter_feedback(FeedbackFilters(reviewed=False, limit=batch_size or policy.batch_size)))
    run_id = str(flow_run.id) if flow_run.id else None
    auto = [i for i in batch if policy.auto_accept_ratings and rating_only(i)]
    people = [i for i in batch if i not in auto]
    reviews = [Review(i.feedback.id, i.feedback.revision, "accepted", None, AUTO_REVIEWER, time.time(), run_id) for i in auto]
    problems: list[str] = []
    if people:
        form = ReviewInput.with_initial_data(description=describe(people), items=[{"feedback_id": i.feedback.id} for i in people])
        print(f"{len(people)} feedback item(s) wait for a decision: open this flow run in the Prefect UI and resume it with the form")
        # The store is closed while the run waits: a review may wait a day (review.timeout_s).
        answer = pause_flow_run(wait_for_input=form, timeout=policy.timeout_s, poll_interval=policy.poll_interval_s)
        decided, problems = decide(people, answer, time.time(), run_id)
        reviews += decided
    with open_record(params, store) as record:
        record.put_reviews(reviews)
    counts = {verb: sum(r.decision == verb for r in reviews) for verb in VERBS.values()}
    counts.update(auto_accepted=len(auto), undecided=len(batch) - len(reviews), batch=len(batch))
    lines = [f"# Feedback review: {len(reviews)} of {len(batch)} decided", "", json.dumps(counts), ""]
    lines += [f"- `{r.feedback_id}` r{r.revision}: **{r.decision}** by {r.reviewer}" for r in reviews] + [f"- {p}" for p in problems]
    create_markdown_artifact("\n".join(lines), key="feedback-review", description="The decisions of one feedback review")
    for problem in problems:
        print(problem)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.review", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, help="items in this review (default: review.batch_size)")
    parser.add_argument("--store", help="the record's store (default: record.store, $record.store_env, or the plane's file)")
    args = parser.parse_args(argv)
    if args.store and holds_secret(args.store):
        sys.exit(STORE_SECRET.format(redact_url(args.store)))
    try:
        load_params()
    except ConfigError as exc:
        sys.exit(str(exc))
    print(json.dumps(review_feedback(args.batch_size, args.store)))


if __name__ == "__main__":
    main()
