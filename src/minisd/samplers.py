"""Samplers, as pure functions over a denoiser (k-diffusion's convention).

    sample_x(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x

x = x0 + sigma * n in the variance-exploding form; sigmas is a decreasing fp32 schedule
(`minisd.schedules`); the denoiser is D(x, sigma) (`minisd.denoisers`). There is no
scheduler object: a sampler's whole state is local to its loop. `SAMPLERS` names each
sampler after the diffusers scheduler it reproduces, and `plan_sampler` sets one up.
The conventions (dtypes, the callback contract), the table of names and the update
equations are in docs/samplers.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minisd import compat
from minisd.denoisers import Denoiser
from minisd.schedules import DiscreteSchedule, discrete_sigmas, exponential_sigmas, karras_sigmas

# callback({"i", "x", "sigma", "sigma_next", "denoised"}) once per step, after its first denoiser
# call; returning False stops the sampler, which returns that step's "denoised" (docs/samplers.md).
Callback = Callable[[dict], bool | None]
Sampler = Callable[..., torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]  # (sigma, sigma_next) -> N(0, 1) noise shaped like x

# ----------------------------------------------------------------------------------
# Shared pieces of the samplers
# ----------------------------------------------------------------------------------


def _sigma_list(sigmas: torch.Tensor) -> list[float]:
    """The schedule as Python floats, checked: 1-D, >= 2 entries, strictly decreasing, >= 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas: expected a 1-D schedule with >= 2 entries, got shape {tuple(sigmas.shape)}")
    values = sigmas.tolist()
    if any(b >= a for a, b in zip(values, values[1:])) or values[-1] < 0:
        raise ValueError(f"sigmas: expected strictly decreasing values >= 0, got {values}")
    return values


