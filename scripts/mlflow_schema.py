"""Regenerate launcher/mlflow_schema.sql: the empty embedded store as the installed MLflow makes it.

    .venv/bin/python scripts/mlflow_schema.py

aitrain creates a new ``sqlite:///`` store from this snapshot (milliseconds) instead of
importing MLflow and running its migrations (seconds), but only when the installed MLflow
is the version the snapshot was taken from (the first line of the file); otherwise MLflow
makes the store itself. Run this after changing MLflow's pin in constraints.txt; the test
tests/observability/test_obs_mlflow_sqlite.py fails while the snapshot is stale.
"""

from __future__ import annotations

import importlib.metadata
import sqlite3
import sys
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "launcher" / "mlflow_schema.sql"


def dump(db: Path) -> list[str]:
    """The store's schema and rows as SQL, without the Default experiment (made per store)."""
    con = sqlite3.connect(db)
    try:
        return [line for line in con.iterdump()
                if not line.startswith(('INSERT INTO "experiments"', "BEGIN TRANSACTION", "COMMIT"))]
    finally:
        con.close()


def mlflow_made_store(directory: Path) -> Path:
    from mlflow.tracking import MlflowClient

    db = directory / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    return db


def main() -> int:
    version = importlib.metadata.version("mlflow")
    with tempfile.TemporaryDirectory() as d:
        lines = dump(mlflow_made_store(Path(d)))
    OUT.write_text(f"-- mlflow {version}\n" + "\n".join(lines) + "\n")
    print(f"wrote {OUT} ({len(lines)} statements, MLflow {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
