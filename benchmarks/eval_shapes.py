"""Quality of the tiny model, measured: `minisd.shapes.evaluate` over a model, its guidance, its
training snapshots, and its VAE's reconstructions. Writes a markdown report.

    .venv/bin/python benchmarks/eval_shapes.py                                   # minisd.TINY, default settings
    .venv/bin/python benchmarks/eval_shapes.py --run /work/tiny_run/out --out benchmarks/results/tiny_eval.md

With `--run` (the folder `python -m minisd.tiny_model --out` wrote) it also judges the VAE's
reconstructions (the autoencoder's ceiling) and every snapshot in `run/snapshots/` (accuracy over
training time). Everything uses fixed seeds: the same command prints the same numbers.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

import minisd
from minisd import shapes
from minisd.model import DEFAULT_STEPS

SIZE = 32  # the tiny model's training size


def _row(label: str, ev: shapes.Evaluation) -> str:
    cells = []
    for rep in (ev.train, ev.held_out):
        cells += [f"{rep.accuracy[a]:.0%}" if a in rep.accuracy else "-" for a in shapes.ATTRIBUTES]
    return f"| {label} | " + " | ".join(cells) + " |"


def _head(first: str) -> list[str]:
    names = [f"{a}" for a in shapes.ATTRIBUTES] + [f"held-out {a}" for a in shapes.ATTRIBUTES]
    return [f"| {first} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(minisd.TINY), help="model file (default: minisd.TINY)")
    p.add_argument("--run", help="a tiny_model work folder: also judge its VAE and its snapshots")
    p.add_argument("--n", type=int, default=16, help="prompts per form, for the training and the held-out pairs")
    p.add_argument("--n-snapshots", type=int, default=8, help="prompts per form for each snapshot")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the markdown report here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sd = minisd.load(args.model)
    default = sd.family.default_guidance
    lines = [f"# Shapes evaluation of `{Path(args.model).name}`", "",
             f"{args.n} prompts per form (plain, large, small) for the 26 training pairs and as many for the 6 "
             f"held-out pairs; {SIZE}x{SIZE}, the model's default sampler (euler) and steps ({DEFAULT_STEPS}); "
             "accuracy per attribute (size: over the large and small prompts; position: over the small ones; "
             "all: every attribute the prompt asks).", ""]  # fmt: skip
    lines += ["## Guidance", ""] + _head("guidance")
    for g in (1.0, default):
        ev = shapes.evaluate(sd, args.n, size=SIZE, guidance_scale=g)
        lines.append(_row(f"{g:g}" + (" (default)" if g == default else ""), ev))
        print(lines[-1], flush=True)
    if args.run:
        run = Path(args.run)
        ev, psnr = shapes.evaluate_reconstructions(sd.vae, args.n, size=SIZE)
        lines += ["", f"## VAE ceiling: reconstructions (PSNR {psnr:.1f} dB)", ""] + _head("input") + [_row("VAE", ev)]
        print(lines[-1], flush=True)
        lines += ["", f"## Over training ({args.n_snapshots} prompts per form, default guidance)", ""]
        lines += _head("U-Net step")
        for snap in sorted((run / "snapshots").glob("step-*.safetensors")):
            ev = shapes.evaluate(minisd.load(snap), args.n_snapshots, size=SIZE)
            lines.append(_row(str(int(snap.stem.split("-")[1])), ev))
            print(lines[-1], flush=True)
        timings = run / "timings.json"
        if timings.exists():
            lines += ["", "## Training time (seconds)", "", "```", timings.read_text(), "```"]
    lines += ["", f"(evaluation took {time.perf_counter() - t0:.0f} s with {args.threads} thread(s))"]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
