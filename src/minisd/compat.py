"""Choices minisd makes only to reproduce diffusers' results for the same seed; each with a one-line reason.

The algorithm lives elsewhere; this is the compatibility. Each item is a small
function or constant that the algorithm's code calls where it has a choice to make;
tests/test_samplers.py checks each against diffusers' own schedulers.

Not here, because the math needs them where they are (compat imports `schedules`, so
`schedules` cannot import compat):
- `schedules.TIMESTEP_RULES`: diffusers' three formulas for each timestep spacing;
  which sampler follows which is `samplers.SAMPLERS`.
- `schedules.ZERO_SNR_ALPHABAR`: diffusers' finite stand-in (2**-24) for a zero
  terminal alphabar, which the VE form cannot hold.

Where minisd does NOT copy diffusers (docs/samplers.md has the list): DDIMScheduler
steps to t - T // steps, and DPMSolverMultistep truncates exponential schedules'
fractional timesteps.
"""

from __future__ import annotations

import torch

from minisd.schedules import TIMESTEP_RULES, DiscreteSchedule
from minisd.schedules import init_noise_sigma as _init_noise_sigma


def _check_rule(rule: str) -> None:
    if rule not in TIMESTEP_RULES:
        raise ValueError(f"rule: expected one of {TIMESTEP_RULES}, got {rule!r}")


# ----------------------------------------------------------------------------------
# ## samplers and schedules
# ----------------------------------------------------------------------------------


def init_noise_sigma(sigmas: torch.Tensor, rule: str, spacing: str) -> float:
    """Scale of the first latent (VE form) of a text-to-image run with `sigmas`.

    Reason: diffusers' DDIM / DPM-Solver start from a unit-variance VP latent
    (`init_noise_sigma = 1`); its Euler-type schedulers do so only for "leading"
    spacing and start from sigma_max otherwise (their `init_noise_sigma` property).
    """
    _check_rule(rule)
    return _init_noise_sigma(sigmas, variance_preserving=rule != "euler" or spacing == "leading")


def final_sigma(rule: str) -> str:
    """Where a schedule ends: "sigma_min" for the "ddim" rule, "zero" otherwise (`schedules.FINAL_SIGMAS`).

    Reason: DDIMScheduler (and PNDM) with `set_alpha_to_one=False`, as in every official
    SD config, take their last step to alphabar_0 = alphabar(t=0), not to the clean sample.
    """
    _check_rule(rule)
    return "sigma_min" if rule == "ddim" else "zero"


def sigma_range(rule: str, schedule: DiscreteSchedule, spaced_sigmas: torch.Tensor) -> tuple[float, float]:
    """(sigma_min, sigma_max) that a Karras or exponential schedule spans.

    Reason: diffusers' DPMSolverMultistep spans the whole training table; its Euler-type
    schedulers span the spaced timesteps' sigmas (`spaced_sigmas`, ending in 0), whose
    ends depend on the spacing.
    """
    _check_rule(rule)
    if rule == "dpm_solver":
        return schedule.sigma_min, schedule.sigma_max
    return float(spaced_sigmas[-2]), float(spaced_sigmas[0])


def quantize_timesteps(rule: str, sigma_schedule: str) -> bool:
    """Whether the denoiser rounds t(sigma) to the nearest trained timestep (`DiscreteDenoiser.quantize`).

    Reason: DPMSolverMultistep with Karras sigmas rounds their fractional timesteps
    (`_sigma_to_t(...).round()`) and so calls the model at other sigmas than it steps
    between; the Euler-type schedulers keep them fractional.
    """
    _check_rule(rule)
    return rule == "dpm_solver" and sigma_schedule == "karras"


# ----------------------------------------------------------------------------------
# ## pipelines
# ----------------------------------------------------------------------------------


def draw_unused_masked_image(
    generator: torch.Generator, images: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, dtype: torch.dtype
) -> None:
    """Advance `generator` as diffusers' 4-channel inpainting does, by one unused posterior draw.

    Reason: StableDiffusionInpaintPipeline encodes the masked image for 4-channel U-Nets too
    (a VAE posterior sample of shape (max(images, masks), 4, h, w) in the VAE's dtype) and then
    drops it; drawing the same amount keeps every later draw (ancestral and SDE step noise)
    in step with diffusers for the same seed.
    """
    draw = (max(images.shape[0], masks.shape[0]), *known.shape[1:])
    torch.randn(draw, generator=generator, device=generator.device, dtype=dtype)
