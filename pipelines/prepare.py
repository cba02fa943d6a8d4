"""Stage `prepare`: the declared sources, in any supported format and file type -> one
canonical schema -> cleaned, deduplicated, decontaminated, validated Parquet tables.

Every raw row ends in exactly one place: a split of one table (sft, preference, kto, text), or
data/prepared/quarantine.jsonl with its source, file, line and reason. The counts reconcile
per file and per reason (checked here; the stage fails rather than lose a row silently) and go
to metrics/prepare.json. The data card (counts, lengths, sources and hashes, a length
histogram) and the Great Expectations Data Docs go to reports/data/; a failed data gate writes a readable report and no
tables. Nothing here writes to a source.

Order matters: rows are normalised and cleaned, then measured in the tokens of the model being
trained, checked for PII and deduplicated (exact, then near-duplicates), split by a hash of the
prompt (all copies of a prompt land in one split, in every table), and then every training row
is checked for overlap with every evaluation item the gate uses (decontamination): the
held-out splits, the safety suite and the local files of evaluate.tasks.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pipelines.clean import Contamination, NearDuplicates, clean_text, find_pii, normal_form, redact, repetition_ratio
from pipelines.common import METRICS, PREPARED, REPORTS, log, stage_main, write_json
from pipelines.config import Params
from pipelines.data_config import PrepareParams, SourceParams
from pipelines.formats import DEFAULT, RowError, map_strings, message_texts, normalise, strings_in, tool_calls_of
from pipelines.recipe import required_tables
from pipelines.sources import DATA_SUFFIXES, RawRow, SourceError, read_file, read_source
from pipelines.validate import DataValidationError, validate

TABLES = {"sft": ("train", "validation", "test"), "preference": ("train", "test"), "kto": ("train", "test"), "text": ("train", "validation", "test")}
COLUMNS = {"sft": ["messages", "tools"], "preference": ["prompt", "chosen", "rejected"], "kto": ["prompt", "completion", "label"], "text": ["text"]}
MESSAGE_FIELDS = {"sft": ("messages",), "preference": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion")}
EVAL_SPLITS = ("test", "validation")  # held out from training: what training rows must not overlap
REPORT_DIR = REPORTS / "data"
TASKS_DIR = Path(__file__).parent / "eval_tasks"  # the project's lm-eval tasks and their local data


def split_of(prompt: str, cfg: PrepareParams) -> str:
    """Deterministic split by a hash of the prompt: a prompt (and all its duplicates) lands in
    one split only, in every table, and keeps its split as the data grows."""
    u = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if u < cfg.test_fraction:
        return "test"
    if u < cfg.test_fraction + cfg.validation_fraction:
        return "validation"
    return "train"


@dataclass
class Kept:
    table: str
    record: dict
    source: str
    file: str
    line: int
    prompt: str  # what the split and decontamination key on
    answer: str
    split: str = ""
    id: str = ""


# ---------------------------------------------------------------- one row


def messages_of(table: str, record: dict) -> list[dict]:
    return [m for f in MESSAGE_FIELDS.get(table, ()) for m in record[f]]


def record_texts(table: str, record: dict) -> list[str]:
    """Every text a record holds: contents (system prompts, tool results and answers
    included), each string inside its tool calls, and the tool schemas of an SFT row."""
    if table == "text":
        return [record["text"]]
    texts = [t for m in messages_of(table, record) for t in message_texts(m)]
    if table == "sft" and (tools := tool_calls_of(record.get("tools"))) is not None:
        texts += strings_in(tools)
    return texts


def sequences(table: str, record: dict) -> list[list[str]]:
    """What the model reads of a record, as the sequences it is trained on (a pair is two:
    prompt + chosen, prompt + rejected), each as its texts: contents, tool calls and tool
    schemas as the JSON a chat template renders."""
    if table == "text":
        return [[record["text"]]]
    texts = lambda ms: [t for m in ms for t in (m["content"], m["tool_calls"] or "")]  # noqa: E731
    if table == "sft":
        return [[*texts(record["messages"]), record.get("tools") or ""]]
    answers = ("chosen", "rejected") if table == "preference" else ("completion",)
    return [texts(record["prompt"]) + texts(record[a]) for a in answers]


def clean_record(table: str, record: dict) -> None:
    """Unicode, control characters and whitespace, in place; empty turns are refused."""
    if table == "text":
        record["text"] = clean_text(record["text"])
        if not record["text"]:
            raise RowError("empty", "empty text after cleaning")
        return
    for m in messages_of(table, record):
        m["content"] = clean_text(m["content"])
        if not m["content"] and not m["tool_calls"] and m["role"] in ("user", "assistant"):
            raise RowError("empty", f"empty {m['role']} turn after cleaning")


def _check_prompt(prompt: list[dict]) -> None:
    roles = [m["role"] for m in prompt]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if not body or body[-1] not in ("user", "tool") or "system" in body:
        raise RowError("bad_turns", f"a prompt must be [system] user ... ending with the user (or a tool result), got {roles}")


def check_turns(table: str, record: dict) -> None:
    """Role order: what the chat template and the loss mask rely on."""
    if table == "sft":
        roles = [m["role"] for m in record["messages"]]
        body = roles[1:] if roles[:1] == ["system"] else roles
        if not body or body[0] != "user" or body[-1] != "assistant" or "system" in body:
            raise RowError("bad_turns", f"a conversation must be [system] user ... assistant, got {roles}")
        for prev, cur, msg in zip(body, body[1:], record["messages"][len(roles) - len(body) + 1 :]):
            if cur == "tool" and prev not in ("assistant", "tool"):
                raise RowError("bad_turns", "a tool result must follow the assistant's tool call")
            if cur == prev == "assistant" and not msg["tool_calls"]:
                raise RowError("bad_turns", "two assistant turns in a row")
    elif table == "preference":
        if record["chosen"] == record["rejected"]:
            raise RowError("identical_pair", "chosen and rejected are identical")
        if not record["prompt"]:
            raise RowError("missing_field", "no prompt: chosen and rejected share nothing")
        _check_prompt(record["prompt"])
        for side in ("chosen", "rejected"):
            if record[side][0]["role"] != "assistant" or "system" in {m["role"] for m in record[side]}:
                raise RowError("bad_turns", f"{side} must be the assistant's answer, got roles {[m['role'] for m in record[side]]}")
    elif table == "kto":
        _check_prompt(record["prompt"])
        if [m["role"] for m in record["completion"]][:1] != ["assistant"]:
            raise RowError("bad_turns", "the judged completion must be the assistant's")


def prompt_and_answer(table: str, record: dict) -> tuple[str, str]:
    if table == "text":
        return record["text"], ""
    if table == "sft":
        msgs = record["messages"]
        prompt, answer = msgs[:-1], msgs[-1:]
    else:
        prompt, answer = record["prompt"], record["chosen" if table == "preference" else "completion"]
    text = lambda ms: "\n".join(t for m in ms if m["role"] != "system" for t in message_texts(m) if t)  # noqa: E731
    return text(prompt), text(answer)


def item_id(table: str, record: dict) -> str:
    return hashlib.sha256(json.dumps([table, record], sort_keys=True, default=str).encode()).hexdigest()[:16]


class Lengths:
    """Row length in tokens of the model being trained: the base model's own tokenizer, or, for
    the bootstrapped default, a BPE trained exactly as bootstrap trains its tokenizer (the same
    function, pipelines/tokenizer.py, and model.vocab_size) on this run's SFT rows: bootstrap
    trains on the SFT training split, which this stage is about to write."""

    def __init__(self, params: Params):
        self.base_model = None if params.bootstrapped else params.model.base_model
        self.vocab_size = params.model.vocab_size
        self.encode = None
        self.name = self.base_model or f"the bootstrap BPE, vocab {self.vocab_size}"
        # A byte-level BPE never needs more tokens than a text has bytes: rows no longer than
        # the limit in bytes need no tokenising. Another tokenizer may (a sentencepiece word
        # marker is a token of its own), so there every row is measured.
        self.at_most_bytes = self.base_model is None

    def fit(self, texts: list[str]) -> None:
        if self.base_model:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.base_model, trust_remote_code=False)
            self.encode = lambda batch: [len(ids) for ids in tok(batch, add_special_tokens=False)["input_ids"]]
        else:
            from pipelines.tokenizer import train_bpe

            bpe = train_bpe(texts, self.vocab_size)
            self.encode = lambda batch: [len(e.ids) for e in bpe.encode_batch(batch)]

    def __call__(self, rows: list[list[str]]) -> list[int]:
        """Tokens per row, each row given as its texts."""
        flat = [t for texts in rows for t in texts if t]
        counts = iter(self.encode(flat) if flat else [])
        return [sum(next(counts) for t in texts if t) for texts in rows]


# ---------------------------------------------------------------- the stage


class Prepared:
    def __init__(self) -> None:
        self.kept: list[Kept] = []
        self.quarantine: list[dict] = []
        self.raw_by_file: Counter = Counter()
        self.raw_by_source: Counter = Counter()
        self.seen: set[tuple[str, str]] = set()
        self.decontaminated_against: dict[str, int] = {}

    def reject(self, r: RawRow | Kept, code: str, detail: str, raw: str | None = None) -> None:
        self.quarantine.append({"source": r.source, "file": r.file, "line": r.line, "reason": f"{code}: {detail}", "raw": (raw if raw is not None else getattr(r, "raw", ""))[:500]})


def ingest(sources: list[SourceParams], cfg: PrepareParams, lengths: Lengths | None = None) -> Prepared:
    """Read, normalise, clean, measure and deduplicate every row of every source. Rows are read
    and normalised first: the bootstrapped tokenizer that measures them is trained on them."""
    out = Prepared()
    near = {t: NearDuplicates(cfg.near_dup_threshold, cfg.near_dup_min_words) for t in TABLES}
    started = last = time.perf_counter()
    rows: list[tuple[SourceParams, RawRow, str, dict]] = []
    # Held-out sources first: when a row appears twice, the copy kept is the evaluation one.
    for src in sorted(sources, key=lambda s: s.split not in ("test", "validation")):
        for r in read_source(src):
            out.raw_by_file[r.file] += 1
            out.raw_by_source[src.label] += 1
            if (now := time.perf_counter()) - last > 5:
                n = sum(out.raw_by_file.values())
                log.info("prepare: %d rows read (%.0f rows/s)", n, n / (now - started))
                last = now
            if r.error:
                out.reject(r, *r.error)
                continue
            try:
                (table, record), = normalise(r.row, r.convention).items()
                clean_record(table, record)
                check_turns(table, record)
            except RowError as exc:
                out.reject(r, exc.code, str(exc).split(": ", 1)[1])
                continue
            rows.append((src, r, table, record))
    seqs = [sequences(table, record) for *_, table, record in rows] if lengths is not None else [[] for _ in rows]
    if lengths is not None and lengths.at_most_bytes:  # only rows over the limit in bytes can be over it in tokens
        seqs = [row if max(sum(len(t.encode()) for t in seq) for seq in row) > cfg.max_tokens else [] for row in seqs]
    if any(seqs):
        sft = [m["content"] for *_, table, record in rows if table == "sft" for m in record["messages"]]
        lengths.fit(sft or [t for *_, table, record in rows for seq in sequences(table, record) for t in seq])
    counts = iter(lengths([seq for row in seqs for seq in row]) if any(seqs) else [])
    tokens = [max((next(counts) for _ in row), default=0) for row in seqs]  # the longest sequence a row makes
    for (src, r, table, record), n_tokens in zip(rows, tokens):
        try:
            texts = record_texts(table, record)
            contents = [record["text"]] if table == "text" else [m["content"] for m in messages_of(table, record)]
            if max(len(t) for t in contents) > cfg.max_chars:
                raise RowError("too_long", f"a message of {max(len(t) for t in contents):,} characters > max_chars {cfg.max_chars:,}")
            if n_tokens > cfg.max_tokens:
                raise RowError("too_long", f"{n_tokens:,} tokens > max_tokens {cfg.max_tokens:,} (in {lengths.name})")
            whole = "\n".join(texts)
            if repetition_ratio("\n".join(contents)) > cfg.max_repetition:
                raise RowError("repetitive", f"more than {cfg.max_repetition:.0%} of its word 3-grams repeat")
            if cfg.pii != "off" and (found := [f for t in texts for f in find_pii(t)]):
                if cfg.pii == "quarantine":
                    raise RowError("pii", "holds " + ", ".join(sorted({k for k, _ in found})))
                redact_record(table, record)
                whole = "\n".join(record_texts(table, record))
            key = (table, normal_form(json.dumps(record, sort_keys=True)) if table != "sft" else normal_form(whole) + str(record.get("tools")))
            if key in out.seen:
                raise RowError("duplicate", "an earlier row has the same text (case, punctuation and spacing aside)")
            out.seen.add(key)
            # A system prompt shared by many rows says nothing about their likeness.
            body = record["text"] if table == "text" else "\n".join(m["content"] for m in messages_of(table, record) if m["role"] != "system")
            if near[table].seen(body):
                raise RowError("near_duplicate", f"Jaccard similarity >= {cfg.near_dup_threshold} with an earlier row")
        except RowError as exc:
            out.reject(r, exc.code, str(exc).split(": ", 1)[1])
            continue
        prompt, answer = prompt_and_answer(table, record)
        kept = Kept(table, record, src.label, r.file, r.line, prompt, answer)
        kept.split = assign_split(kept, src, cfg)
        kept.id = item_id(table, record)
        out.kept.append(kept)
    return out


def redact_record(table: str, record: dict) -> None:
    """Every text field redacted in place: contents, tool-call names and arguments, tool schemas."""
    if table == "text":
        record["text"] = redact(record["text"])
        return
    for m in messages_of(table, record):
        m["content"] = redact(m["content"])
        if m["tool_calls"]:
            m["tool_calls"] = map_strings(m["tool_calls"], redact)
    if table == "sft" and record.get("tools"):
        record["tools"] = map_strings(record["tools"], redact)


def assign_split(k: Kept, src: SourceParams, cfg: PrepareParams) -> str:
    split = src.split if src.split != "auto" else split_of(k.prompt, cfg)
    if split not in TABLES[k.table]:  # preference and kto have no validation split
        split = "test"
    return split


class _TaskYaml(yaml.SafeLoader):
    """lm-eval task YAML read for its data files only: `!function` tags are not run."""


_TaskYaml.add_multi_constructor("!", lambda loader, suffix, node: None)


def _string_leaves(obj: object) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _string_leaves(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _string_leaves(v)]
    return []


def eval_files(params: Params) -> dict[str, Path]:
    """The local data files of every task of the evaluation suite (`evaluate.tasks`): a task's
    own data_files, else those of the project's task YAML (relative to pipelines/eval_tasks/).
    The prepared test split (`@test_split`) is not among them: it is indexed as a split."""
    files: dict[str, Path] = {}
    for task in params.evaluate.tasks:
        if task.data_files:
            files.update({f"{task.name}:{split}": Path(path) for split, path in task.data_files.items()})
            continue
        own = TASKS_DIR / f"{task.name}.yaml"
        if not own.exists():
            log.warning("evaluate.tasks[%s]: a hub dataset with no local data_files; training data is not checked against it (give data_files to check)", task.name)
            continue
        conf = yaml.load(own.read_text(), Loader=_TaskYaml) or {}
        for split, path in ((conf.get("dataset_kwargs") or {}).get("data_files") or {}).items():
            if path != "@test_split":
                files[f"{task.name}:{split}"] = Path(path) if Path(path).is_absolute() else TASKS_DIR / path
    return files


def eval_items(params: Params) -> list[tuple[str, list[str]]]:
    """(where, texts) for every item of the evaluation suite's local files: each item's string
    fields (a question, its choices, a passage; `id` and `kind` aside)."""
    items = []
    for name, path in eval_files(params).items():
        if not path.exists():
            raise SystemExit(f"evaluate.tasks: {name} names {path}, which does not exist; prepare checks training data against it")
        if path.suffix not in DATA_SUFFIXES:
            log.warning("%s: %s is not a file type prepare reads (%s); not checked for contamination", name, path, ", ".join(DATA_SUFFIXES))
            continue
        for r in read_file(name, path, DEFAULT):
            if r.error is None and isinstance(r.row, dict):
                texts = _string_leaves({k: v for k, v in r.row.items() if k not in ("id", "kind")})
                items.append((f"{name} item {r.row.get('id', r.line)}", texts))
    return items


def decontaminate(data: Prepared, cfg: PrepareParams, suite: list[tuple[str, list[str]]] = ()) -> None:
    """Every training row (every table) against every evaluation item: the held-out rows (test
    and validation, all tables) and the suite's local files. Boilerplate shared by many
    training rows or many evaluation items is not evidence (clean.Contamination)."""
    index = Contamination(cfg.decontamination_ngram, cfg.decontamination_common)
    against: Counter = Counter()
    for k in data.kept:
        if k.split in EVAL_SPLITS:
            where = f"a {k.split} item ({k.source} {Path(k.file).name}:{k.line})"
            index.add(k.prompt, k.answer, where)
            against[f"{k.table}_{k.split}"] += 1
            # The evaluation scores a conversation's last user turn on its own (evaluate.eval_items):
            # that turn alone, leaked into training, is contamination too.
            users = [m["content"] for m in messages_of(k.table, k.record) if m.get("role") == "user"]
            if len(users) > 1:
                index.add(users[-1], k.answer, where)
    for where, texts in suite:
        for text in texts:  # each field may be asked on its own (a question), and together they are the item
            if len(text.split()) >= 3:
                index.add_prompt(text, where)
        index.add("", "\n".join(texts), where)
        against[where.split(" item ")[0]] += 1
    rows = {}  # each training row folded once: prompt and turn keys, words
    for k in data.kept:
        if k.split not in EVAL_SPLITS:
            turns = [m["content"] for m in messages_of(k.table, k.record) if m.get("role") == "user"]
            rows[id(k)] = keys = index.keys(k.prompt, turns, f"{k.prompt} {k.answer}")
            index.count(k.prompt, turns, "", keys)
    kept = []
    for k in data.kept:
        if k.split in EVAL_SPLITS:
            why = None
        else:
            key, turn_keys, words = rows[id(k)]
            why = index.hit(k.prompt, k.answer, index.spans(words, index.n), key) or index.hit_turns([], turn_keys)
        if why:
            data.reject(k, "contaminated", why, raw=json.dumps(k.record, ensure_ascii=False))
        else:
            kept.append(k)
    data.kept = kept
    data.decontaminated_against = dict(against)


def mix(data: Prepared, sources: list[SourceParams], cfg: PrepareParams) -> Counter:
    """Apply each source's mixing weight to its training rows: a deterministic fraction by hash
    of the row id, whole repeats for weights above 1. Returns rows added (+) or left out (-)."""
    weights = {s.label: s.weight for s in sources}
    out, change = [], Counter()
    for k in data.kept:
        w = weights.get(k.source, 1.0)
        if k.split != "train" or w == 1.0:
            out.append(k)
            continue
        u = int(hashlib.sha256(f"{cfg.seed}:{k.id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        copies = int(w) + (1 if u < w - int(w) else 0)
        out += [k] * copies
        change[k.source] += copies - 1
    data.kept = out
    return change


def frames(data: Prepared) -> dict[str, pd.DataFrame]:
    rows: dict[str, list] = defaultdict(list)
    for k in data.kept:
        rows[k.table].append({**k.record, "source": k.source, "id": k.id, "split": k.split})
    return {t: pd.DataFrame(rows[t], columns=[*COLUMNS[t], "source", "id", "split"]) for t in TABLES}


def reconcile(data: Prepared) -> dict:
    """Raw rows in = rows kept (before mixing) + rows quarantined, per file; raise otherwise."""
    kept_by_file = Counter(k.file for k in {id(k): k for k in data.kept}.values())
    quarantined_by_file = Counter(q["file"] for q in data.quarantine)
    per_file = {}
    for f, raw in sorted(data.raw_by_file.items()):
        kept, dropped = kept_by_file[f], quarantined_by_file[f]
        per_file[f] = {"raw": raw, "kept": kept, "quarantined": dropped}
        if kept + dropped != raw:
            raise RuntimeError(f"rows do not reconcile for {f}: {raw} raw != {kept} kept + {dropped} quarantined")
    return per_file


def run(params: Params) -> None:
    cfg = params.prepare
    try:
        data = ingest(list(params.data.sources), cfg, Lengths(params))
    except SourceError as exc:
        raise SystemExit(str(exc)) from None
    decontaminate(data, cfg, eval_items(params))
    unique = {id(k) for k in data.kept}
    per_file = reconcile(data)
    mixed = mix(data, list(params.data.sources), cfg)
    tables = frames(data)
    raw_rows = sum(data.raw_by_file.values())
    reasons = Counter(q["reason"].split(":")[0] for q in data.quarantine)
    report = {
        "raw_rows": raw_rows,
        "raw_rows_by_file": dict(data.raw_by_file),
        "rows_by_file": per_file,
        "kept": len(unique),
        "quarantined": len(data.quarantine),
        "quarantined_by_reason": dict(reasons),
        "quarantined_by_file_and_reason": {f: dict(Counter(q["reason"].split(":")[0] for q in data.quarantine if q["file"] == f)) for f in data.raw_by_file},
        "mixing_added_rows": dict(mixed),
        "decontaminated_against": data.decontaminated_against,
        "rows": {t: {s: int((df["split"] == s).sum()) for s in TABLES[t]} for t, df in tables.items()},
        "reconciled": True,
    }
    PREPARED.mkdir(parents=True, exist_ok=True)
    with open(PREPARED / "quarantine.jsonl", "w") as fh:
        fh.writelines(json.dumps(q, ensure_ascii=False) + "\n" for q in data.quarantine)
    log.info("read %d raw rows; kept %d; quarantined %d (%s)", raw_rows, len(unique), len(data.quarantine), dict(reasons))
    # The data gate: nothing is written for training unless every expectation holds.
    try:
        report["expectations_checked"] = validate(tables, required_tables(params.recipe), cfg, len(data.quarantine), raw_rows)
    except DataValidationError as exc:
        exc.write_report(REPORTS / "data_validation.md")
        write_json(METRICS / "prepare.json", {**report, "validation_passed": False})
        for t in TABLES:  # no stale tables from an earlier run may pass for this one
            for s in TABLES[t]:
                (PREPARED / f"{t}_{s}.parquet").unlink(missing_ok=True)
        raise SystemExit(str(exc)) from None
    report["validation_passed"] = True
    for t, df in tables.items():
        for s in TABLES[t]:
            df[df["split"] == s].drop(columns="split").to_parquet(PREPARED / f"{t}_{s}.parquet", index=False)
    write_json(METRICS / "prepare.json", report)
    write_data_card(params, tables, report)
    log.info("tables: %s", report["rows"])


def write_data_card(params: Params, tables: dict[str, pd.DataFrame], report: dict) -> None:
    """Counts, lengths, sources and hashes in one file, and a length histogram to look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.sources import files_of

    lengths = {}
    for t, df in tables.items():
        if df.empty:
            continue
        if t == "text":
            lengths[t] = [len(x) for x in df["text"]]
        else:
            lengths[t] = [sum(len(m["content"]) for cell in cells for m in cell) for cells in zip(*(df[f] for f in MESSAGE_FIELDS[t]))]
    sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest() if Path(p).is_file() else None  # noqa: E731
    card = {
        "rows": report["rows"],
        "quarantined_by_reason": report["quarantined_by_reason"],
        "rows_by_source": {s: int(sum((df["source"] == s).sum() for df in tables.values())) for s in {src.label for src in params.data.sources}},
        "sources": [
            {"name": s.label, "path": s.path, "hub": s.hub, "format": s.format, "split": s.split, "weight": s.weight,
             "files": {str(f): sha(f) for f in (files_of(s) if s.path else [])}}
            for s in params.data.sources
        ],
        "outputs": {p.name: sha(p) for p in sorted(PREPARED.glob("*.parquet"))},
        "length_chars": {t: {"min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v), "histogram": _histogram(v)} for t, v in lengths.items()},
    }
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    write_json(REPORT_DIR / "data_card.json", card)
    fig, axes = plt.subplots(1, max(len(lengths), 1), figsize=(4 * max(len(lengths), 1), 3), squeeze=False)
    for ax, (t, v) in zip(axes[0], lengths.items()):
        ax.hist(v, bins=30, color="#4C72B0")
        ax.set_title(f"{t}: {len(v)} rows")
        ax.set_xlabel("characters per row")
    fig.suptitle("prepared data: length per row")
    fig.tight_layout()
    fig.savefig(REPORT_DIR / "data_card.png", dpi=100)
    plt.close(fig)


def _histogram(values: list[int], bins: int = 20) -> dict:
    lo, hi = min(values), max(values)
    width = max((hi - lo) / bins, 1)
    counts = Counter(min(int((v - lo) / width), bins - 1) for v in values)
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": [counts[i] for i in range(bins)]}


def main() -> None:
    stage_main("prepare", run)


if __name__ == "__main__":
    main()
