"""TLS (serving/tls.py): a bind off loopback needs it (served, or terminated in front); the
gateway serves HTTPS with a certificate and key; the project's own clients (the plane client and
the OpenAI client a release sends through) verify it against the configured certificate, and a
client that does not trust it is refused by the handshake."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipelines.config import ConfigError, load_params
from serving.client import client
from serving.gateway import exposure_problem, parse_args
from serving.launcher import PROJECT_ROOT, free_port
from serving.plane_client import PlaneClient, plane_root
from serving.routing import Backend
from serving.plane.targets import TARGETS_FILE, scrape_address, scrape_targets, write_targets
from tests.monitoring.conftest import need
from tests.serving.conftest import ThreadedServer, stop, wait_until
from tests.serving.record.test_gateway_record import ANSWER, EngineState, fake_engine


def self_signed(folder: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """(cert.pem, key.pem) for `name` (an IP in subjectAltName, as clients of 127.0.0.1 check)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def test_an_exposed_bind_needs_tls_served_or_offloaded(tmp_path, monkeypatch, capsys):
    """Seen red: with exposure_problem's TLS check removed, `--host 0.0.0.0` with client and
    admin keys but no TLS started (parse_args returned)."""
    for name in ("GATEWAY_API_KEY", "SERVING_API_KEY", "SERVING_ADMIN_KEY", "GATEWAY_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)
    assert exposure_problem("127.0.0.1", None, None, None) is None, "loopback needs nothing"
    said = exposure_problem("0.0.0.0", "sk-client", "sk-admin", None)
    assert said.startswith("refusing to listen on 0.0.0.0 without TLS (--tls-certfile and --tls-keyfile, or --tls-offloaded")
    assert exposure_problem("0.0.0.0", "sk-client", "sk-admin", None, tls=True) is None

    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("GATEWAY_API_KEY", "sk-client-0123456789")
    monkeypatch.setenv("SERVING_ADMIN_KEY", "sk-admin-0123456789")
    base = ["--stable-url", "http://127.0.0.1:8001", "--stable-model", "champ", "--host", "0.0.0.0"]
    with pytest.raises(SystemExit):
        parse_args(base)
    assert "without TLS" in capsys.readouterr().err
    assert parse_args([*base, "--tls-certfile", str(cert), "--tls-keyfile", str(key)]).tls_certfile == str(cert)
    assert parse_args([*base, "--tls-offloaded"]).tls_offloaded
    for bad, says in (
        (["--tls-certfile", str(cert)], "--tls-certfile is set but --tls-keyfile is not"),
        (["--tls-certfile", str(tmp_path / "nope.pem"), "--tls-keyfile", str(key)], "--tls-certfile: " + str(tmp_path / "nope.pem") + " does not exist"),
        (["--tls-certfile", str(key), "--tls-keyfile", str(key)], "do not load as a PEM certificate and its key"),
    ):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
        assert says in capsys.readouterr().err

    # The plane reads serve.*: half a pair is a config error before any work; no TLS off loopback is refused.
    params = tmp_path / "params.yaml"
    params.write_text(f"serve:\n  tls_keyfile: {key}\n")
    with pytest.raises(ConfigError, match="serve.tls_keyfile is set but serve.tls_certfile is not"):
        load_params(params)
    from serving.plane.__main__ import main as plane_main

    params.write_text("serve:\n  host: 0.0.0.0\n")
    with pytest.raises(SystemExit) as exited:
        plane_main(["--params", str(params), "--state-dir", str(tmp_path / "plane")])
    assert exited.value.code == 2
    assert "without TLS (serve.tls_certfile and serve.tls_keyfile, or serve.tls_offloaded" in capsys.readouterr().err
    assert not (tmp_path / "plane").exists(), "refused before anything started"


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory):
    """A real `python -m serving.gateway --tls-certfile --tls-keyfile` in front of a fake engine:
    (root URL, port, certificate, key, its folder)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = self_signed(folder)
    state = EngineState()
    with ThreadedServer(fake_engine(state)) as engine:
        state.backend = Backend("v1", engine.root_url, "served", version="1")
        port = free_port()
        log = (folder / "gateway.log").open("wb")
        cmd = [sys.executable, "-m", "serving.gateway", "--stable-url", engine.root_url, "--stable-model", "served", "--public-model", "m",
               "--port", str(port), "--tls-certfile", str(cert), "--tls-keyfile", str(key)]
        gateway = subprocess.Popen(cmd, cwd=folder, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=log, stderr=subprocess.STDOUT)
        try:
            root = f"https://127.0.0.1:{port}"
            with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=5) as trusted:

                def up() -> bool:
                    assert gateway.poll() is None, (folder / "gateway.log").read_text()
                    try:
                        return trusted.get(f"{root}/health").status_code == 200
                    except httpx.HTTPError:
                        return False

                wait_until(up, "the TLS gateway's /health")
            yield root, port, cert, key, folder
        finally:
            stop(gateway)


def test_the_gateway_serves_https_and_the_projects_clients_verify_it(tls_gateway, tmp_path):
    """The plane client and a release's OpenAI client, given serve.tls_certfile, reach the TLS
    gateway over https; a client that does not trust the certificate, and plain http, get nothing.
    Seen red: with serving.client.client ignoring verify_for (the default httpx client) ->
    openai.APIConnectionError, certificate verify failed: self-signed certificate."""
    root, port, cert, key, _ = tls_gateway
    params = tmp_path / "params.yaml"
    params.write_text(f"serve:\n  port: {port}\n  tls_certfile: {cert}\n  tls_keyfile: {key}\n")
    assert plane_root(load_params(params)) == root  # 'auto' on a TLS plane is https, and trusted from here on
    plane = PlaneClient(root)
    assert plane.http.get("/health").status_code == 200
    plane.close()
    with client(f"{root}/v1") as oai:
        answer = oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert answer.choices[0].message.content == ANSWER
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{root}/health", timeout=5)  # the system's CAs do not know it
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # no plain-text fallback


def test_prometheus_scrapes_a_tls_gateway_from_the_planes_target_file(tls_gateway, tmp_path):
    """What the plane writes for a gateway serving TLS (`__scheme__: https` in its targets.json)
    and what `make monitor` renders (the serving job's tls_config trusting serve.tls_certfile):
    a real Prometheus scrapes the gateway over https and verifies it.
    Seen red: without the __scheme__ label -> scraped at http://127.0.0.1:<port>/metrics; without
    the tls_config -> down, 'Get "https://127.0.0.1:<port>/metrics": x509: certificate signed by
    unknown authority'."""
    need("prometheus")
    need("prometheus-alertmanager")
    from monitoring.stack import Stack

    _, port, cert, key, _ = tls_gateway
    ports = {k: free_port() for k in ("prometheus", "alertmanager", "receiver")}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "serve": {"port": port, "tls_certfile": str(cert), "tls_keyfile": str(key)},
        "monitor": {"prometheus_port": ports["prometheus"], "alertmanager_port": ports["alertmanager"], "receiver_port": ports["receiver"], "scrape_interval": "1s", "evaluation_interval": "1s"},
    }))
    params = load_params(tmp_path / "params.yaml")
    plane_dir = tmp_path / "plane"
    plane_dir.mkdir()
    write_targets(plane_dir / TARGETS_FILE, scrape_targets("m", "plane", scrape_address("127.0.0.1", port), [], None, None, "https"))
    stack = Stack(params, tmp_path / "monitoring", (plane_dir,))
    stack.render()
    stack.start()
    try:
        url = f"{stack.prometheus_url}/api/v1/targets"

        seen: list[dict] = []

        def scraped() -> bool:
            time.sleep(0.2)
            active = httpx.get(url, timeout=5, trust_env=False).json()["data"]["activeTargets"]
            seen[:] = [t for t in active if t["labels"].get("job") == "gateway" and t["health"] != "unknown"]
            return bool(seen)

        wait_until(scraped, "Prometheus to scrape the TLS gateway once", 60)
        (target,) = seen
        assert target["scrapeUrl"] == f"https://127.0.0.1:{port}/metrics"
        assert target["health"] == "up", target["lastError"]
    finally:
        stack.stop()


