"""A tiny SDXL-architecture model that learned what SDXL's `original_size` means.

SDXL's size conditioning (Podell et al. 2023, sec. 2.2): training pictures smaller than the training
size are upscaled, hence blurry; the U-Net is told each picture's original size (`y`'s
`original_size`, walkthrough 3), so it keeps them and learns that a small original size means blur.
At sampling time, asking for a large original size asks for a sharp picture.

This module reproduces that on the built-in shapes, small enough to train on one CPU thread:

1. **Data** (`SizedShapes`): item i of `shapes.ShapesDataset` rendered at an original size s drawn
   from `SIZES` (8 to 32 px), upscaled bilinearly back to 32 px (`degrade`: that is where the blur
   comes from), with `original_size = (s, s)`.
2. **Model**: the `sdxl` family scaled down (`config`): two text transformers as SDXL has (a CLIP-L-like
   one and a bigG-like one that also gives the pooled, projected vector, both read at their penultimate
   layer), a U-Net with `y` = pooled (16) + 6 x 256 micro-conditioning features, and the shipped tiny
   model's trained VAE (`minisd.TINY`, same 32 px and 4x8x8 latents).
3. **VAE fine-tuning** (`train.train_vae` from TINY's weights, on `SizedShapes`): TINY's VAE saw only
   sharp pictures, and decodes a blurred one with its edges snapped back sharp (measured on 32
   evaluation scenes: the mean |Laplacian| of its reconstructions at original size 8 was 88% of that at
   32, against 21% for the pictures themselves). SDXL's VAE saw pictures of every size; so, briefly,
   does this one.
4. **U-Net and text towers**: `tiny_model`'s U-Net stage (`train.train`, epsilon, min-SNR-5, 10%
   caption dropout, EMA 0.999, in segments that each resume the last) on a latent cache of the
   degraded pictures, each with its `original_size`.

One command retrains it (about half an hour on one thread; it resumes what `--out` holds):

    python -m minisd.tiny_sdxl --out runs/size-demo          # add --ship to copy it to docs/assets/

`sharpness` is the measure the docs quote (docs/make_figures.py `size_demo`, walkthrough 3).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import save
from .clip import TextConfig
from .model import StableDiffusion, load
from .shapes import SIZE, ShapesDataset, eval_scenes, render, to_tensor
from .tiny_model import RECIPE as TINY_RECIPE
from .tiny_model import LatentCache, Recipe, Stages, encode_cache, run_stages
from .unet import UNetConfig

logger = logging.getLogger(__name__)

SIZES = (8, 12, 16, 24, 32)  # the original sizes of the training pictures, drawn uniformly; 32 = sharp
# Two text towers as SDXL's (families.py `_SDXL_CLIP_L`, `_SDXL_BIGG`): both read at the penultimate
# layer, so 3 layers use 2 for the context. 16 wide (TINY_TEXT is 32): CLIP's 49408-token embedding is
# most of a text tower's weights, and two 32-wide ones alone would be 6.4 MB of the 8 MB file budget.
TEXT_L = TextConfig(width=16, heads=2, layers=3, mlp_width=64, act="quick_gelu", projection_dim=None)
TEXT_G = TextConfig(width=16, heads=2, layers=3, mlp_width=64, act="gelu", projection_dim=16)
# SDXL's U-Net (linear projections, num_head_channels, `y` through label_emb) at 32 channels, two levels
# (8x8 and 4x4 latents), attention at 4x4 and in the middle as TINY_UNET. context = the two towers'
# hidden states side by side (16 + 16); y = pooled (16) + original_size, crop, target_size (6 x 256).
# 32 channels, not TINY_UNET's 64: 1.2M parameters (2.4 MB in fp16) and 0.16 s per batch-32 U-Net step
# on one thread, against 4.3M and 0.39 s for this U-Net at 64 channels (measured on this CPU).
UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(2,), transformer_depth=1, num_head_channels=32, context_dim=TEXT_L.width + TEXT_G.width,
    use_linear_in_transformer=True, adm_in_channels=TEXT_G.projection_dim + 6 * 256,
)  # fmt: skip
# `tiny_model`'s recipe with this run's lengths; the VAE stage fine-tunes TINY's VAE (lr 5x lower than
# TINY's from-scratch 1e-3) instead of training one.
RECIPE = dataclasses.replace(TINY_RECIPE, vae_steps=1000, vae_lr=2e-4, unet_steps=7000, segments=7)
# The committed result (in a source checkout), read by docs/make_figures.py and the tests.
ASSET = Path(__file__).resolve().parents[2] / "docs" / "assets" / "tiny-sdxl-size.safetensors"


def config(vae_config) -> dict:
    """`minisd.load`'s `config=` for this architecture, with the given VAE config (TINY's)."""
    return {"unet": UNET, "vae": vae_config, "text_encoders": [TEXT_L, TEXT_G], "default_size": SIZE}


# ---------------------------------------------------------------------------------- the data
def degrade(image: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """A picture (3, s, s) upscaled to (3, size, size) by bilinear interpolation (half-pixel centres,
    PIL's and torch's `align_corners=False`): what a training pipeline does to a picture smaller
    than its training size. s = size returns the picture unchanged."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def original_size(seed: int, index: int) -> int:
    """Item `index`'s original size, from `SIZES`: a pure function of (seed, index)."""
    return random.Random(f"size:{seed}:{index}").choice(SIZES)


