"""Tests for minisd.schedules and minisd.samplers.

1. Parity with diffusers' schedulers, step by step, on a toy "U-Net" (a fixed smooth
   function of (x, t)): every sampler, eps and v prediction, the official SD config.
2. The sigma / timestep schedules against diffusers' `sigmas` / `timesteps`.
3. Invariants on an analytic Gaussian data distribution, whose exact denoiser and
   probability-flow ODE solution are known in closed form.
4. Schedule invariants, guidance, callbacks, img2img start, and errors.

Tolerances. Trajectories are compared with `assert_rel_close` (max abs error over
max |expected|) at 1e-5: both sides run fp32 arithmetic (measured agreement ~1e-7 to
1e-6 after 20 steps); the differences are round-off only, because diffusers writes
DDIM and DPM-Solver in the variance-preserving form (minisd divides by
sqrt(alphabar) instead) and computes step coefficients in fp32 tensors (minisd in
Python floats from the same fp32 sigmas). Looser tolerances are stated where used.
DPM++ SDE takes its noise from diffusers' torchsde Brownian tree (`diffusers_tree_noise`).
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
)
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

from minisd import compat
from minisd.denoisers import DiscreteDenoiser, cfg_denoiser, denoiser_scalings, rescale_guidance
from minisd.samplers import (
    SAMPLER_NAMES,
    SAMPLERS,
    lms_coefficient,
    plan_sampler,
    sample_ddim,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from minisd.schedules import (
    SPACINGS,
    TIMESTEP_RULES,
    DiscreteSchedule,
    ddpm_alphas_cumprod,
    discrete_sigmas,
    discrete_timesteps,
    exponential_sigmas,
    from_variance_preserving,
    img2img_sigmas,
    img2img_start,
    init_noise_sigma,
    karras_sigmas,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    split_sigmas,
    to_variance_preserving,
)
from tests.utils import assert_rel_close

# The official SD scheduler config (SD1.x PNDM / SD2.x DDIM / SDXL Euler
# scheduler_config.json and diffusers' single-file SCHEDULER_DEFAULT_CONFIG); each
# scheduler class picks the keys it knows, as `from_config(pipe.scheduler.config)` does.
OFFICIAL = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    interpolation_type="linear",
)
PREDICTIONS = ("epsilon", "v_prediction")
STEPS = 20


def make_scheduler(cls, prediction_type: str, **extra):
    return cls.from_config({**OFFICIAL, "prediction_type": prediction_type, **extra})


def toy_unet(x: torch.Tensor, t, context: torch.Tensor | None = None) -> torch.Tensor:
    """A fixed stand-in for the U-Net: nonlinear in x, mixes channels, and depends on t
    strongly enough that a timestep off by one changes the output by ~1e-2.
    t is diffusers' 0-d timestep or minisd's (B,) timesteps."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    out = torch.tanh(0.5 * x) * (1 + 0.5 * torch.sin(t / 37.0)) + 0.1 * torch.cos(0.3 * x.flip(1) + t / 250.0)
    if context is not None:
        # (B, L, D) -> a per-sample, per-channel shift, so guidance has an effect
        out = out + 0.5 * torch.tanh(context.mean(dim=1))[:, : x.shape[1], None, None] * torch.sigmoid(x)
    return out


def initial_noise() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def run_diffusers(scheduler, noise, steps, *, seed=None, eta=None, x0=None, strength=None):
    """diffusers' denoising loop (scale_model_input, unet, step); returns the latents after
    each complete step (Heun: after its correction) and the timesteps the model saw."""
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    if x0 is None:
        latents = noise * scheduler.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline: get_timesteps, then add_noise at the first one
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
            StableDiffusionImg2ImgPipeline,
        )

        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
        )
        latents = scheduler.add_noise(x0, noise, timesteps[:1])
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    states, seen = [latents], []
    for k, t in enumerate(timesteps):
        seen.append(float(t))
        out = toy_unet(scheduler.scale_model_input(latents, t), t)
        kwargs = {} if generator is None else {"generator": generator}
        if eta is not None:
            kwargs["eta"] = eta
        latents = scheduler.step(out, t, latents, **kwargs).prev_sample
        # Heun completes a step after its correction; its last step is a lone Euler step.
        if getattr(scheduler, "state_in_first_order", True) or k == len(timesteps) - 1:
            states.append(latents)
    return states, seen


def run_minisd(sampler, sigmas, x, schedule, prediction_type, *, quantize=False, seed=None, vp=False, **kwargs):
    """Our sampler with the same toy model; the states at each sigma (VP form if `vp`)."""
    seen = []

    def model(x_in, t):
        seen.append(float(t[0]))
        return toy_unet(x_in, t)

    denoiser = DiscreteDenoiser(model, schedule, prediction_type, quantize=quantize)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    states = [x]
    callback = lambda info: states.append(info["x"]) if info["i"] > 0 else None  # noqa: E731
    states.append(sampler(denoiser, x, sigmas, generator=generator, callback=callback, **kwargs))
    if vp:
        states = [to_variance_preserving(s, sigma) for s, sigma in zip(states, sigmas.tolist())]
    return states, seen


def assert_same_run(ours, theirs, rel=1e-5, t_atol=1e-3):
    (our_states, our_t), (their_states, their_t) = ours, theirs
    assert len(our_states) == len(their_states), f"{len(our_states)} states != diffusers' {len(their_states)}"
    for i, (a, b) in enumerate(zip(our_states, their_states)):
        assert_rel_close(a, b, rel, f"state {i}")
    # The timesteps the model was called with. Integer ones agree exactly; fractional
    # ones (Karras / exponential) come from float64 log-sigma interpolation on both
    # sides, of a sigma rounded to fp32 on ours: within 1e-3 of a timestep, which
    # moves the toy model's output by < 1e-5.
    assert len(our_t) == len(their_t)
    np.testing.assert_allclose(our_t, their_t, rtol=0, atol=t_atol)


# (minisd name, diffusers class, extra diffusers config, diffusers works in VP form, stochastic)
PARITY_CASES = [
    ("ddim", DDIMScheduler, {}, True, False),
    ("euler", EulerDiscreteScheduler, {}, False, False),
    ("euler_a", EulerAncestralDiscreteScheduler, {}, False, True),
    ("heun", HeunDiscreteScheduler, {}, False, False),
    ("lms", LMSDiscreteScheduler, {}, False, False),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}, True, False),
    ("dpmpp_2m_sde", DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, True, True),
    ("euler_karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}, False, False),
    ("heun_karras", HeunDiscreteScheduler, {"use_karras_sigmas": True}, False, False),
    ("lms_karras", LMSDiscreteScheduler, {"use_karras_sigmas": True}, False, False),
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, True, False),
    (
        "dpmpp_2m_sde_karras",
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        True,
        True,
    ),
    ("euler_exponential", EulerDiscreteScheduler, {"use_exponential_sigmas": True}, False, False),
    ("heun_exponential", HeunDiscreteScheduler, {"use_exponential_sigmas": True}, False, False),
    ("lms_exponential", LMSDiscreteScheduler, {"use_exponential_sigmas": True}, False, False),
]


