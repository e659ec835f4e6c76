"""The parity report: `python docs/parity_report.py` rewrites docs/parity-report.md (about two minutes, one core).

For every family, `minisd.parity.check` (the `minisd parity` tool, docs/parity.md) runs the tiny
official-layout checkpoint of tests/tiny.py against diffusers (U-Net, VAE, schedulers) and transformers
(the text encoders, the OpenCLIP ones converted by diffusers' own converter), in fp32, fp16 and bf16 on the
CPU. The OpenCLIP towers are also compared with open_clip itself, read as SD2 and SDXL read them (as
tests/test_clip.py does). Each row gives max |ours - theirs|, that over max |theirs|, and the tolerance the
tests hold it to.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import tempfile
import time
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.tiny: the tiny checkpoints and their references

from minisd import parity  # noqa: E402
from minisd.clip import OPENCLIP_VIT_BIGG14, OPENCLIP_VIT_H14  # noqa: E402
from minisd.families import FAMILIES, family_spec  # noqa: E402
from minisd.layouts import open_clip_table  # noqa: E402
from minisd.samplers import SAMPLERS, sampler_parts  # noqa: E402
from tests.test_clip import REL as OPEN_CLIP_REL  # noqa: E402
from tests.test_clip import build_ours, make_ids, tiny_open_clip  # noqa: E402
from tests.tiny import TINY_G, official_checkpoint, tiny_config  # noqa: E402

FAMILY_NAMES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-refiner")  # as test_parity_tool
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLER_RUNS = ("euler", "dpmpp_2m_karras")  # as tests/test_parity_tool.py


def text_name(spec) -> str:
    """The text encoder a family's spec stands for, from its full-size preset."""
    if spec.layout == "hf":
        return "CLIP-L"
    return {OPENCLIP_VIT_H14: "OpenCLIP-H", OPENCLIP_VIT_BIGG14: "OpenCLIP-bigG"}[spec.config]


def reference_of(family: str, row: str) -> str:
    """What a parity row compares against (parity_reference.py)."""
    part = row.split(".")
    if part[0].startswith("text"):
        spec = family_spec(family).text[int(part[0][4:])]
        how = "" if spec.layout == "hf" else ", converted by diffusers' `convert_open_clip_checkpoint`"
        return f"transformers CLIPTextModel ({text_name(spec)}{how})"
    if part[0] == "unet":
        return "diffusers UNet2DConditionModel"
    if part[0] == "vae":
        return "diffusers AutoencoderKL"
    return f"diffusers {SAMPLERS[sampler_parts(part[1])[0]].diffusers.split('(')[0].strip()} + U-Net"


def tool_rows(family: str, folder: Path) -> dict[str, dict[str, parity.Row]]:
    """{dtype name: {row name: Row}} of `minisd parity` on the tiny checkpoint of `family`."""
    path = folder / f"{family}.safetensors"
    torch.manual_seed(0)  # tests/tiny.py builds the VAE with torch's default init, from the global generator
    tensors = official_checkpoint(family).tensors
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    out = {}
    for name, dtype in DTYPES.items():
        settings = parity.Settings(dtype=dtype, samplers=SAMPLER_RUNS)
        report = parity.check(path, settings=settings, config=tiny_config(family), family=family, localise=False)
        out[name] = {r.name: r for r in report.rows}
    return out


@torch.no_grad()
def open_clip_rows(dtype: torch.dtype, tolerance_fp32: float) -> list[tuple[str, str, parity.Row]]:
    """minisd's TextTransformer against open_clip's own text tower (tests/test_clip.py), as each family reads it."""
    rows = []
    for family, index, seed in (("sd2", 0, 4), ("sdxl", 1, 5)):
        spec = FAMILIES[family].text[index]
        ref = tiny_open_clip("gelu", seed=seed)
        ours = build_ours(TINY_G, open_clip_table(TINY_G).to_ours(ref.state_dict(), ignored={}))
        ref, ours = ref.to(dtype), ours.to(dtype)
        use = spec.use(TINY_G.layers)
        seen: list[torch.Tensor] = []  # open_clip's hidden states, read by hooks around its blocks
        blocks = ref.transformer.resblocks
        hooks = [blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))]
        hooks += [b.register_forward_hook(lambda m, args, out: seen.append(out)) for b in blocks]
        ids = make_ids(torch.Generator().manual_seed(5))
        pooled_ref = ref.encode_text(ids, normalize=False)
        for h in hooks:
            h.remove()
        got = ours(ids)
        context_ref = ref.ln_final(seen[use.layer]) if use.final_ln else seen[use.layer]
        context = ours.ln_final(got.hidden_states[use.layer]) if use.final_ln else got.hidden_states[use.layer]
        per_block = parity.layer_count(ours.transformer.resblocks[0])
        budgets = {"context": 1 + per_block * use.layer + use.final_ln, "pooled": parity.layer_count(ours)}
        reading = f"hidden_states[{use.layer}]" + (" + ln_final" if use.final_ln else "")
        for what, a, b in (("context", context, context_ref), ("pooled", got.pooled, pooled_ref)):
            a, b = a.double(), b.double()
            err = (a - b).abs().max().item()
            scaled = parity.tolerance(dtype, budgets[what], parity.fan_in(ours))
            tol = tolerance_fp32 if dtype == torch.float32 else scaled
            label = f"{text_name(spec)} {what}" + (f" ({reading}, as {family})" if what == "context" else "")
            rows.append((label, "open_clip text tower", parity.Row(what, err, err / b.abs().max().item(), tol)))
    return rows


