"""Render the key-mapping tables into Markdown (docs/key-tables/*.md).

The tables are data (`keymap.KeyTable`), generated from each component's config; this
module prints them so a reader can grep any key of any layout and see where it goes.
`python -m minisd.tables_doc docs/key-tables` rewrites the files; tests/test_docs.py
checks that the committed files are what the code generates.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .clip import CLIP_VIT_L14, OPENCLIP_VIT_BIGG14
from .diffusers_format import unet_table, vae_table
from .families import FAMILIES, UNET_PREFIX, VAE_PREFIX
from .keymap import KeyTable
from .layouts import OFFICIAL_IGNORES, hf_table, open_clip_table
from .unet import SD1_UNET, SDXL_BASE_UNET, UNetModel
from .vae import SD_VAE, AutoencoderKL


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def render(table: KeyTable, title: str, intro: str, shapes: dict[str, tuple[int, ...]] | None = None) -> str:
    lines = [f"# {title}", "", intro, "", f"{len(table.rules)} rules.", ""]
    lines += ["| minisd (official) key | shape | their key(s) | transform |", "|---|---|---|---|"]
    for r in table.rules:
        shape = "" if shapes is None else "x".join(map(str, shapes[r.ours]))
        lines.append(f"| `{r.ours}` | {shape} | {'<br>'.join(f'`{t}`' for t in r.theirs)} | {r.transform} |")
    if table.ignore:
        lines += ["", "Ignored keys:", "", "| pattern | reason |", "|---|---|"]
        lines += [f"| `{i.pattern}` | {i.reason} |" for i in table.ignore]
    return "\n".join(lines) + "\n"


def documents() -> dict[str, str]:
    """File name -> Markdown, for every table a reader needs."""
    with torch.device("meta"):
        sd1, xl, vae = UNetModel(SD1_UNET), UNetModel(SDXL_BASE_UNET), AutoencoderKL(SD_VAE)
    docs = {
        "unet-sd1-diffusers.md": render(
            unet_table(SD1_UNET), "SD1.5 U-Net: official <- diffusers",
            "Official names without `model.diffusion_model.`; diffusers' `unet/` folder.", _shapes(sd1),
        ),
        "unet-sdxl-diffusers.md": render(
            unet_table(SDXL_BASE_UNET), "SDXL base U-Net: official <- diffusers",
            "Official names without `model.diffusion_model.`; diffusers' `unet/` folder.", _shapes(xl),
        ),
        "vae-diffusers.md": render(
            vae_table(SD_VAE), "VAE: official <- diffusers",
            "Official names without `first_stage_model.`; diffusers' `vae/` folder. "
            "The official decoder's `up.N` is diffusers' `up_blocks.{3-N}`.", _shapes(vae),
        ),
        "clip-l-hf.md": render(
            hf_table(CLIP_VIT_L14), "CLIP ViT-L/14: open_clip names <- transformers",
            "SD1 files at `cond_stage_model.transformer.`, SDXL at `conditioner.embedders.0.transformer.`, "
            "diffusers at `text_encoder/`. q/k/v are fused into open_clip's `in_proj`.",
        ),
        "openclip-bigg-hf.md": render(
            hf_table(OPENCLIP_VIT_BIGG14), "OpenCLIP ViT-bigG/14: open_clip names <- transformers",
            "diffusers' `text_encoder_2/` (CLIPTextModelWithProjection); `text_projection` is transposed.",
        ),
        "openclip-bigg-open_clip.md": render(
            open_clip_table(OPENCLIP_VIT_BIGG14), "OpenCLIP ViT-bigG/14: official layout",
            "SDXL files at `conditioner.embedders.1.model.` (refiner: `embedders.0`): a prefix strip.",
        ),
    }
    prefixes = [
        "# Where each component sits", "",
        "| family | U-Net | VAE | text encoders (official prefix, layout -> diffusers folder) |",
        "|---|---|---|---|",
    ]
    for f in FAMILIES.values():
        texts = "<br>".join(f"`{t.official_prefix}` ({t.layout}) -> `{t.diffusers_folder}/`" for t in f.text)
        prefixes.append(f"| {f.name} | `{UNET_PREFIX}` | `{VAE_PREFIX}` | {texts} |")
    prefixes += ["", "Keys of official files that are not weights:", "", "| pattern | reason |", "|---|---|"]
    prefixes += [f"| `{i.pattern}` | {i.reason} |" for i in OFFICIAL_IGNORES]
    docs["README.md"] = "\n".join(prefixes) + "\n"
    return docs


def main(argv: list[str] | None = None) -> None:
    out = Path((argv or sys.argv[1:] or ["docs/key-tables"])[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in documents().items():
        (out / name).write_text(text)


if __name__ == "__main__":
    main()