class SizedShapes(ShapesDataset):
    """`ShapesDataset` at a random original size: items {"image": (3, 32, 32) in [0, 1], the scene
    rendered at s px and upscaled (`degrade`), "caption", "original_size": (s, s)}."""

    def __getitem__(self, index: int) -> dict:
        scene, s = self.scene(index), original_size(self.seed, index)
        image = degrade(to_tensor(render(scene, s)), self.size)
        return {"image": image, "caption": scene.caption, "original_size": torch.tensor([s, s])}


class SizedLatents(LatentCache):
    """A `LatentCache` whose items also carry their `original_size` (h, w), which `train.train` hands to
    the U-Net through `y` (train.py `_micro`)."""

    def __init__(self, latents: torch.Tensor, captions: list[str], sizes: torch.Tensor) -> None:
        super().__init__(latents, captions)
        if sizes.shape != (len(captions), 2):
            raise ValueError(f"sizes: expected shape ({len(captions)}, 2), got {tuple(sizes.shape)}")
        self.sizes = sizes

    def __getitem__(self, index: int) -> dict:
        return {**super().__getitem__(index), "original_size": self.sizes[index]}


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian of each picture (B, 3, H, W) in [0, 1], over the interior pixels and the
    channels, `(B,)`: the 4-neighbour |4 x[i, j] - x[i-1, j] - x[i+1, j] - x[i, j-1] - x[i, j+1]|.
    A blur lowers it: it is the high-frequency energy of the picture (the Laplacian's gain is 8 at the
    highest frequency and 0 at the lowest)."""
    x = images.float()
    c = x[..., 1:-1, 1:-1]
    lap = 4 * c - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.abs().mean(dim=(1, 2, 3))


@dataclass(frozen=True)
class SizeSharpness:
    """Mean `sharpness` at one original size, over the same scenes and seeds at every size."""

    size: int  # original_size (size, size); the pictures are 32 px
    generated: float  # the model's pictures for the scenes' captions, generated at this original_size
    data: float  # the scenes as training pictures: rendered at `size` px and upscaled (`degrade`)
    reconstructed: float  # those pictures through the model's VAE: the most the latents can carry
    each: tuple[float, ...] = ()  # `sharpness` of each generated picture, in scene order


@torch.no_grad()
def measure_sharpness(sd: StableDiffusion, n: int = 48, *, seed: int = 0, steps: int = 20) -> list[SizeSharpness]:
    """`SizeSharpness` for each of `SIZES`: `n` captions of `shapes.eval_scenes` (the training pairs),
    generated in one batch from `seed` (the same noise at every size) at the model's default guidance."""
    scenes = eval_scenes(-(-n // 3))[:n]  # a third of each form (plain, large, small)
    captions = [scene.caption for scene in scenes]
    results = []
    for s in SIZES:
        images = sd.generate(captions, original_size=(s, s), steps=steps, seed=seed, width=SIZE, height=SIZE,
                             output="tensor")  # fmt: skip
        data = torch.stack([degrade(to_tensor(render(scene, s))) for scene in scenes])
        latents = sd.vae.encode(2.0 * data.to(sd.vae.dtype) - 1.0).mean
        rec = ((sd.vae.decode(latents).float().clamp(-1, 1) + 1) / 2).cpu()
        each = sharpness(images.cpu())
        results.append(SizeSharpness(s, float(each.mean()), float(sharpness(data).mean()),
                                     float(sharpness(rec).mean()), tuple(each.tolist())))  # fmt: skip
    return results


# ---------------------------------------------------------------------------------- training
def new_model(seed: int) -> StableDiffusion:
    """Fresh U-Net and text towers of the `sdxl` family (`config`), with the shipped tiny model's VAE."""
    from . import TINY
    from .train import init_model

    tiny = load(TINY)
    sd = init_model("sdxl", config=config(tiny.vae.config), seed=seed)
    sd.vae.load_state_dict(tiny.vae.state_dict(), strict=True)
    return sd


def _stage_vae(sd: StableDiffusion, out: Path, recipe: Recipe, seed: int) -> float:
    """Fine-tune the VAE on `SizedShapes` (`tiny_model._stage_vae`'s settings, from TINY's weights)."""
    from .train import VAETrainConfig, apply_ema, train_vae

    cfg = VAETrainConfig(steps=recipe.vae_steps, batch_size=recipe.vae_batch, lr=recipe.vae_lr, seed=seed,
                         warmup_steps=100, grad_clip=1.0, ema_decay=recipe.ema_decay, checkpoint_every=250)  # fmt: skip
    result = train_vae(sd.vae, SizedShapes(10**6, seed=seed, size=SIZE), cfg, out / "vae")
    apply_ema(sd.vae, result)
    sd.family = dataclasses.replace(sd.family, vae=sd.vae.config)  # the new scale factor, which save records
    return result.seconds


def _cache(sd: StableDiffusion, out: Path, recipe: Recipe, seed: int) -> SizedLatents:
    path = out / "latents.pt"
    if path.exists():
        state = torch.load(path, weights_only=True)
        return SizedLatents(state["latents"], state["captions"], state["sizes"])
    data = SizedShapes(recipe.cache_size, seed=seed + 1, size=SIZE)
    cache = encode_cache(sd, data)
    sizes = torch.tensor([[s, s] for s in (original_size(data.seed, i) for i in range(len(data)))])
    torch.save({"latents": cache.latents, "captions": cache.captions, "sizes": sizes}, path)
    return SizedLatents(cache.latents, cache.captions, sizes)


def retrain(out: str | Path, *, seed: int = 0, recipe: Recipe = RECIPE, threads: int = 1) -> Path:
    """Train the size-conditioned model into `out` (resuming what is there); returns `out/tiny-sdxl-size.safetensors`
    (every weight in fp16, `ship_file`). `threads`: torch's threads while training (see `tiny_model.retrain`)."""
    return run_stages(Path(out), seed, recipe, threads, SIZE_STAGES)


def ship_file(src: str | Path, dst: str | Path) -> Path:
    """The committed form: every weight in fp16, the VAE included (`minisd.load` casts them back to fp32;
    rounding the VAE's weights moved its decoded pixels by at most 0.78 of an 8-bit level, measured on this
    run's VAE; tests/test_size_demo.py checks the same bound on TINY's)."""
    sd = load(src)
    for module in (sd.unet, sd.vae, *sd.text_encoders):
        module.half()
    return save(sd, dst, overwrite=True)


SIZE_STAGES = Stages(new_model, _stage_vae, _cache, ship_file, "tiny-sdxl-size.safetensors")


def main(argv: list[str] | None = None) -> int:
    """Retrain the size-conditioned demo model from the command line; returns the exit status.

    python -m minisd.tiny_sdxl --out runs/size-demo --ship
    """
    p = argparse.ArgumentParser(prog="python -m minisd.tiny_sdxl", description="Retrain the tiny SDXL model with "
                                "size conditioning on the built-in shapes (resumes what --out holds).")  # fmt: skip
    p.add_argument("--out", required=True, help="work folder: latents, checkpoints, logs, snapshots, the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=int, default=RECIPE.unet_steps, help=f"U-Net steps (default {RECIPE.unet_steps})")
    p.add_argument("--segments", type=int, default=RECIPE.segments, help="snapshots over training")
    p.add_argument("--ship", action="store_true", help=f"copy the result to {ASSET}")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = dataclasses.replace(RECIPE, unet_steps=args.steps, segments=args.segments)
    path = retrain(args.out, seed=args.seed, recipe=recipe, threads=args.threads)
    if args.ship:
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, ASSET)
        logger.info("shipped %s -> %s", path, ASSET)
    return 0


if __name__ == "__main__":
    sys.exit(main())
