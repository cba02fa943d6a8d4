"""The data gate: Great Expectations suites over the prepared tables.

Expectations are declared here as data (one list per table) and run by GX in an ephemeral
context, so no GX project folder is needed; its Data Docs (a static HTML site) are built into
reports/data/data_docs and kept as an artifact. They check what ingestion does not already
guarantee: lengths, role order, no PII left in any text field (contents, tool-call arguments,
tool results, system prompts, answers, tool schemas), no item shared by two splits, and enough rows in
every table the recipe trains on. A failure raises DataValidationError, whose message and
markdown report say which expectation failed, on which table and column, with examples.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from pipelines.clean import find_pii
from pipelines.formats import message_texts, strings_in, tool_calls_of

# GX's progress bars print once per metric; they are noise in a pipeline log.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
logging.getLogger("great_expectations").setLevel(logging.WARNING)

DATA_DOCS = Path("reports/data/data_docs")
# After an optional system turn: user, then assistant turns answering users or tool results.
ROLE_ORDER = r"^(system )?user( (assistant|tool|user))* assistant$"


class DataValidationError(RuntimeError):
    def __init__(self, failures: list[dict]):
        self.failures = failures
        lines = [f"data gate failed: {len(failures)} expectation(s) not met"]
        for f in failures:
            where = f" on column '{f['column']}'" if f["column"] else ""
            lines.append(f"  - {f['table']}: {f['expectation']}{where}: {f['detail']}")
        lines.append("See reports/data_validation.md and the Data Docs in reports/data/data_docs; fix the data or the prepare.* params and rerun.")
        super().__init__("\n".join(lines))

    def write_report(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = "\n".join(f"| {f['table']} | {f['expectation']} | {f['column'] or '-'} | {f['detail']} |" for f in self.failures)
        path.write_text(f"# Data validation failed\n\n| table | expectation | column | detail |\n|---|---|---|---|\n{rows}\n")


class Gate:
    """One GX context for every table of a run, so the Data Docs show them all together."""

    def __init__(self) -> None:
        import great_expectations as gx

        self.gx = gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.ctx = gx.get_context(mode="ephemeral")
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)  # a bar per metric is noise in a stage log
        DATA_DOCS.mkdir(parents=True, exist_ok=True)
        self.ctx.add_data_docs_site(
            site_name="prepared",
            site_config={"class_name": "SiteBuilder", "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(DATA_DOCS.resolve())}, "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}},
        )
        self.failures: list[dict] = []
        self.checked = 0

    def check(self, table: str, df: pd.DataFrame, expectations: list) -> None:
        gx = self.gx
        source = self.ctx.data_sources.add_pandas(table)
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        suite = self.ctx.suites.add(gx.ExpectationSuite(name=table, expectations=expectations))
        vd = self.ctx.validation_definitions.add(gx.ValidationDefinition(name=table, data=batch, suite=suite))
        checkpoint = self.ctx.checkpoints.add(gx.Checkpoint(name=table, validation_definitions=[vd], result_format="SUMMARY"))
        outcome = checkpoint.run(batch_parameters={"dataframe": df})
        for result in outcome.run_results.values():
            for r in result.results:
                self.checked += 1
                if r.success:
                    continue
                res = r.result or {}
                if res.get("unexpected_count") is not None:
                    detail = f"{res['unexpected_count']} unexpected value(s), e.g. {res.get('partial_unexpected_list', [])[:3]}"
                else:
                    detail = f"observed {res.get('observed_value')!r}"
                self.failures.append({"table": table, "expectation": r.expectation_config.type, "column": r.expectation_config.kwargs.get("column"), "detail": detail})

    def finish(self) -> int:
        self.ctx.build_data_docs(site_names=["prepared"])
        if self.failures:
            raise DataValidationError(self.failures)
        return self.checked


def conversation_columns(messages: list[list[dict]], tools: list | None = None) -> dict[str, list]:
    """Derived columns the expectations read: the role sequence, the longest message, PII left
    in any text of the conversation (tool calls and the tool schemas included)."""
    roles, longest, pii = [], [], []
    for convo, schema in zip(messages, tools if tools is not None else [None] * len(messages)):
        roles.append(" ".join(m["role"] for m in convo))
        longest.append(max((len(m["content"]) for m in convo), default=0))
        texts = [t for m in convo for t in message_texts(m)] + strings_in(tool_calls_of(schema) or [])
        pii.append(sum(len(find_pii(t)) for t in texts))
    return {"roles": roles, "longest_message": longest, "pii_found": pii}


def validate(tables: dict[str, pd.DataFrame], required: set[str], cfg, quarantined: int, raw_rows: int) -> int:
    """Run every table's suite; raise DataValidationError listing all failures at once."""
    import great_expectations as gx  # heavy: imported when the gate runs

    E = gx.expectations
    gate = Gate()
    summary = pd.DataFrame({"quarantine_fraction": [quarantined / max(raw_rows, 1)], "raw_rows": [raw_rows]})
    gate.check("totals", summary, [
        E.ExpectColumnValuesToBeBetween(column="quarantine_fraction", max_value=cfg.max_quarantine_fraction),
        E.ExpectColumnValuesToBeBetween(column="raw_rows", min_value=1),
    ])
    for table, df in tables.items():
        need = cfg.min_rows if table in required else 0
        train_rows = int((df["split"] == "train").sum()) if len(df) else 0
        checks = [
            E.ExpectColumnValuesToBeInSet(column="splits_of_item", value_set=[1]),  # one item, one split (weights may repeat it within one)
            E.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "validation", "test"]),
            E.ExpectColumnValuesToBeBetween(column="train_rows", min_value=need),
        ]
        frame = df.assign(train_rows=train_rows, splits_of_item=df.groupby("id")["split"].transform("nunique") if len(df) else [])
        if table == "sft":
            frame = frame.assign(**conversation_columns(list(df["messages"]), list(df["tools"])))
            checks += [
                E.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLE_ORDER),
                E.ExpectColumnValuesToBeBetween(column="longest_message", min_value=1, max_value=cfg.max_chars),
                E.ExpectColumnValuesToBeInSet(column="pii_found", value_set=[0]) if cfg.pii != "off" else E.ExpectColumnToExist(column="pii_found"),
            ]
        elif table in ("preference", "kto"):
            answers = ("chosen", "rejected") if table == "preference" else ("completion",)
            convo = [[m for cell in cells for m in cell] for cells in zip(df["prompt"], *(df[a] for a in answers))] if len(df) else []
            derived = conversation_columns(convo)
            frame = frame.assign(longest_message=derived["longest_message"], pii_found=derived["pii_found"])
            checks += [
                E.ExpectColumnValuesToBeBetween(column="longest_message", min_value=1, max_value=cfg.max_chars),
                E.ExpectColumnValuesToBeInSet(column="pii_found", value_set=[0]) if cfg.pii != "off" else E.ExpectColumnToExist(column="pii_found"),
            ]
            if table == "preference":
                frame = frame.assign(differs=[list(c) != list(r) for c, r in zip(df["chosen"], df["rejected"])])
                checks.append(E.ExpectColumnValuesToBeInSet(column="differs", value_set=[True]))
            else:
                checks.append(E.ExpectColumnDistinctValuesToContainSet(column="label", value_set=[True, False]) if table in required else E.ExpectColumnToExist(column="label"))
        if table in required:
            checks.append(E.ExpectTableRowCountToBeBetween(min_value=need))
        if len(frame):
            gate.check(table, frame, checks)
        elif need:
            gate.failures.append({"table": table, "expectation": "expect_table_row_count_to_be_between", "column": None, "detail": f"no rows, but the recipe trains on '{table}' and needs at least {need}"})
    return gate.finish()
