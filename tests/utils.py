"""Small helpers shared by the test files."""

from __future__ import annotations

import torch


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """max|actual - expected| <= rel * max|expected|.

    This is the "relative tolerance" the parity tests state: the error is measured
    against the scale of the whole reference output, so elements that happen to sit
    near zero do not make an fp32 round-off look like a large relative error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel:g} * max|expected| ({scale:.3g})"
