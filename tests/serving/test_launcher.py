"""Launching engines as processes: argv per engine, missing engines, startup failures, stop."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving import launcher, server
from serving.client import chat_once, client
from serving.launcher import EngineNotInstalledError, ServerProcess, ServerStartError, engine_command, free_port, launch


def test_vllm_command():
    assert engine_command("vllm", "/models/m", "champ", "127.0.0.1", 8001, ["--max-model-len", "256"]) == [
        "vllm", "serve", "/models/m",
        "--served-model-name", "champ",
        "--host", "127.0.0.1", "--port", "8001",
        "--max-model-len", "256",
    ]


def test_tensorrt_llm_command():
    assert engine_command("tensorrt-llm", "/models/m", "champ", "0.0.0.0", 8002) == [
        "trtllm-serve", "/models/m",
        "--host", "0.0.0.0", "--port", "8002",
        "--backend", "pytorch",
        "--served_model_name", "champ",
    ]


def test_cpu_command_runs_this_projects_server_with_the_same_python():
    assert engine_command("cpu", "/models/m", "champ", "127.0.0.1", 8003, ["--api-key", "k"]) == [
        sys.executable, "-m", "serving.server",
        "--model-dir", "/models/m", "--model-name", "champ",
        "--host", "127.0.0.1", "--port", "8003",
        "--api-key", "k",
    ]


def test_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        engine_command("sglang", "/m", "x", "127.0.0.1", 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(("engine", "command", "extra"), [("vllm", "vllm", "vllm"), ("tensorrt-llm", "trtllm-serve", "tensorrt-llm")])
def test_missing_gpu_engine_fails_clearly_before_spawning(engine, command, extra, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no engine is installed

    def no_spawn(*args, **kwargs):
        raise AssertionError("nothing may be spawned when the engine is missing")

    monkeypatch.setattr(launcher.subprocess, "Popen", no_spawn)
    log = tmp_path / "server.log"
    with pytest.raises(EngineNotInstalledError) as err:
        launch(engine, "/models/m", "champ", "127.0.0.1", free_port(), log, startup_timeout_s=5)
    message = str(err.value)
    assert f"engine '{engine}' needs the `{command}` command, which is not installed" in message
    assert f"pip install -e '.[{extra}]'" in message
    assert "serve.engine: cpu" in message
    assert not log.exists()


def test_trtllm_serve_is_started_with_its_prometheus_metrics_on(tmp_path, monkeypatch):
    """trtllm-serve mounts /prometheus/metrics only with return_perf_metrics: true in its LLM
    options, which it reads from --extra_llm_api_options. A stand-in `trtllm-serve` on PATH
    records how it was started (then exits, as a server without a GPU would).
    Seen red: without trtllm_options() in launch() (as before), the recorded argv had no
    options file: "ValueError: '--extra_llm_api_options' is not in list"."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    fake = bin_dir / "trtllm-serve"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {record}\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(ServerStartError, match="exited with code 3"):
        launch("tensorrt-llm", "/models/m", "champ", "127.0.0.1", free_port(), tmp_path / "logs" / "v3-r0.log", startup_timeout_s=30)
    argv = record.read_text().split()
    options = Path(argv[argv.index("--extra_llm_api_options") + 1])
    assert yaml.safe_load(options.read_text()) == {"return_perf_metrics": True, "enable_iter_perf_stats": True}
    assert argv[:2] == ["/models/m", "--host"] and "--served_model_name" in argv
    # An options file of the caller's own decides for itself.
    with pytest.raises(ServerStartError):
        launch("tensorrt-llm", "/models/m", "champ", "127.0.0.1", free_port(), tmp_path / "logs" / "v3-r1.log", 30, extra_args=["--config", "mine.yaml"])
    assert record.read_text().split().count("--extra_llm_api_options") == 0


def test_cpu_engine_launches_answers_and_stops(model_dir, tmp_path):
    log = tmp_path / "logs" / "cpu.log"
    with launch("cpu", model_dir, "tiny", "127.0.0.1", free_port(), log, startup_timeout_s=60) as proc:
        assert proc.poll() is None
        assert proc.base_url == f"http://127.0.0.1:{proc.port}/v1"
        assert httpx.get(f"{proc.root_url}/health").json() == {"status": "ok", "model": "tiny"}
        text, latency = chat_once(client(proc.base_url), "tiny", "Reverse the list:\n1 2 3", max_tokens=4)
        assert isinstance(text, str)
        assert latency > 0
        proc.stop()
        assert proc.poll() is not None
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{proc.root_url}/health", timeout=2)
    assert log.read_text()  # uvicorn's startup lines went to the log file