def cell(row: parity.Row | None) -> str:
    if row is None:
        return "| - | - | -"
    mark = "" if row.passed else " **FAIL**"
    return f"| {row.max_abs:.1e} | {row.max_rel:.1e} | {row.tolerance:.1e}{mark}"


def header() -> list[str]:
    cols = " | ".join(f"{d} max abs | {d} max rel | {d} tolerance" for d in DTYPES)
    return [f"| output | reference | {cols} |", "|---|---|" + "---:|" * 3 * len(DTYPES)]


def versions() -> str:
    names = ("torch", "diffusers", "transformers", "open_clip_torch")
    return ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)


def report(folder: Path) -> tuple[str, bool]:
    lines = [
        "# Parity report",
        "",
        "Generated by `python docs/parity_report.py` (do not edit by hand). Every number is measured: minisd",
        "against the reference implementations on the tiny random checkpoints of `tests/tiny.py`, one per family,",
        f"on the CPU ({platform.machine()}), with {versions()}.",
        "",
        "- **Rows per family** are `minisd parity` (`minisd.parity.check`, [parity.md](parity.md)): the text encoders",
        "  against transformers, the U-Net at t = 999 / 500 / 20 (raw and with guidance 7.5), the VAE's encode and",
        f"  decode, and 4-step guided sampling runs ({', '.join(SAMPLER_RUNS)}) against diffusers' schedulers.",
        "- **max abs** is max |ours - theirs|; **max rel** is that over max |theirs| (the whole output's scale, so",
        "  elements near zero do not inflate a rounding). 0 means bit-identical: both sides ran the same kernels in",
        "  the same order.",
        "- **tolerance** is the one `minisd parity` applies, `parity.tolerance(dtype, depth, fan_in, steps)`: a random",
        "  walk of one rounding of the dtype per layer (plus fp32 accumulation) on both sides, times a growth constant",
        "  4, plus the fp32 DDPM table's rounding per sampler step (derived in [parity.md](parity.md)).",
        "  tests/test_parity_tool.py asserts it for every family in fp32 and for SDXL in fp16; the other fp16 and the",
        "  bf16 columns are measured here only.",
        "- **fp16 and bf16 on the CPU.** torch runs fp16 and bf16 matmuls, convolutions and SDPA on the CPU; both",
        "  sides run every component in the dtype (the VAE too), with the sampler's arithmetic in fp32.",
        "",
    ]
    passed = True
    for family in FAMILY_NAMES:
        start = time.time()
        rows = tool_rows(family, folder)
        lines += [f"## {family}", "", *header()]
        for name in rows["fp32"]:
            cells = " ".join(cell(rows[d].get(name)) for d in DTYPES)
            lines.append(f"| `{name}` | {reference_of(family, name)} {cells} |")
            passed &= all(rows[d][name].passed for d in DTYPES if name in rows[d])
        lines.append("")
        print(f"{family}: {time.time() - start:.0f} s", file=sys.stderr)
    lines += [
        "## OpenCLIP text towers against open_clip",
        "",
        "minisd's `TextTransformer` with the open_clip weights mapped by `layouts.open_clip_table`, against",
        "`open_clip.CLIP`'s own text tower (tiny: width 32, 3 blocks, as tests/test_clip.py builds it); the context",
        "is read as each family reads it (`Family.text[i].use`), the pooled vector is `encode_text(normalize=False)`.",
        f"The fp32 tolerance is tests/test_clip.py's ({OPEN_CLIP_REL:g}); fp16 and bf16 have no test: the column gives",
        "`parity.tolerance` for the same depth, for scale.",
        "",
        *header(),
    ]
    per_dtype = {d: open_clip_rows(dtype, OPEN_CLIP_REL) for d, dtype in DTYPES.items()}
    for k, (label, ref, _) in enumerate(per_dtype["fp32"]):
        cells = " ".join(cell(per_dtype[d][k][2]) for d in DTYPES)
        lines.append(f"| {label} | {ref} {cells} |")
        passed &= all(per_dtype[d][k][2].passed for d in DTYPES)
    lines += ["", f"All rows within tolerance: **{'yes' if passed else 'NO'}**.", ""]
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "parity-report.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors (tests/conftest.py)
    torch.set_flush_denormal(True)  # as the tests: random tiny networks make denormals, slow on both sides
    with tempfile.TemporaryDirectory(prefix="minisd-parity-report-") as tmp:
        text, passed = report(Path(tmp))
    Path(args.out).write_text(text)
    print(f"wrote {args.out}; all within tolerance: {passed}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
