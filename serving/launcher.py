"""Launch any serving engine as its own OpenAI-compatible process, the same way for all.

The CPU engine (`python -m serving.server`), vLLM (`vllm serve`) and TensorRT-LLM
(`trtllm-serve`) all answer GET /health and the OpenAI /v1 routes, so the rest of the system
starts one with `launch()`, talks to `base_url` with the `openai` client and calls `stop()`,
never caring which engine it is. Each server runs in its own process group so `stop()` also
reaches the workers vLLM and TensorRT-LLM spawn.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import httpx

from serving import auth

Engine = Literal["cpu", "vllm", "tensorrt-llm"]
ENGINES: tuple[Engine, ...] = ("cpu", "vllm", "tensorrt-llm")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The command each GPU engine needs on PATH, and the project extra that installs it.
EXECUTABLES: dict[Engine, tuple[str, str]] = {"vllm": ("vllm", "vllm"), "tensorrt-llm": ("trtllm-serve", "tensorrt-llm")}
LOG_TAIL_LINES = 20


class EngineNotInstalledError(RuntimeError):
    """The engine's command is not on PATH; raised before anything is spawned."""


class ServerStartError(RuntimeError):
    """The server exited, or never became healthy, during startup."""


def engine_command(
    engine: Engine, model_dir: str, model_name: str, host: str, port: int, extra_args: list[str] | None = None
) -> list[str]:
    """The argv that serves `model_dir` as `model_name` on host:port with the given engine.

    `extra_args` go last, verbatim; `--api-key K` means the same to the cpu engine and vLLM.
    """
    extra = list(extra_args or [])
    if engine == "cpu":
        return [
            sys.executable, "-m", "serving.server",
            "--model-dir", model_dir, "--model-name", model_name,
            "--host", host, "--port", str(port), *extra,
        ]
    if engine == "vllm":
        return [
            "vllm", "serve", model_dir,
            "--served-model-name", model_name,
            "--host", host, "--port", str(port), *extra,
        ]
    if engine == "tensorrt-llm":
        # trtllm-serve spells its options with underscores. The PyTorch backend loads a Hugging
        # Face checkpoint directly (older releases default to the engine-file backend), and
        # --served_model_name (TensorRT-LLM >= 1.2) makes the API name match the other engines.
        return [
            "trtllm-serve", model_dir,
            "--host", host, "--port", str(port),
            "--backend", "pytorch",
            "--served_model_name", model_name, *extra,
        ]
    raise ValueError(f"unknown engine '{engine}', expected one of: {', '.join(ENGINES)}")


# trtllm-serve mounts its Prometheus endpoint (/prometheus/metrics) only with return_perf_metrics,
# and fills its running/waiting gauges only with enable_iter_perf_stats; both default to false.
# Without them the canary's analysis has no engine figures for TensorRT-LLM at all.
TRTLLM_OPTIONS = {"return_perf_metrics": True, "enable_iter_perf_stats": True}
TRTLLM_OPTIONS_FLAGS = ("--extra_llm_api_options", "--config")


