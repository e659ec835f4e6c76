"""The tiny model minisd ships: the SD1 architecture scaled down, trained from scratch on the shapes.

One command retrains it, VAE stage included, in under an hour on a 2-core CPU:

    python -m minisd.tiny_model --out runs/tiny --seed 0          # add --ship to copy it into the package

The recipe (docs/tiny-model.md has the measurements behind each choice):

1. **VAE** (`TINY_VAE`): SD's KL autoencoder with 3 levels instead of 4, so a 32x32 picture becomes
   4x8x8 latents (x4 down, not SD's x8: a 64x64 VAE step cost ~4x a 32x32 one, more than the hour
   allows). Trained by `train.train_vae` (L1 + 1e-6 KL, LDM's loss without LPIPS/GAN), EMA weights
   kept; then the latent scale factor is 1 / std of the latents (LDM's `scale_by_std`).
2. **Latent cache**: `Recipe.cache_size` pictures of `shapes.ShapesDataset` encoded once (posterior
   means x scale factor), so the U-Net steps do not pay for rendering and encoding every batch.
3. **U-Net and text transformer** (`TINY_UNET`, `TINY_TEXT`) trained jointly by `train.train` from
   scratch (there is no pretrained CLIP): epsilon objective (SD1's), min-SNR-5 weighting, 10%
   caption dropout, EMA. Trained in `Recipe.segments` calls, each resuming the last and ending in
   a snapshot, so accuracy can be measured over training.
4. The EMA weights are saved in the official SD1 layout (`minisd.save`, which records the
   architecture in the file); the U-Net and text encoder are stored in fp16 to keep the file small
   (`minisd.load` casts them back to fp32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import save
from .clip import TextConfig
from .model import StableDiffusion, load
from .shapes import SIZE as SHAPES_SIZE
from .shapes import ShapesDataset
from .unet import UNetConfig
from .vae import VAEConfig

logger = logging.getLogger(__name__)

SIZE = SHAPES_SIZE  # 32 pixels; 4x8x8 latents (see the module docstring for why not 64)
# A causal CLIP-style text transformer (SD1's reading: the last hidden state after ln_final). 32 wide:
# its token embedding over CLIP's 49408-entry vocabulary is already 1.6M parameters, and a 64-wide one
# cost a third more time per training step for a 20-word language.
TINY_TEXT = TextConfig(width=32, heads=2, layers=2, mlp_width=128, act="quick_gelu", projection_dim=None)
# SD1's U-Net (1x1-conv projections, num_heads) at 64 channels, two levels (8x8 and 4x4 latents), one
# ResBlock per level, attention (self and cross) at 4x4 and in the middle only: with attention at 8x8 a
# step ran ~4x slower, and a third level (2x2) cost 16% more per step (both measured on this CPU).
TINY_UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(2,), transformer_depth=1, num_heads=4, context_dim=TINY_TEXT.width,
    use_linear_in_transformer=False,
)  # fmt: skip
# SD's VAE (`SD_VAE`) at 32 channels (the least GroupNorm's 32 groups allow), three levels (x4 down),
# one ResBlock per level. `scale_factor` is what `estimate_scale_factor` measured for the shipped run.
TINY_VAE = VAEConfig(
    ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, resolution=SIZE, scale_factor=1.0,
)  # fmt: skip
TINY_CONFIG = {"unet": TINY_UNET, "vae": TINY_VAE, "text_encoders": [TINY_TEXT], "default_size": SIZE}


@dataclass(frozen=True)
class Recipe:
    """The training recipe of the shipped model; the defaults are the shipped run's."""

    vae_steps: int = 4500  # at 1000 steps: the prototype's ceiling (24 dB, 58% of shapes judged right)
    vae_batch: int = 16  # small batches, more steps: flat shapes give a clean gradient per picture
    vae_lr: float = 1e-3  # above LDM's 4.5e-6 x batch: a 0.7M-parameter autoencoder from scratch, in minutes
    cache_size: int = 16_384  # encoded pictures (1 KB each); ~16 epochs of the U-Net stage
    unet_steps: int = 5000
    unet_batch: int = 32  # on a CPU a step costs ~ the batch: at a fixed budget, more and smaller steps
    unet_lr: float = 5e-4  # SD's 1e-4 is for an 860M-parameter U-Net at batch 2048; small nets take more
    warmup_steps: int = 200
    min_snr_gamma: float | None = 5.0  # Hang et al. 2023: ~3x faster convergence; their gamma = 5
    ema_decay: float = 0.999  # ~1000-step average: SD's 0.9999 outlasts a 5000-step run
    segments: int = 10  # snapshots of the EMA model over training (for accuracy over time)


