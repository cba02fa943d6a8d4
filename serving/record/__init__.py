"""The record of every answer: each completion the gateway gives (chat and text, streamed or
not, cache hits included), redacted with the data cleaning's PII rules and written off the
request path through a bounded buffer, to SQLite by default or PostgreSQL by URL.

- `schema.py`: the row (`Row`), its columns, `Filters`, `key_id()`;
- `store.py`: `open_store(where)` and the one interface both stores share;
- `tap.py`: one completion on the request path (its id, what the recorder needs of it);
- `rows.py`: a completion as the request path left it, and the redacted row made of it;
- `recorder.py`: the bounded buffer and its writer thread, the metrics, retention;
- `redactor.py`: the process that makes and stores the rows (redaction and inserts off the gateway's GIL);
- `export.py`: a window as OpenAI `messages` JSONL that `data.sources` reads.

`lifecycle traffic` queries and exports it; `lifecycle forget KEY` deletes a key's rows.
"""

from serving.record.recorder import Recorder
from serving.record.schema import COLUMNS, Filters, Row, key_id
from serving.record.store import PostgresStore, SQLiteStore, Store, StoreError, open_store
from serving.record.tap import ID_HEADER, Tap

__all__ = ["COLUMNS", "ID_HEADER", "Filters", "PostgresStore", "Recorder", "Row", "SQLiteStore", "Store", "StoreError", "Tap", "key_id", "open_store"]
