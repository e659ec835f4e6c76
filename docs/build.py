"""Rebuild every generated page of the docs, in one command:

    .venv/bin/python docs/build.py                 # everything (a few minutes on one CPU core)
    .venv/bin/python docs/build.py --fast          # only the pages tests/test_docs.py checks (about a minute)

| output | made by | checked by |
|---|---|---|
| docs/key-tables/*.md (the key-map atlas) | `python -m minisd.tables_doc docs/key-tables` | tests/test_docs.py |
| the table of docs/side-by-side.md | `python docs/side_by_side.py` | tests/test_docs.py |
| docs/reliability.md | `python -m tests.reliability_doc` | tests/test_docs.py |
| docs/parity-report.md | `python docs/parity_report.py` (slow; skipped by --fast) | |
| docs/images/*.png (the walkthrough's pictures) | `python docs/make_figures.py` (slow; skipped by --fast) | |

size-demo.png (walkthrough 3) is drawn by the committed docs/assets/tiny-sdxl-size.safetensors, which
tests/test_size_demo.py checks; `python -m minisd.tiny_sdxl` retrains it (about half an hour).

Each step runs as its own process from the repository root, as a reader would run it; a step whose
script is absent is reported and skipped.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (name, command, script that must exist, slow)
STEPS = [
    ("key tables", ["-m", "minisd.tables_doc", "docs/key-tables"], "src/minisd/tables_doc.py", False),
    ("side by side", ["docs/side_by_side.py"], "docs/side_by_side.py", False),
    ("reliability", ["-m", "tests.reliability_doc"], "tests/reliability_doc.py", False),
    ("parity report", ["docs/parity_report.py"], "docs/parity_report.py", True),
    ("figures", ["docs/make_figures.py"], "docs/make_figures.py", True),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Rebuild the generated pages and pictures of docs/.")
    p.add_argument("--fast", action="store_true", help="skip the parity report and the figures (minutes each)")
    args = p.parse_args(argv)
    failed = []
    for name, command, script, slow in STEPS:
        if slow and args.fast:
            print(f"{name}: skipped (--fast)")
            continue
        if not (ROOT / script).exists():
            print(f"{name}: skipped, {script} is absent")
            continue
        start = time.time()
        rc = subprocess.run([sys.executable, *command], cwd=ROOT).returncode
        print(f"{name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - start:.0f} s")
        if rc:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