def test_a_server_that_exits_during_startup_reports_code_and_log(tmp_path):
    proc = ServerProcess(
        [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], "127.0.0.1", free_port(), tmp_path / "boom.log"
    ).start()
    with pytest.raises(ServerStartError) as err:
        proc.wait_healthy(timeout_s=30)
    assert "boom" in str(err.value)
    assert "exited with code 3" in str(err.value)
    proc.stop()


def test_a_server_that_never_becomes_healthy_is_stopped_on_timeout(tmp_path):
    proc = ServerProcess([sys.executable, "-c", "import time; time.sleep(60)"], "127.0.0.1", free_port(), tmp_path / "slow.log")
    proc.start()
    with pytest.raises(ServerStartError, match="not healthy"):
        proc.wait_healthy(timeout_s=0.5)
    assert proc.poll() is not None


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path):
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    log = tmp_path / "stubborn.log"
    with ServerProcess([sys.executable, "-c", script], "127.0.0.1", free_port(), log).start() as proc:
        while "ready" not in proc.log_tail():  # SIGTERM is only ignored once the handler is set
            assert proc.poll() is None
            time.sleep(0.01)
        assert proc.stop(timeout_s=0.5) == -9  # SIGKILL
    assert proc.poll() == -9


def test_cpu_server_launched_on_a_public_host_without_key_fails_with_the_reason(model_dir, tmp_path):
    with pytest.raises(ServerStartError) as err:
        launch("cpu", model_dir, "tiny", "0.0.0.0", free_port(), tmp_path / "public.log", startup_timeout_s=30)
    assert "refusing to listen on 0.0.0.0 without an API key" in str(err.value)
    assert "exited with code 2" in str(err.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "my-box.example"])
def test_server_main_refuses_a_public_host_without_key(host, capsys, monkeypatch):
    monkeypatch.delenv(server.API_KEY_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        server.main(["--model-dir", "/nowhere", "--model-name", "x", "--host", host])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"refusing to listen on {host} without an API key" in err
    assert "--insecure" in err


def test_public_host_is_allowed_with_a_key_and_tls_or_insecure(monkeypatch, capsys):
    """Off loopback the key would cross the network: TLS served (--tls-certfile, tests/serving/
    test_tls.py) or terminated in front (--tls-offloaded), as for the gateway.
    Seen red: with the TLS check taken out of parse_args -> "DID NOT RAISE SystemExit" for a key alone."""
    base = ["--model-dir", "/m", "--model-name", "x", "--host", "0.0.0.0"]
    monkeypatch.delenv(server.API_KEY_ENV, raising=False)
    with pytest.raises(SystemExit):
        server.parse_args([*base, "--api-key", "k"])
    assert "refusing to listen on 0.0.0.0 without TLS" in capsys.readouterr().err
    assert server.parse_args([*base, "--api-key", "k", "--tls-offloaded"]).api_key == "k"
    assert server.parse_args([*base, "--insecure"]).insecure
    monkeypatch.setenv(server.API_KEY_ENV, "from-env")
    assert server.parse_args([*base, "--tls-offloaded"]).api_key == "from-env"
    assert server.parse_args(["--model-dir", "/m", "--model-name", "x", "--host", "::1"]).host == "::1"


GUARDED_HEALTH = """
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.headers.get("authorization") == "Bearer " + os.environ["SERVING_API_KEY"]
        self.send_response(200 if ok else 401)
        self.end_headers()
HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def test_health_wait_sends_the_serving_api_key_and_vllm_is_given_it(tmp_path):
    # A deployment that guards /health too: the wait must authenticate like every other client.
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "SERVING_API_KEY": "k-123"}
    with ServerProcess([sys.executable, "-c", GUARDED_HEALTH, str(port)], "127.0.0.1", port, tmp_path / "guarded.log", env).start() as proc:
        proc.wait_healthy(timeout_s=20)
    assert launcher.engine_key_env("vllm", {"SERVING_API_KEY": "k-123"}) == {"VLLM_API_KEY": "k-123"}
    assert launcher.engine_key_env("vllm", {"SERVING_API_KEY": "k-123", "VLLM_API_KEY": "own"}) == {}
    assert launcher.engine_key_env("cpu", {"SERVING_API_KEY": "k-123"}) == {}  # serving.server reads it itself
    assert launcher.engine_key_env("vllm", {}) == {}