# ----------------------------------------------------------------------------------
# 1. Trajectory parity with diffusers
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("name,cls,extra,vp,stochastic", PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_sampler_matches_diffusers(name, cls, extra, vp, stochastic, prediction_type):
    scheduler = make_scheduler(cls, prediction_type, **extra)
    seed = 1 if stochastic else None
    theirs = run_diffusers(scheduler, initial_noise(), STEPS, seed=seed)
    # Same training table as diffusers (fp32 cumprod); ours in float64 is tested below.
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler(name, schedule, STEPS)
    x = initial_noise() * plan.init_noise_sigma
    ours = run_minisd(plan.sampler, plan.sigmas, x, schedule, prediction_type, quantize=plan.quantize, seed=seed, vp=vp)
    assert_same_run(ours, theirs)


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_eta_matches_diffusers(eta, prediction_type):
    # DDIMScheduler draws its variance noise with the generator, once per step.
    scheduler = make_scheduler(DDIMScheduler, prediction_type)
    theirs = run_diffusers(scheduler, initial_noise(), STEPS, seed=3, eta=eta)
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler("ddim", schedule, STEPS)
    x = initial_noise() * plan.init_noise_sigma
    ours = run_minisd(sample_ddim, plan.sigmas, x, schedule, prediction_type, seed=3, vp=True, eta=eta)
    assert_same_run(ours, theirs)


SPACING_CASES = [
    # (name, class, extra, vp, spacing, steps)
    ("euler", EulerDiscreteScheduler, {}, False, "trailing", 7),
    ("euler_a", EulerAncestralDiscreteScheduler, {}, False, "trailing", 10),
    ("heun", HeunDiscreteScheduler, {}, False, "trailing", 9),
    ("lms", LMSDiscreteScheduler, {}, False, "leading", 7),
    ("ddim", DDIMScheduler, {}, True, "trailing", 25),  # 25 divides 1000, see plan_sampler
    ("ddim", DDIMScheduler, {}, True, "leading", 7),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, True, "linspace", 9),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, True, "leading", 7),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}, True, "trailing", 12),
    ("euler_karras", EulerDiscreteScheduler, {"use_karras_sigmas": True}, False, "trailing", 8),
]


@pytest.mark.parametrize(
    "name,cls,extra,vp,spacing,steps", SPACING_CASES, ids=[f"{c[0]}-{c[4]}-{c[5]}" for c in SPACING_CASES]
)
def test_spacings_match_diffusers(name, cls, extra, vp, spacing, steps):
    scheduler = make_scheduler(cls, "epsilon", timestep_spacing=spacing, **extra)
    seed = 5 if name == "euler_a" else None
    theirs = run_diffusers(scheduler, initial_noise(), steps, seed=seed)
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler(name, schedule, steps, spacing=spacing)
    x = initial_noise() * plan.init_noise_sigma
    ours = run_minisd(plan.sampler, plan.sigmas, x, schedule, "epsilon", quantize=plan.quantize, seed=seed, vp=vp)
    assert_same_run(ours, theirs)


# DPM++ SDE (diffusers' DPMSolverSDEScheduler, which needs torchsde) draws its noise from
# a seeded Brownian tree, not from a generator: minisd is given the same tree as a
# `noise_sampler`. torchsde rounds the tree's ends to its 1e-6 time grid and warns (then
# clamps) when a query lies outside them by less than that, which diffusers' own fp32
# query times do too: harmless, silenced.
TORCHSDE_GRID = pytest.mark.filterwarnings("ignore:Should have t[ab]:UserWarning")


def diffusers_tree_noise(x: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor, seed: int):
    """diffusers' BrownianTreeNoiseSampler (torchsde), built as DPMSolverSDEScheduler.step
    builds it (seed, sigma_min / sigma_max of the schedule, identity time transform), as a
    minisd `noise_sampler`.

    The tree resolves time on a 1e-6 grid (torchsde `tol`), so a query time one fp32 ulp
    away can land on another grid point and move the noise by up to ~1e-2 (see
    `test_dpmpp_sde_parity_needs_diffusers_query_times`). diffusers queries at
    sigma_fn(t_fn(sigma)) and at the midpoint sigma_fn(t + (t_next - t) / 2), computed in
    fp32 from its own sigma table (`theirs`, which differs from ours by <= 1 ulp), so this
    sampler identifies the step by our sigma's index in `ours` and queries the tree at
    the times diffusers' step computes there. It checks that minisd asks for the
    intervals [sigma_s, sigma] and [sigma_next, sigma] of that step.
    """
    tree = BrownianTreeNoiseSampler(x, float(theirs[theirs > 0].min()), float(theirs.max()), seed)
    values = ours.tolist()

    def noise(sigma: float, sigma_target: float) -> torch.Tensor:
        i = values.index(sigma)
        t, t_next = theirs[i].log().neg(), theirs[i + 1].log().neg()  # diffusers' t_fn, fp32
        t_end = t_next if sigma_target == values[i + 1] else t + (t_next - t) * 0.5  # its t_proposed
        assert float(t_end.neg().exp()) == pytest.approx(sigma_target, rel=1e-6), (i, sigma_target)
        return tree(t.neg().exp(), t_end.neg().exp())

    return noise


DPMPP_SDE_CASES = [
    # (minisd name, diffusers extra config, timestep_spacing, steps)
    ("dpmpp_sde", {}, "leading", STEPS),
    ("dpmpp_sde_karras", {"use_karras_sigmas": True}, "leading", STEPS),
    ("dpmpp_sde", {}, "trailing", 9),
    ("dpmpp_sde_karras", {"use_karras_sigmas": True}, "trailing", 7),
    ("dpmpp_sde_exponential", {"use_exponential_sigmas": True}, "leading", 12),
]


@TORCHSDE_GRID
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize(
    "name,extra,spacing,steps", DPMPP_SDE_CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in DPMPP_SDE_CASES]
)
def test_dpmpp_sde_matches_diffusers(name, extra, spacing, steps, prediction_type):
    # diffusers interleaves the midpoints into its timesteps (t_0, m_0, t_1, m_1, ..., t_{n-1}):
    # each step is two `step` calls, the first (at sigma) leaves the midpoint state, the
    # second (at the midpoint) completes the step; the last, to sigma = 0, is one Euler
    # call. run_diffusers keeps the states after complete steps (`state_in_first_order`)
    # and every timestep the model saw, midpoints included, which minisd's two denoiser
    # calls per step must reproduce in the same order. 1e-5 as the other samplers (fp32
    # arithmetic on both sides; measured <= 6.1e-7 of max |x| over these cases).
    scheduler = make_scheduler(
        DPMSolverSDEScheduler, prediction_type, timestep_spacing=spacing, noise_sampler_seed=42, **extra
    )
    theirs = run_diffusers(scheduler, initial_noise(), steps)
    assert len(theirs[1]) == 2 * steps - 1
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler(name, schedule, steps, spacing=spacing)
    assert not plan.quantize
    x = initial_noise() * plan.init_noise_sigma
    their_sigmas = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])  # undo the interleaving
    noise = diffusers_tree_noise(x, plan.sigmas, their_sigmas, seed=42)
    ours = run_minisd(plan.sampler, plan.sigmas, x, schedule, prediction_type, noise_sampler=noise)
    assert_same_run(ours, theirs)


