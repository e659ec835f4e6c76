"""SD2's epsilon and v models share every key and shape: one U-Net call at t = 999 tells them apart
(`probe_prediction_type`), or answers "unsure" rather than guess.

Loading asks it last, after the file's metadata and `known_files.KNOWN_SHA256`
(`checkpoint.load_components`); tests/test_probe.py runs it on models trained with each objective
and on random weights, and tests/fixtures/README.md has the numbers behind its bands and size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .unet import UNetModel

# The probe's bands (see `probe_prediction_type`). The exact slopes at t=999 are 0.96..1.0024 for
# epsilon and -0.53..+0.07 for v (data std s <= 3); the probe is unsure in (0.4, 0.6), about the middle
# fifth of the gap between them (midpoint 0.52), where a model has learned neither. The trained
# tiny fixtures sit at 0.98 and 0.09 with residuals 0.09 and 0.07 at `PROBE_SIZE` (1.04 and 0.17, 0.11 and
# 0.13 at 4x it); random weights at residual 0.26 (full-size SD2, PyTorch's init) and up (tests/fixtures/README.md).
PROBE_EPSILON_SLOPES = (0.6, 1.25)
PROBE_V_SLOPES = (-0.75, 0.4)
PROBE_MAX_RESIDUAL = 0.2  # above it the output is not an affine function of the noise: no objective learned
# The probe's latent side: the smallest that decides with a margin. At 8 the fixtures sit furthest inside
# their bands (slopes 0.983 and 0.088, residuals 0.09 and 0.07) and random weights stay unsure (residual
# 0.26 .. 0.43); at 4, 39 -> 12 high-frequency modes per channel, one random U-Net in three already reads
# as v (residual 0.19). A1111 probes real SD2 files at 8 x 8 too. It costs one pass over the weights
# (tests/fixtures/README.md has the numbers); a U-Net with more than 4 levels gets its downsampling factor.
PROBE_SIZE = 8


@dataclass(frozen=True)
class ProbeResult:
    """What one U-Net call at t=999 says (`probe_prediction_type`).

    Attributes:
        verdict: "epsilon", "v_prediction", or "unsure" (outside both bands, or the output is not
            a function of the noise that either trained objective gives).
        slope: d(output)/d(input) along the noise, fitted over two noise draws (high frequencies).
        residual: what that fit leaves, relative to the input (0 for an exact Gaussian denoiser).
        reason: one line with the numbers and the bands, starting "probe".
    """

    verdict: str
    slope: float
    residual: float
    reason: str


@torch.no_grad()
def probe_prediction_type(unet: UNetModel, *, size: int | None = None) -> ProbeResult:
    """Tell an SD2 epsilon model from a v model by one U-Net call at t = 999 (a batch of two noise draws of
    `size` x `size` latents, default `PROBE_SIZE`), in the U-Net's own dtype and on its own device.

    At the last training step alphabar = 0.0047, so x_t = sqrt(alphabar) x_0 + sqrt(1 - alphabar) eps
    is 99.8 % noise. An epsilon-model must hand (nearly) its input back: for data of standard
    deviation s, the exact eps-prediction is x_t times (1 - sqrt(alphabar) k) / sqrt(1 - alphabar)
    plus a constant, with k = sqrt(alphabar) s^2 / (alphabar s^2 + 1 - alphabar), a slope of 0.96 or
    more for any s <= 3. The exact v = sqrt(alphabar) eps - sqrt(1 - alphabar) x_0 has slope
    sqrt(alphabar / (1 - alphabar)) - sqrt(1 - alphabar) k, between -0.53 and +0.07 for s <= 3.
    SD latents are scaled to unit variance (s about 1), far inside that range.

    So we feed two Gaussian noise draws (seed 0, zero context) and compare the difference of the two
    outputs with that of the inputs, which cancels whatever does not depend on the noise (v's
    -E[x_0], a mean picture), over the upper three quarters of the spatial frequencies
    (max(|f_y|, |f_x|) > 1/4 cycle per latent pixel). Those ranges hold there too: with correlated
    data each frequency has its own variance, and k is concave in it, so averaging over modes only
    moves epsilon's slope toward 1.0024 and v's toward +0.07 (Jensen). Images hold little power at
    high frequencies, so both exact predictions are the input times a slope and nothing else there
    (a `residual` near 0), even for a model that reads the mean brightness out of the noise at t=999
    (the low frequencies keep some signal at SD's last step: Lin et al. 2023, sec. 3.1). Random
    weights answer noise with more noise: residual about 0.3 and up, and a slope near 0 that alone would
    read as v. The verdict is epsilon or v only when the slope is in that kind's band
    (`PROBE_EPSILON_SLOPES`, `PROBE_V_SLOPES`) and the residual is at most `PROBE_MAX_RESIDUAL`;
    otherwise "unsure", and loading keeps the family's default (`checkpoint._prediction`). An output
    that does not change with the input at all (an untrained, zero-initialised output layer), or
    that is not finite, is "unsure" too.

    A1111 and stable-diffusion.cpp also decide with one call at t=999; they threshold the mean of
    `out - x` on a constant input, a rule calibrated on the real weights. The slope rule follows
    from the two parameterizations; it is tested on exact (analytic) denoisers, on two tiny models
    trained with each objective, and on random weights (tests/test_probe.py).
    """
    p = next(unet.parameters())
    cfg = unet.config
    # a U-Net deeper than SD's 4 levels needs a side of its downsampling factor (duck-typed test doubles lack it)
    size = size or max(PROBE_SIZE, getattr(cfg, "downsample_factor", 1))
    g = torch.Generator("cpu").manual_seed(0)
    x = torch.randn(2, cfg.in_channels, size, size, generator=g).to(p.device)
    context = torch.zeros(2, 77, cfg.context_dim, device=p.device, dtype=p.dtype)
    y = None if cfg.adm_in_channels is None else torch.zeros(2, cfg.adm_in_channels, device=p.device, dtype=p.dtype)
    t = torch.full((2,), 999.0, device=p.device)
    out = unet(x.to(p.dtype), t, context, y).float()
    # The difference of the two draws cancels what does not depend on the noise; then its spectrum
    # (c h w, complex) above a quarter cycle per pixel, where images hold little power.
    dx = torch.fft.fft2(x[0, : cfg.out_channels] - x[1, : cfg.out_channels])
    dout = torch.fft.fft2(out[0] - out[1])
    f = torch.fft.fftfreq(size, device=p.device).abs()
    high = torch.maximum(f[:, None], f[None, :]) > 0.25  # (h, w)
    dx, dout = dx[:, high], dout[:, high]
    slope = float((dx.conj() * dout).real.sum() / dx.abs().square().sum())
    residual = float((dout - slope * dx).abs().square().sum().sqrt() / dx.abs().square().sum().sqrt())
    fit = f"slope {slope:.3f}, residual {residual:.3f}"
    if not out.isfinite().all():
        why = f"the U-Net returned inf or NaN in {p.dtype} (an overflow? load it in float32)"
        return ProbeResult("unsure", slope, residual, f"probe unsure: {why}")
    if not dout.any():
        why = "the output does not change with the input (an untrained, zero-initialised output layer?)"
        return ProbeResult("unsure", slope, residual, f"probe unsure: {why}")
    if residual > PROBE_MAX_RESIDUAL:
        why = f"the output is not an affine function of the noise ({fit}; residual > {PROBE_MAX_RESIDUAL})"
        return ProbeResult("unsure", slope, residual, f"probe unsure: {why}: random or broken weights?")
    for kind, (lo, hi) in (("epsilon", PROBE_EPSILON_SLOPES), ("v_prediction", PROBE_V_SLOPES)):
        if lo <= slope <= hi:
            return ProbeResult(kind, slope, residual, f"probe: one U-Net call at t=999: {fit}, in {kind}'s band "
                               f"[{lo}, {hi}]")  # fmt: skip
    bands = f"epsilon {list(PROBE_EPSILON_SLOPES)}, v {list(PROBE_V_SLOPES)}"
    return ProbeResult("unsure", slope, residual, f"probe unsure: {fit} is in neither band ({bands})")
