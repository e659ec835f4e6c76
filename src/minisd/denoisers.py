"""Denoisers and classifier-free guidance: the U-Net seen as D(x, sigma, **cond).

Karras et al. 2022 ("EDM"), Table 1: D(x; sigma) = c_skip x + c_out F(c_in x; t(sigma)),
with sigma_data = 1 for Stable Diffusion's latents. The prediction type (epsilon or v)
lives here and nowhere else; the samplers (`minisd.samplers`) only ever see D.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from minisd.schedules import DiscreteSchedule

Denoiser = Callable[..., torch.Tensor]  # D(x, sigma, **cond) -> denoised x, sigma of shape (B,)
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ----------------------------------------------------------------------------------
# Denoisers
# ----------------------------------------------------------------------------------


def denoiser_scalings(sigma: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) with D(x) = c_skip x + c_out F(c_in x), sigma_data = 1.

    Karras et al. 2022, Table 1, for a DDPM in VE form: c_in = 1 / sqrt(sigma^2 + 1)
    turns x into the DDPM's unit-variance input sqrt(alphabar) x.
      - "epsilon" (F predicts the noise):  c_skip = 1, c_out = -sigma.
      - "v_prediction" (F predicts v = sqrt(alphabar) n - sqrt(1-alphabar) x0,
        Salimans & Ho 2022): c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    c_in = 1 / (sigma**2 + 1) ** 0.5
    if prediction_type == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in
    return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5, c_in


@dataclass(frozen=True, eq=False)
class DiscreteDenoiser:
    """D(x, sigma, **cond) for a discrete-time DDPM model such as the SD U-Net.

    The model is called as `model(c_in * x, t, **cond)` with t = schedule.sigma_to_t(sigma)
    (fp32, fractional between table entries, as k-diffusion and diffusers' Euler-type
    schedulers do; integer for the spaced schedules). `quantize=True` rounds t to the
    nearest trained timestep, which is what diffusers' DPMSolverMultistepScheduler does
    with Karras sigmas (`compat.quantize_timesteps`). `model_dtype` (e.g. torch.float16)
    is the dtype of the model's input; its output is cast back to x's dtype (the
    conditioning tensors are passed as given). The prediction type lives here only.
    """

    model: Callable[..., torch.Tensor]
    schedule: DiscreteSchedule
    prediction_type: str = "epsilon"
    quantize: bool = False
    model_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    def scalings(self, sigma: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`denoiser_scalings` shaped (B, 1, ..., 1) to broadcast against a ndim-D x."""
        shape = (-1,) + (1,) * (ndim - 1)
        return tuple(c.reshape(shape) for c in denoiser_scalings(sigma, self.prediction_type))

    def model_output(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """The raw model prediction F (eps or v) at (x, sigma), in x's dtype."""
        _, _, c_in = self.scalings(sigma, x.ndim)
        t = self.schedule.sigma_to_t(sigma, quantize=self.quantize)
        x_in = (x * c_in).to(self.model_dtype or x.dtype)
        return self.model(x_in, t, **cond).to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, _ = self.scalings(sigma, x.ndim)
        return c_skip * x + c_out * self.model_output(x, sigma, **cond)


def rescale_guidance(guided: torch.Tensor, cond_output: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, Section 3.4, eqs. 15-16; diffusers' `rescale_noise_cfg`).

    x_rescaled = x_cfg * std(x_pos) / std(x_cfg)  (per sample), then
    x_final = phi * x_rescaled + (1 - phi) * x_cfg.
    """
    dims = list(range(1, guided.ndim))
    std_pos = cond_output.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    return phi * (guided * (std_pos / std_cfg)) + (1 - phi) * guided


def cfg_denoiser(
    denoiser: DiscreteDenoiser,
    cond: Mapping[str, torch.Tensor],
    uncond: Mapping[str, torch.Tensor],
    scale: float,
    rescale: float = 0.0,
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022) wrapped around a denoiser.

    Each call runs the model ONCE on the batch [uncond, cond] (diffusers' order; every
    conditioning tensor is concatenated along the batch axis) and combines the outputs

        F = F_uncond + scale * (F_cond - F_uncond),

    optionally followed by `rescale_guidance(F, F_cond, rescale)`. Guidance is applied to
    the model output F (eps or v) as diffusers does; since D is affine in F with
    weights summing to one, this is the same as guiding D, but the rescale's standard
    deviations are those of F. Returns D(x, sigma) for the samplers.
    """
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale: expected a value in [0, 1], got {rescale}")
    for key in cond:
        if cond[key].shape != uncond[key].shape:
            raise ValueError(f"cond[{key!r}] has shape {tuple(cond[key].shape)}, uncond {tuple(uncond[key].shape)}")
    cond_in = {key: torch.cat([uncond[key], cond[key]]) for key in cond}

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        for key, value in cond.items():
            if value.shape[0] != x.shape[0]:
                raise ValueError(f"cond[{key!r}] has batch {value.shape[0]}, x has batch {x.shape[0]}")
        out_uncond, out_cond = denoiser.model_output(torch.cat([x, x]), torch.cat([sigma, sigma]), **cond_in).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:
            out = rescale_guidance(out, out_cond, rescale)
        c_skip, c_out, _ = denoiser.scalings(sigma, x.ndim)
        return c_skip * x + c_out * out

    return guided