def _batch_sigma(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (as diffusers' `randn_tensor`)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _cancelled(
    callback: Callback | None, i: int, x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor
) -> bool:
    if callback is None:
        return False
    info = {"i": i, "x": x, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised}
    return callback(info) is False


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step from sigma to sigma_next.

    The DDPM posterior q(x_{t-1} | x_t, x0) in VE form has standard deviation
    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2); eta scales it
    (DDIM's eta, Song et al. 2021, eq. 16). The deterministic part moves to
    sigma_down = sqrt(sigma_next^2 - sigma_up^2), so that sigma_down^2 + sigma_up^2 = sigma_next^2.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


# ----------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12), written in sigma space.

    With x_t = x_vp / sqrt(alphabar_t) and sigma_t = sqrt((1 - alphabar_t) / alphabar_t),
    eq. 12 divided by sqrt(alphabar_{t-1}) reads

        x_next = x0_hat + sqrt(sigma_next^2 - sigma_up^2) * eps_hat + sigma_up * z,

    with x0_hat = D(x, sigma), eps_hat = (x - x0_hat) / sigma and sigma_up the eq. 16
    standard deviation over sqrt(alphabar_{t-1}) (`ancestral_step`). eta = 0 is the
    deterministic DDIM (and equals Euler's method); eta = 1 is DDPM's ancestral sampler.
    One noise draw per step from `generator`, as diffusers' DDIMScheduler.
    """
    schedule = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if eta > 0 and sigma_next > 0:
            x = x + sigma_up * _randn_like(x, generator)
    return x


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.

    Karras et al. 2022, Algorithm 2 with S_churn = 0 and Euler steps (Algorithm 1 without
    its correction). No noise is added, so `generator` is unused; it is accepted so that
    every sampler has the same signature.
    """
    schedule = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        d = (x - denoised) / sigma
        x = x + d * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling with Euler steps (k-diffusion `sample_euler_ancestral`).

    Each step takes an Euler step down to sigma_down and adds fresh noise of standard
    deviation sigma_up (`ancestral_step`), landing at sigma_next. With eta = 1 this is
    DDPM's ancestral sampler (Ho et al. 2020) in VE form.
    """
    schedule = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + d * (sigma_down - sigma)
        if sigma_next > 0:
            x = x + sigma_up * _randn_like(x, generator)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method, Karras et al. 2022, Algorithm 1 (= Algorithm 2 with S_churn = 0).

    An Euler step to sigma_next, then the trapezoidal correction with the slope
    d' = (x_next - D(x_next; sigma_next)) / sigma_next; the last step (to sigma = 0) is
    plain Euler. Two denoiser calls per step but the last.
    """
    schedule = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        d = (x - denoised) / sigma
        dt = sigma_next - sigma
        x_next = x + d * dt
        if sigma_next > 0:
            denoised_next = denoiser(x_next, _batch_sigma(x, sigma_next))
            d_prime = (x_next - denoised_next) / sigma_next
            x_next = x + (d + d_prime) / 2 * dt
        x = x_next
    return x


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial l_j through
    sigma_i, sigma_{i-1}, ..., sigma_{i-order+1} (l_j = 1 at sigma_{i-j}).

    diffusers and k-diffusion integrate it numerically with `scipy.integrate.quad`; the
    integrand is a polynomial of degree order-1, so minisd expands it and integrates
    it exactly (in float64, in the variable u = tau - sigma_i to avoid cancellation).
    """
    if not 0 <= j < order <= i + 1:
        raise ValueError(f"LMS coefficient needs 0 <= j < order <= i + 1, got i={i}, j={j}, order={order}")
    poly = [1.0]  # coefficients of l_j(sigma_i + u), lowest degree first
    for k in range(order):
        if k == j:
            continue
        root = sigmas[i - k] - sigmas[i]
        scale = sigmas[i - j] - sigmas[i - k]
        # poly <- poly * (u - root) / scale
        u_times_poly = [0.0] + poly
        root_times_poly = [root * c for c in poly] + [0.0]
        poly = [(a - b) / scale for a, b in zip(u_times_poly, root_times_poly)]
    h = sigmas[i + 1] - sigmas[i]
    return sum(c * h ** (m + 1) / (m + 1) for m, c in enumerate(poly))


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 4,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Linear multistep method on the probability-flow ODE (k-diffusion `sample_lms`).

    x_{i+1} = x_i + sum_j c_ij d_{i-j}, with d the ODE slopes (x - D) / sigma of the last
    `order` steps and c_ij the integrated Lagrange coefficients (`lms_coefficient`); the
    order ramps up 1, 2, ... over the first steps (an Adams-Bashforth method in sigma).
    """
    if order < 1:
        raise ValueError(f"order: expected an integer >= 1, got {order}")
    schedule = _sigma_list(sigmas)
    slopes: list[torch.Tensor] = []
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        slopes = (slopes + [(x - denoised) / sigma])[-order:]
        cur_order = len(slopes)
        coeffs = [lms_coefficient(schedule, i, j, cur_order) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(slopes)))
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2; k-diffusion `sample_dpmpp_2m`).

    In lambda = -log(sigma) (half the log-SNR), with h = lambda_next - lambda:

        x_next = (sigma_next / sigma) x - expm1(-h) D_hat,
        D_hat = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h_i,

    a multistep data-prediction solver; the first step and the step to sigma = 0 are
    first order (D_hat = D_i; the latter gives x_next = D_i). `generator` is unused.
    """
    schedule = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        if old_denoised is None:
            denoised_hat = denoised
        else:
            r = h_last / h
            denoised_hat = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_hat
        old_denoised, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022; k-diffusion `sample_dpmpp_2m_sde`).

    The SDE counterpart of `sample_dpmpp_2m`: with h = lambda_next - lambda and eta_h = eta h,

        x_next = (sigma_next / sigma) e^(-eta_h) x + (1 - e^(-h - eta_h)) D_i
                 + 1/2 (1 - e^(-h - eta_h)) (D_i - D_{i-1}) / r
                 + sigma_next sqrt(1 - e^(-2 eta_h)) z,

    the second line from the second step on (r = h_{i-1} / h_i). eta = 1 is diffusers'
    DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"). z is drawn once per
    step from `generator` (k-diffusion defaults to a Brownian tree instead).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    schedule = _sigma_list(sigmas)
    old_denoised, h_last = None, None
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        eta_h = eta * h
        weight = -math.expm1(-h - eta_h)  # 1 - e^(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + weight * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x + (0.5 * weight / r) * (denoised - old_denoised)
        if eta > 0:
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * _randn_like(x, generator)
        old_denoised, h_last = denoised, h
    return x


def _brownian_pair(
    x: torch.Tensor, sigma: float, sigma_s: float, sigma_next: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_1, z_2): increments of one Brownian motion W, in the time variable sigma, over
    [sigma_s, sigma] and [sigma_next, sigma], each divided by the square root of its length.

    W(sigma_s) - W(sigma) and W(sigma_next) - W(sigma_s) are independent normals, so
    z_2 = (sqrt(sigma - sigma_s) z_1 + sqrt(sigma_s - sigma_next) z') / sqrt(sigma - sigma_next):
    each z is N(0, 1), correlated as the references' Brownian tree makes them.
    """
    z_1 = _randn_like(x, generator)
    z_rest = _randn_like(x, generator)
    gap = max(sigma_s - sigma_next, 0.0)  # r = 1: sigma_s is sigma_next, up to round-off of either sign
    z_2 = (math.sqrt(sigma - sigma_s) * z_1 + math.sqrt(gap) * z_rest) / math.sqrt(sigma - sigma_next)
    return z_1, z_2


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> torch.Tensor:
    """DPM-Solver++ SDE: single-step 2nd-order DPM-Solver++ with ancestral noise
    (k-diffusion `sample_dpmpp_sde`; diffusers' DPMSolverSDEScheduler with r = 1/2, eta = 1).

    DPM-Solver++(2S) (Lu et al. 2022, "DPM-Solver++", Algorithm 1) in lambda = -log(sigma),
    h = lambda_next - lambda, whose two first-order updates are made ancestral: each
    x' = (sigma_down / sigma) x + (1 - sigma_down / sigma) D + s_noise sigma_up z, with
    (sigma_down, sigma_up) = `ancestral_step(sigma, target, eta)`:

        1. to sigma_s = e^(-(lambda + r h)) (r = 1/2: sqrt(sigma sigma_next)), with D = D_i = D(x; sigma),
           giving u;
        2. again from x, to sigma_next, with D = (1 - 1/(2r)) D_i + 1/(2r) D(u; sigma_s)
           (for r = 1/2 just D(u; sigma_s): the exponential midpoint rule).

    The step to sigma = 0 is an Euler step (x_next = D_i). Two denoiser calls per step
    but the last. eta = 0 removes the noise and gives DPM-Solver++(2S) itself.

    Noise: z_1 and z_2 are the increments of one Brownian motion W(sigma) over
    [sigma_s, sigma] and [sigma_next, sigma], each divided by the square root of its
    length: N(0, 1) each, and correlated, since the second interval contains the first
    (increments of different steps are independent). k-diffusion and diffusers read them
    from a seeded Brownian tree (torchsde); by default minisd draws them from `generator`
    (two draws per step, `_brownian_pair`) with exactly that joint law. All the tree adds
    is that its path is fixed by the seed whatever the schedule, so that runs with
    different step counts see the same Brownian path. The correlation itself matters:
    with independent z_1, z_2 the sampler still converges, but far more slowly (over ten
    times the error in the standard deviation of Gaussian data at 50 steps, see
    tests/test_samplers.py).
    `noise_sampler(sigma, sigma_next) -> z` supplies the noise instead (e.g. diffusers'
    tree, as the parity test does): each step calls it for (sigma, sigma_s), then for
    (sigma, sigma_next), and `generator` is unused. eta = 0 draws no noise.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
    if not 0.0 < r <= 1.0:
        raise ValueError(f"r: expected a value in (0, 1], got {r}")
    schedule = _sigma_list(sigmas)
    for i, (sigma, sigma_next) in enumerate(zip(schedule, schedule[1:])):
        denoised = denoiser(x, _batch_sigma(x, sigma))
        if _cancelled(callback, i, x, sigma, sigma_next, denoised):
            return denoised
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(sigma_next)
        sigma_s = sigma * math.exp(-r * h)
        # The step's two noises, in k-diffusion's query order (a Brownian tree may depend on it).
        if eta > 0 and noise_sampler is None:
            z_1, z_2 = _brownian_pair(x, sigma, sigma_s, sigma_next, generator)
        elif eta > 0:
            z_1, z_2 = noise_sampler(sigma, sigma_s), noise_sampler(sigma, sigma_next)
        # 1. Ancestral first-order step to sigma_s, with D_i.
        sigma_down, sigma_up = ancestral_step(sigma, sigma_s, eta)
        u = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised
        if eta > 0:
            u = u + (s_noise * sigma_up) * z_1
        denoised_s = denoiser(u, _batch_sigma(x, sigma_s))
        # 2. Ancestral first-order step from x to sigma_next, with the 2nd-order data
        #    prediction D_i + (D(u; sigma_s) - D_i) / (2r) (Lu et al., Algorithm 1's D_i).
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_s
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised_d
        if eta > 0:
            x = x + (s_noise * sigma_up) * z_2
    return x


# ----------------------------------------------------------------------------------
# The table: diffusers-like names
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler: its function and the diffusers scheduler set-up it reproduces."""

    fn: Sampler
    timestep_rule: str  # which of diffusers' spacing formulas its scheduler uses (`schedules.TIMESTEP_RULES`)
    sigma_schedules: tuple[str, ...]  # "discrete", and the Karras / exponential options its scheduler has
    options: tuple[str, ...] = ()  # the keyword options fn takes besides generator and callback
    diffusers: str = ""  # the diffusers scheduler (and arguments) it reproduces
    a1111: str = ""  # A1111's display name of the same k-diffusion sampler (its infotext "Sampler")
    about: str = ""  # one line for `minisd samplers`


