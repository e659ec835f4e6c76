"""The generated pages of docs/ are what the code generates (the key-map atlas, the side-by-side table,
the reliability page), the block table of docs/unet.md is the U-Net's block plan, the atlas covers every
family and layout, and every relative link of the docs resolves. `python docs/build.py --fast` rebuilds
the generated pages."""

import dataclasses
import functools
import importlib.util
import re
from pathlib import Path

import pytest

from minisd.clip import TextTransformer
from minisd.families import FAMILIES
from minisd.layouts import official_tables
from minisd.tables_doc import documents as _documents
from minisd.tables_doc import pages
from minisd.unet import SD1_UNET, SDXL_BASE_UNET, UNetConfig, UNetModel, block_plan
from minisd.vae import AutoencoderKL
from tests import reliability_doc
from tests.tiny import TINY_UNETS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
documents = functools.cache(_documents)  # the atlas, rendered once for the tests that read it
DOCS = ROOT / "docs"


@functools.cache
def _script(name: str):
    """A script of docs/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rendered_tables_are_current():
    for name, text in documents().items():
        stale = f"docs/key-tables/{name} is stale: run python docs/build.py --fast"
        assert (DOCS / "key-tables" / name).read_text() == text, stale
    committed = {p.name for p in (DOCS / "key-tables").glob("*.md")}
    assert committed == set(documents()), "docs/key-tables holds pages the code no longer generates"


def test_the_atlas_covers_every_family_and_layout():
    # Each family: its U-Net and VAE against diffusers (the official layout of both is minisd's own names,
    # a prefix strip: the index page), and each text encoder in its official layout and its diffusers folder.
    atlas = pages()
    for name, family in FAMILIES.items():
        covered = [p for p in atlas if name in p.families]
        assert sum(isinstance(p.module, UNetModel) for p in covered) == 1, name
        assert sum(isinstance(p.module, AutoencoderKL) for p in covered) == 1, name
        texts = [p for p in covered if isinstance(p.module, TextTransformer)]
        loader = list(official_tables(family, set()).values())[2:]  # the loader's text tables, in family order
        for enc, table in zip(family.text, loader, strict=True):
            is_hf = enc.layout == "hf"
            official = [p for p in texts if p.module.config == enc.config and (p.table.name == "HF CLIP text") == is_hf]
            assert len(official) == 1, (name, enc.layout)
            # the page is the loader's own table (the loader's is the same rules under the file's prefix)
            assert [r.ours for r in table.rules] == [r.ours for r in official[0].table.rules], (name, enc.layout)
            folder = enc.config
            if enc.diffusers_drops_last:  # diffusers' SD2 converter keeps 23 of 24 blocks, no projection
                folder = dataclasses.replace(folder, layers=folder.layers - 1, projection_dim=None)
            assert any(p.module.config == folder and p.table.name == "HF CLIP text" for p in texts), name


def test_atlas_rows_name_the_owning_module():
    # Each row links the minisd class that holds the weight: a ResBlock's conv is the ResBlock's.
    text = documents()["unet-sd1-diffusers.md"]
    row = next(line for line in text.splitlines() if line.startswith("| `input_blocks.1.0.in_layers.2.weight`"))
    assert "[`unet.ResBlock`](../../src/minisd/unet.py) / Conv2d" in row
    key = "`input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight`"
    row = next(line for line in text.splitlines() if key in line)
    assert "[`unet.CrossAttention`](../../src/minisd/unet.py) / Linear" in row


def test_side_by_side_table_is_current():
    sbs = _script("side_by_side")
    page = (DOCS / "side-by-side.md").read_text()
    stale = "docs/side-by-side.md is stale: run python docs/build.py --fast"
    assert sbs.splice(page, sbs.render()) == page, stale


def test_side_by_side_counts_match_independent_figures():
    # The FLOPs formula against torch's FlopCounterMode running the U-Net on meta tensors, exactly (both
    # count 2 per multiply-add of the same convolutions, linears and attention products), for every tiny
    # test architecture (conv / linear projections, SDXL's y and per-level depths, 9 input channels) and
    # for full-size SD1 at 512 px.
    sbs = _script("side_by_side")
    for name, cfg in TINY_UNETS.items():
        assert sbs.unet_flops(cfg, 16, tokens=7) == sbs.counted_flops(cfg, 16, tokens=7), name
    sd1 = FAMILIES["sd1"].unet
    assert sbs.unet_flops(sd1, 64) == sbs.counted_flops(sd1, 64)
    # About 0.8 TFLOPs per SD1 call at 512 px, the figure usually quoted (~400 GMACs).
    assert 7.5e11 < sbs.unet_flops(sd1, 64) < 8.5e11
    # Parameter counts against the published ones: 860M (Rombach et al. 2022) and 2.6B (Podell et al. 2023).
    assert sbs._column(FAMILIES["sd1"])["U-Net parameters"] == "859.5M"
    assert sbs._column(FAMILIES["sdxl"])["U-Net parameters"] == "2.57B"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_relative_links_resolve():
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


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