def trtllm_options(log_path: Path, extra_args: list[str]) -> list[str]:
    """The `--extra_llm_api_options` file trtllm-serve starts with (written beside its log), unless
    the caller passes one of its own (which then decides about the metrics)."""
    if any(a.split("=", 1)[0] in TRTLLM_OPTIONS_FLAGS for a in extra_args):
        return []
    import yaml

    path = log_path.with_name(f"{log_path.stem}.trtllm-options.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(TRTLLM_OPTIONS))
    return ["--extra_llm_api_options", str(path)]


def require_engine(engine: Engine) -> None:
    """Fail with an actionable message when a GPU engine's command is missing."""
    if engine not in EXECUTABLES:
        return
    command, extra = EXECUTABLES[engine]
    if shutil.which(command) is None:
        raise EngineNotInstalledError(
            f"engine '{engine}' needs the `{command}` command, which is not installed: "
            f"on a GPU machine run `pip install -e '.[{extra}]'` or set serve.engine: cpu"
        )


def engine_key_env(engine: Engine, env: dict[str, str]) -> dict[str, str]:
    """What makes `engine` require $SERVING_API_KEY: the cpu server reads that variable itself,
    vLLM reads $VLLM_API_KEY (an explicit one is kept). trtllm-serve gets no key from here."""
    key = auth.backend_key(env)
    if engine == "vllm" and key and not env.get("VLLM_API_KEY"):
        return {"VLLM_API_KEY": key}
    return {}


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the OS picks it; another process could still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (wildcards mean this machine)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class ServerProcess:
    """One server process: start it, wait for /health, stop it (also as a context manager)."""

    def __init__(self, command: list[str], host: str, port: int, log_path: str | Path, env: dict[str, str] | None = None) -> None:
        self.command = command
        self.host, self.port = host, port
        self.log_path = Path(log_path)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def root_url(self) -> str:
        """http://host:port, where /health lives."""
        return f"http://{_connect_host(self.host)}:{self.port}"

    @property
    def base_url(self) -> str:
        """http://host:port/v1, what the `openai` client takes as base_url."""
        return f"{self.root_url}/v1"

    def start(self) -> "ServerProcess":
        if self.process is not None:
            raise RuntimeError("this server was already started")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,  # one log, in the order things happened
            env=self.env,
            start_new_session=True,  # own process group: stop() signals the engine's children too
        )
        return self

    def poll(self) -> int | None:
        """The exit code, or None while running (or never started)."""
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            with self.log_path.open("r", errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except FileNotFoundError:
            return ""

    def wait_healthy(self, timeout_s: float) -> None:
        """Return once GET /health answers 200; raise ServerStartError if the process exits or
        the timeout passes first (stopping the process in that case)."""
        if self.process is None:
            raise RuntimeError("start() the server before waiting for it")
        deadline = time.monotonic() + timeout_s
        # /health is open on every engine here, but a deployment may put it behind the key too.
        headers = auth.bearer_headers(auth.backend_key(self.env))
        with httpx.Client(timeout=2.0, headers=headers, trust_env=False) as http:
            while True:
                code = self.process.poll()
                if code is not None:
                    raise ServerStartError(
                        f"server exited with code {code} before becoming healthy: {' '.join(self.command)}\n"
                        f"last lines of {self.log_path}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):  # not listening yet
                    if http.get(f"{self.root_url}/health").status_code == 200:
                        return
                if time.monotonic() >= deadline:
                    self.stop()
                    raise ServerStartError(
                        f"server not healthy at {self.root_url}/health after {timeout_s:g}s (stopped it): "
                        f"{' '.join(self.command)}\nlast lines of {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(0.2)

    def stop(self, timeout_s: float = 10) -> int | None:
        """SIGTERM the process group, SIGKILL it if still alive after timeout_s; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self._signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # then SIGKILL, below
                self.process.wait(timeout=timeout_s)
            # SIGKILL even when the leader exited: workers it spawned (vLLM, TensorRT-LLM) may
            # linger in the group. Only done right after SIGTERM, while the group id is surely ours.
            self._signal_group(signal.SIGKILL)
            self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):  # the group is already empty
            os.killpg(self.process.pid, sig)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def launch(
    engine: Engine,
    model_dir: str,
    model_name: str,
    host: str,
    port: int,
    log_path: str | Path,
    startup_timeout_s: float,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> ServerProcess:
    """Start `engine` serving `model_dir` and return it once healthy (raises ServerStartError).
    `env` adds to this process's environment (e.g. OMP_NUM_THREADS for side-by-side servers).
    With $SERVING_API_KEY set, every engine requires it (vLLM reads it as $VLLM_API_KEY).
    trtllm-serve gets an options file that turns its Prometheus metrics on (`TRTLLM_OPTIONS`)."""
    require_engine(engine)
    if engine == "tensorrt-llm":
        extra_args = trtllm_options(Path(log_path), list(extra_args or [])) + list(extra_args or [])
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))  # unbuffered: log lines reach the file as they happen
    env.update(engine_key_env(engine, env))
    if engine == "cpu":
        # `-m serving.server` must resolve to this project whatever the caller's cwd is.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
    server = ServerProcess(engine_command(engine, model_dir, model_name, host, port, extra_args), host, port, log_path, env)
    server.start()
    try:
        server.wait_healthy(startup_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server