@TORCHSDE_GRID
def test_dpmpp_sde_parity_needs_diffusers_query_times():
    # The same tree queried at minisd's own (float64) times instead of diffusers' fp32
    # round trips gives visibly different noise: the trajectories differ by ~4e-4, so the
    # parity test above would catch noise this far off (and guards its own adapter).
    scheduler = make_scheduler(DPMSolverSDEScheduler, "epsilon", noise_sampler_seed=42)
    theirs, _ = run_diffusers(scheduler, initial_noise(), STEPS)
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler("dpmpp_sde", schedule, STEPS)
    x = initial_noise() * plan.init_noise_sigma
    tree = BrownianTreeNoiseSampler(x, float(plan.sigmas[-2]), float(plan.sigmas[0]), 42)
    ours, _ = run_minisd(plan.sampler, plan.sigmas, x, schedule, "epsilon", noise_sampler=tree)
    err = (ours[-1] - theirs[-1]).abs().max() / theirs[-1].abs().max()
    assert err > 1e-4


def test_euler_linspace_fractional_timesteps():
    # With "linspace" the Euler-type schedulers use fractional timesteps 999 k / (n-1).
    # The model sees diffusers' timesteps (sigma_to_t inverts our log-sigma
    # interpolation exactly), but diffusers interpolates sigma linearly between table
    # entries where k-diffusion (and minisd) interpolate log sigma: the sigmas differ by
    # < 7e-5 relative (largest near t = 0), so the trajectories agree to 1e-4, not 1e-5.
    scheduler = make_scheduler(EulerDiscreteScheduler, "epsilon", timestep_spacing="linspace")
    theirs = run_diffusers(scheduler, initial_noise(), STEPS)
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler("euler", schedule, STEPS, spacing="linspace")
    assert plan.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma))  # sigma_max, not VP
    assert_rel_close(plan.sigmas, scheduler.sigmas, 1e-4, "linspace sigmas")
    ours = run_minisd(plan.sampler, plan.sigmas, initial_noise() * plan.init_noise_sigma, schedule, "epsilon")
    assert_same_run(ours, theirs, rel=1e-4)


@pytest.mark.parametrize("name,cls", [("euler", EulerDiscreteScheduler), ("ddim", DDIMScheduler)])
def test_zero_terminal_snr_matches_diffusers(name, cls):
    # v-prediction with rescale_betas_zero_snr and "trailing" spacing (Lin et al. 2023).
    # diffusers' Euler replaces the terminal alphabar 0 by 2**-24, as minisd does, so it
    # matches to round-off. DDIM keeps alphabar = 0 exactly (sigma = inf, which the VE
    # form cannot hold): minisd's first step at sigma ~ 4096 differs by ~1/sigma = 2.4e-4.
    scheduler = make_scheduler(cls, "v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    theirs = run_diffusers(scheduler, initial_noise(), 10)
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler(name, schedule, 10, spacing="trailing")
    x = initial_noise() * plan.init_noise_sigma
    ours = run_minisd(plan.sampler, plan.sigmas, x, schedule, "v_prediction", vp=name == "ddim")
    # Euler's first step starts at sigma_0 ~ 4096 (|x_0| up to ~1.7e4) and lands near sigma_1 ~ 18:
    # x_1 = x_0 + (sigma_1 - sigma_0) d cancels all but ~1/200 of x_0's magnitude. Each side rounds
    # that update in fp32 a few times, in an order the CPU's SIMD path decides (FMA or not, vector
    # width), so the two can differ by a few units of 2**-24 |x_0|: ~1e-4 of |x_1| for 8 units
    # (2.7e-5 was seen on an AVX2 machine; 0 here). Later steps carry that absolute error along.
    # Relative to max|x_1| it is the bound below; the plain round-off floor is 1e-5 as elsewhere.
    cancellation = 8 * 2.0**-24 * float(x.abs().max()) / float(theirs[0][1].abs().max())
    assert_same_run(ours, theirs, rel=max(1e-5, cancellation) if name == "euler" else 1e-3)


def test_dpm_solver_karras_needs_quantized_timesteps():
    # diffusers' DPMSolverMultistep rounds the Karras timesteps; without `quantize` the
    # model sees fractional ones and the run visibly differs (guards the parity test).
    scheduler = make_scheduler(DPMSolverMultistepScheduler, "epsilon", use_karras_sigmas=True)
    theirs = run_diffusers(scheduler, initial_noise(), STEPS)
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler("dpmpp_2m_karras", schedule, STEPS)
    assert plan.quantize
    x = initial_noise() * plan.init_noise_sigma
    ours, _ = run_minisd(plan.sampler, plan.sigmas, x, schedule, "epsilon", quantize=False, vp=True)
    err = (ours[-1] - theirs[0][-1]).abs().max() / theirs[0][-1].abs().max()
    assert err > 1e-4


@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_guided_loop_matches_diffusers_pipeline(prediction_type):
    # StableDiffusionPipeline's loop: latents doubled, one unet call on [uncond, cond],
    # guidance, rescale_noise_cfg (guidance_rescale=0.7), scheduler step (Euler, leading).
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    scale, phi = 7.5, 0.7
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    scheduler = make_scheduler(EulerDiscreteScheduler, prediction_type)
    scheduler.set_timesteps(STEPS)
    latents = initial_noise() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_uncond, noise_text = toy_unet(model_in, t, context=torch.cat([uncond, cond])).chunk(2)
        noise_pred = noise_uncond + scale * (noise_text - noise_uncond)
        noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=phi)
        latents = scheduler.step(noise_pred, t, latents).prev_sample

    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler("euler", schedule, STEPS)
    denoiser = cfg_denoiser(
        DiscreteDenoiser(toy_unet, schedule, prediction_type), {"context": cond}, {"context": uncond}, scale, phi
    )
    x = plan.sampler(denoiser, initial_noise() * plan.init_noise_sigma, plan.sigmas)
    assert_rel_close(x, latents, 1e-5, "guided run")


@pytest.mark.parametrize(
    "name,cls,vp",
    [
        ("euler", EulerDiscreteScheduler, False),
        ("heun", HeunDiscreteScheduler, False),
        ("ddim", DDIMScheduler, True),
        ("dpmpp_2m", DPMSolverMultistepScheduler, True),
    ],
)
@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_img2img_matches_diffusers(name, cls, vp, strength):
    # diffusers' img2img: get_timesteps(strength), add_noise at the first kept timestep,
    # then the loop from there (set_begin_index). minisd: x = x0 + sigma_start * noise
    # on the schedule's tail; add_noise is exactly that in VE form for every scheduler.
    x0 = 0.8 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    scheduler = make_scheduler(cls, "epsilon")
    theirs, _ = run_diffusers(scheduler, initial_noise(), STEPS, x0=x0, strength=strength)
    schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
    plan = plan_sampler(name, schedule, STEPS)
    sigmas = img2img_sigmas(plan.sigmas, strength)
    assert sigmas.numel() - 1 == int(STEPS * strength)
    x = x0 + float(sigmas[0]) * initial_noise()
    ours, _ = run_minisd(plan.sampler, sigmas, x, schedule, "epsilon", vp=vp)
    assert_rel_close(ours[0], theirs[0], 1e-5, "noised image")
    assert_rel_close(ours[-1], theirs[-1], 1e-5, "img2img result")


# ----------------------------------------------------------------------------------
# 2. Schedules against diffusers
# ----------------------------------------------------------------------------------


