"""A real, throwaway redis-server for the Redis-backed cache and rate-limit tests.

Import `redis_url` into a test module: module-scoped, so each module gets its own server on a
free loopback port, with persistence off (--save "" --appendonly no) and its files in a temp dir.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis

from tests.serving.conftest import stop

MISSING = "redis-server not installed: apt-get install redis-server (CI installs it)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):  # .ci/run installs it: a skip there would hide untested code
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    workdir = tmp_path_factory.mktemp("redis")
    for _ in range(3):  # a free port can be taken between the probe and the bind: try another
        port = free_port()
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.02)
        else:
            process.kill()
            process.wait()
            client.close()
            continue
        client.close()
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop(process, 10)
        return
    pytest.fail("redis-server did not start on a free loopback port in 3 tries")
