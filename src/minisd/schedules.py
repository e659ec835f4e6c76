"""Noise schedules of the discrete-time DDPM models (SD 1.x, 2.x, XL).

Every Stable Diffusion U-Net was trained as a discrete DDPM (Ho et al. 2020) with
T = 1000 timesteps and the "scaled linear" betas. minisd samples in the
variance-exploding (VE) form of Karras et al. 2022 (k-diffusion's convention):

    x = x0 + sigma * n,   sigma_t = sqrt((1 - alphabar_t) / alphabar_t),

which is the DDPM's variance-preserving (VP) latent divided by sqrt(alphabar_t):
x_vp = x / sqrt(sigma^2 + 1). `to_variance_preserving` / `from_variance_preserving`
convert between the two (diffusers' DDIM and DPM-Solver work in VP form).

This file holds the pure schedule math:

- `scaled_linear_betas`, `rescale_zero_terminal_snr`, `ddpm_alphas_cumprod`: the
  training schedule, computed in float64 as the official LDM / sgm code does.
- `DiscreteSchedule`: the table sigma_t, t = 0..T-1, and k-diffusion's
  `DiscreteSchedule.sigma_to_t` / `t_to_sigma` (log-sigma interpolation).
- Sigma schedules for sampling, all fp32, decreasing, ending in the final sigma
  (0 unless asked otherwise): `discrete_sigmas` (diffusers' "linspace" /
  "leading" / "trailing" timestep spacings), `karras_sigmas`, `exponential_sigmas`.
- Where sampling starts: `init_noise_sigma` (text-to-image), `img2img_sigmas`
  (diffusers' `strength`), `split_sigmas` (SDXL's `denoising_end` / `denoising_start`).

Sigma-to-timestep conversions run on the CPU in float64, so that a sigma read from
the table maps back to exactly its integer timestep; the results are fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

# The official SD1/SD2/SDXL training schedule: `linear_start`, `linear_end` and
# `timesteps` of v1-inference.yaml / v2-inference.yaml / sd_xl_base.yaml.
NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012

SPACINGS = ("leading", "linspace", "trailing")
# Timestep rules: diffusers computes the same spacing names with three slightly
# different formulas, one per group of schedulers (`samplers.SAMPLERS` says which
# sampler follows which):
# - "euler":      EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete, LMSDiscrete,
#                 DPMSolverSDE ("linspace" keeps fractional timesteps);
# - "ddim":       DDIM, PNDM ("linspace" is rounded to integers);
# - "dpm_solver": DPMSolverMultistep ("linspace" and "leading" lay out steps + 1
#                 timesteps and drop the last, the one nearest t = 0).
TIMESTEP_RULES = ("euler", "ddim", "dpm_solver")
FINAL_SIGMAS = ("zero", "sigma_min")

# diffusers' stand-in for the terminal alphabar of a zero-terminal-SNR schedule, which
# is exactly 0 (sigma = inf): "FP16 smallest positive subnormal" (2**-24), sigma ~ 4096.
ZERO_SNR_ALPHABAR = 2.0**-24


# ----------------------------------------------------------------------------------
# Training schedule
# ----------------------------------------------------------------------------------


def scaled_linear_betas(
    beta_start: float = BETA_START, beta_end: float = BETA_END, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> torch.Tensor:
    """The "scaled linear" betas of latent diffusion, float64: linear in sqrt(beta).

    Reproduces ldm/sgm `make_beta_schedule("linear", ...)`, which builds the ramp in
    float64 (`torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64)**2`).
    """
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1).

    sqrt(alphabar) is shifted so that its last value is 0 and scaled so that its first
    value is unchanged; the betas are then read back from the new alphabar.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    # Undo the cumulative product: alpha_t = alphabar_t / alphabar_{t-1}.
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def ddpm_alphas_cumprod(
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    *,
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """alphabar_t = prod_{s<=t} (1 - beta_s), computed in float64 and returned as float64.

    The official checkpoints store this (cast to fp32) as the `alphas_cumprod` buffer.
    With `zero_terminal_snr` the last value is exactly 0. diffusers computes the same
    product in fp32, which differs by up to ~1e-6 relative.
    """
    betas = scaled_linear_betas(beta_start, beta_end, num_train_timesteps)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The noise levels sigma_t of a discrete DDPM, t = 0 .. T-1 (increasing).

    Build it with `DiscreteSchedule.scaled_linear()` (the SD schedule) or
    `DiscreteSchedule.from_alphas_cumprod(...)` (e.g. a checkpoint's buffer).
    """

    sigmas: torch.Tensor  # (T,) fp32, on the CPU
    _device_cache: dict = field(default_factory=dict, init=False, repr=False)  # device -> log sigmas (float64)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> DiscreteSchedule:
        """sigma_t = sqrt((1 - alphabar_t) / alphabar_t), computed in float64, stored fp32.

        A terminal alphabar of exactly 0 (zero terminal SNR) becomes 2**-24 first, as in
        diffusers' Euler / DPM-Solver schedulers, so that sigma_max ~ 4096 is finite.
        """
        a = alphas_cumprod.detach().to("cpu", torch.float64).clone()
        if a.ndim != 1 or a.numel() < 2:
            raise ValueError(f"alphas_cumprod: expected a 1-D tensor with >= 2 entries, got shape {tuple(a.shape)}")
        if a[-1] == 0:
            a[-1] = ZERO_SNR_ALPHABAR
        if not bool(((a > 0) & (a < 1)).all()):
            raise ValueError("alphas_cumprod: expected values in (0, 1)")
        return cls(sigmas=((1.0 - a) / a).sqrt().to(torch.float32))

    @classmethod
    def scaled_linear(
        cls,
        beta_start: float = BETA_START,
        beta_end: float = BETA_END,
        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
        *,
        zero_terminal_snr: bool = False,
    ) -> DiscreteSchedule:
        """The schedule of every official SD1/SD2/SDXL model (sgm `LegacyDDPMDiscretization`)."""
        return cls.from_alphas_cumprod(
            ddpm_alphas_cumprod(beta_start, beta_end, num_train_timesteps, zero_terminal_snr=zero_terminal_snr)
        )

    @property
    def num_train_timesteps(self) -> int:
        """The number of training timesteps (sigmas)."""
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        """The smallest sigma (the first timestep's)."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """The largest sigma (the last timestep's)."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor, *, quantize: bool = False) -> torch.Tensor:
        """Fractional timestep of each sigma: linear interpolation in log sigma.

        Same as k-diffusion's `DiscreteSchedule.sigma_to_t` and diffusers' `_sigma_to_t`,
        but in float64, so sigma_to_t(sigmas[t]) == t exactly. `quantize` returns the
        nearest timestep in log sigma, which equals diffusers' `round()` of the
        interpolated t (DPMSolverMultistep with Karras sigmas). Returns fp32 on
        sigma's device.
        """
        # In float64 on sigma's own device (the CPU where the device has no float64, e.g. MPS): no
        # device-to-host copy, so a sampling loop on a GPU never waits here for the GPU to catch up.
        device = sigma.device if sigma.device.type != "mps" else torch.device("cpu")
        log_sigmas = self._log_sigmas(device)  # (T,)
        log_sigma = sigma.detach().to(device, torch.float64).reshape(-1).log()  # (N,)
        dists = log_sigma - log_sigmas[:, None]  # (T, N)
        if quantize:
            t = dists.abs().argmin(dim=0).double()
        else:
            # Index of the last table entry at or below sigma, kept inside [0, T-2].
            low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.numel() - 2)
            high_idx = low_idx + 1
            low, high = log_sigmas[low_idx], log_sigmas[high_idx]
            w = ((low - log_sigma) / (low - high)).clamp(0, 1)
            t = (1 - w) * low_idx + w * high_idx
        return t.reshape(sigma.shape).to(device=sigma.device, dtype=torch.float32)

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        """log sigma_t in float64 on `device`, copied there once (a host-to-device copy waits for the
        device's queue, so it must not happen at every step)."""
        if device not in self._device_cache:
            self._device_cache[device] = self.sigmas.double().log().to(device)
        return self._device_cache[device]

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (fractional) timesteps: k-diffusion's `t_to_sigma` (log-sigma lerp), fp32."""
        t = t.detach().to("cpu", torch.float64)
        if bool(((t < 0) | (t > self.num_train_timesteps - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], got {t.tolist()}")
        log_sigmas = self.sigmas.double().log()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t - t.floor()
        log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
        return log_sigma.exp().to(torch.float32)


# ----------------------------------------------------------------------------------
# Sampling schedules (fp32, decreasing, ending in the final sigma)
# ----------------------------------------------------------------------------------


def _check_steps(steps: int, num_train_timesteps: int | None = None) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if num_train_timesteps is not None and steps > num_train_timesteps:
        raise ValueError(f"steps: expected at most num_train_timesteps={num_train_timesteps}, got {steps}")


def discrete_timesteps(
    steps: int,
    spacing: str = "leading",
    *,
    steps_offset: int = 1,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    rule: str = "euler",
) -> torch.Tensor:
    """The `steps` decreasing timesteps diffusers' `set_timesteps` picks, float64.

    spacing (Lin et al. 2023, Table 2, with diffusers' formulas; r = T // steps):
      - "leading":  r * [steps-1, ..., 1, 0] + steps_offset. The official SD configs
                    use it with steps_offset=1 (LDM's DDIM: `range(0, T, r)) + 1`).
      - "linspace": `linspace(0, T-1, steps)` reversed ("euler" keeps it fractional,
                    "ddim" rounds it).
      - "trailing": `round(arange(T, 0, -T/steps)) - 1`.
    rule: which diffusers formula variant, see `TIMESTEP_RULES` ("dpm_solver" lays
    out steps + 1 points for "linspace"/"leading" and drops the one nearest 0).
    The arithmetic is numpy's, as in diffusers, so the rounding is identical.
    """
    _check_steps(steps, num_train_timesteps)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {SPACINGS}, got {spacing!r}")
    if rule not in TIMESTEP_RULES:
        raise ValueError(f"rule: expected one of {TIMESTEP_RULES}, got {rule!r}")
    T = num_train_timesteps
    if rule == "dpm_solver" and spacing != "trailing":
        # DPMSolverMultistepScheduler.set_timesteps: steps + 1 points, the last dropped.
        if spacing == "linspace":
            t = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
        else:
            t = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "linspace" and rule == "ddim":
        t = np.linspace(0, T - 1, steps).round()[::-1]
    elif spacing == "linspace":
        # Euler-type schedulers keep these fp32 and fractional (`dtype=np.float32`).
        t = np.linspace(0, T - 1, steps, dtype=np.float32)[::-1]
    elif spacing == "leading":
        t = (np.arange(0, steps) * (T // steps)).round()[::-1] + steps_offset
    else:  # trailing
        t = np.round(np.arange(T, 0, -T / steps)) - 1
    t = torch.from_numpy(np.array(t, dtype=np.float64))  # a copy: [::-1] views have negative strides
    if t.numel() != steps or bool(((t < 0) | (t > T - 1)).any()):
        raise ValueError(f"{spacing!r} spacing with steps={steps}, steps_offset={steps_offset} gives {t.tolist()}")
    return t


def _append_final(sigmas: torch.Tensor, final: float) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float32), torch.tensor([final], dtype=torch.float32)])


def _final_sigma(schedule: DiscreteSchedule, final_sigma: str) -> float:
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"final_sigma: expected one of {FINAL_SIGMAS}, got {final_sigma!r}")
    return 0.0 if final_sigma == "zero" else schedule.sigma_min