def test_training_schedule():
    ours = ddpm_alphas_cumprod()
    # LDM's make_beta_schedule + np.cumprod, in float64 (an independent numpy version).
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(ours.numpy(), np.cumprod(1 - betas), rtol=1e-13)
    # diffusers builds the same product in fp32: 1000 roundings, measured 9.3e-7 relative.
    theirs = make_scheduler(EulerDiscreteScheduler, "epsilon").alphas_cumprod
    np.testing.assert_allclose(ours.numpy(), theirs.double().numpy(), rtol=2e-6)
    # The sigma table then differs by up to 1.3e-5 relative near t = 0, where
    # 1 - alphabar ~ 8.5e-4 amplifies that error.
    sigmas = DiscreteSchedule.scaled_linear().sigmas
    assert sigmas.dtype == torch.float32 and sigmas.shape == (1000,)
    their_sigmas = make_scheduler(EulerDiscreteScheduler, "epsilon").sigmas[:-1].flip(0)
    np.testing.assert_allclose(sigmas.numpy(), their_sigmas.numpy(), rtol=2e-5)
    # From diffusers' own alphas_cumprod, our table is its table to fp32 round-off.
    from_theirs = DiscreteSchedule.from_alphas_cumprod(theirs).sigmas
    np.testing.assert_allclose(from_theirs.numpy(), their_sigmas.numpy(), rtol=3e-7)


