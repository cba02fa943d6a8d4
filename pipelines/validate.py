"""The data gate: Great Expectations suites over the prepared tables.

Expectations are declared here as data (one list per table) and run by GX in an ephemeral
context, so no GX project folder is needed. A failure raises DataValidationError, whose message
and markdown report say which expectation failed, on which column, and with example values.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from pipelines.config import PrepareParams

# GX's progress bars print once per metric; they are noise in a pipeline log.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
logging.getLogger("great_expectations").setLevel(logging.WARNING)


class DataValidationError(RuntimeError):
    def __init__(self, table: str, failures: list[dict]):
        self.table, self.failures = table, failures
        lines = [f"data gate failed on '{table}': {len(failures)} expectation(s) not met"]
        for f in failures:
            where = f" on column '{f['column']}'" if f["column"] else ""
            lines.append(f"  - {f['expectation']}{where}: {f['detail']}")
        lines.append("See reports/data_validation.md; fix the raw data or the prepare.* params and rerun.")
        super().__init__("\n".join(lines))

    def write_report(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = "\n".join(
            f"| {f['expectation']} | {f['column'] or '-'} | {f['detail']} |" for f in self.failures
        )
        path.write_text(
            f"# Data validation failed: `{self.table}`\n\n| expectation | column | detail |\n|---|---|---|\n{rows}\n"
        )


def _run_suite(table: str, df: pd.DataFrame, expectations: list) -> int:
    import great_expectations as gx

    ctx = gx.get_context(mode="ephemeral")
    batch = ctx.data_sources.add_pandas(table).add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
    result = vd.run(batch_parameters={"dataframe": df}, result_format="SUMMARY")
    failures = []
    for r in result.results:
        if r.success:
            continue
        res = r.result or {}
        if res.get("unexpected_count") is not None:
            detail = f"{res['unexpected_count']} unexpected value(s), e.g. {res.get('partial_unexpected_list', [])[:3]}"
        else:
            detail = f"observed {res.get('observed_value')!r}"
        failures.append({"expectation": r.expectation_config.type, "column": r.expectation_config.kwargs.get("column"), "detail": detail})
    if failures:
        raise DataValidationError(table, failures)
    return len(result.results)


def validate_sft(df: pd.DataFrame, cfg: PrepareParams, quarantined: int, raw_rows: int) -> int:
    import great_expectations as gx

    E = gx.expectations
    train_rows = int((df["split"] == "train").sum()) if len(df) else 0
    table = df.assign(
        quarantine_fraction=quarantined / max(raw_rows, 1),
        train_rows=train_rows,
    )
    return _run_suite(
        "sft",
        table,
        [
            E.ExpectColumnValuesToNotBeNull(column="prompt"),
            E.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=1, max_value=cfg.max_chars),
            E.ExpectColumnValueLengthsToBeBetween(column="answer", min_value=1, max_value=cfg.max_chars),
            E.ExpectCompoundColumnsToBeUnique(column_list=["prompt", "answer"]),
            E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "validation", "test"]),
            E.ExpectColumnValuesToBeBetween(column="train_rows", min_value=cfg.min_rows),
            E.ExpectColumnValuesToBeBetween(column="quarantine_fraction", max_value=cfg.max_quarantine_fraction),
            E.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
        ],
    )


def validate_preference(df: pd.DataFrame) -> int:
    import great_expectations as gx

    E = gx.expectations
    table = df.assign(differs=df["chosen"] != df["rejected"])
    return _run_suite(
        "preference",
        table,
        [
            E.ExpectColumnValueLengthsToBeBetween(column="chosen", min_value=1),
            E.ExpectColumnValueLengthsToBeBetween(column="rejected", min_value=1),
            E.ExpectColumnValuesToBeInSet(column="differs", value_set=[True]),
            E.ExpectTableRowCountToBeBetween(min_value=1),
        ],
    )