def discrete_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    spacing: str = "leading",
    *,
    steps_offset: int = 1,
    rule: str = "euler",
    final_sigma: str = "zero",
) -> torch.Tensor:
    """The model's own noise levels at `discrete_timesteps(...)`, then the final sigma.

    Integer timesteps (every spacing except fractional "linspace") give diffusers'
    `scheduler.sigmas` bit for bit. For fractional timesteps sigma is interpolated in
    log sigma (k-diffusion), so the denoiser's `sigma_to_t` returns exactly diffusers'
    timesteps; diffusers' `np.interp` interpolates sigma linearly instead, which
    differs by < 1e-4 relative.

    final_sigma: "zero" (the sampler ends on the clean sample) or "sigma_min" (it ends
    at sigma_0 = sigma(t=0); DDIM with `set_alpha_to_one=False`, as the official SD
    configs and LDM's DDIM sampler do, see `compat.final_sigma`).
    """
    t = discrete_timesteps(
        steps, spacing, steps_offset=steps_offset, num_train_timesteps=schedule.num_train_timesteps, rule=rule
    )
    final = _final_sigma(schedule, final_sigma)
    if final_sigma == "sigma_min" and t[-1] == 0:
        # DDIM with "linspace" spacing already ends at t = 0; diffusers' last step, from
        # sigma(0) to sigma(0), changes nothing and is left out (schedules strictly decrease).
        return schedule.t_to_sigma(t)
    return _append_final(schedule.t_to_sigma(t), final)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
    then 0. Float64 ramp (numpy, as diffusers), fp32 result."""
    _check_steps(steps)
    ramp = np.linspace(0, 1, steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return _append_final(torch.from_numpy(sigmas), 0.0)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Noise levels evenly spaced in log sigma from sigma_max to sigma_min, then 0 (k-diffusion)."""
    _check_steps(steps)
    sigmas = np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), steps))
    return _append_final(torch.from_numpy(sigmas), 0.0)


