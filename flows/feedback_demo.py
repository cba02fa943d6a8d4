"""Scripted users close the feedback loop on the embedded default (`make feedback-demo`).

The generated training data asks for the task one way ("Reverse the list:\\n1 2 3"); users also
write "Please reverse 1 2 3", which the champion mostly gets wrong. With the plane running (`make
serve`), the Prefect server (`make ui`, PREFECT_API_URL exported) and the deployments served
(`make serve-flows`), this plays the users (and, with --reviewer, the reviewer) and waits for what
the loop does with what they said:

1. users ask --users prompts in that phrasing through the gateway, and --probes more that nobody
   will correct (asked again at the end);
2. each wrong answer gets a thumbs down and the correction, each right one a thumbs up
   (POST /v1/feedback, with $GATEWAY_API_KEY when the gateway wants a key);
3. `make review`: a flow run pauses for a person. With --reviewer NAME the demo accepts every
   item as NAME (as the Resume form in the Prefect UI would); without, decide there yourself;
4. `make feedback-export`: preference pairs traced to their completions and, when
   feedback_loop's policy holds, the `lifecycle.data.added` event;
5. the lifecycle deployment runs what the event asks (feedback_loop.recipe from the champion,
   with feedback_loop.overrides): gated on the held-out corrections, released into the plane;
6. the uncorrected prompts again: how many the new champion gets right, against the old one.

Exit status 0 when a new version answers and gets more of them right; 1 otherwise (the run's
state says why, e.g. the gate's reason).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PHRASING = "Please reverse {}"  # users' phrasing; the generated data only says "Reverse the list:"


def digits(rng: random.Random) -> list[str]:
    return [str(rng.randrange(10)) for _ in range(rng.choice((3, 4, 5)))]


def headers(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def ask(gateway: str, model: str, prompts: list[str], key: str | None = None) -> list[dict]:
    """Users asking, 8 at a time: each answer's prompt, first line, completion id and version."""

    def one(prompt: str) -> dict:
        r = httpx.post(f"{gateway}/v1/chat/completions", headers=headers(key), timeout=120,
                       json={"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0})
        if r.status_code != 200:
            raise SystemExit(f"the gateway at {gateway} answered {r.status_code}: {r.text[:300]}")
        body = r.json()
        return {"prompt": prompt, "id": body["id"], "answer": body["choices"][0]["message"]["content"].split("\n")[0].strip(), "version": r.headers.get("x-gateway-version", "?")}

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def give_feedback(gateway: str, answers: list[dict], truth: dict[str, str], key: str | None = None) -> list[dict]:
    """A thumbs down and the correction on each wrong answer, a thumbs up on each right one: the
    wrong answers."""
    wrong = []
    with httpx.Client(timeout=30) as http:
        for a in answers:
            right = a["answer"] == truth[a["prompt"]]
            body = {"completion_id": a["id"], "rating": 1} if right else {"completion_id": a["id"], "rating": -1, "correction": truth[a["prompt"]], "reason": "not reversed"}
            r = http.post(f"{gateway}/v1/feedback", json=body, headers=headers(key))
            if r.status_code not in (200, 201):
                raise SystemExit(f"POST /v1/feedback answered {r.status_code}: {r.text[:300]}")
            if not right:
                wrong.append(a)
    return wrong


def prefect_client():
    from prefect import get_client

    return get_client(sync_client=True)


def review(reviewer: str | None, batch: int, timeout_s: float) -> dict:
    """`make review`'s flow for `batch` items; with a reviewer, accept them all in its form."""
    from prefect import resume_flow_run
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    from flows.review import review_feedback  # its run's pause is the one answered, not any paused run

    proc = subprocess.Popen([sys.executable, "-m", "flows.review", "--batch-size", str(batch)], stdout=subprocess.PIPE, text=True)
    if reviewer:
        paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
        deadline = time.monotonic() + timeout_s
        while True:
            with prefect_client() as c:
                runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[review_feedback.name])), flow_run_filter=paused)
            if runs:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the review did not pause for its decision (exit {proc.poll()}): {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(1)
        resume_flow_run(runs[0].id, run_input={"reviewer": reviewer, "all_items": "accept", "items": []})
    else:
        print("review: decide in the Prefect UI (the paused 'review-feedback' run); this waits", flush=True)
    out, _ = proc.communicate(timeout=timeout_s if reviewer else None)
    if proc.returncode != 0:
        raise SystemExit(f"the review failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def lifecycle_deployment():
    with prefect_client() as c:
        return c.read_deployment_by_name("llm-lifecycle/lifecycle")


def triggered_since(deployment_id, since) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with prefect_client() as c:
        runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
    return [r for r in runs if not r.auto_scheduled and r.created and r.created >= since]


def wait_for_run(deployment_id, since, timeout_s: float):
    """The run the event started, once it has ended."""
    deadline = time.monotonic() + timeout_s
    run = None
    while time.monotonic() < deadline:
        runs = triggered_since(deployment_id, since)
        if runs:
            with prefect_client() as c:
                run = c.read_flow_run(runs[0].id)
            if run.state and run.state.is_final():
                return run
        time.sleep(3)
    raise SystemExit(f"the triggered lifecycle run did not end within {timeout_s:.0f} s" + (f" ({run.name}: {run.state.name})" if run else ": none started (is `make serve-flows` running?)"))


def main(argv: list[str] | None = None) -> int:
    import datetime

    from flows.deployments import server_problem
    from pipelines.config import ConfigError, load_params
    from serving.plane_client import plane_root

    parser = argparse.ArgumentParser(prog="python -m flows.feedback_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=110, help="prompts the users ask and rate (default 110)")
    parser.add_argument("--probes", type=int, default=40, help="prompts nobody corrects, asked before and after (default 40)")
    parser.add_argument("--reviewer", help="accept every item in the review as this name (default: a person decides in the Prefect UI)")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the review and for the triggered run")
    args = parser.parse_args(argv)
    try:
        params = load_params()
    except ConfigError as exc:
        sys.exit(str(exc))
    gateway, key = plane_root(params), os.environ.get("GATEWAY_API_KEY")
    if gateway is None:
        sys.exit("serve.plane_url is null: the demo talks to the plane `make serve` runs; set it to auto")
    try:
        httpx.get(f"{gateway}/health", timeout=5).raise_for_status()
    except httpx.HTTPError:
        sys.exit(f"no plane answers at {gateway}: start `make serve` first")
    if problem := server_problem():
        sys.exit(f"{problem}; then `make serve-flows` (the lifecycle deployment the export's event triggers)")
    try:
        deployment = lifecycle_deployment()
    except Exception as exc:  # ObjectNotFound: nothing served it
        sys.exit(f"no 'llm-lifecycle/lifecycle' deployment on the Prefect server ({type(exc).__name__}): start `make serve-flows`")
    model = params.registry.model_name
    rng = random.Random(args.seed)
    asked, probes = [digits(rng) for _ in range(args.users)], [digits(rng) for _ in range(args.probes)]
    truth = {PHRASING.format(" ".join(d)): " ".join(reversed(d)) for d in asked + probes}
    right = lambda answers: sum(a["answer"] == truth[a["prompt"]] for a in answers)  # noqa: E731

    before = ask(gateway, model, [PHRASING.format(" ".join(d)) for d in probes], key)
    champion = before[0]["version"]
    print(f"uncorrected prompts ('{PHRASING.format('…')}'): {right(before)} of {len(before)} right from version {champion}", flush=True)
    answers = ask(gateway, model, [PHRASING.format(" ".join(d)) for d in asked], key)
    wrong = give_feedback(gateway, answers, truth, key)
    print(f"users: {len(wrong)} of {len(answers)} answers wrong, each corrected (thumbs down); {len(answers) - len(wrong)} thumbs up", flush=True)

    counts = review(args.reviewer, len(answers), args.timeout)
    print(f"review: {json.dumps(counts)}", flush=True)
    since = datetime.datetime.now(datetime.UTC)
    export = subprocess.run([sys.executable, "-m", "pipelines.feedback_export"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    print(export.stdout.rstrip(), flush=True)
    if export.returncode != 0 or "emitted lifecycle.data.added" not in export.stdout:
        print("no run was started: see the export's last line", file=sys.stderr)
        return 1
    run = wait_for_run(deployment.id, since, args.timeout)
    print(f"triggered run '{run.name}': {run.state.name}; parameters {json.dumps({k: run.parameters.get(k) for k in ('recipe', 'start_from', 'overrides')})}", flush=True)
    if not run.state.is_completed():
        print(f"  {run.state.message}", file=sys.stderr)
        return 1
    after = ask(gateway, model, [PHRASING.format(" ".join(d)) for d in probes], key)
    version = after[0]["version"]
    print(f"uncorrected prompts: {right(after)} of {len(after)} right from version {version} (was {right(before)} from version {champion})", flush=True)
    return 0 if version != champion and right(after) > right(before) else 1


if __name__ == "__main__":
    sys.exit(main())