def test_zero_terminal_snr_schedule():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as reference

    betas = scaled_linear_betas()
    # Same float64 algorithm, operations grouped differently; beta = 1 - alpha ~ 1e-3 loses
    # three digits to cancellation, hence 1e-10 rather than 1e-13.
    np.testing.assert_allclose(rescale_zero_terminal_snr(betas).numpy(), reference(betas.clone()).numpy(), rtol=1e-10)
    alphas_cumprod = ddpm_alphas_cumprod(zero_terminal_snr=True)
    assert alphas_cumprod[-1] == 0 and bool((alphas_cumprod[:-1] > 0).all())
    assert alphas_cumprod[0] == pytest.approx(1 - 0.00085, rel=1e-12)  # first value kept
    # Against diffusers' fp32 computation (with its 2**-24 terminal stand-in): the
    # subtraction of nearly equal fp32 square roots near t = T costs ~2e-5 relative.
    sigmas = DiscreteSchedule.scaled_linear(zero_terminal_snr=True).sigmas
    theirs = make_scheduler(EulerDiscreteScheduler, "v_prediction", rescale_betas_zero_snr=True).sigmas
    np.testing.assert_allclose(sigmas.numpy(), theirs[:-1].flip(0).numpy(), rtol=3e-5)
    assert sigmas[-1] == pytest.approx(4096.0, rel=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_discrete_schedules_match_diffusers(spacing, steps):
    euler = make_scheduler(EulerDiscreteScheduler, "epsilon", timestep_spacing=spacing)
    ddim = make_scheduler(DDIMScheduler, "epsilon", timestep_spacing=spacing)
    dpm = make_scheduler(DPMSolverMultistepScheduler, "epsilon", timestep_spacing=spacing)
    for scheduler in (euler, ddim, dpm):
        scheduler.set_timesteps(steps)
    schedule = DiscreteSchedule.from_alphas_cumprod(euler.alphas_cumprod)

    for rule, scheduler in (("euler", euler), ("ddim", ddim), ("dpm_solver", dpm)):
        t = discrete_timesteps(steps, spacing, rule=rule)
        assert torch.equal(t, scheduler.timesteps.double()), f"{rule} timesteps"
    for rule, scheduler in (("euler", euler), ("dpm_solver", dpm)):
        sigmas = discrete_sigmas(schedule, steps, spacing, rule=rule)
        assert sigmas.dtype == torch.float32 and sigmas[-1] == 0
        fractional = rule == "euler" and spacing == "linspace"
        # Integer timesteps: a table lookup on both sides, equal to fp32 round-off.
        # Fractional ones: linear (diffusers) vs log-sigma (minisd) interpolation, < 1e-4.
        np.testing.assert_allclose(sigmas.numpy(), scheduler.sigmas.numpy(), rtol=1e-4 if fractional else 1e-6)
        # What the denoiser will pass to the model: exactly diffusers' timesteps.
        t_model = schedule.sigma_to_t(sigmas[:-1])
        np.testing.assert_allclose(t_model.numpy(), scheduler.timesteps.numpy(), rtol=0, atol=1e-3 if fractional else 0)


@pytest.mark.parametrize("steps", [5, 20])
def test_karras_and_exponential_match_diffusers(steps):
    for kind in ("karras", "exponential"):
        for name, cls in (("euler", EulerDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler)):
            if (name, kind) == ("dpmpp_2m", "exponential"):
                continue
            scheduler = make_scheduler(cls, "epsilon", **{f"use_{kind}_sigmas": True})
            scheduler.set_timesteps(steps)
            schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
            plan = plan_sampler(f"{name}_{kind}", schedule, steps)
            np.testing.assert_allclose(plan.sigmas.numpy(), scheduler.sigmas.numpy(), rtol=1e-6)
            t_model = schedule.sigma_to_t(plan.sigmas[:-1], quantize=plan.quantize)
            np.testing.assert_allclose(t_model.numpy(), scheduler.timesteps.float().numpy(), rtol=0, atol=1e-3)


def test_init_noise_sigma_matches_diffusers():
    schedule = DiscreteSchedule.scaled_linear()
    for spacing in ("leading", "linspace", "trailing"):
        for name, cls in (("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)):
            scheduler = make_scheduler(cls, "epsilon", timestep_spacing=spacing)
            scheduler.set_timesteps(STEPS)
            plan = plan_sampler(name, schedule, STEPS, spacing=spacing)
            assert plan.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=2e-5)
    # DDIM / DPM-Solver start from unit-variance VP latents: x_VE = noise * sqrt(sigma_0^2 + 1).
    plan = plan_sampler("dpmpp_2m", schedule, STEPS)
    noise = initial_noise()
    assert_rel_close(to_variance_preserving(noise * plan.init_noise_sigma, float(plan.sigmas[0])), noise, 1e-6)


# The diffusers scheduler (and extra config) behind each base sampler name.
DIFFUSERS_SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_sde": (DPMSolverSDEScheduler, {}),
}


def split_name(name: str) -> tuple[str, str]:
    """The base sampler and sigma schedule of a name: euler_karras -> ("euler", "karras")."""
    for kind in ("karras", "exponential"):
        if name.endswith("_" + kind):
            return name[: -len(kind) - 1], kind
    return name, "discrete"


@pytest.mark.parametrize("spacing", SPACINGS)
def test_compat_rules_match_diffusers(spacing):
    # compat's start and end rules, per timestep rule and spacing, against each diffusers
    # scheduler's own `init_noise_sigma` and last step. diffusers' DDIM / DPM-Solver
    # hold VP latents, so their start noise * init_noise_sigma is, in VE form,
    # noise * init_noise_sigma * sqrt(sigma_0^2 + 1) with sigma_0 at their first timestep.
    for name in SAMPLER_NAMES:
        base, kind = split_name(name)
        rule = SAMPLERS[base].timestep_rule
        cls, extra = DIFFUSERS_SCHEDULERS[base]
        if kind != "discrete":
            extra = {**extra, f"use_{kind}_sigmas": True}
        scheduler = make_scheduler(cls, "epsilon", timestep_spacing=spacing, **extra)
        scheduler.set_timesteps(STEPS)
        schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
        plan = plan_sampler(name, schedule, STEPS, spacing=spacing)
        theirs = float(scheduler.init_noise_sigma)
        if cls is DDIMScheduler:
            alphabar = float(scheduler.alphas_cumprod[int(scheduler.timesteps[0])])
            theirs *= math.sqrt(1 / alphabar)  # sqrt(sigma_0^2 + 1)
            # set_alpha_to_one=False: DDIM's last step lands on alphabar_0, i.e. sigma(t=0).
            assert scheduler.final_alpha_cumprod == scheduler.alphas_cumprod[0]
            expected_final = "sigma_min"
        else:
            if cls is DPMSolverMultistepScheduler:
                theirs *= math.sqrt(float(scheduler.sigmas[0]) ** 2 + 1)
            expected_final = "zero" if scheduler.sigmas[-1] == 0 else "sigma_min"
        label = f"{name}/{spacing}"
        assert compat.init_noise_sigma(plan.sigmas, rule, spacing) == pytest.approx(theirs, rel=2e-5), label
        assert plan.init_noise_sigma == compat.init_noise_sigma(plan.sigmas, rule, spacing), label
        assert compat.final_sigma(rule) == expected_final, label


# ----------------------------------------------------------------------------------
# 3. Invariants on an analytic Gaussian data distribution
# ----------------------------------------------------------------------------------

MU, S = 0.3, 0.5  # data ~ N(MU, S^2) in every dimension


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for x = x0 + sigma n, x0 ~ N(MU, S^2): (S^2 x + sigma^2 MU) / (S^2 + sigma^2)."""
    sigma2 = sigma.reshape(-1, 1) ** 2
    return (S**2 * x + sigma2 * MU) / (S**2 + sigma2)


def exact_flow(x_start: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor:
    """The probability-flow ODE's exact solution for this data: x - MU scales with sqrt(S^2 + sigma^2)."""
    return MU + (x_start - MU) * math.sqrt(S**2 + sigma_end**2) / math.sqrt(S**2 + sigma_start**2)


def gaussian_start(sigma_0: float, dtype=torch.float32) -> torch.Tensor:
    # The exact marginal N(MU, S^2 + sigma_0^2) at the first sigma, so that any error
    # below is the sampler's and not that of the prior. 20000 scalars (batch of 4): small
    # enough to stay under torch's intra-op threading grain, which is slow on a busy CPU.
    n = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return MU + math.sqrt(S**2 + sigma_0**2) * n


def _dpmpp_2s(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM++ SDE without noise (eta = 0): DPM-Solver++(2S), a 2nd-order ODE solver."""
    return sample_dpmpp_sde(denoiser, x, sigmas, eta=0.0, generator=generator, callback=callback)


# (sampler, order of accuracy, max error at 40 Karras steps). The ratio err(20)/err(40)
# should approach 2**order; measured: 2.0 (Euler, DDIM), 4.4 (Heun, DPM++ 2M), 4.1
# (DPM++ 2S = DPM++ SDE with eta = 0), 11.6 (LMS, whose order ramps up to 4).
ODE_SAMPLERS = [
    (sample_euler, 1.8, 0.15),
    (sample_ddim, 1.8, 0.15),
    (sample_heun, 3.5, 0.012),
    (sample_dpmpp_2m, 3.5, 0.012),
    (_dpmpp_2s, 3.5, 0.012),
    (sample_lms, 8.0, 3e-3),
]


@pytest.mark.parametrize("sampler,ratio,bound", ODE_SAMPLERS, ids=[s[0].__name__ for s in ODE_SAMPLERS])
def test_ode_samplers_converge_to_exact_flow(sampler, ratio, bound):
    # Karras sigmas over the SD range, stopping at sigma_min (without the final jump to
    # 0) so that the error is the discretization error alone; float64 so that round-off
    # does not hide it. Each sample is compared with its exact ODE solution.
    schedule = DiscreteSchedule.scaled_linear()
    errors = []
    for steps in (20, 40):
        sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)[:-1].double()
        x = gaussian_start(float(sigmas[0]), torch.float64)
        out = sampler(gaussian_denoiser, x, sigmas)
        errors.append((out - exact_flow(x, float(sigmas[0]), float(sigmas[-1]))).abs().max().item())
    assert errors[0] / errors[1] > ratio, f"errors {errors}: convergence order too low"
    assert errors[1] < bound


def _ddpm(denoiser, x, sigmas, *, generator=None, callback=None):
    return sample_ddim(denoiser, x, sigmas, eta=1.0, generator=generator, callback=callback)


def _dpmpp_sde_r1(denoiser, x, sigmas, *, generator=None, callback=None):
    """r = 1: the intermediate level is sigma_next itself (up to round-off on either side)."""
    return sample_dpmpp_sde(denoiser, x, sigmas, r=1.0, generator=generator, callback=callback)


# (sampler, bound on |std - S| at 50 Karras steps). First-order samplers carry an
# O(1/steps) bias (measured 0.015 for Euler, 0.034 for Euler ancestral); the others are
# within sampling error (standard error of the std: S / sqrt(2 * 20000) = 0.0025).
DISTRIBUTION_SAMPLERS = [
    (sample_euler, 0.05),
    (sample_ddim, 0.05),
    (_ddpm, 0.05),
    (sample_euler_ancestral, 0.05),
    (sample_heun, 0.012),
    (sample_lms, 0.012),
    (sample_dpmpp_2m, 0.012),
    (sample_dpmpp_2m_sde, 0.012),
    (sample_dpmpp_sde, 0.012),
    (_dpmpp_sde_r1, 0.012),
]


@pytest.mark.parametrize("sampler,bound", DISTRIBUTION_SAMPLERS, ids=[s[0].__name__ for s in DISTRIBUTION_SAMPLERS])
def test_samplers_reach_data_distribution(sampler, bound):
    # Every sampler (ODE or SDE) maps N(MU, S^2 + sigma_max^2) to N(MU, S^2) in the limit.
    # The sample mean has a standard error S / sqrt(20000) = 0.0035 (bound: 4 of them).
    schedule = DiscreteSchedule.scaled_linear()
    std_errors = []
    for steps in (10, 50):
        sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
        x = gaussian_start(float(sigmas[0]))
        out = sampler(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(1))
        assert abs(out.mean().item() - MU) < 0.014
        std_errors.append(abs(out.std().item() - S))
    assert std_errors[1] < std_errors[0], f"|std - S| did not shrink with steps: {std_errors}"
    assert std_errors[1] < bound


def test_paper_equivalences():
    # DDIM with eta = 0 is Euler's method in sigma space; with eta = 1 it is the
    # ancestral (DDPM) sampler: the same numbers from the same noise.
    schedule = DiscreteSchedule.scaled_linear()
    sigmas = discrete_sigmas(schedule, 15)
    x = gaussian_start(float(sigmas[0]))
    assert_rel_close(sample_ddim(gaussian_denoiser, x, sigmas), sample_euler(gaussian_denoiser, x, sigmas), 1e-6)
    a = sample_ddim(gaussian_denoiser, x, sigmas, eta=1.0, generator=torch.Generator().manual_seed(4))
    b = sample_euler_ancestral(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(4))
    assert_rel_close(a, b, 1e-6, "DDIM eta=1 vs Euler ancestral")
    # DPM++ 2M SDE with eta = 0 is DPM++ 2M.
    c = sample_dpmpp_2m_sde(gaussian_denoiser, x, sigmas, eta=0.0)
    assert_rel_close(c, sample_dpmpp_2m(gaussian_denoiser, x, sigmas), 1e-6, "2M SDE eta=0 vs 2M")


@pytest.mark.parametrize("r", [0.5, 0.3, 1.0])
def test_dpmpp_sde_without_noise_is_dpm_solver_pp_2s(r):
    # With eta = 0 DPM++ SDE is DPM-Solver++(2S): Lu et al. 2022 ("DPM-Solver++"),
    # Algorithm 1, transcribed here in the paper's own VP variables: alpha_t = 1/sqrt(1 + s^2),
    # sigma_t = s/sqrt(1 + s^2) for the VE noise level s, lambda_t = log(alpha_t / sigma_t),
    # x_theta(x_t, t) = D(x_t / alpha_t; s). float64, ending at sigma_min (finite lambda):
    # the two forms differ by round-off only.
    schedule = DiscreteSchedule.scaled_linear()
    levels = karras_sigmas(12, schedule.sigma_min, schedule.sigma_max)[:-1].double()
    x = gaussian_start(float(levels[0]), torch.float64)

    def alpha_sigma(s):
        return 1 / math.sqrt(1 + s**2), s / math.sqrt(1 + s**2)

    def lam(s):
        alpha, sigma = alpha_sigma(s)
        return math.log(alpha / sigma)

    def x_theta(x_t, s):
        return gaussian_denoiser(x_t / alpha_sigma(s)[0], torch.full((x_t.shape[0],), s, dtype=torch.float64))

    x_t = to_variance_preserving(x, float(levels[0]))
    values = levels.tolist()
    for t_prev, t_i in zip(values, values[1:]):
        h = lam(t_i) - lam(t_prev)
        s_i = math.exp(-(lam(t_prev) + r * h))  # t_lambda(lambda_prev + r h), as a VE level: lambda = -log(s)
        alpha_s, sigma_s = alpha_sigma(s_i)
        alpha_i, sigma_i = alpha_sigma(t_i)
        sigma_prev = alpha_sigma(t_prev)[1]
        d_prev = x_theta(x_t, t_prev)
        u_i = (sigma_s / sigma_prev) * x_t - alpha_s * math.expm1(-r * h) * d_prev
        d_i = (1 - 1 / (2 * r)) * d_prev + 1 / (2 * r) * x_theta(u_i, s_i)
        x_t = (sigma_i / sigma_prev) * x_t - alpha_i * math.expm1(-h) * d_i

    def no_noise(sigma, sigma_next):
        raise AssertionError("eta = 0 must not draw noise")

    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    ours = sample_dpmpp_sde(gaussian_denoiser, x, levels, eta=0.0, r=r, generator=generator)
    assert torch.equal(generator.get_state(), state), "eta = 0 must leave the generator untouched"
    assert_rel_close(to_variance_preserving(ours, values[-1]), x_t, 1e-12, "DPM-Solver++(2S)")
    again = sample_dpmpp_sde(gaussian_denoiser, x, levels, eta=0.0, r=r, noise_sampler=no_noise)
    assert torch.equal(again, ours)


@TORCHSDE_GRID
def test_dpmpp_sde_noise_is_brownian():
    # A step's two noises are the increments of one Brownian motion W(sigma) over
    # [sigma_s, sigma] and [sigma_next, sigma], normalized: N(0, 1) each, with correlation
    # sqrt((sigma - sigma_s) / (sigma - sigma_next)). The default (from the generator) must
    # draw them with the law of diffusers' torchsde tree. One step 4 -> 1 (sigma_s = 2)
    # with D = 0 from x = 0 exposes them: the midpoint input is sigma_up_1 z_1 and the
    # result sigma_up_2 z_2, with sigma_up^2 = b^2 (a^2 - b^2) / a^2 for a step a -> b.
    # Over 20000 values the standard errors are 0.005 (std) and 0.0024 (correlation).
    x = torch.zeros(4, 5000)
    up_1, up_2 = math.sqrt(4 * (16 - 4) / 16), math.sqrt(1 * (16 - 1) / 16)
    expected = math.sqrt((4 - 2) / (4 - 1))
    inputs = []

    def zero(x_in, sigma):
        inputs.append(x_in)
        return torch.zeros_like(x_in)

    for noise_sampler in (None, BrownianTreeNoiseSampler(x, 1.0, 4.0, seed=3)):
        inputs.clear()
        out = sample_dpmpp_sde(
            zero, x, torch.tensor([4.0, 1.0]), generator=torch.Generator().manual_seed(3), noise_sampler=noise_sampler
        )
        z_1, z_2 = inputs[1].flatten() / up_1, out.flatten() / up_2
        assert abs(z_1.std().item() - 1) < 0.02 and abs(z_2.std().item() - 1) < 0.02
        correlation = torch.corrcoef(torch.stack([z_1, z_2]))[0, 1].item()
        assert abs(correlation - expected) < 0.01, f"{noise_sampler}: correlation {correlation} != {expected}"


@TORCHSDE_GRID
def test_dpmpp_sde_needs_correlated_noise():
    # Why the default correlates its two noises: drawn independently, each is still N(0, 1)
    # and the sampler still converges, but slowly. At 50 Karras steps on the Gaussian data
    # |std - S| measured 0.032 with independent noise vs 0.001 (default) and 0.002
    # (torchsde tree, diffusers' noise); the sampling error is 0.0025.
    schedule = DiscreteSchedule.scaled_linear()
    sigmas = karras_sigmas(50, schedule.sigma_min, schedule.sigma_max)
    x = gaussian_start(float(sigmas[0]))
    generator = torch.Generator().manual_seed(1)
    independent = lambda sigma, sigma_next: torch.randn(x.shape, generator=generator)  # noqa: E731
    tree = BrownianTreeNoiseSampler(x, float(sigmas[-2]), float(sigmas[0]), seed=1)
    errors = {}
    for name, noise_sampler in (("independent", independent), ("tree", tree), ("default", None)):
        out = sample_dpmpp_sde(gaussian_denoiser, x, sigmas, noise_sampler=noise_sampler, generator=generator)
        errors[name] = abs(out.std().item() - S)
    assert errors["independent"] > 0.02 and errors["tree"] < 0.012 and errors["default"] < 0.012, errors


# ----------------------------------------------------------------------------------
# 4. Schedule invariants, pieces, callbacks, errors
# ----------------------------------------------------------------------------------


def test_schedule_invariants():
    schedule = DiscreteSchedule.scaled_linear()
    for name in SAMPLER_NAMES:
        for spacing in ("leading", "linspace", "trailing"):
            sigmas = plan_sampler(name, schedule, 13, spacing=spacing).sigmas
            # DDIM with "linspace" ends at t = 0 = sigma_min itself: its no-op last step is left out.
            length = 13 if (name, spacing) == ("ddim", "linspace") else 14
            assert sigmas.dtype == torch.float32 and sigmas.shape == (length,)
            assert bool((sigmas[1:] < sigmas[:-1]).all()), f"{name}/{spacing} not decreasing"
            final = schedule.sigma_min if name == "ddim" else 0.0  # set_alpha_to_one=False
            assert float(sigmas[-1]) == pytest.approx(final)
    karras = karras_sigmas(10, 0.03, 14.6)
    assert karras[0] == pytest.approx(14.6, rel=1e-7) and karras[-2] == pytest.approx(0.03, rel=1e-6)
    assert karras[-1] == 0 and bool((karras[1:] < karras[:-1]).all())
    exponential = exponential_sigmas(10, 0.03, 14.6)
    ratios = exponential[1:-1] / exponential[:-2]
    assert_rel_close(ratios, torch.full_like(ratios, ratios[0]), 1e-6, "exponential is geometric")
    # sigma <-> t: exact on the table, a round trip (to fp32 t) between entries.
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), torch.arange(1000, dtype=torch.float32))
    t = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 999
    np.testing.assert_allclose(schedule.sigma_to_t(schedule.t_to_sigma(t)).numpy(), t.numpy(), atol=1e-4, rtol=0)
    quantized = schedule.sigma_to_t(schedule.t_to_sigma(t), quantize=True)
    assert torch.equal(quantized, t.round().float())


def test_lms_coefficients():
    sigmas = [14.6, 9.1, 5.0, 2.5, 1.1, 0.4, 0.0]
    nodes, weights = np.polynomial.legendre.leggauss(8)
    for i in range(len(sigmas) - 1):
        for order in range(1, min(i + 1, 4) + 1):
            coeffs = [lms_coefficient(sigmas, i, j, order) for j in range(order)]
            # The Lagrange basis sums to 1, so the coefficients sum to the step length.
            assert sum(coeffs) == pytest.approx(sigmas[i + 1] - sigmas[i], rel=1e-12)
            for j, c in enumerate(coeffs):  # against quadrature of the product formula
                a, b = sigmas[i], sigmas[i + 1]
                taus = 0.5 * (b - a) * nodes + 0.5 * (a + b)
                basis = [
                    math.prod((tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]) for k in range(order) if k != j)
                    for tau in taus
                ]
                assert c == pytest.approx(0.5 * (b - a) * float(np.dot(weights, basis)), rel=1e-10, abs=1e-12)


def test_denoiser_scalings_and_dtypes():
    # Feed each denoiser the exact prediction for a known x0 and noise n at x = x0 + sigma n:
    # eps = n, and v = sqrt(alphabar) n - sqrt(1 - alphabar) x0 with alphabar = 1 / (sigma^2 + 1)
    # (Salimans & Ho 2022, in VP form). D must return x0 exactly.
    g = torch.Generator().manual_seed(0)
    x0, n = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sigma = torch.tensor([0.05, 1.0, 14.0])
    alphabar = 1 / (sigma[:, None] ** 2 + 1)
    x = x0 + sigma[:, None] * n
    targets = {"epsilon": n, "v_prediction": alphabar.sqrt() * n - (1 - alphabar).sqrt() * x0}
    for prediction_type, target in targets.items():
        c_skip, c_out, c_in = (c[:, None] for c in denoiser_scalings(sigma, prediction_type))
        assert_rel_close(c_skip * x + c_out * target, x0, 1e-6, prediction_type)
        assert_rel_close(c_in * x, alphabar.sqrt() * x, 1e-6, "c_in gives the VP input")
    schedule = DiscreteSchedule.scaled_linear()
    seen = {}

    def model(x_in, t):
        seen.update(x=x_in.dtype, t=t.dtype, shape=tuple(t.shape))
        return torch.zeros_like(x_in)

    denoiser = DiscreteDenoiser(model, schedule, "epsilon", model_dtype=torch.float16)
    out = denoiser(torch.ones(3, 4, 2, 2), torch.full((3,), 2.0))
    assert seen == {"x": torch.float16, "t": torch.float32, "shape": (3,)} and out.dtype == torch.float32
    assert_rel_close(out, torch.ones(3, 4, 2, 2), 0, "zero noise prediction leaves x")


def test_cfg_is_one_batched_call_uncond_first():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    calls = []

    def model(x_in, t, context):
        calls.append(x_in.shape[0])
        return toy_unet(x_in, t, context)

    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    x = torch.randn(2, 4, 8, 8, generator=g)
    schedule = DiscreteSchedule.scaled_linear()
    sigma = torch.full((2,), 3.0)
    denoiser = cfg_denoiser(DiscreteDenoiser(model, schedule), {"context": cond}, {"context": uncond}, 6.0, 0.5)
    out = denoiser(x, sigma)
    assert calls == [4]
    # Reference: diffusers' arithmetic on the eps outputs, uncond first.
    t = schedule.sigma_to_t(torch.full((4,), 3.0))
    eps_u, eps_c = toy_unet(torch.cat([x, x]) / math.sqrt(10.0), t, torch.cat([uncond, cond])).chunk(2)
    eps = rescale_noise_cfg(eps_u + 6.0 * (eps_c - eps_u), eps_c, guidance_rescale=0.5)
    assert_rel_close(out, x - 3.0 * eps, 1e-6, "guided denoiser")
    assert_rel_close(rescale_guidance(eps_u, eps_c, 0.3), rescale_noise_cfg(eps_u, eps_c, 0.3), 1e-7)


def test_callback_and_cancel():
    schedule = DiscreteSchedule.scaled_linear()
    sigmas = discrete_sigmas(schedule, 8)
    x = gaussian_start(float(sigmas[0]))
    for name, spec in SAMPLERS.items():
        sampler = spec.fn
        seen = []

        def stop_at_three(info):
            seen.append(info)
            return info["i"] != 3

        out = sampler(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0), callback=stop_at_three)
        assert [info["i"] for info in seen] == [0, 1, 2, 3], name
        assert [info["sigma"] for info in seen] == sigmas[:4].tolist(), name
        assert seen[3]["sigma_next"] == float(sigmas[4])
        assert out is seen[3]["denoised"], f"{name}: a cancelled run returns the step's denoised"

        def fail(info):
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            sampler(gaussian_denoiser, x, sigmas, callback=fail)


def test_img2img_and_refiner_split_match_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import (
        StableDiffusionXLImg2ImgPipeline,
    )

    for cls, name in ((EulerDiscreteScheduler, "euler"), (DPMSolverMultistepScheduler, "dpmpp_2m")):
        scheduler = make_scheduler(cls, "epsilon")
        schedule = DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)
        for steps in (10, 25, 30):
            plan = plan_sampler(name, schedule, steps)
            scheduler.set_timesteps(steps)
            for strength in (0.1, 0.35, 0.5, 0.99, 1.0):
                expected, n = StableDiffusionImg2ImgPipeline.get_timesteps(
                    SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
                )
                tail = img2img_sigmas(plan.sigmas, strength)
                assert tail.numel() - 1 == n == steps - img2img_start(steps, strength)
                assert schedule.sigma_to_t(tail[:-1]).tolist() == expected.float().tolist()
            for fraction in (0.5, 0.8, 0.93):
                k = split_sigmas(schedule, plan.sigmas, fraction)
                # SDXL base, `denoising_end`: keeps the timesteps >= the cut-off.
                cutoff = int(round(1000 - fraction * 1000))
                base_t = [t for t in scheduler.timesteps.tolist() if t >= cutoff]
                assert schedule.sigma_to_t(plan.sigmas[:k]).tolist() == [float(t) for t in base_t]
                # SDXL refiner, `denoising_start`: diffusers' get_timesteps.
                expected, n = StableDiffusionXLImg2ImgPipeline.get_timesteps(
                    SimpleNamespace(scheduler=scheduler), steps, 0.3, "cpu", denoising_start=fraction
                )
                assert plan.sigmas[k:].numel() - 1 == n
                assert schedule.sigma_to_t(plan.sigmas[k:-1]).tolist() == expected.float().tolist()


def test_variance_preserving_round_trip():
    x = initial_noise()
    assert_rel_close(from_variance_preserving(to_variance_preserving(x, 7.0), 7.0), x, 1e-7)
    assert init_noise_sigma(torch.tensor([3.0, 0.0]), variance_preserving=True) == pytest.approx(math.sqrt(10))
    assert init_noise_sigma(torch.tensor([3.0, 0.0]), variance_preserving=False) == 3.0


def test_sampler_table_matches_functions():
    # The table declares each function's keyword options; guard it against drifting.
    assert SAMPLER_NAMES == (
        "ddim", "euler", "euler_karras", "euler_exponential", "euler_a", "heun", "heun_karras",
        "heun_exponential", "lms", "lms_karras", "lms_exponential", "dpmpp_2m", "dpmpp_2m_karras",
        "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_sde", "dpmpp_sde_karras", "dpmpp_sde_exponential",
    )  # fmt: skip
    for name, spec in SAMPLERS.items():
        params = inspect.signature(spec.fn).parameters
        assert list(params)[:3] == ["denoiser", "x", "sigmas"], name
        keywords = {p.name for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert keywords >= {"generator", "callback"}, name
        assert sorted(spec.options) == sorted(keywords - {"generator", "callback"}), name
        assert len(params) == 3 + len(keywords), f"{name}: every option is keyword-only"
        assert spec.timestep_rule in TIMESTEP_RULES and spec.sigma_schedules[0] == "discrete", name


def test_plan_options():
    schedule = DiscreteSchedule.scaled_linear()
    with_eta = [name for name in SAMPLER_NAMES if "eta" in SAMPLERS[split_name(name)[0]].options]
    assert with_eta == ["ddim", "euler_a", "dpmpp_2m_sde", "dpmpp_2m_sde_karras", "dpmpp_sde", "dpmpp_sde_karras",
                        "dpmpp_sde_exponential"]  # fmt: skip
    for name in SAMPLER_NAMES:
        assert plan_sampler(name, schedule, 8).options == {}
        if name in with_eta:
            assert plan_sampler(name, schedule, 8, eta=0.25).options == {"eta": 0.25}
        else:
            with pytest.raises(
                ValueError, match=rf"eta: sampler '{name}' has no eta \(samplers with eta: ddim, euler_a, "
            ):
                plan_sampler(name, schedule, 8, eta=0.25)
    with pytest.raises(ValueError, match=r"eta: expected a value in \[0, 1\], got 1.5"):
        plan_sampler("euler_a", schedule, 8, eta=1.5)
    # run() passes the options on: DDIM with eta 0.6 through the plan is sample_ddim(eta=0.6),
    # and differs from the plan's default (eta 0).
    plan = plan_sampler("ddim", schedule, 8, eta=0.6)
    x = gaussian_start(float(plan.sigmas[0]))
    seen = []
    ours = plan.run(gaussian_denoiser, x, plan.sigmas, generator=torch.Generator().manual_seed(4), callback=seen.append)
    direct = sample_ddim(gaussian_denoiser, x, plan.sigmas, eta=0.6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ours, direct) and [info["i"] for info in seen] == list(range(8))
    default = plan_sampler("ddim", schedule, 8).run(gaussian_denoiser, x, plan.sigmas)
    assert not torch.allclose(default, direct, rtol=0, atol=1e-3)


def test_errors():
    schedule = DiscreteSchedule.scaled_linear()
    with pytest.raises(ValueError, match=r"steps: expected an integer >= 1, got 0"):
        discrete_timesteps(0)
    with pytest.raises(ValueError, match=r"steps: expected an integer >= 1"):
        karras_sigmas(0, 0.03, 14.6)
    with pytest.raises(ValueError, match=r"steps: expected at most num_train_timesteps=1000"):
        discrete_sigmas(schedule, 1001)
    with pytest.raises(ValueError, match=r"sampler: expected one of .*'dpmpp_2m_karras'.*got 'dpm_fast'"):
        plan_sampler("dpm_fast", schedule, 20)
    with pytest.raises(ValueError, match=r"sampler: expected one of"):
        plan_sampler("euler_a_karras", schedule, 20)  # diffusers has no such option
    with pytest.raises(ValueError, match=r"spacing: expected one of \('leading', 'linspace', 'trailing'\), got 'even'"):
        plan_sampler("euler", schedule, 20, spacing="even")
    with pytest.raises(ValueError, match=r"rule: expected one of"):
        discrete_timesteps(20, rule="pndm")
    with pytest.raises(ValueError, match=r"rule: expected one of \('euler', 'ddim', 'dpm_solver'\), got 'pndm'"):
        compat.final_sigma("pndm")
    with pytest.raises(ValueError, match=r"final_sigma: expected one of \('zero', 'sigma_min'\)"):
        discrete_sigmas(schedule, 20, final_sigma="one")
    with pytest.raises(ValueError, match=r"prediction_type: expected one of \('epsilon', 'v_prediction'\), got 'samp"):
        DiscreteDenoiser(toy_unet, schedule, "sample")
    with pytest.raises(ValueError, match=r"strength: expected a value in \[0, 1\], got 1.5"):
        img2img_start(20, 1.5)
    with pytest.raises(ValueError, match=r"leaves no step"):
        img2img_start(20, 0.01)
    with pytest.raises(ValueError, match=r"denoising fraction: expected a value in \(0, 1\)"):
        split_sigmas(schedule, discrete_sigmas(schedule, 20), 1.0)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        schedule.t_to_sigma(torch.tensor([1000.0]))
    with pytest.raises(ValueError, match=r"alphas_cumprod: expected values in \(0, 1\)"):
        DiscreteSchedule.from_alphas_cumprod(torch.tensor([0.5, 1.5]))
    x = torch.zeros(1, 4)
    with pytest.raises(ValueError, match=r"sigmas: expected strictly decreasing values >= 0"):
        sample_euler(gaussian_denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match=r"sigmas: expected a 1-D schedule with >= 2 entries"):
        sample_heun(gaussian_denoiser, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"eta: expected a value in \[0, 1\], got 1.5"):
        sample_ddim(gaussian_denoiser, x, torch.tensor([1.0, 0.5, 0.0]), eta=1.5)
    with pytest.raises(ValueError, match=r"eta: expected a value in \[0, 1\], got -0.5"):
        sample_dpmpp_sde(gaussian_denoiser, x, torch.tensor([1.0, 0.5, 0.0]), eta=-0.5)
    with pytest.raises(ValueError, match=r"r: expected a value in \(0, 1\], got 0"):
        sample_dpmpp_sde(gaussian_denoiser, x, torch.tensor([1.0, 0.5, 0.0]), r=0)
    with pytest.raises(ValueError, match=r"order: expected an integer >= 1"):
        sample_lms(gaussian_denoiser, x, torch.tensor([1.0, 0.0]), order=0)
    cond = {"context": torch.zeros(1, 3, 8)}
    with pytest.raises(ValueError, match=r"cond and uncond must have the same keys"):
        cfg_denoiser(DiscreteDenoiser(toy_unet, schedule), cond, {"y": torch.zeros(1, 8)}, 7.5)
    with pytest.raises(ValueError, match=r"rescale: expected a value in \[0, 1\]"):
        cfg_denoiser(DiscreteDenoiser(toy_unet, schedule), cond, cond, 7.5, rescale=2.0)
    guided = cfg_denoiser(DiscreteDenoiser(toy_unet, schedule), cond, cond, 7.5)
    with pytest.raises(ValueError, match=r"cond\['context'\] has batch 1, x has batch 2"):
        guided(torch.zeros(2, 4, 2, 2), torch.ones(2))