# ----------------------------------------------------------------------------------
# Where sampling starts and ends
# ----------------------------------------------------------------------------------


def to_variance_preserving(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """VE sample x = x0 + sigma n  ->  DDPM latent sqrt(alphabar) x = x / sqrt(sigma^2 + 1)."""
    return x / math.sqrt(sigma**2 + 1)


def from_variance_preserving(x_vp: torch.Tensor, sigma: float) -> torch.Tensor:
    """DDPM latent x_vp at noise level sigma -> VE sample x_vp * sqrt(sigma^2 + 1)."""
    return x_vp * math.sqrt(sigma**2 + 1)


def init_noise_sigma(sigmas: torch.Tensor, *, variance_preserving: bool) -> float:
    """Scale of the first latent, x = noise * init_noise_sigma, in the VE form.

    - `variance_preserving=True`: sqrt(sigma_0^2 + 1), the start of a unit-variance
      VP latent (sgm, ComfyUI). It is the true standard deviation of x at sigma_0
      when the data has unit variance.
    - `variance_preserving=False`: sigma_0 (k-diffusion, A1111).

    Which one a diffusers scheduler uses is `compat.init_noise_sigma`.
    """
    sigma_0 = float(sigmas[0])
    return math.sqrt(sigma_0**2 + 1) if variance_preserving else sigma_0


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first sigma that img2img runs, as diffusers' `get_timesteps`:

        init_timestep = min(int(steps * strength), steps)
        t_start = max(steps - init_timestep, 0)

    The pipeline noises the encoded image to sigmas[t_start] (x = x0 + sigma n, what
    every diffusers scheduler's `add_noise` is in VE form) and samples sigmas[t_start:].
    """
    _check_steps(steps)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength: expected a value in [0, 1], got {strength}")
    init_timestep = min(int(steps * strength), steps)
    if init_timestep == 0:
        raise ValueError(f"strength={strength} with steps={steps} leaves no step to run (int(steps * strength) == 0)")
    return max(steps - init_timestep, 0)


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a sigma schedule that img2img runs at `strength`: sigmas[img2img_start(...):]."""
    return sigmas[img2img_start(sigmas.numel() - 1, strength) :]


def split_sigmas(schedule: DiscreteSchedule, sigmas: torch.Tensor, denoising_fraction: float) -> int:
    """Where SDXL's base hands over to the refiner (`denoising_end` / `denoising_start`).

    diffusers' cut-off rule: cutoff = int(round(T - fraction * T)); the base runs the
    steps whose timestep is >= cutoff and the refiner those below. Returns k such that
    the base samples sigmas[:k+1] (ending, noisy, at sigmas[k]) and the refiner
    sigmas[k:] (from that latent, without adding noise). Timesteps are read back with
    `schedule.sigma_to_t`, exact for integer timesteps.

    This equals diffusers for every first-order and multistep sampler. For Heun, diffusers'
    base stops after the Euler predictor of step k-1 and its refiner repeats step k-1
    (the "+1" in `get_timesteps`); minisd's Heun keeps whole steps instead.
    """
    if not 0.0 < denoising_fraction < 1.0:
        raise ValueError(f"denoising fraction: expected a value in (0, 1), got {denoising_fraction}")
    T = schedule.num_train_timesteps
    cutoff = int(round(T - denoising_fraction * T))
    timesteps = schedule.sigma_to_t(sigmas[:-1])
    return int((timesteps >= cutoff).sum())
