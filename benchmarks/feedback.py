"""`make bench`: the feedback endpoint's throughput, and the export's rows a second.

One CPU engine (the default-size bootstrap model) behind one recording gateway built as the
plane builds its gateway (`python -m benchmarks.record gateway --record-dir`: FrontDoor with
the default record and feedback policy, SQLite). 32 clients first ask COMPLETIONS chats and keep
each answer's id; then 32 clients rate every one of them once through POST /v1/feedback (new
feedback: 201), and a second time (the same completion and key again: 200, the stored row
replaced). The bodies mix what users send: thumbs, corrections (a quarter holding personal data
the redaction has to find), reasons and tags. Printed, never asserted: feedback requests a
second and p50 latency for each pass, failures, and what the store holds afterwards.

Every stored feedback is then reviewed (a third of them edited) and the export
(pipelines/feedback_export.py) turns them into training rows: its rows a second are printed
beside the rows it made.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from benchmarks.serving_load import build_default_model
from benchmarks.workspace import stop, wait_healthy
from serving.launcher import PROJECT_ROOT, free_port, launch

NAME = "bench-record"  # the gateway benchmarks.record serves
CLIENTS = int(os.environ.get("BENCH_FEEDBACK_CLIENTS", "32"))
COMPLETIONS = int(os.environ.get("BENCH_FEEDBACK_COMPLETIONS", "640"))
PII = ["mail jane.doe@example.com", "call +1 202-555-0143", "card 4111 1111 1111 1111"]


def feedback_body(i: int, completion_id: str, again: bool) -> dict:
    """What users send, in turn: a thumb, a correction, a thumb with its reason and tags."""
    kind = i % 3
    if kind == 0:
        return {"completion_id": completion_id, "rating": -1 if again else 1}
    if kind == 1:
        correction = f"{i % 10} {(i // 10) % 10} {(i // 100) % 10}" + (f" ({PII[i % 3]})" if i % 4 == 1 else "")
        return {"completion_id": completion_id, "rating": -1, "correction": correction, "reason": "wrong order"}
    return {"completion_id": completion_id, "rating": 1 if again else -1, "reason": "too long" if again else "missed a digit", "tags": ["order", f"batch-{i % 5}"]}


async def fan_out(jobs: list, send) -> tuple[list, list[float], list[str], float]:
    """Run `send(http, job)` for every job on CLIENTS concurrent clients."""
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results, latencies, failures = [], [], []

    async def client(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            job = queue.get_nowait()
            started = time.perf_counter()
            try:
                status, body = await send(http, job)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failures.append(type(exc).__name__)
                continue
            if status in (200, 201):
                latencies.append(time.perf_counter() - started)
                results.append((status, body))
            else:
                failures.append(f"{status} {body[:160]}")

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS * 2), timeout=aiohttp.ClientTimeout(total=300)) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    return results, latencies, failures, time.perf_counter() - started


async def ask_all(root: str) -> list[str]:
    async def send(http, i):
        text = f"Reverse the list:\n{i % 10} {(i // 10) % 10} {(i // 100) % 10}"
        body = {"model": NAME, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0}
        async with http.post(f"{root}/v1/chat/completions", json=body, headers={"cache-control": "no-cache"}) as r:
            return r.status, (await r.json())["id"] if r.status == 200 else await r.text()

    results, _, failures, _ = await fan_out(list(range(COMPLETIONS)), send)
    if failures:
        print(f"  {len(failures)} of {COMPLETIONS} chats failed, e.g. {failures[0]}")
    return [body for _, body in results]


async def rate_all(root: str, ids: list[str], again: bool) -> dict:
    async def send(http, job):
        i, completion_id = job
        async with http.post(f"{root}/v1/feedback", json=feedback_body(i, completion_id, again)) as r:
            return r.status, await r.text()

    results, latencies, failures, elapsed = await fan_out(list(enumerate(ids)), send)
    statuses = {s: sum(1 for status, _ in results if status == s) for s in (200, 201)}
    return {"rps": len(latencies) / elapsed, "p50_s": statistics.median(latencies) if latencies else float("nan"),
            "p95_s": statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 20 else float("nan"), "statuses": statuses, "failed": failures}


def export_rate(store_path: Path, work: Path) -> str:
    """The export's rows a second on what the endpoint stored: every feedback row is reviewed
    first (every third one edited, as a reviewer would), then pipelines.feedback_export builds
    and writes the training rows with the default feedback_loop policy, timed apart."""
    from pipelines import feedback_export
    from pipelines.data_config import FeedbackLoopParams
    from serving.record import open_store
    from serving.record.feedback import Review

    with open_store(store_path) as store:
        items = list(store.iter_feedback())
        store.put_reviews([Review(it.feedback.id, it.feedback.revision, "edited" if i % 3 == 0 else "accepted",
                                  f"a reviewer's answer {i}" if i % 3 == 0 else None, "bench", time.time()) for i, it in enumerate(items)])
        started = time.perf_counter()
        result = feedback_export.build(store.iter_feedback(), FeedbackLoopParams())
        files = feedback_export.write(result, work / "export")
        elapsed = time.perf_counter() - started
    rows = sum(len(r) for r in result.rows.values())
    counts = result.counts()
    return (f"{len(items)} reviewed feedback rows -> {rows} training rows ({counts['pairs']} pairs, {counts['kto_rows']} KTO, "
            f"{counts['sft_rows']} SFT, {counts['held_out_rows']} held out) in {len(files)} files: {elapsed:.2f} s, "
            f"{rows / elapsed:,.0f} rows/s, {len(items) / elapsed:,.0f} feedback/s; skipped {counts['skipped'] or 'none'}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1"}
    engine = gateway = None
    try:
        build_default_model(work / "model")
        engine = launch("cpu", str(work / "model"), f"{NAME}-v1", "127.0.0.1", free_port(), work / "engine.log", 600)
        port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.record", "gateway", "--engine-url", engine.root_url, "--model", f"{NAME}-v1", "--port", str(port), "--record-dir", str(work / "record")]
        gateway = subprocess.Popen(cmd, cwd=work, env=env, stdout=(work / "gateway.log").open("wb"), stderr=subprocess.STDOUT)
        root = f"http://127.0.0.1:{port}"
        wait_healthy(root, gateway, work / "gateway.log", "gateway", 120)

        print(f"feedback endpoint: {CLIENTS} clients rate {COMPLETIONS} completions (default-size bootstrap model, one CPU engine, SQLite record):", flush=True)
        ids = asyncio.run(ask_all(root))
        for label, again in (("new feedback (201)", False), ("the same completions again (200, replaced)", True)):
            r = asyncio.run(rate_all(root, ids, again))
            print(f"  {label:<44} {r['rps']:7.1f} req/s  p50 {1000 * r['p50_s']:6.1f} ms  p95 {1000 * r['p95_s']:6.1f} ms  "
                  f"(201: {r['statuses'][201]}, 200: {r['statuses'][200]}, failed: {len(r['failed'])}{', e.g. ' + r['failed'][0] if r['failed'] else ''})", flush=True)
        stop(gateway)  # the recorder flushes on shutdown
        gateway = None
        store_path = work / "record" / "record.sqlite3"
        from serving.record import open_store

        with open_store(store_path) as store:
            items = list(store.iter_feedback())
            leaked = sum(1 for it in items for pii in ("jane.doe@example.com", "202-555-0143", "4111 1111 1111 1111") if pii in (it.correction or ""))
            print(f"  the store: {store.count()} completions, {len(items)} feedback rows (one per completion and key), "
                  f"{sum(1 for it in items if it.correction)} with a correction, {leaked} holding the planted personal data", flush=True)
        print(f"  export: {export_rate(store_path, work)}", flush=True)
    finally:
        if gateway is not None:
            stop(gateway)
        if engine is not None:
            engine.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