# Each entry reproduces a diffusers scheduler on the official SD config (docs/samplers.md).
# EulerAncestral and DDIM have no Karras option; DPMSolverMultistep truncates exponential
# schedules' fractional timesteps to integers, which minisd does not copy.
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, "ddim", ("discrete",), ("eta",), "DDIMScheduler (step's eta)", "DDIM",
                        "DDIM (Song et al. 2021): deterministic at eta 0, DDPM-like at eta 1"),
    "euler": SamplerSpec(sample_euler, "euler", ("discrete", "karras", "exponential"), (),
                         "EulerDiscreteScheduler", "Euler", "Euler's method on the probability-flow ODE"),
    "euler_a": SamplerSpec(sample_euler_ancestral, "euler", ("discrete",), ("eta",),
                           "EulerAncestralDiscreteScheduler", "Euler a", "Euler, fresh noise each step (ancestral)"),
    "heun": SamplerSpec(sample_heun, "euler", ("discrete", "karras", "exponential"), (),
                        "HeunDiscreteScheduler", "Heun", "Heun's 2nd-order method (Karras et al. 2022, Alg. 1)"),
    "lms": SamplerSpec(sample_lms, "euler", ("discrete", "karras", "exponential"), ("order",),
                       "LMSDiscreteScheduler", "LMS", "linear multistep, order 4 (Karras et al. 2022)"),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, "dpm_solver", ("discrete", "karras"), (),
                            'DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)', "DPM++ 2M",
                            "DPM-Solver++(2M), 2nd-order multistep (Lu et al. 2022)"),
    "dpmpp_2m_sde": SamplerSpec(sample_dpmpp_2m_sde, "dpm_solver", ("discrete", "karras"), ("eta",),
                                'DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)',
                                "DPM++ 2M SDE", "DPM-Solver++(2M) with SDE noise (eta 1)"),
    # its timesteps and Karras range follow EulerDiscrete's
    "dpmpp_sde": SamplerSpec(sample_dpmpp_sde, "euler", ("discrete", "karras", "exponential"),
                             ("eta", "s_noise", "r", "noise_sampler"), "DPMSolverSDEScheduler", "DPM++ SDE",
                             "DPM-Solver++ SDE, 2 model calls per step, Brownian-tree noise"),
}
# The sigma schedules a sampler name may end with: (diffusers' scheduler option, A1111's "Schedule type", about).
# A1111's "Uniform" is the model's own discrete sigmas, as minisd's "discrete" (spaced by `timestep_spacing`).
SIGMA_SCHEDULES: dict[str, tuple[str, str, str]] = {
    "discrete": ("(default)", "Uniform", "the training schedule's own noise levels, spaced by --spacing"),
    "karras": ("use_karras_sigmas=True", "Karras", "Karras et al. 2022's rho=7 spacing of noise levels"),
    "exponential": ("use_exponential_sigmas=True", "Exponential", "noise levels evenly spaced in log sigma"),
}
SAMPLER_NAMES = tuple(
    base if kind == "discrete" else f"{base}_{kind}" for base, spec in SAMPLERS.items() for kind in spec.sigma_schedules
)


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """What a pipeline needs to reproduce one diffusers scheduler run.

    Build the denoiser with `quantize=plan.quantize`, start from
    x = noise * plan.init_noise_sigma (VE form), and call
    `plan.run(denoiser, x, plan.sigmas, generator=..., callback=...)` (or a slice of
    plan.sigmas, for img2img or a refiner split). The result is at noise level
    sigmas[-1]; `schedules.to_variance_preserving(x, sigmas[-1])` is the latent
    diffusers would decode (identical to x when sigmas[-1] == 0).
    """

    name: str
    sampler: Sampler
    sigmas: torch.Tensor
    quantize: bool
    init_noise_sigma: float
    options: dict[str, float]  # the validated keyword options `run` passes to the sampler, e.g. {"eta": 0.5}

    def run(
        self,
        denoiser: Denoiser,
        x: torch.Tensor,
        sigmas: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        callback: Callback | None = None,
    ) -> torch.Tensor:
        """The sampler over `sigmas`, with the plan's options."""
        return self.sampler(denoiser, x, sigmas, generator=generator, callback=callback, **self.options)


