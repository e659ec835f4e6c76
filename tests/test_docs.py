"""The key tables rendered in docs/key-tables are the ones the code generates."""

from pathlib import Path

from minisd.tables_doc import documents

DOCS = Path(__file__).resolve().parent.parent / "docs" / "key-tables"


def test_rendered_tables_are_current():
    for name, text in documents().items():
        assert (DOCS / name).read_text() == text, f"docs/key-tables/{name} is stale: run python -m minisd.tables_doc"
