"""The pictures of the docs, generated from the code: `python docs/make_figures.py` rewrites docs/images/.

Every picture is computed here by the library's public functions on the shipped tiny model (`minisd.TINY`,
32x32 pixels, shown at x4 with nearest-neighbour so its pixels stay visible) or, for SDXL, from the
conditioning code alone. Plots are drawn with Pillow (matplotlib is not a dependency). About a minute on
one CPU core.

    schedules.png          the sigma schedules (discrete, Karras, exponential, trailing, zero-SNR), log sigma vs step
    samplers-grid.png      every sampler on one seed, across step counts
    trajectory.png         the denoised estimate x0-hat along one run
    guidance-sweep.png     one seed at guidance scales 1, 2, 4, 7.5, 12
    attention-maps.png     one cross-attention layer's map for each token of a prompt
    size-conditioning.png  SDXL's original_size as the U-Net sees it: its sinusoidal features in y
    size-demo.png          what original_size does, drawn by a tiny SDXL model trained with it (minisd.tiny_sdxl,
                           docs/assets/tiny-sdxl-size.safetensors), and the sharpness it measures (printed)

    python docs/make_figures.py                  # every figure
    python docs/make_figures.py --only size-demo # one figure (names as above, without .png)
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import torch

import minisd
from minisd import explain as ex
from minisd import shapes, tiny_sdxl
from minisd.conditioning import sdxl_vector
from minisd.samplers import SAMPLERS, plan_sampler
from minisd.schedules import DiscreteSchedule

SIZE = 32  # the tiny model's pictures
SIDE = SIZE * ex.SCALE
SEED = 1
PROMPT = "a small yellow star in the top left on a black background"
GRID_PROMPT = "a red circle on a blue background"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


# ---------------------------------------------------------------------- small drawing helpers
def titled(image: PIL.Image.Image, title: str, size: int = 13) -> PIL.Image.Image:
    """`image` with a title line above, on white."""
    out = PIL.Image.new("RGB", (image.width, image.height + size + 8), "white")
    PIL.ImageDraw.Draw(out).text((4, 3), title, fill="black", font=ex.font(size))
    out.paste(image, (0, size + 8))
    return out


def column(parts: list[PIL.Image.Image], gap: int = 4) -> PIL.Image.Image:
    out = PIL.Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts) + gap * len(parts)), "white")
    y = 0
    for p in parts:
        out.paste(p, (0, y))
        y += p.height + gap
    return out


def label_cell(text: str, width: int, height: int) -> PIL.Image.Image:
    cell = PIL.Image.new("RGB", (width, height), "white")
    PIL.ImageDraw.Draw(cell).text((4, height // 2 - 7), text, fill="black", font=ex.font(12))
    return cell


def line_plot(series: dict[str, list[float]], *, width: int = 640, height: int = 380, ylabel: str = "",
              xlabel: str = "") -> PIL.Image.Image:  # fmt: skip
    """Lines of y against their index, y on a log10 axis, with a legend: a minimal Pillow plot."""
    left, right, top, bottom = 60, 170, 12, 40
    img = PIL.Image.new("RGB", (width, height), "white")
    d = PIL.ImageDraw.Draw(img)
    logs = [math.log10(v) for ys in series.values() for v in ys]
    lo, hi = math.floor(min(logs)), math.ceil(max(logs))
    n = max(len(ys) for ys in series.values()) - 1
    w, h = width - left - right, height - top - bottom

    def xy(i: float, v: float) -> tuple[float, float]:
        return left + w * i / n, top + h * (hi - math.log10(v)) / (hi - lo)

    d.rectangle([left, top, left + w, top + h], outline="black")
    for e in range(lo, hi + 1):  # decades
        y = xy(0, 10.0**e)[1]
        d.line([left, y, left + w, y], fill="#dddddd")
        d.text((left - 6, y), f"1e{e}" if e not in (0, 1) else str(10**e), fill="black", anchor="rm", font=ex.font())
    for i in range(0, n + 1, max(1, n // 10)):
        x = xy(i, 10.0**lo)[0]
        d.text((x, top + h + 5), str(i), fill="black", anchor="mt", font=ex.font())
    d.text((left + w / 2, height - 6), xlabel, fill="black", anchor="mb", font=ex.font(12))
    d.text((6, top + h / 2), ylabel, fill="black", anchor="lm", font=ex.font(12))
    for k, (name, ys) in enumerate(series.items()):
        color = COLORS[k % len(COLORS)]
        points = [xy(i, v) for i, v in enumerate(ys)]
        d.line(points, fill=color, width=2)
        for x, y in points:
            d.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=color)
        ly = top + 10 + 18 * k
        d.line([left + w + 10, ly, left + w + 30, ly], fill=color, width=3)
        d.text((left + w + 35, ly), name, fill="black", anchor="lm", font=ex.font(12))
    return img


def diverging(values: torch.Tensor) -> PIL.Image.Image:
    """A 2-D map of values in [-1, 1] as blue (-1) -> white (0) -> red (+1)."""
    v = values.clamp(-1, 1).cpu()
    pos, neg = v.clamp(min=0), (-v).clamp(min=0)
    rgb = torch.stack([1 - neg, 1 - pos - neg, 1 - pos]).clamp(0, 1)
    return PIL.Image.fromarray((rgb * 255).round().byte().permute(1, 2, 0).numpy())


def pictures(sd: minisd.StableDiffusion, **kw) -> list[PIL.Image.Image]:
    images = sd.generate(GRID_PROMPT if "prompt" not in kw else kw.pop("prompt"), width=SIZE, height=SIZE,
                         output="tensor", **kw)  # fmt: skip
    return [ex.to_pil(im) for im in images]


# ---------------------------------------------------------------------- the figures
def schedules() -> PIL.Image.Image:
    """The sigmas of a 20-step run under each schedule (the final 0 left off: log axis)."""
    steps, sl, zsnr = 20, DiscreteSchedule.scaled_linear(), DiscreteSchedule.scaled_linear(zero_terminal_snr=True)
    series = {
        "discrete (leading)": plan_sampler("euler", sl, steps).sigmas,
        "Karras (rho 7)": plan_sampler("euler_karras", sl, steps).sigmas,
        "exponential": plan_sampler("euler_exponential", sl, steps).sigmas,
        "trailing": plan_sampler("euler", sl, steps, spacing="trailing").sigmas,
        "zero-SNR, trailing": plan_sampler("euler", zsnr, steps, spacing="trailing").sigmas,
    }
    plot = line_plot({k: v[:-1].tolist() for k, v in series.items()}, xlabel="step", ylabel="sigma")
    return titled(plot, "sigma per step, 20 steps (samplers.plan_sampler; the last sigma, 0, is off the log axis)")


def samplers_grid(sd: minisd.StableDiffusion, steps=(5, 10, 20, 50)) -> PIL.Image.Image:
    """Rows: every base sampler; columns: step counts; one seed throughout."""
    side = SIDE // 2
    head = ex.row([label_cell("", 110, 20)] + [label_cell(f"{n} steps", side, 20) for n in steps])
    rows = [head]
    for name in SAMPLERS:
        cells = [ex.tile(pictures(sd, sampler=name, steps=n, seed=SEED)[0], side) for n in steps]
        rows.append(ex.row([label_cell(name, 110, side)] + cells))
    return titled(column(rows), f'"{GRID_PROMPT}", seed {SEED}, guidance 7.5')


def trajectory(sd: minisd.StableDiffusion) -> tuple[PIL.Image.Image, PIL.Image.Image]:
    """The x0-hat trajectory of a 20-step Euler run, and the attention maps of the same run."""
    run = ex.explain(sd, ex.Request(PROMPT, steps=20, seed=SEED, size=(SIZE, SIZE)))
    traj = titled(ex.trajectory_picture(sd, run.steps), f'x0-hat per step (decoded), "{PROMPT}", euler, 20 steps')
    attn = titled(
        ex.attention_picture(sd, run),
        f"{run.attention_layer}: each token's attention, mean over steps and heads (each map to its max)",
    )
    return traj, attn


def guidance_sweep(sd: minisd.StableDiffusion, scales=(1, 2, 4, 7.5, 12)) -> PIL.Image.Image:
    prompts = (GRID_PROMPT, PROMPT)
    rows = []
    for p in prompts:
        rows.append(ex.row([ex.tile(pictures(sd, prompt=p, guidance_scale=s, steps=20, seed=SEED)[0], SIDE,
                                    f"scale {s}") for s in scales]))  # fmt: skip
    return titled(column(rows), "guidance scale sweep (euler, 20 steps, seed 1; scale 1 = no guidance)")


def size_conditioning(sizes=(64, 128, 256, 512, 768, 1024, 2048)) -> PIL.Image.Image:
    """SDXL's y for original_size = (s, s): left, the 256 sinusoidal features of the height per size;
    right, the cosine similarity of the size features between sizes. No trained SDXL model is at hand,
    so the figure shows what the U-Net receives, not what it draws from it."""
    pooled = torch.zeros(len(sizes), 1280)
    y = sdxl_vector(pooled, torch.tensor([[s, s] for s in sizes]), (0, 0), (1024, 1024))
    height = y[:, 1280 : 1280 + 256]  # original_size's height: [cos(s f_i), sin(s f_i)], 128 + 128
    strip = diverging(height).resize((512, 24 * len(sizes)), PIL.Image.NEAREST)
    labels = column([label_cell(f"{s} px", 70, 24) for s in sizes], gap=0)
    size_part = y[:, 1280 : 1280 + 512]  # the height and width features
    unit = size_part / size_part.norm(dim=1, keepdim=True)
    sim = diverging(unit @ unit.T).resize((24 * len(sizes), 24 * len(sizes)), PIL.Image.NEAREST)
    left = titled(ex.row([labels, strip], gap=0), "the 256 features of original_size's height (cos | sin)", 12)
    right = titled(sim, "cosine similarity", 12)
    note = ("y = [pooled text, original_size, crop, target_size]; each number -> 256 sinusoidal features "
            "(conditioning.sdxl_vector).")  # fmt: skip
    note2 = "Near sizes get similar features. Trained, SDXL draws blurrier, upscaled-looking pictures for a small"
    note3 = "original_size (Podell et al. 2023, sec. 2.2): size-demo.png shows a tiny SDXL model doing it."
    body = ex.row([left, right], gap=24)
    title = titled(body, "SDXL size conditioning: what the U-Net receives (blue -1, white 0, red +1)")
    return column([title, *(label_cell(n, body.width, 16) for n in (note, note2, note3))], gap=0)


# the size demo's rows: training pairs, each caption form
SIZE_PROMPTS = (
    GRID_PROMPT,
    PROMPT,
    "a large white square on a green background",
    "a purple circle on a yellow background",
)


def size_demo() -> PIL.Image.Image:
    """The tiny SDXL model of `minisd.tiny_sdxl` (trained on shapes upscaled from 8-32 px, each with its
    original_size): one row per prompt, one column per original_size, one seed. Prints the measured
    sharpness per original_size (`tiny_sdxl.measure_sharpness`), the numbers walkthrough 3 quotes."""
    sd = minisd.load(tiny_sdxl.ASSET)
    sizes = tiny_sdxl.SIZES
    head = ex.row([label_cell(f"original_size {s}", SIDE, 20) for s in sizes])
    # For reference, what the model was shown: a scene rendered at s px and upscaled (`tiny_sdxl.degrade`).
    scene = shapes.make_scene(random.Random(0), "red", "circle", "plain", bg="blue")
    data = [ex.tile(ex.to_pil(tiny_sdxl.degrade(shapes.to_tensor(shapes.render(scene, s)))), SIDE) for s in sizes]
    rows = [head, label_cell(f'training pictures: "{scene.caption}" drawn at s px, upscaled', head.width, 18)]
    rows += [ex.row(data), label_cell("generated by the model, one seed:", head.width, 22)]
    for p in SIZE_PROMPTS:
        cells = [ex.tile(pictures(sd, prompt=p, original_size=(s, s), steps=20, seed=SEED)[0], SIDE) for s in sizes]
        rows += [label_cell(f'"{p}"', head.width, 18), ex.row(cells)]
    measured = tiny_sdxl.measure_sharpness(sd)
    print("mean |Laplacian| of 48 pictures per original_size (tiny_sdxl.measure_sharpness, seed 0, 20 steps):")
    print("| original_size | generated | training pictures | their VAE reconstructions |\n|---|---|---|---|")
    for m in measured:
        print(f"| {m.size} | {m.generated:.4f} | {m.data:.4f} | {m.reconstructed:.4f} |")
    small, large = measured[0], measured[-1]
    wins = sum(a < b for a, b in zip(small.each, large.each))
    print(f"original_size {large.size} sharper than {small.size}: {wins} of {len(small.each)} pictures (same seed)")
    cells = "   ".join(f"{m.size}: {m.generated:.4f}" for m in measured)
    note = label_cell(f"mean |Laplacian|, 48 pictures each:  {cells}", head.width, 18)
    title = f"tiny SDXL with size conditioning: original_size (s, s), target 32 px (euler, 20 steps, seed {SEED})"
    return titled(column(rows + [note], gap=2), title)


FIGURES = {
    "schedules": lambda sd: {"schedules": schedules()},
    "trajectory": lambda sd: dict(zip(("trajectory", "attention-maps"), trajectory(sd))),
    "guidance-sweep": lambda sd: {"guidance-sweep": guidance_sweep(sd)},
    "size-conditioning": lambda sd: {"size-conditioning": size_conditioning()},
    "size-demo": lambda sd: {"size-demo": size_demo()},
    "samplers-grid": lambda sd: {"samplers-grid": samplers_grid(sd)},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "images"))
    p.add_argument("--only", choices=sorted(FIGURES), action="append", help="make only this figure (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the tiny model's tensors are too small to split (see cli._model_and_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sd = minisd.load(minisd.TINY)
    start = time.time()
    figures = {}
    for name in args.only or FIGURES:
        figures.update(FIGURES[name](sd))
    for name, image in figures.items():
        path = out / f"{name}.png"
        image.save(path, optimize=True)
        print(f"{path}  {image.width}x{image.height}  {path.stat().st_size // 1024} KB")
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
