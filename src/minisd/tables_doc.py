"""Render the key-mapping tables into Markdown: the key-map atlas, docs/key-tables/*.md.

The tables are data (`keymap.KeyTable`), generated from each component's config; this module prints
them so a reader can grep any key of any layout and see where it goes. There is one page per distinct
(component architecture, foreign layout) pair, covering every family of `families.FAMILIES`; each row
names the minisd module that owns the weight and links to its source file. The index page
(`README.md`) says where each component of each family sits in an official file and a diffusers
folder, and which page maps it.

`python -m minisd.tables_doc docs/key-tables` rewrites the files (or `python docs/build.py`);
tests/test_docs.py checks that the committed files are what the code generates.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .clip import TextConfig, TextTransformer
from .diffusers_format import unet_table, vae_table
from .families import FAMILIES, UNET_PREFIX, VAE_PREFIX
from .keymap import KeyTable, on_meta
from .layouts import OFFICIAL_IGNORES, hf_table, open_clip_table
from .unet import UNetConfig, UNetModel
from .vae import AutoencoderKL, VAEConfig

SRC = "../../src/minisd"  # the library's sources, relative to docs/key-tables/


@dataclass(frozen=True)
class Page:
    """One page of the atlas: a table, the module it maps onto, and what it is for."""

    name: str  # file name
    title: str
    intro: str
    table: KeyTable
    module: torch.nn.Module  # built on meta: shapes and owning classes
    made_by: str  # the function that generates the table, as `file.function`
    families: tuple[str, ...]


def _owner(module: torch.nn.Module, key: str) -> str:
    """The cell naming the minisd module that holds `key`: the innermost minisd class on its path (linked to
    its file), and the torch layer inside it when that is a different class."""
    path = key.split(".")[:-1]
    leaf = module.get_submodule(".".join(path)) if path else module
    for n in range(len(path), -1, -1):
        owner = module.get_submodule(".".join(path[:n])) if n else module
        cls = type(owner)
        if cls.__module__.startswith("minisd."):
            file = cls.__module__.removeprefix("minisd.")
            cell = f"[`{file}.{cls.__name__}`]({SRC}/{file}.py)"
            return cell if leaf is owner else f"{cell} / {type(leaf).__name__}"
    raise AssertionError(f"no minisd module on the path of {key}")  # the root is always minisd's


def render(page: Page) -> str:
    """The Markdown of one atlas page."""
    shapes = {k: tuple(v.shape) for k, v in page.module.state_dict().items()}
    file, function = page.made_by.split(".")
    lines = [f"# {page.title}", "", page.intro, "",
             f"Families: {', '.join(f'`{f}`' for f in page.families)}. Table: `{page.made_by}` "
             f"([{file}.py]({SRC}/{file}.py)); {len(page.table.rules)} rules.", ""]  # fmt: skip
    lines += ["| minisd (official) key | shape | module | their key(s) | transform |", "|---|---|---|---|---|"]
    for r in page.table.rules:
        shape = "x".join(map(str, shapes[r.ours]))
        theirs = "<br>".join(f"`{t}`" for t in r.theirs)
        lines.append(f"| `{r.ours}` | {shape} | {_owner(page.module, r.ours)} | {theirs} | {r.transform} |")
    if page.table.ignore:
        lines += ["", "Ignored keys:", "", "| pattern | reason |", "|---|---|"]
        lines += [f"| `{i.pattern}` | {i.reason} |" for i in page.table.ignore]
    return "\n".join(lines) + "\n"


def _families(pred) -> tuple[str, ...]:
    return tuple(name for name, f in FAMILIES.items() if pred(f))


def _unet_page(name: str, title: str, cfg: UNetConfig, variants: str) -> Page:
    with on_meta():
        module = UNetModel(cfg)
    # Inpainting U-Nets differ only in conv_in's input channels: same keys, one page.
    same = _families(lambda f: dataclasses.replace(f.unet, in_channels=cfg.in_channels) == cfg)
    intro = (f"Official names without `{UNET_PREFIX}`; diffusers' `unet/` folder (`UNet2DConditionModel`). "
             f"{variants}")  # fmt: skip
    return Page(name, title, intro, unet_table(cfg), module, "diffusers_format.unet_table", same)


def _vae_page(cfg: VAEConfig) -> Page:
    with on_meta():
        module = AutoencoderKL(cfg)
    intro = (f"Official names without `{VAE_PREFIX}`; diffusers' `vae/` folder (`AutoencoderKL`). "
             "The official decoder's `up.N` is diffusers' `up_blocks.{3-N}`. SD1, SD2 and SDXL VAEs share every "
             "key and shape (SDXL's differs in weights and scale factor).")  # fmt: skip
    return Page("vae-diffusers.md", "VAE: official <- diffusers", intro, vae_table(cfg), module,
                "diffusers_format.vae_table", tuple(FAMILIES))  # fmt: skip


def _text_page(name: str, title: str, intro: str, cfg: TextConfig, layout: str, families: tuple[str, ...]) -> Page:
    with on_meta():
        module = TextTransformer(cfg)
    table, made_by = (hf_table(cfg), "layouts.hf_table") if layout == "hf" else (
        open_clip_table(cfg), "layouts.open_clip_table")  # fmt: skip
    return Page(name, title, intro, table, module, made_by, families)


def pages() -> list[Page]:
    """Every page of the atlas: each U-Net architecture and the VAE against diffusers, each text encoder
    in each layout it is stored in (official files and diffusers folders)."""
    sd1, sd2, xl, refiner = (FAMILIES[n] for n in ("sd1", "sd2", "sdxl", "sdxl-refiner"))
    clip_l, vit_h, bigg = sd1.text[0].config, sd2.text[0].config, xl.text[1].config
    # diffusers' converter drops SD2's last OpenCLIP block and its projection (`TextEncoderSpec.diffusers_drops_last`).
    vit_h_diffusers = dataclasses.replace(vit_h, layers=vit_h.layers - 1, projection_dim=None)
    with_clip_l = _families(lambda f: clip_l in [t.config for t in f.text])
    with_h, with_bigg = _families(lambda f: vit_h in [t.config for t in f.text]), _families(
        lambda f: bigg in [t.config for t in f.text])  # fmt: skip
    return [
        _unet_page("unet-sd1-diffusers.md", "SD1.x U-Net: official <- diffusers", sd1.unet,
                   "The inpainting model differs only in `input_blocks.0.0.weight` (9 input channels)."),
        _unet_page("unet-sd2-diffusers.md", "SD2.x U-Net: official <- diffusers", sd2.unet,
                   "512 (epsilon) and 768 (v) share it; inpainting differs only in `input_blocks.0.0.weight`. "
                   "Against SD1: linear `proj_in`/`proj_out` and a 1024-wide context."),
        _unet_page("unet-sdxl-diffusers.md", "SDXL base U-Net: official <- diffusers", xl.unet,
                   "The inpainting model differs only in `input_blocks.0.0.weight` (9 input channels). "
                   "`label_emb` is diffusers' `add_embedding` (the vector `y`)."),
        _unet_page("unet-sdxl-refiner-diffusers.md", "SDXL refiner U-Net: official <- diffusers", refiner.unet,
                   "Base width 384, four levels, `y` of 2560 (with the aesthetic score)."),
        _vae_page(sd1.vae),
        _text_page("clip-l-hf.md", "CLIP ViT-L/14: open_clip names <- transformers",
                   "Stored in the transformers layout everywhere: SD1 files at `cond_stage_model.transformer.`, "
                   "SDXL at `conditioner.embedders.0.transformer.`, diffusers at `text_encoder/`. q/k/v are "
                   "fused into open_clip's `in_proj`.", clip_l, "hf", with_clip_l),
        _text_page("openclip-h-open_clip.md", "OpenCLIP ViT-H/14: official layout",
                   "SD2 files at `cond_stage_model.model.`: a prefix strip (the image tower "
                   "`cond_stage_model.model.visual.*` is ignored).", vit_h, "open_clip", with_h),
        _text_page("openclip-h-hf.md", "OpenCLIP ViT-H/14 in diffusers: open_clip names <- transformers",
                   "diffusers' SD2 `text_encoder/` (`CLIPTextModel`): its converter keeps 23 of the 24 blocks and "
                   "drops `text_projection`, because SD2 reads the penultimate layer; minisd reads such a folder "
                   "at the same absolute layer (`TextEncoderSpec.use`).", vit_h_diffusers, "hf", with_h),
        _text_page("openclip-bigg-open_clip.md", "OpenCLIP ViT-bigG/14: official layout",
                   "SDXL files at `conditioner.embedders.1.model.` (refiner: `embedders.0`): a prefix strip.",
                   bigg, "open_clip", with_bigg),
        _text_page("openclip-bigg-hf.md", "OpenCLIP ViT-bigG/14: open_clip names <- transformers",
                   "diffusers' `text_encoder_2/` (`CLIPTextModelWithProjection`); `text_projection` is transposed.",
                   bigg, "hf", with_bigg),
    ]  # fmt: skip


def _index(atlas: list[Page]) -> str:
    lines = ["# The key-map atlas", "",
             "Every foreign layout minisd reads is a declarative key table (`keymap.KeyTable`), generated from the "
             "component's config. These pages are rendered from the code by `python -m minisd.tables_doc "
             f"docs/key-tables` ([tables_doc.py]({SRC}/tables_doc.py)) and checked by tests/test_docs.py.", "",
             "| page | families | table generated by | modules |", "|---|---|---|---|"]  # fmt: skip
    for p in atlas:
        file, _ = p.made_by.split(".")
        root = type(p.module)
        mod = root.__module__.removeprefix("minisd.")
        lines.append(f"| [{p.title}]({p.name}) | {', '.join(p.families)} | [`{p.made_by}`]({SRC}/{file}.py) | "
                     f"[`{mod}.{root.__name__}`]({SRC}/{mod}.py) |")  # fmt: skip
    lines += ["", "## Where each component sits", "",
              "Official single files hold every component under a prefix, with minisd's (the official) names for "
              "the U-Net and VAE: loading is a prefix strip (`layouts.official_tables`, "
              f"[layouts.py]({SRC}/layouts.py)).", "",
              "| family | U-Net | VAE | text encoders (official prefix, layout -> diffusers folder) |",
              "|---|---|---|---|"]  # fmt: skip
    for f in FAMILIES.values():
        texts = "<br>".join(f"`{t.official_prefix}` ({t.layout}) -> `{t.diffusers_folder}/`" for t in f.text)
        lines.append(f"| {f.name} | `{UNET_PREFIX}` | `{VAE_PREFIX}` | {texts} |")
    lines += ["", "Keys of official files that are not weights:", "", "| pattern | reason |", "|---|---|"]
    lines += [f"| `{i.pattern}` | {i.reason} |" for i in OFFICIAL_IGNORES]
    return "\n".join(lines) + "\n"


def documents() -> dict[str, str]:
    """File name -> Markdown, for every page of the atlas and its index."""
    atlas = pages()
    docs = {p.name: render(p) for p in atlas}
    docs["README.md"] = _index(atlas)
    return docs


def main(argv: list[str] | None = None) -> None:
    """Write the key-table documents into the folder argv[0] (default docs/key-tables).

        minisd.tables_doc.main(["docs/key-tables"])
    """
    out = Path((argv or sys.argv[1:] or ["docs/key-tables"])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in documents().items():
        (out / name).write_text(text)


if __name__ == "__main__":
    main()
