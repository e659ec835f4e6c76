"""Train Stable Diffusion with minisd: the U-Net (and the text encoder), and the VAE.

    import minisd
    from minisd.train import ImageCaptionFolder, TrainConfig, train
    sd = minisd.load("v1-5-pruned-emaonly.safetensors")               # or init_model(...) from scratch
    data = ImageCaptionFolder("my-images/", size=512)                 # a.png + a.txt, b.jpg + b.txt, ...
    result = train(sd, data, TrainConfig(steps=1000, batch_size=4), "runs/ft")   # -> runs/ft/model.safetensors

The objective is the latent diffusion loss of Rombach et al. 2022 (eq. 2), with the target the
model's prediction type asks for (`noised_and_target`): the noise (epsilon, Ho et al. 2020) or
v (Salimans & Ho 2022); optionally weighted by min-SNR-gamma (Hang et al. 2023), with a noise
offset, or on the zero-terminal-SNR schedule (Lin et al. 2023). Captions are dropped for 10% of
the samples (SD's recipe), so the model learns the unconditional prediction that classifier-free
guidance needs. The machinery around the loss (data order, seeds, AdamW, EMA, mixed precision,
checkpoints and resume, DDP under torchrun, logging) is `minisd.trainkit`'s. docs/training.md has
the whole story; `python -m minisd.train --help` (or `minisd train`) is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Dataset

from .checkpoint import Components, save
from .clip import TextTransformer
from .conditioning import encode_prompt, vector_conditioning
from .families import PREDICTION_TYPES, Family, family_spec
from .imagefolder import ImageCaptionFolder
from .model import StableDiffusion, load
from .schedules import NUM_TRAIN_TIMESTEPS, DiscreteSchedule, ddpm_alphas_cumprod
from .trainkit import MIXED_PRECISION, Draws, LoopResult, Task, copy_weights, derived_generator, run_loop, save_grid
from .trainkit import swapped as swapped_weights
from .unet import ResBlock, SpatialTransformer, UNetModel
from .vae import AutoencoderKL

logger = logging.getLogger(__name__)

__all__ = [
    "ImageCaptionFolder", "TrainConfig", "TrainResult", "VAETrainConfig", "apply_ema", "estimate_scale_factor",
    "init_model", "loss_weights", "main", "noised_and_target", "snr", "train", "train_vae", "training_alphas_cumprod",
]  # fmt: skip


# ---------------------------------------------------------------------------------- configs
def _check(name: str, ok: bool, expected: str, got: Any) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _check_mechanics(cfg: Any) -> None:
    """The fields `TrainConfig` and `VAETrainConfig` share."""
    n = type(cfg).__name__
    _check(f"{n}.steps", isinstance(cfg.steps, int) and cfg.steps >= 1, "an integer >= 1", cfg.steps)
    _check(f"{n}.batch_size", isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, "an integer >= 1",
           cfg.batch_size)  # fmt: skip
    _check(f"{n}.lr", cfg.lr > 0, "a value > 0", cfg.lr)
    _check(f"{n}.betas", len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "two values in [0, 1)",
           cfg.betas)  # fmt: skip
    _check(f"{n}.weight_decay", cfg.weight_decay >= 0, "a value >= 0", cfg.weight_decay)
    _check(f"{n}.warmup_steps", cfg.warmup_steps >= 0, "an integer >= 0", cfg.warmup_steps)
    _check(f"{n}.grad_clip", cfg.grad_clip is None or cfg.grad_clip > 0, "None or a value > 0", cfg.grad_clip)
    _check(f"{n}.ema_decay", cfg.ema_decay is None or 0 < cfg.ema_decay < 1, "None or a value in (0, 1)",
           cfg.ema_decay)  # fmt: skip
    _check(f"{n}.mixed_precision", cfg.mixed_precision in MIXED_PRECISION, f"one of {MIXED_PRECISION}",
           cfg.mixed_precision)  # fmt: skip
    for field in ("log_every", "sample_every", "checkpoint_every", "num_workers"):
        value = getattr(cfg, field)
        _check(f"{n}.{field}", isinstance(value, int) and value >= 0, "an integer >= 0 (0: never)", value)


@dataclass(frozen=True)
class TrainConfig:
    """How to train the U-Net (and the text encoder). Defaults are SD's recipe where it has one
    (Rombach et al. 2022, the SD model cards); docs/training.md explains each choice."""

    steps: int  # optimizer steps in all (a resumed run continues up to this number)
    batch_size: int  # global batch: split evenly over the processes of a torchrun run
    lr: float = 1e-4  # SD 1.x/2.x: AdamW at 1e-4 (model cards), constant after the warm-up
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (torch's defaults, as LDM)
    weight_decay: float = 1e-2  # AdamW's decoupled weight decay (torch's default, as LDM)
    warmup_steps: int = 0  # linear warm-up from 0 to lr (SD 1.x: 10,000 steps from scratch)
    grad_clip: float | None = 1.0  # max global gradient norm (diffusers' max_grad_norm); None: no clipping
    ema_decay: float | None = 0.9999  # EMA of the weights (LDM's use_ema), with LitEma's warm-up; None: off
    caption_dropout: float = 0.1  # SD: the text is dropped ("", SDXL: zeros) for 10% of samples, for CFG
    min_snr_gamma: float | None = None  # min-SNR-gamma loss weighting (Hang et al. 2023, gamma = 5); None: off
    noise_offset: float = 0.0  # noise += offset * N(0, 1) per (sample, channel): brighter darks (Guttenberg 2023)
    zero_terminal_snr: bool = False  # Lin et al. 2023: rescaled betas, SNR(T-1) = 0; needs v-prediction
    mixed_precision: str = "no"  # "no" | "bf16" (autocast, CPU or CUDA) | "fp16" (autocast + GradScaler, CUDA)
    gradient_checkpointing: bool = False  # recompute U-Net blocks in the backward pass (less memory, ~30% slower)
    train_text_encoder: bool = False  # train the text transformer(s) jointly (from scratch there is no CLIP)
    seed: int = 0  # drives the data order, noise, timesteps, caption dropout and VAE posterior samples
    log_every: int = 50  # a `logging` line every this many steps (the JSONL log has every step)
    sample_every: int = 0  # a PNG grid of `sample_prompts` (EMA weights) every this many steps; 0: never
    checkpoint_every: int = 500  # write checkpoint.pt every this many steps (and always at the end)
    sample_prompts: tuple[str, ...] = ()  # the preview grid's prompts
    sample_steps: int = 20  # sampler steps of the preview
    sample_guidance: float | None = None  # guidance of the preview; None: the family's default
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)

    def __post_init__(self) -> None:
        _check_mechanics(self)
        _check("TrainConfig.caption_dropout", 0 <= self.caption_dropout <= 1, "a value in [0, 1]",
               self.caption_dropout)  # fmt: skip
        _check("TrainConfig.min_snr_gamma", self.min_snr_gamma is None or self.min_snr_gamma > 0,
               "None or a value > 0", self.min_snr_gamma)  # fmt: skip
        _check("TrainConfig.noise_offset", self.noise_offset >= 0, "a value >= 0", self.noise_offset)
        _check("TrainConfig.sample_steps", self.sample_steps >= 1, "an integer >= 1", self.sample_steps)
        if self.sample_every and not self.sample_prompts:
            raise ValueError("TrainConfig.sample_prompts: expected prompts for sample_every > 0, got ()")


@dataclass(frozen=True)
class VAETrainConfig:
    """How to train the KL autoencoder (LDM's `AutoencoderKL` recipe, without its LPIPS and GAN terms,
    which need pretrained or adversarial networks: see docs/training.md)."""

    steps: int  # optimizer steps in all
    batch_size: int  # global batch
    lr: float = 1e-4  # LDM: base_learning_rate 4.5e-6 times the global batch (main.py's scale_lr)
    betas: tuple[float, float] = (0.5, 0.9)  # LDM's autoencoder Adam betas
    weight_decay: float = 0.0  # LDM uses Adam, without weight decay
    warmup_steps: int = 0
    grad_clip: float | None = None  # LDM does not clip
    ema_decay: float | None = None  # LDM keeps no EMA of the autoencoder
    kl_weight: float = 1e-6  # LDM's kl_weight: a near-deterministic autoencoder, latents kept near N(0, I)
    reconstruction: str = "l1"  # "l1" (LDM's pixel loss) or "l2"
    sample_posterior: bool = True  # decode a posterior sample (LDM), not its mean
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 50
    sample_every: int = 0  # a PNG of 8 images over their reconstructions every this many steps; 0: never
    checkpoint_every: int = 500
    scale_samples: int = 256  # images encoded at the end to estimate the latent scale factor
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_mechanics(self)
        _check("VAETrainConfig.kl_weight", self.kl_weight >= 0, "a value >= 0", self.kl_weight)
        _check("VAETrainConfig.reconstruction", self.reconstruction in ("l1", "l2"), "'l1' or 'l2'",
               self.reconstruction)  # fmt: skip
        _check("VAETrainConfig.scale_samples", self.scale_samples >= 2, "an integer >= 2", self.scale_samples)


@dataclass
class TrainResult(LoopResult):
    """What a training run returns.

    Attributes:
        step: the last step trained (`config.steps`); start_step: where this call began (0, or the
            step of the checkpoint it resumed).
        losses: the loss of each step this call ran (the mean over all processes).
        ema: the EMA weights of each trained module ("unet", "text_encoders.0", "vae"), or None.
        checkpoint, log: `checkpoint.pt` and `log.jsonl` in the out_dir; seconds: wall time of the steps.
        model_path: `train`: the official-layout `model.safetensors` (EMA weights); `train_vae`: `vae.safetensors`.
        scale_factor: `train_vae`: 1 / std of the trained VAE's latents (also set in `vae.config`).
    """

    model_path: Path | None = None
    scale_factor: float | None = None

    @property
    def steps_per_second(self) -> float:
        """Training speed over this run's steps."""
        return (self.step - self.start_step) / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------- the objective
