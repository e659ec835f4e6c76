"""The pictures of docs/tiny-model.md, drawn with Pillow only (matplotlib is not a dependency):

- `tiny-grid.png`: generated pictures beside their prompts (training and held-out pairs, the three
  forms), at the model's default sampler and steps, seeds 0-2 at the default guidance (7.5) and at
  guidance 1 (no guidance), enlarged 3x;
- `tiny-loss.png`: the loss curves of a training run (the VAE's L1 reconstruction and PSNR, the
  U-Net's diffusion MSE), read from the run's `log.jsonl` files.

    .venv/bin/python benchmarks/tiny_figures.py --run /work/tiny_run/out --out docs/images
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

import minisd

PROMPTS = [
    "a red circle on a blue background",
    "a large yellow star on a black background",
    "a small white square in the top left on a green background",
    "a green square on a purple background",
    "a small orange circle in the bottom right on a white background",
    "a large black triangle on a yellow background",
    # held-out pairs: never seen in training
    "a purple star on a white background",
    "a large blue circle on a orange background",
    "a small yellow triangle in the top right on a blue background",
]
HELD_OUT_FROM = 6  # PROMPTS[6:] are held-out pairs
SEEDS = 3
GUIDANCES = (None, 1.0)  # the family's default (7.5), then no guidance: guidance trades diversity for fidelity
HEADER = 20
SCALE = 3  # enlargement of the 32x32 pictures (nearest neighbour: the pixels as generated)
TEXT_W = 400


def grid(model: str | Path, out: Path) -> Path:
    sd = minisd.load(model)
    side = 32 * SCALE
    columns = [(g, k) for g in GUIDANCES for k in range(SEEDS)]
    width = TEXT_W + len(columns) * (side + 4) + 12
    image = PIL.Image.new("RGB", (width, HEADER + len(PROMPTS) * (side + 4) + 4), "white")
    draw = PIL.ImageDraw.Draw(image)
    for i, g in enumerate(GUIDANCES):
        x = TEXT_W + i * (SEEDS * (side + 4) + 12)
        title = f"guidance {sd.family.default_guidance:g} (default)" if g is None else f"guidance {g:g}"
        draw.text((x, 4), f"{title}, seeds 0-{SEEDS - 1}", fill="black")
    for row, prompt in enumerate(PROMPTS):
        y = HEADER + 4 + row * (side + 4)
        label = prompt + ("\n(held-out pair)" if row >= HELD_OUT_FROM else "")
        draw.multiline_text((6, y + side // 2 - 10), label, fill="black")
        for c, (g, k) in enumerate(columns):
            pic = sd.generate(prompt, seed=k, width=32, height=32, guidance_scale=g)[0]
            x = TEXT_W + c * (side + 4) + (12 if c >= SEEDS else 0)
            image.paste(pic.resize((side, side), PIL.Image.NEAREST), (x, y))
    path = out / "tiny-grid.png"
    image.save(path)
    return path


def _read(log: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in map(json.loads, log.read_text().splitlines()) if key in r]


def _smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    """A centred moving average (a trailing one lags the fast start of a loss curve)."""
    out = []
    for i in range(len(points)):
        chunk = points[max(0, i - window // 2) : i + window // 2 + 1]
        out.append((points[i][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def _panel(draw: PIL.ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: list[tuple[int, float]],
           title: str, color: str, log: bool) -> None:  # fmt: skip
    """One line plot in `box` (left, top, right, bottom): axes, min/max labels, the raw curve in grey
    and its moving average in colour; `log`: a logarithmic value axis."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left + 6, top - 16), title + (" (log scale)" if log else ""), fill="black")
    steps = [s for s, _ in series]
    values = [v for _, v in series]
    lo, hi = min(values), max(values)
    f = math.log if log else (lambda v: v)
    span = (f(hi) - f(lo)) or 1.0

    def xy(s: int, v: float) -> tuple[float, float]:
        return (left + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (right - left),
                bottom - (f(v) - f(lo)) / span * (bottom - top))  # fmt: skip

    draw.line([xy(s, v) for s, v in series], fill=(200, 200, 200))
    draw.line([xy(s, v) for s, v in _smooth(series, max(len(series) // 50, 1))], fill=color, width=2)
    draw.text((left - 56, top - 5), f"{hi:.4g}", fill="black")
    draw.text((left - 56, bottom - 8), f"{lo:.4g}", fill="black")
    draw.text((left, bottom + 4), f"step {steps[0]}", fill="black")
    draw.text((right - 70, bottom + 4), f"step {steps[-1]}", fill="black")


def loss_curves(run: Path, out: Path) -> Path:
    panels = [
        (_read(run / "vae" / "log.jsonl", "rec"), "VAE: L1 reconstruction error (mean per pixel, [-1, 1])", "blue",
         True),
        (_read(run / "vae" / "log.jsonl", "psnr"), "VAE: PSNR of the reconstructions (dB)", "green", False),
        (_read(run / "unet" / "log.jsonl", "mse"), "U-Net + text: diffusion MSE (epsilon target)", "red", True),
    ]
    w, h = 720, 220
    image = PIL.Image.new("RGB", (w, h * len(panels)), "white")
    draw = PIL.ImageDraw.Draw(image)
    for i, (series, title, color, log) in enumerate(panels):
        _panel(draw, (70, i * h + 30, w - 20, (i + 1) * h - 30), series, title, color, log)
    path = out / "tiny-loss.png"
    image.save(path)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(minisd.TINY))
    p.add_argument("--run", help="a tiny_model work folder (for the loss curves)")
    p.add_argument("--out", default="docs/images")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(grid(args.model, out))
    if args.run:
        print(loss_curves(Path(args.run), out))


if __name__ == "__main__":
    main()
