"""`python -m benchmarks.engine`: what dynamic batching buys the CPU engine.

The same prompts are sent by N concurrent threads (default 16) twice:
- one request at a time: each thread calls `model.generate` for its own prompt, serialised by a
  lock (how the engine worked before batching: one model, one request at a time);
- the batching engine: each thread calls `CpuEngine.generate`, the worker batches what waits.

The model is the size of the project's default bootstrap model (`ModelParams()`: hidden 128,
2 layers), untrained, built here. Stop tokens are suppressed so every request generates exactly
`--max-new-tokens` tokens, making both sides do the same work. Target (issue "Promotion you
can trust"): batched throughput >= 3x at 16 concurrent requests. Figures are printed, never
asserted: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

TARGET_RATIO = 3.0


def build_checkpoint(path: str) -> None:
    from pipelines.bootstrap import build_model, train_tokenizer
    from pipelines.config import ModelParams

    texts = [f"Reverse the list:\n{' '.join(str((i * k) % 10) for k in range(3 + i % 3))}" for i in range(500)]
    tokenizer = train_tokenizer(iter(texts), ModelParams().vocab_size)
    build_model(ModelParams(), tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)


def suppress_stop_tokens(model: torch.nn.Module, stop_ids: list[int]) -> None:
    """Every request then runs to max_new_tokens: an untrained model stops at random otherwise."""
    stop = torch.tensor(stop_ids)
    model.lm_head.register_forward_hook(lambda module, inputs, logits: logits.index_fill(-1, stop, float("-inf")))


def timed_round(ask: Callable[[list[int]], int], prompts: list[list[int]]) -> tuple[float, int]:
    """All prompts sent at once from their own threads: (wall seconds, tokens generated)."""
    start = threading.Barrier(len(prompts) + 1)

    def one(ids: list[int]) -> int:
        start.wait()
        return ask(ids)

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        pending = [pool.submit(one, p) for p in prompts]
        start.wait()
        began = time.perf_counter()
        tokens = sum(f.result() for f in pending)
        return time.perf_counter() - began, tokens


def report(label: str, rounds: list[tuple[float, int]], requests: int) -> float:
    seconds = statistics.median(s for s, _ in rounds)
    tokens = rounds[0][1]
    print(f"{label:<28} {requests / seconds:8.2f} req/s  {tokens / seconds:9.1f} tok/s  ({seconds:.2f} s per round of {requests}, median of {len(rounds)})")
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent requests (threads), one distinct prompt each")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per request (stop tokens are suppressed)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per side; the median is reported")
    parser.add_argument("--batch-window-ms", type=float, default=5.0, help="the engine's batch window")
    args = parser.parse_args()

    from serving.engine import CpuEngine

    with tempfile.TemporaryDirectory(prefix="bench-engine-") as path:
        build_checkpoint(path)
        batch_sizes: list[int] = []
        engine = CpuEngine(
            path,
            max_new_tokens_limit=args.max_new_tokens,
            max_batch_size=args.concurrency,
            batch_window_ms=args.batch_window_ms,
            max_queue=max(64, args.concurrency),
            on_batch=batch_sizes.append,
        )
        try:
            suppress_stop_tokens(engine.model, engine.stop_ids)
            prompts = [
                engine.encode_chat([{"role": "user", "content": "Reverse the list:\n" + " ".join(str((i * 7 + k) % 10) for k in range(3 + i % 3))}])
                for i in range(args.concurrency)
            ]
            model, lock = engine.model, threading.Lock()

            def one_at_a_time(ids: list[int]) -> int:
                with lock, torch.inference_mode():
                    out = model.generate(
                        input_ids=torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=args.max_new_tokens,
                        do_sample=False,
                        eos_token_id=engine.stop_ids,
                        pad_token_id=engine.pad_id,
                    )
                return out.shape[1] - len(ids)

            def batched(ids: list[int]) -> int:
                return engine.generate(ids, args.max_new_tokens).completion_tokens

            n_params = sum(p.numel() for p in model.parameters())
            print(f"model: {n_params / 1e6:.2f} M parameters (ModelParams() defaults), torch threads: {torch.get_num_threads()}")
            print(f"{args.concurrency} concurrent requests, {args.max_new_tokens} new tokens each, greedy\n")
            timed_round(one_at_a_time, prompts[:2])  # warm-up: first-call allocations and lazy imports
            timed_round(batched, prompts[:2])
            baseline = [timed_round(one_at_a_time, prompts) for _ in range(args.rounds)]
            batch_sizes.clear()
            dynamic = [timed_round(batched, prompts) for _ in range(args.rounds)]
            base_tps = report("one request at a time", baseline, len(prompts))
            batch_tps = report("dynamic batching engine", dynamic, len(prompts))
            ratio = batch_tps / base_tps
            print(f"\nbatched / one-at-a-time throughput: {ratio:.2f}x  (target >= {TARGET_RATIO:g}x: {'met' if ratio >= TARGET_RATIO else 'NOT met'})")
            print(f"batch sizes the engine formed: {batch_sizes}")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