def training_alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    """The SD training schedule alphabar_t, t = 0..999, float64 (`schedules.ddpm_alphas_cumprod`),
    rescaled to zero terminal SNR when asked (Lin et al. 2023, Algorithm 1: alphabar_999 = 0)."""
    return ddpm_alphas_cumprod(zero_terminal_snr=zero_terminal_snr)


def _coefficients(t: torch.Tensor, alphas_cumprod: torch.Tensor, like: torch.Tensor):
    """(sqrt(alphabar_t), sqrt(1 - alphabar_t)) in float64, then shaped (B, 1, ..., 1) in like's dtype."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)[t.detach().cpu().long()]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return (a.sqrt().reshape(shape).to(like), (1.0 - a).sqrt().reshape(shape).to(like))


def noised_and_target(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The U-Net's input x_t and its regression target, for clean latents x0 `(B, C, h, w)`, noise of
    the same shape and integer timesteps t `(B,)`:

        x_t = sqrt(alphabar_t) x0 + sqrt(1 - alphabar_t) noise        (Ho et al. 2020, eq. 4)
        target = noise                                                 ("epsilon", Ho et al. 2020, eq. 14)
        target = v = sqrt(alphabar_t) noise - sqrt(1 - alphabar_t) x0  ("v_prediction", Salimans & Ho 2022, sec. 4)

    diffusers' `DDPMScheduler.add_noise` / `get_velocity` on the same tensors (tests/test_train.py)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if noise.shape != x0.shape or t.shape != x0.shape[:1]:
        raise ValueError(f"noise, t: expected shapes {tuple(x0.shape)} and ({x0.shape[0]},), "
                         f"got {tuple(noise.shape)} and {tuple(t.shape)}")  # fmt: skip
    sqrt_a, sqrt_1ma = _coefficients(t, alphas_cumprod, x0)
    x_t = sqrt_a * x0 + sqrt_1ma * noise
    target = noise if prediction_type == "epsilon" else sqrt_a * noise - sqrt_1ma * x0
    return x_t, target


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alphabar_t / (1 - alphabar_t) at integer timesteps t (Kingma et al. 2021),
    fp32 on t's device (diffusers' `training_utils.compute_snr`); 0 at the last step of a zero-terminal-SNR
    schedule."""
    a = alphas_cumprod.detach().to("cpu", torch.float64)[t.detach().cpu().long()]
    return (a / (1.0 - a)).to(device=t.device, dtype=torch.float32)


