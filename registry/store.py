"""Where MLflow lives: a local SQLite tracking/registry store and a local artifact folder by
default (created on first use), or whatever MLFLOW_TRACKING_URI points at."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow import MlflowClient


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def experiment_id(name: str) -> str:
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_location())


def artifact_location() -> str | None:
    """Where a new experiment keeps its artifacts: $MLFLOW_ARTIFACT_ROOT when it is a URL
    (s3://, gs://, ...), the tracking server's own artifact root when tracking is remote (None),
    else a local folder beside the SQLite store."""
    root = os.environ.get("MLFLOW_ARTIFACT_ROOT")
    if root and "://" in root:
        return root
    if tracking_uri().startswith(("http://", "https://", "databricks")):
        return None
    return Path(root or "mlartifacts").resolve().as_uri()


def unreadable(exc: BaseException) -> str | None:
    """One line for a registry store that cannot be read (a damaged or half-written SQLite file,
    a database that refuses us), naming the store and the fix; None for any other error."""
    import sqlite3

    from sqlalchemy.exc import DatabaseError

    from pipelines.redact import redact_url

    seen = exc
    while seen is not None:
        if isinstance(seen, (DatabaseError, sqlite3.DatabaseError)):
            reason = str(getattr(seen, "orig", None) or seen).splitlines()[0]
            return (f"the MLflow registry at {redact_url(tracking_uri())} cannot be read ({reason}): it is damaged or was "
                    "half-written; restore it from a backup, or point MLFLOW_TRACKING_URI at a good store, and rerun")
        seen = seen.__cause__ or seen.__context__
    return None


def exit_if_unreadable(exc: BaseException, prefix: str, code: int) -> None:
    """Exit with `code` and `unreadable`'s line after `prefix` when `exc` is an unreadable store;
    return otherwise (the caller re-raises)."""
    import sys

    line = unreadable(exc)
    if line is not None:
        print(f"{prefix}{line}", file=sys.stderr)
        sys.exit(code)