def test_the_cpu_engine_serves_https_on_its_own(model_dir, tmp_path):
    """`python -m serving.server` (what `lifecycle serve` runs for the champion alone) with a
    certificate: a real model answers over https to a client that trusts it; a half pair fails
    before the model loads, naming the flag.
    Seen red: with main() not passing server_kwargs to uvicorn -> the trusted https client's
    handshake failed (plain http on the port) until the wait timed out."""
    cert, key = self_signed(tmp_path)
    base = [sys.executable, "-m", "serving.server", "--model-dir", model_dir, "--model-name", "m"]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "SERVING_API_KEY": "sk-engine-tls-0123456789"}
    half = subprocess.run([*base, "--tls-certfile", str(cert)], env=env, capture_output=True, text=True, timeout=120)
    assert half.returncode == 2 and "--tls-certfile is set but --tls-keyfile is not" in half.stderr
    port = free_port()
    log = (tmp_path / "engine.log").open("wb")
    engine = subprocess.Popen([*base, "--port", str(port), "--tls-certfile", str(cert), "--tls-keyfile", str(key)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        root = f"https://127.0.0.1:{port}"
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=60, headers={"authorization": "Bearer sk-engine-tls-0123456789"}) as trusted:

            def up() -> bool:
                assert engine.poll() is None, (tmp_path / "engine.log").read_text()
                time.sleep(0.2)
                try:
                    return trusted.get(f"{root}/health").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(up, "the CPU engine's https /health", 180)
            answer = trusted.post(f"{root}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "1 2 3"}], "max_tokens": 4})
            assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{root}/health", timeout=5)
    finally:
        stop(engine)