def loss_weights(
    t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str, min_snr_gamma: float | None
) -> torch.Tensor:
    """Per-sample weights of the MSE, `(B,)` fp32: ones, or min-SNR-gamma (Hang et al. 2023, eq. 9 and
    sec. 3.4) expressed for the model's target:

        epsilon:       min(SNR, gamma) / SNR        (the x0-MSE weight min(SNR, gamma) moved onto the noise)
        v_prediction:  min(SNR, gamma) / (SNR + 1)

    At SNR = 0 (zero terminal SNR) the epsilon weight takes its limit, 1."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if min_snr_gamma is None:
        return torch.ones(t.shape, device=t.device)
    s = snr(t, alphas_cumprod)
    clipped = s.clamp(max=min_snr_gamma)
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), torch.ones_like(s))


# ---------------------------------------------------------------------------------- the diffusion loss
class DiffusionObjective(nn.Module):
    """The loss of one batch as a module (DDP wraps it): text encoding (trained or not), x_t, the
    U-Net's prediction, and the weighted MSE against the target. The trained modules are registered
    (`unet`, `text_encoders`); the rest of the model is read through `sd`."""

    def __init__(self, sd: StableDiffusion, config: TrainConfig, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.unet = sd.unet
        self.text_encoders = nn.ModuleList(sd.text_encoders)
        self._sd, self.config, self.alphas_cumprod = (sd,), config, alphas_cumprod  # a tuple: not a submodule

    def forward(  # type: ignore[override]
        self, latents, noise, t, captions, drop, micro
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted denoising MSE of latents (B, C, h, w) with noise at timesteps t (B,): (loss, {'mse'})."""
        sd = self._sd[0]
        context, y = condition(sd, captions, drop, micro, grad=self.config.train_text_encoder)
        x_t, target = noised_and_target(latents, noise, t, self.alphas_cumprod, sd.prediction_type)
        pred = self.unet(x_t, t, context, y)
        mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,), in fp32 under autocast
        w = loss_weights(t, self.alphas_cumprod, sd.prediction_type, self.config.min_snr_gamma)
        return (w * mse).mean(), {"mse": mse.mean()}


