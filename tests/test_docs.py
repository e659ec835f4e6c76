"""The key tables rendered in docs/key-tables are the ones the code generates, and the
block table of docs/unet.md is the U-Net's block plan."""

from pathlib import Path

from minisd.tables_doc import documents
from minisd.unet import SD1_UNET, SDXL_BASE_UNET, UNetConfig, block_plan
from tests import reliability_doc

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_rendered_tables_are_current():
    for name, text in documents().items():
        stale = f"docs/key-tables/{name} is stale: run python -m minisd.tables_doc"
        assert (DOCS / "key-tables" / name).read_text() == text, stale


def _plan_rows(cfg: UNetConfig, size: int) -> tuple[list[str], list[str]]:
    """`block_plan(cfg)` written as docs/unet.md writes it, for `size` x `size` latents."""

    def st(b) -> str:
        depth = cfg.depths[b.level]
        return "" if not b.attn else " + ST" if depth == 1 else f" + ST({depth})"

    plan = block_plan(cfg)
    inputs = [f"conv_in {cfg.in_channels}->{cfg.model_channels} ({size})"]
    for b in plan.inputs:
        inputs.append(f"Down {b.ch_in} ({size >> (b.level + 1)})" if b.down else f"Res {b.ch_in}->{b.ch_out}{st(b)}")
    up = lambda b: f" + Up ({size >> (b.level - 1)})" if b.up else ""  # noqa: E731
    outputs = [f"Res {b.ch_in}->{b.ch_out}{st(b)}{up(b)}" for b in plan.outputs]
    return inputs, outputs


def test_unet_block_table_is_the_plan():
    rows: dict[str, list[list[str]]] = {"input_blocks": [], "output_blocks": []}
    current = None
    for line in (DOCS / "unet.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| n |"):
            current = "input_blocks" if "`input_blocks`" in line else "output_blocks"
        elif current and line.startswith("|") and cells[0].isdigit():
            rows[current].append(cells[1:])
        elif not line.startswith("|"):
            current = None
    for column, (cfg, size) in enumerate([(SD1_UNET, 64), (SDXL_BASE_UNET, 128)]):
        inputs, outputs = _plan_rows(cfg, size)
        assert [r[column] for r in rows["input_blocks"] if r[column]] == inputs
        assert [r[column] for r in rows["output_blocks"] if r[column]] == outputs


def test_reliability_page_is_current():
    stale = "docs/reliability.md is stale: run python -m tests.reliability_doc"
    assert (DOCS / "reliability.md").read_text() == reliability_doc.render(), stale