RECIPE = Recipe()


class LatentCache(torch.utils.data.Dataset):
    """Encoded shapes: items {"latents": (4, 8, 8) scaled latents, "caption": str}, which `train.train`
    takes in place of images."""

    def __init__(self, latents: torch.Tensor, captions: list[str]) -> None:
        if len(latents) != len(captions):
            raise ValueError(f"{len(latents)} latents but {len(captions)} captions")
        self.latents, self.captions = latents, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"latents": self.latents[index], "caption": self.captions[index]}


@torch.no_grad()
def encode_cache(sd: StableDiffusion, data: ShapesDataset, batch: int = 256) -> LatentCache:
    """Posterior means x scale factor of every item: with LDM's KL weight of 1e-6 the posterior is
    nearly a point, so sampling it adds nothing worth a fresh encoding per step."""
    chunks, captions = [], []
    for start in range(0, len(data), batch):
        items = [data[i] for i in range(start, min(len(data), start + batch))]
        images = torch.stack([it["image"] for it in items])
        chunks.append(sd.vae.encode(2.0 * images - 1.0).mean * sd.scale_factor)
        captions += [it["caption"] for it in items]
    return LatentCache(torch.cat(chunks).float(), captions)


def new_model(seed: int) -> StableDiffusion:
    """Fresh weights of the tiny architecture (`train.init_model`, the SD1 family)."""
    from .train import init_model

    return init_model("sd1", config=TINY_CONFIG, seed=seed)


def _stage_vae(sd: StableDiffusion, out: Path, recipe: Recipe, seed: int) -> float:
    from .train import VAETrainConfig, apply_ema, train_vae

    config = VAETrainConfig(steps=recipe.vae_steps, batch_size=recipe.vae_batch, lr=recipe.vae_lr, seed=seed,
                            warmup_steps=100, grad_clip=1.0, ema_decay=recipe.ema_decay, sample_every=500,
                            checkpoint_every=250)  # fmt: skip
    result = train_vae(sd.vae, ShapesDataset(10**6, seed=seed, size=SIZE), config, out / "vae")
    apply_ema(sd.vae, result)  # the module holds the raw weights; the EMA ones are smoother
    # The family record carries the architecture that `minisd.save` writes: give it the new scale factor.
    sd.family = dataclasses.replace(sd.family, vae=sd.vae.config)
    return result.seconds


def _stage_cache(sd: StableDiffusion, out: Path, recipe: Recipe, seed: int) -> LatentCache:
    path = out / "latents.pt"
    if path.exists():
        state = torch.load(path, weights_only=True)
        return LatentCache(state["latents"], state["captions"])
    # A different seed from the VAE's data: the U-Net sees pictures the VAE never trained on.
    cache = encode_cache(sd, ShapesDataset(recipe.cache_size, seed=seed + 1, size=SIZE))
    torch.save({"latents": cache.latents, "captions": cache.captions}, path)
    return cache


def _stage_unet(sd: StableDiffusion, cache: LatentCache, out: Path, recipe: Recipe, seed: int) -> float:
    """Train in `recipe.segments` calls of `train` (each resumes the last), snapshotting the EMA model."""
    from .train import TrainConfig, train

    seconds = 0.0
    for k in range(1, recipe.segments + 1):
        steps = recipe.unet_steps * k // recipe.segments
        snapshot = out / "snapshots" / f"step-{steps:06d}.safetensors"
        if snapshot.exists():  # done by an earlier call (the checkpoint is past it: nothing to resume)
            continue
        config = TrainConfig(
            steps=steps, batch_size=recipe.unet_batch, lr=recipe.unet_lr, warmup_steps=recipe.warmup_steps,
            ema_decay=recipe.ema_decay, min_snr_gamma=recipe.min_snr_gamma, caption_dropout=0.1,
            train_text_encoder=True, seed=seed, checkpoint_every=500, log_every=50,
        )  # fmt: skip
        result = train(sd, cache, config, out / "unet")
        seconds += result.seconds
        snapshot.parent.mkdir(exist_ok=True)
        shutil.copyfile(result.model_path, snapshot)
        logger.info("snapshot %s (%.0f s of U-Net training so far)", snapshot, seconds)
    return seconds