def condition(
    sd: Components, captions: list[str], drop: torch.Tensor, micro: dict[str, torch.Tensor], *, grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The U-Net's (context, y) for a batch of captions, of which those flagged in `drop` are dropped.

    A dropped caption becomes "" (SD1/SD2, the empty prompt of sampling-time guidance) or, for families
    whose empty negative prompt is zeros (SDXL base, `Family.zero_empty_negative`), zero context and
    pooled vectors (sgm's ucg on the text embedders). SDXL's y is the pooled vector and the sizes/crop
    in `micro` (`conditioning.vector_conditioning`, the order of `Family.y_inputs`)."""
    texts = ["" if d else c for c, d in zip(captions, drop.tolist())]
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        c = encode_prompt(texts, sd.family, sd.text_encoders, sd.tokenizer, uses=sd.text_uses)
    context, pooled = c.context, c.pooled
    if sd.family.zero_empty_negative:
        keep = (~drop).to(context.dtype)
        context = context * keep[:, None, None]
        pooled = pooled * keep[:, None] if pooled is not None else None
    if not sd.family.y_inputs:
        return context, None
    return context, vector_conditioning(pooled, sd.family.y_inputs, micro)


def _micro(sd: Components, batch: dict[str, Any], size: tuple[int, int], b: int, device) -> dict[str, torch.Tensor]:
    """SDXL's micro-conditioning per sample: the item's `original_size` and `crop_coords_top_left` when
    the data has them (`ImageCaptionFolder`), else the training size and no crop; target = training size."""
    full = torch.tensor(size, dtype=torch.float32).expand(b, 2)
    values = {
        "original_size": batch.get("original_size", full),
        "crop_coords_top_left": batch.get("crop_coords_top_left", torch.zeros(b, 2)),
        "target_size": full,
        "aesthetic_score": batch.get("aesthetic_score", torch.full((b,), 6.0)),  # diffusers' refiner default
    }
    return {k: torch.as_tensor(values[k]).to(device, torch.float32) for k in sd.family.y_inputs}


def _prepare(sd: StableDiffusion, config: TrainConfig, batch: dict[str, Any], draws: Draws) -> dict[str, Any]:
    """A batch -> the objective's inputs: latents (a VAE posterior sample x scale_factor, LDM's
    `get_first_stage_encoding`, unless the data has `latents`), noise (+ offset), t ~ U{0..999}, dropout."""
    if "latents" in batch:
        latents = batch["latents"].to(sd.device, torch.float32)
    else:
        images = batch["image"].to(sd.device)
        posterior = sd.vae.encode(2.0 * images.to(sd.vae.dtype) - 1.0)  # [0, 1] -> [-1, 1]
        eps = draws.randn(*posterior.mean.shape[1:]).to(posterior.mean)
        latents = ((posterior.mean + posterior.std * eps) * sd.scale_factor).float()
    b, f = latents.shape[0], sd.vae.config.downsample_factor
    noise = draws.randn(*latents.shape[1:])
    if config.noise_offset:
        noise = noise + config.noise_offset * draws.randn(latents.shape[1], 1, 1)  # one shift per (sample, channel)
    t = draws.randint(NUM_TRAIN_TIMESTEPS)
    drop = draws.rand() < config.caption_dropout
    size = (latents.shape[-2] * f, latents.shape[-1] * f)
    micro = _micro(sd, batch, size, b, sd.device)
    return {"latents": latents, "noise": noise, "t": t, "captions": batch["caption"], "drop": drop, "micro": micro}


# ---------------------------------------------------------------------------------- train
def _as_model(model: Components) -> StableDiffusion:
    return model if isinstance(model, StableDiffusion) else StableDiffusion(**vars(model))


def _check_model(sd: StableDiffusion, config: TrainConfig) -> None:
    if config.zero_terminal_snr and sd.prediction_type == "epsilon":
        raise ValueError(
            "TrainConfig.zero_terminal_snr: expected a v_prediction model (Lin et al. 2023, sec. 3.2: epsilon is "
            f"undefined at SNR 0), got prediction_type {sd.prediction_type!r}"
        )
    if sd.family.inpainting:
        raise ValueError(f"model: expected a text-to-image U-Net, got the inpainting family {sd.family.name!r}")


def _image_size(sd: StableDiffusion, data: Dataset) -> tuple[int, int]:
    """(height, width) of the training images (read from the first item)."""
    item = data[0]
    if "latents" in item:
        f = sd.vae.config.downsample_factor
        return item["latents"].shape[-2] * f, item["latents"].shape[-1] * f
    return tuple(item["image"].shape[-2:])


def _sample_grid(sd: StableDiffusion, config: TrainConfig, size: tuple[int, int], path: Path) -> None:
    """One image per sample prompt, from the same seed, with the sampling schedule of training."""
    schedule = DiscreteSchedule.scaled_linear(zero_terminal_snr=config.zero_terminal_snr)
    images = sd.generate(list(config.sample_prompts), steps=config.sample_steps, guidance_scale=config.sample_guidance,
                         seed=config.seed, height=size[0], width=size[1], schedule=schedule,
                         timestep_spacing="trailing" if config.zero_terminal_snr else "leading")  # fmt: skip
    save_grid(images, path)


def train(
    model: Components, data: Dataset, config: TrainConfig, out_dir: str | Path, *, resume: bool = True
) -> TrainResult:
    """Train `model`'s U-Net (and text encoder(s), `config.train_text_encoder`) on `data`, in place.

    Args:
        model: a `StableDiffusion` (`minisd.load`, `init_model`) or `checkpoint.Components`, in float32,
            on the device to train on (under torchrun: this process's GPU).
        data: a Dataset of dicts {"image": (3, H, W) in [0, 1], "caption": str}, optionally with
            "original_size" (h, w) and "crop_coords_top_left" (top, left) (SDXL), or "latents"
            (C, h, w) already encoded and scaled instead of "image". One size for all items.
        config: the recipe (`TrainConfig`).
        out_dir: where checkpoint.pt, log.jsonl, samples/*.png and model.safetensors go.
        resume: continue from out_dir/checkpoint.pt when there is one (bit-identical to not stopping).

    Returns a `TrainResult`. The model's modules keep the *trained* weights; `model.safetensors` (the
    official layout, `minisd.save`) and `result.ema` hold the EMA weights (`apply_ema` puts them in).
    """
    sd = _as_model(model)
    _check_model(sd, config)
    trained = {"unet": sd.unet} | ({f"text_encoders.{i}": e for i, e in enumerate(sd.text_encoders)}
                                   if config.train_text_encoder else {})  # fmt: skip
    frozen = [sd.vae] + ([] if config.train_text_encoder else list(sd.text_encoders))
    for m in frozen:
        m.eval().requires_grad_(False)
    for m in trained.values():
        m.requires_grad_(True)
    size = _image_size(sd, data)
    objective = DiffusionObjective(sd, config, training_alphas_cumprod(config.zero_terminal_snr))
    task = Task(trained, objective, lambda batch, draws: _prepare(sd, config, batch, draws),
                lambda path: _sample_grid(sd, config, size, path),
                find_unused_parameters=config.train_text_encoder)  # fmt: skip
    was = sd.unet.gradient_checkpointing
    sd.unet.gradient_checkpointing = config.gradient_checkpointing
    try:
        loop = run_loop(task, data, config, out_dir, resume=resume)
    finally:
        sd.unet.gradient_checkpointing = was
    path = Path(out_dir) / "model.safetensors"
    if _is_main():
        with swapped_weights(trained, loop.ema):
            save(sd, path, overwrite=True)
    return TrainResult(**vars(loop), model_path=path)


def _is_main() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def apply_ema(model: Components | AutoencoderKL, result: TrainResult) -> None:
    """Copy a run's EMA weights into the model it trained (e.g. to sample or save them yourself)."""
    if result.ema is None:
        raise ValueError("result.ema: expected EMA weights (train with ema_decay set), got None")
    modules = {"vae": model} if isinstance(model, AutoencoderKL) else {
        "unet": model.unet, **{f"text_encoders.{i}": e for i, e in enumerate(model.text_encoders)}}  # fmt: skip
    copy_weights({k: modules[k] for k in result.ema}, result.ema)


# ---------------------------------------------------------------------------------- from scratch
@torch.no_grad()
def init_model(
    family: Family | str, *, config: Any = None, seed: int = 0, device: str | torch.device = "cpu"
) -> StableDiffusion:
    """A model of `family` (and `config`'s architecture, as `minisd.load` takes it) with fresh weights,
    drawn from `seed`: PyTorch's default init, the zero-initialised output layers of LDM's U-Net
    (`zero_module` on each ResBlock's last conv, each SpatialTransformer's proj_out and the final conv,
    so every block starts as the identity), and open_clip's `init_parameters` for the text towers."""
    from .checkpoint import apply_config

    fam = apply_config(family_spec(family) if isinstance(family, str) else family, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = UNetModel(fam.unet), AutoencoderKL(fam.vae)
        encoders = [TextTransformer(t.config) for t in fam.text]
        for e in encoders:
            _init_text(e)
    zeroed = [unet.out[-1]] + [m.out_layers[-1] for m in unet.modules() if isinstance(m, ResBlock)]
    zeroed += [m.proj_out for m in unet.modules() if isinstance(m, SpatialTransformer)]
    for layer in zeroed:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    uses = [t.use() for t in fam.text]
    sd = StableDiffusion(fam, unet, vae, encoders, uses, prediction_reason="a new model (init_model)")
    for m in (unet, vae, *encoders):
        m.to(device).eval()
    return sd


def _init_text(e: TextTransformer) -> None:
    """open_clip `TextTransformer.init_parameters` (global RNG, seeded by the caller)."""
    w, layers = e.config.width, max(e.config.layers, 1)
    nn.init.normal_(e.token_embedding.weight, std=0.02)
    nn.init.normal_(e.positional_embedding, std=0.01)
    attn_std, proj_std, fc_std = w**-0.5, (w**-0.5) * (2 * layers) ** -0.5, (2 * w) ** -0.5
    for block in e.transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.zeros_(block.attn.in_proj_bias)
        nn.init.zeros_(block.attn.out_proj.bias)  # nn.MultiheadAttention's init
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    if e.text_projection is not None:
        nn.init.normal_(e.text_projection, std=w**-0.5)


# ---------------------------------------------------------------------------------- the VAE
class VAEObjective(nn.Module):
    """LDM's autoencoder loss without LPIPS and the GAN (`LPIPSWithDiscriminator` with those weights 0):

        L = sum_pixels |x - D(z)| + kl_weight * KL(q(z|x) || N(0, I)),   z ~ q(z|x),

    summed over each sample's pixels (and latent elements) and averaged over the batch, as LDM does,
    so that `kl_weight` = 1e-6 means what it meant there. Images in [-1, 1]."""

    def __init__(self, vae: AutoencoderKL, config: VAETrainConfig) -> None:
        super().__init__()
        self.vae, self.config = vae, config

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """VAE loss of images (B, 3, H, W) in [0, 1], eps for the posterior sample: (loss, {rec, kl, psnr})."""
        x = 2.0 * images - 1.0
        posterior = self.vae.encode(x)
        z = posterior.mean + posterior.std * eps if self.config.sample_posterior else posterior.mean
        err = self.vae.decode(z).float() - x
        rec = err.abs() if self.config.reconstruction == "l1" else err.pow(2)
        # KL of a diagonal Gaussian to N(0, I): 0.5 * sum(mu^2 + var - 1 - log var) (LDM's `kl()`).
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
        loss = (rec.sum(dim=(1, 2, 3)) + self.config.kl_weight * kl.sum(dim=(1, 2, 3))).mean()
        # PSNR of the reconstruction in [0, 1] (err / 2), for the log only.
        psnr = -10.0 * torch.log10((err / 2).pow(2).mean().clamp(min=1e-10))
        return loss, {"rec": rec.mean(), "kl": kl.mean(), "psnr": psnr}


def _vae_prepare(vae: AutoencoderKL, batch: dict[str, Any], draws: Draws) -> dict[str, torch.Tensor]:
    images = batch["image"].to(next(vae.parameters()).device, torch.float32)
    f, c = vae.config.downsample_factor, vae.config.embed_dim
    eps = draws.randn(c, images.shape[-2] // f, images.shape[-1] // f)
    return {"images": images, "eps": eps}


@torch.no_grad()
def _vae_grid(vae: AutoencoderKL, data: Dataset, path: Path) -> None:
    """The first 8 items over their reconstructions (posterior means)."""
    images = torch.stack([data[i]["image"] for i in range(min(8, len(data)))]).to(next(vae.parameters()).device)
    rec = (vae.decode(vae.encode(2 * images - 1).mean).float() + 1) / 2
    save_grid(torch.cat([images.float(), rec]).cpu(), path, columns=len(images))


def train_vae(
    vae: AutoencoderKL, data: Dataset, config: VAETrainConfig, out_dir: str | Path, *, resume: bool = True
) -> TrainResult:
    """Train a KL autoencoder on the "image" of each item (`VAEObjective`), in place, then set
    `vae.config.scale_factor` to 1 / std of its latents (`estimate_scale_factor`, LDM's scale_by_std).

    The module keeps the trained weights; out_dir gets checkpoint.pt, log.jsonl, samples/*.png and
    `vae.safetensors` (EMA weights if any, our names = the official keys less `first_stage_model.`)
    with the architecture in its metadata (`minisd.vae_config`). Returns a `TrainResult`."""
    task = Task({"vae": vae}, VAEObjective(vae, config), lambda batch, draws: _vae_prepare(vae, batch, draws),
                lambda path: _vae_grid(vae, data, path))  # fmt: skip
    vae.requires_grad_(True)
    loop = run_loop(task, data, config, out_dir, resume=resume)
    with swapped_weights({"vae": vae}, loop.ema):
        scale = estimate_scale_factor(vae, data, n=config.scale_samples, seed=config.seed)
        vae.config = dataclasses.replace(vae.config, scale_factor=scale)
        path = Path(out_dir) / "vae.safetensors"
        if _is_main():
            tensors = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
            save_file(tensors, str(path), metadata={"minisd.vae_config": json.dumps(dataclasses.asdict(vae.config))})
    logger.info("VAE latent scale factor: %.5f", scale)
    return TrainResult(**vars(loop), model_path=path, scale_factor=scale)


@torch.no_grad()
def estimate_scale_factor(
    vae: AutoencoderKL, data: Dataset, n: int = 256, *, batch_size: int = 32, seed: int = 0
) -> float:
    """1 / std of the latents of `n` items (the first n): LDM's `scale_by_std`, which sets
    `scale_factor = 1 / z.flatten().std()` from posterior samples z of a batch, so the diffusion
    model sees latents of unit variance. The samples are drawn from `seed`."""
    n = min(n, len(data))
    _check("estimate_scale_factor: n", n >= 2, "at least 2 items", n)
    device, g = next(vae.parameters()).device, derived_generator(seed, "scale_factor")
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, n, batch_size):
        images = torch.stack([data[i]["image"] for i in range(start, min(n, start + batch_size))]).to(device)
        posterior = vae.encode(2.0 * images.to(vae.dtype) - 1.0)
        eps = torch.randn(posterior.mean.shape, generator=g).to(posterior.mean)
        z = (posterior.mean + posterior.std * eps).double()
        total, total_sq, count = total + float(z.sum()), total_sq + float(z.pow(2).sum()), count + z.numel()
    var = (total_sq - total * total / count) / (count - 1)  # unbiased, as torch.std
    return float(var**-0.5)


# ---------------------------------------------------------------------------------- command line
def _config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One --flag per config field (the field's comment is the recipe; docs/training.md has them all)."""
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), str(f.type)
        required = f.default is dataclasses.MISSING
        if kind == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif kind.startswith("tuple[str"):
            group.add_argument(flag, nargs="*", default=f.default, metavar="PROMPT")
        elif kind.startswith("tuple[float"):
            group.add_argument(flag, nargs=2, type=float, default=f.default, metavar="BETA")
        elif kind == "float | None":
            group.add_argument(flag, type=lambda v: None if v.lower() == "none" else float(v), default=f.default,
                               help=f"default {f.default} ('none' turns it off)")  # fmt: skip
        else:
            kw = {"required": True} if required else {"default": f.default, "help": f"default {f.default}"}
            group.add_argument(flag, type={"int": int, "float": float, "str": str}[kind], **kw)


def _parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minisd train",
        description="Train (or fine-tune) a Stable Diffusion model on a folder of images with .txt captions. "
        "Run under `torchrun --nproc_per_node N` for data-parallel training.",
    )
    p.add_argument("data", help="a folder of images with same-named .txt captions")
    p.add_argument("-o", "--out", required=True, help="output folder: checkpoint.pt, log.jsonl, samples/, the model")
    p.add_argument("--stage", choices=["unet", "vae"], default="unet", help="what to train (default: the U-Net)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint to fine-tune (anything minisd.load reads)")
    src.add_argument("--new", metavar="FAMILY", help="start from fresh weights of this family (sd1, sd2-v, sdxl, ...)")
    p.add_argument("--config", help="JSON of a non-standard architecture (as minisd.load's config=)")
    p.add_argument("--size", type=int, help="training image size in pixels (default: the family's)")
    p.add_argument("--center-crop", action="store_true", help="crop the centre instead of at random")
    p.add_argument("--device", help="default: this process's GPU (LOCAL_RANK) if CUDA is there, else the CPU")
    p.add_argument("--no-resume", action="store_true", help="start over even if out/checkpoint.pt exists")
    p.add_argument("-v", "--verbose", action="store_true")
    _config_flags(p, VAETrainConfig if stage == "vae" else TrainConfig)
    return p


def _config(args: argparse.Namespace, cls: type) -> Any:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def main(argv: list[str] | None = None) -> int:
    """`minisd train ...` (see `--help`); returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    # The stage decides which config's flags exist: read it first.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage", choices=["unet", "vae"], default="unet")
    stage = pre.parse_known_args(argv)[0].stage
    args = _parser(stage).parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # torchrun's; the process group starts later, in the loop
    logging.basicConfig(level=logging.INFO if args.verbose or rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        return _run_cli(args, stage)
    except (ValueError, FileNotFoundError) as e:
        print(f"minisd train: error: {e}", file=sys.stderr)
        return 2


def _run_cli(args: argparse.Namespace, stage: str) -> int:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    config = _config(args, VAETrainConfig if stage == "vae" else TrainConfig)  # checked before any work
    if args.new:
        sd = init_model(args.new, config=args.config, seed=args.seed, device=device)
    else:
        sd = load(args.model, device=device, config=args.config)
    size = args.size or sd.family.default_size
    data = ImageCaptionFolder(args.data, size, random_crop=not args.center_crop, seed=config.seed)
    out = Path(args.out)
    if stage == "vae":
        result = train_vae(sd.vae, data, config, out, resume=not args.no_resume)
        sd.family = dataclasses.replace(sd.family, vae=sd.vae.config)  # the record of the new scale factor
        if _is_main():
            save(sd, out / "model.safetensors", overwrite=True)  # the whole model, with the new VAE
    else:
        result = train(sd, data, config, out, resume=not args.no_resume)
    if _is_main():
        print(f"{out / 'model.safetensors'}  ({result.step} steps, {result.steps_per_second:.2f} it/s, "
              f"last loss {result.losses[-1] if result.losses else float('nan'):.4f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
