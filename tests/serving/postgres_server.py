"""A real, throwaway PostgreSQL server for the record's PostgreSQL store.

Import `postgres_url` into a test module: module-scoped, so each module gets its own cluster
(`initdb` in a temp dir, `pg_ctl start` on a free loopback port, fsync off, trust auth on
loopback only), stopped and deleted afterwards. PostgreSQL refuses to run as root: as root the
cluster is run as Debian's `postgres` user (its package creates it), in a folder it owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.serving.redis_server import free_port

MISSING = "PostgreSQL not installed: apt-get install postgresql (CI installs it; initdb and pg_ctl are under /usr/lib/postgresql/<major>/bin)"


def server_bin() -> str | None:
    """The folder of initdb and pg_ctl: Debian keeps them off PATH, per major version."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(versions[-1]) if versions else None


def as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root, and there is no 'postgres' user to run PostgreSQL as (the postgresql package creates it)")
    return ["runuser", "-u", "postgres", "--", *cmd]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    import psycopg

    bindir = server_bin()
    if bindir is None:
        if os.environ.get("CI"):  # .ci/run installs it: a skip there would hide untested code
            pytest.fail(MISSING)
        pytest.skip(MISSING)
    # Not under pytest's tmp_path: its parents are private to root, and the server user must reach it.
    workdir = tempfile.mkdtemp(prefix="record-pg-")
    os.chmod(workdir, 0o755)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
    data = os.path.join(workdir, "data")
    try:
        subprocess.run(as_server_user([f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
        for _ in range(3):  # a free port can be taken between the probe and the bind: try another
            port = free_port()
            options = f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
            started = subprocess.run(as_server_user([f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(workdir, "log"), "-w", "-t", "60", "-o", options, "start"]), capture_output=True, text=True)
            if started.returncode == 0:
                break
        else:
            log = open(os.path.join(workdir, "log")).read()[-2000:] if os.path.exists(os.path.join(workdir, "log")) else ""
            pytest.fail(f"PostgreSQL did not start on a free loopback port in 3 tries: {started.stderr}\n{log}")
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        try:
            yield url
        finally:
            subprocess.run(as_server_user([f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"]), capture_output=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def new_database(url: str, name: str) -> str:
    """A new, empty database on the server at `url` (each test its own); its URL."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"
