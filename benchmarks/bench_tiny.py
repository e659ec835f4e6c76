"""End-to-end generation with the shipped tiny model: `sd.generate` against diffusers' pipeline, same weights.

    python benchmarks/bench_tiny.py                     # 32x32, 20 Euler steps, CFG 7.5, CPU
    python benchmarks/bench_tiny.py --steps 50 --images 4 --minisd-opts "fused;fused,channels_last"

The model is `minisd.TINY` (the SD1-architecture model trained from scratch, docs/tiny-model.md).
minisd loads it with `minisd.load`; diffusers gets the same weights through minisd's own
exporter (`minisd.save(sd, folder, format="diffusers")`, which tests/test_diffusers_folder.py
checks against diffusers) and `StableDiffusionPipeline.from_pretrained(folder,
local_files_only=True)`, with `EulerDiscreteScheduler` from the folder's scheduler config, the
scheduler minisd's `sampler="euler"` reproduces. minisd is given that scheduler's own fp32
training table (`schedule=`), so both sample the same numbers (tests/test_pipeline.py's set-up);
the table's last column checks it: the relative difference of the two sides' latents.

What is timed: the whole call, prompt to PIL image (tokenizer, text encoder, `--steps` guided
U-Net steps on a batch of 2 x `--images`, VAE decode, conversion to PIL), under
`torch.inference_mode()` on both sides. All sides live in one process and are called in
rotated order (A B C, B C A, ...) after `--warmup` untimed rounds; the median (min) of
`--repeats`. Also timed, the same way: loading (`minisd.load(TINY)` vs `from_pretrained`,
imports done) and one U-Net call of the guided batch. `torch.set_flush_denormal(True)`.

A model this small (about 3.5M parameters, 4x4 latents) is dominated by per-call overhead
(Python, module dispatch, the scheduler's bookkeeping), not by arithmetic: this benchmark
measures exactly the part the full-size ones cannot see.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minisd  # noqa: E402
from common import markdown_table, median, parse_variants, rel_err  # noqa: E402
from minisd import speed  # noqa: E402
from minisd.schedules import DiscreteSchedule  # noqa: E402

PROMPT = "a small white square in the top left on a green background"
NEGATIVE = "a red circle"


# minisd's pipeline-level switches (`StableDiffusion` methods; channels_last: `minisd.speed.channels_last`).
SD_OPTS = {
    "fused": lambda sd: sd.fuse_projections(),
    "channels_last": lambda sd: (speed.channels_last(sd.unet), speed.channels_last(sd.vae)),
    "packed": lambda sd: sd.pack_convolutions(),
    "subpixel": lambda sd: sd.subpixel_upsampling(),
    "compile": lambda sd: sd.compile(),
}


def apply_sd_opts(sd: minisd.StableDiffusion, opts: tuple[str, ...]) -> None:
    """Apply `opts` (names in `SD_OPTS`) to `sd`, in order."""
    for opt in opts:
        SD_OPTS[opt](sd)


def diffusers_pipe(folder: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed_rounds(calls: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each side, called in rotated order each round; `warmup` rounds untimed."""
    sides = list(calls)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(warmup + repeats):
        k = i % len(sides)
        for side in sides[k:] + sides[:k]:
            t0 = time.perf_counter()
            calls[side]()
            if i >= warmup:
                times[side].append(time.perf_counter() - t0)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (the tiny model's own: 32)")
    p.add_argument("--images", type=int, default=1, help="images per call (the guided batch is twice this)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--minisd-opts", default="", help='extra minisd sides, e.g. "fused;fused,channels_last"')
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import diffusers
    import transformers

    for lib in (diffusers, transformers):  # no progress bars or config warnings in the table
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    folder = Path(tempfile.mkdtemp(prefix="minisd_tiny_bench_")) / "tiny-diffusers"
    minisd.save(minisd.load(minisd.TINY), folder, format="diffusers")
    pipe = diffusers_pipe(folder)
    schedule = DiscreteSchedule.from_alphas_cumprod(pipe.scheduler.alphas_cumprod)

    variants = [()] + parse_variants(args.minisd_opts, tuple(SD_OPTS))
    models = {}
    for opts in variants:
        sd = minisd.load(minisd.TINY)
        apply_sd_opts(sd, opts)
        models["minisd" + ("+" + ",".join(opts) if opts else "")] = sd

    common = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=args.size, height=args.size)
    ours = dict(common, steps=args.steps, guidance_scale=args.guidance, sampler="euler", schedule=schedule,
                num_images=args.images)
    theirs = dict(common, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  num_images_per_prompt=args.images)

    def gen_ours(sd, output="pil"):
        return lambda: sd.generate(**ours, seed=0, output=output)

    def gen_theirs(output="pil"):
        return lambda: pipe(**theirs, generator=torch.Generator("cpu").manual_seed(0), output_type=output).images

    # One U-Net call of the guided batch, as the pipelines make it.
    lat = args.size // 8
    x = torch.randn(2 * args.images, 4, lat, lat, generator=torch.Generator().manual_seed(1))
    width = pipe.unet.config.cross_attention_dim
    ctx = torch.randn(2 * args.images, 77, width, generator=torch.Generator().manual_seed(2))
    t = torch.full((2 * args.images,), 500.0)

    results = {}
    with torch.inference_mode():
        generate = {name: gen_ours(sd) for name, sd in models.items()} | {"diffusers": gen_theirs()}
        results["generate (prompt to PIL)"] = timed_rounds(generate, args.warmup, args.repeats)
        step = {name: (lambda sd=sd: sd.unet(x, t, ctx)) for name, sd in models.items()}
        step["diffusers"] = lambda: pipe.unet(x, t, encoder_hidden_states=ctx).sample
        results["one U-Net call (batch 2 x images)"] = timed_rounds(step, args.warmup, args.repeats * 5)
        expected = torch.as_tensor(gen_theirs("latent")())
        errs = {name: rel_err(gen_ours(sd, "latent")(), expected) for name, sd in models.items()}
    load = {"minisd": lambda: minisd.load(minisd.TINY), "diffusers": lambda: diffusers_pipe(folder)}
    results["load (imports done)"] = timed_rounds(load, 1, args.repeats)

    print(f"tiny model {minisd.TINY.name}: {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M U-Net "
          f"parameters; {args.size}x{args.size} px, {args.steps} Euler steps, CFG {args.guidance}, "
          f"{args.images} image(s); torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}; "
          f"{args.warmup} warm-up + {args.repeats} timed rounds, median (min)\n")
    rows = []
    for what, times in results.items():
        ref = median(times["diffusers"])
        for side, ts in times.items():
            ratio = "1" if side == "diffusers" else f"**{median(ts) / ref:.2f}**"
            err = f"{errs[side]:.1e}" if what.startswith("generate") and side in errs else ""
            rows.append([what, side, f"{median(ts) * 1e3:.1f} ms ({min(ts) * 1e3:.1f})", ratio, err])
    print(markdown_table(["what", "side", "median (min)", "/ diffusers", "latents rel diff"], rows))


if __name__ == "__main__":
    main()