def retrain(out: str | Path, *, seed: int = 0, recipe: Recipe = RECIPE, threads: int = 1) -> Path:
    """Train the tiny model from scratch into `out` (resuming whatever is there); returns the shipped-
    format file `out/tiny-sd.safetensors`. Writes `out/timings.json` (seconds per stage).

    `threads`: torch's intra-op threads while training (restored after). 1 by default: on a 2-core
    machine shared with other jobs, 2 threads ran a VAE step 3x *slower* than 1 (the threads wait on
    each other); on an idle machine 2 are faster."""
    return run_stages(Path(out), seed, recipe, threads, TINY_STAGES)


@dataclass(frozen=True)
class Stages:
    """What a tiny model's recipe runs, in order (`run_stages`): fresh weights, the VAE stage, the latent
    cache, then the shared U-Net stage (`_stage_unet`), and the shipped file's writer and name."""

    new_model: Callable[[int], StableDiffusion]
    vae: Callable[[StableDiffusion, Path, Recipe, int], float]
    cache: Callable[[StableDiffusion, Path, Recipe, int], LatentCache]
    ship: Callable[[Path, Path], Path]
    file_name: str


def run_stages(out: Path, seed: int, recipe: Recipe, threads: int, stages: Stages) -> Path:
    """Run `stages` into `out` (each resumes what is there) with `threads` torch threads (restored after);
    returns the shipped file. Writes `out/timings.json`: the seconds of each stage in this call, and of
    the training steps of all calls."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_stages(out, seed, recipe, threads, stages)
    finally:
        torch.set_num_threads(previous)


def _run_stages(out: Path, seed: int, recipe: Recipe, threads: int, stages: Stages) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd = stages.new_model(seed)
    times = {"vae": stages.vae(sd, out, recipe, seed)}
    t1 = time.perf_counter()
    cache = stages.cache(sd, out, recipe, seed)
    times["cache"] = time.perf_counter() - t1
    times["unet"] = _stage_unet(sd, cache, out, recipe, seed)
    path = stages.ship(out / "unet" / "model.safetensors", out / stages.file_name)
    times["this_call"] = time.perf_counter() - t0
    # Over every call that built this folder (a resumed run's own timings cover only its part):
    times.update({f"{stage}_steps_all_calls": logged_seconds(out / stage / "log.jsonl") for stage in ("vae", "unet")})
    record = {"seed": seed, "threads": threads, "recipe": dataclasses.asdict(recipe), **times}
    (out / "timings.json").write_text(json.dumps(record, indent=1))
    logger.info("%s: %s", path, ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return path


def logged_seconds(log: Path) -> float:
    """Seconds of training steps in a `log.jsonl`, summed over the calls that wrote it: each record's
    "time" counts from the start of its call, so a drop marks a resume."""
    total = last = 0.0
    for line in log.read_text().splitlines():
        t = json.loads(line)["time"]
        if t < last:
            total += last
        last = t
    return total + last


def ship_file(src: str | Path, dst: str | Path) -> Path:
    """The shipped form of a trained model file: the U-Net and the text encoder in fp16 (half the
    bytes; `minisd.load` casts them back to fp32), the VAE in fp32 as SD keeps it, via `minisd.save`."""
    sd = load(src)  # the architecture and scale factor come from the file (`minisd.config` metadata)
    sd.unet.half()
    for encoder in sd.text_encoders:
        encoder.half()
    return save(sd, dst, overwrite=True)


TINY_STAGES = Stages(new_model, _stage_vae, _stage_cache, ship_file, "tiny-sd.safetensors")


def main(argv: list[str] | None = None) -> int:
    """Retrain the tiny model from the command line; returns the exit status.

        python -m minisd.tiny_model --out work/tiny
    """
    p = argparse.ArgumentParser(prog="python -m minisd.tiny_model", description="Retrain minisd's tiny model "
                                "from scratch on the built-in shapes (resumes what --out holds).")  # fmt: skip
    p.add_argument("--out", required=True, help="work folder: checkpoints, logs, snapshots, tiny-sd.safetensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see `retrain`)")
    p.add_argument("--ship", action="store_true", help="copy the result over the packaged minisd.TINY")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = retrain(args.out, seed=args.seed, threads=args.threads)
    if args.ship:
        target = Path(__file__).parent / "data" / "tiny-sd.safetensors"
        shutil.copyfile(path, target)
        logger.info("shipped %s -> %s", path, target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