def sampler_parts(name: str) -> tuple[str, str]:
    """(base sampler, sigma schedule) of a sampler name: "dpmpp_2m_karras" -> ("dpmpp_2m", "karras")."""
    return _split_name(name)


def _split_name(name: str) -> tuple[str, str]:
    """(base sampler, sigma schedule) of a name: dpmpp_2m_karras -> ("dpmpp_2m", "karras")."""
    if name not in SAMPLER_NAMES:
        raise ValueError(f"sampler: expected one of {SAMPLER_NAMES}, got {name!r}")
    for kind in ("karras", "exponential"):
        if name.endswith("_" + kind):
            return name[: -len(kind) - 1], kind
    return name, "discrete"


def plan_sampler(
    name: str,
    schedule: DiscreteSchedule,
    steps: int,
    *,
    spacing: str = "leading",
    steps_offset: int = 1,
    eta: float | None = None,
) -> SamplerPlan:
    """The sampler, sigma schedule, start and options of diffusers-like sampler `name` (see `SAMPLER_NAMES`).

    spacing / steps_offset are diffusers' `timestep_spacing` / `steps_offset`; the
    defaults are those of the official SD1, SD2 and SDXL scheduler configs. `eta`
    (None: the sampler's default) is allowed for the samplers whose spec lists it.
    Where diffusers' schedulers make choices of their own (where the schedule ends,
    the Karras / exponential range, rounded timesteps, the initial scale), `compat`
    decides.
    """
    base, kind = _split_name(name)
    spec = SAMPLERS[base]
    options: dict[str, float] = {}
    if eta is not None:
        if "eta" not in spec.options:
            with_eta = ", ".join(n for n in SAMPLER_NAMES if "eta" in SAMPLERS[_split_name(n)[0]].options)
            raise ValueError(f"eta: sampler {name!r} has no eta (samplers with eta: {with_eta})")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta: expected a value in [0, 1], got {eta}")
        options["eta"] = float(eta)
    rule = spec.timestep_rule
    sigmas = discrete_sigmas(
        schedule, steps, spacing, steps_offset=steps_offset, rule=rule, final_sigma=compat.final_sigma(rule)
    )
    if kind != "discrete":
        sigma_min, sigma_max = compat.sigma_range(rule, schedule, sigmas)
        make = karras_sigmas if kind == "karras" else exponential_sigmas
        sigmas = make(steps, sigma_min, sigma_max)
    return SamplerPlan(
        name=name,
        sampler=spec.fn,
        sigmas=sigmas,
        quantize=compat.quantize_timesteps(rule, kind),
        init_noise_sigma=compat.init_noise_sigma(sigmas, rule, spacing),
        options=options,
    )
