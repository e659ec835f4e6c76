"""The SD2 epsilon/v probe (`detection.probe_prediction_type`) on models that really learned their
objective, and on models that learned nothing.

The trained models are two tiny SD2-architecture models, one trained with each objective on the
built-in shapes (tests/fixtures/README.md; `python -m tests.fixtures.make_probe_models` rebuilds
them). Like the official SD2 files they do not say what they predict, so `minisd.load` runs the
probe. The analytic (exact) denoisers are tested in tests/test_checkpoint.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch

import minisd
from minisd.detection import PROBE_EPSILON_SLOPES, PROBE_MAX_RESIDUAL, PROBE_V_SLOPES, probe_prediction_type
from minisd.train import init_model
from minisd.unet import UNetModel
from tests.fixtures.make_probe_models import ARCH
from tests.test_unet import randomize
from tests.tiny import official_checkpoint, tiny_config

FIXTURES = Path(__file__).parent / "fixtures"
TRAINED = {"epsilon": FIXTURES / "probe-epsilon.safetensors", "v_prediction": FIXTURES / "probe-v.safetensors"}
BANDS = {"epsilon": PROBE_EPSILON_SLOPES, "v_prediction": PROBE_V_SLOPES}
# The margins asserted. A trained model's slope lies at least SLOPE_MARGIN inside its band (the
# fixtures: 0.2 and more) and its residual at most 3/4 of the bound (0.11, 0.13 of 0.2); random weights
# leave a residual at least 5/4 of it (0.30 and up).
SLOPE_MARGIN = 0.15
TRAINED_RESIDUAL, RANDOM_RESIDUAL = 0.75 * PROBE_MAX_RESIDUAL, 1.25 * PROBE_MAX_RESIDUAL
DTYPES = [torch.float32, torch.float16]

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("kind", list(TRAINED))
def test_trained_models_are_told_apart_with_a_margin(kind, dtype):
    # the U-Net cast to `dtype` as it is read (fp16 runs on the CPU too); loading runs the probe
    sd = minisd.load(TRAINED[kind], dtype=dtype)
    assert sd.dtype == dtype
    assert (sd.prediction_type, sd.family.name) == (kind, {"epsilon": "sd2", "v_prediction": "sd2-v"}[kind])
    assert sd.prediction_reason.startswith("probe: ") and f"in {kind}'s band" in sd.prediction_reason
    result = probe_prediction_type(sd.unet)
    lo, hi = BANDS[kind]
    assert lo + SLOPE_MARGIN <= result.slope <= hi - SLOPE_MARGIN, result.reason
    assert result.residual <= TRAINED_RESIDUAL, result.reason


def test_fp16_agrees_with_fp32():
    for path in TRAINED.values():
        full, half = (probe_prediction_type(minisd.load(path, dtype=d).unet) for d in DTYPES)
        assert abs(full.slope - half.slope) < 0.01 and abs(full.residual - half.residual) < 0.01


def test_fixtures_do_not_say_what_they_predict():
    """Otherwise loading would read the metadata and the tests above would not exercise the probe."""
    for path in TRAINED.values():
        with safetensors.safe_open(str(path), "pt") as f:
            assert set(f.metadata()) == {"minisd.config"}
        assert minisd.detect(path).prediction_type is None


def _random_unet(init: str, seed: int) -> UNetModel:
    """The fixtures' U-Net architecture with random weights: PyTorch's default init (no zeroed
    output layers), or tests/test_unet.py's `randomize` (1/sqrt(fan_in) normals everywhere)."""
    torch.manual_seed(seed)
    unet = UNetModel(ARCH["unet"]).eval()
    if init == "randomize":
        randomize(unet, seed)
    return unet


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("init", ["default", "randomize"])
def test_random_weights_are_unsure(init, dtype):
    for seed in range(3):
        result = probe_prediction_type(_random_unet(init, seed).to(dtype))
        assert result.verdict == "unsure", result.reason
        assert result.residual >= RANDOM_RESIDUAL and result.reason.startswith("probe unsure: "), result.reason


def test_zero_initialised_model_is_unsure():
    """`init_model` zeroes the output layers (LDM's `zero_module`): the output is 0 for any input,
    which no trained model returns, though its slope (0) lies in v's band."""
    result = probe_prediction_type(init_model("sd2", config=tiny_config("sd2")).unet)
    assert (result.verdict, result.slope, result.residual) == ("unsure", 0.0, 0.0)
    assert "does not change with the input" in result.reason


def test_overflow_is_unsure():
    unet = _random_unet("default", 0)
    torch.nn.init.constant_(unet.out[-1].bias, float("inf"))  # what an fp16 overflow leaves
    result = probe_prediction_type(unet)
    assert result.verdict == "unsure" and "inf or NaN" in result.reason


def test_loading_random_weights_keeps_the_family_default(tmp_path, caplog):
    path = tmp_path / "random-sd2.safetensors"
    safetensors.torch.save_file(official_checkpoint("sd2").tensors, str(path))  # tests/tiny.py: random weights
    with caplog.at_level(logging.WARNING, logger="minisd"):
        sd = minisd.load(path, config=tiny_config("sd2"))
    assert (sd.family.name, sd.prediction_type) == ("sd2", "epsilon")
    assert sd.prediction_reason.startswith("probe unsure: ") and "kept sd2's default epsilon" in sd.prediction_reason
    assert "pass prediction_type= to choose" in caplog.text
    # the caller's word still wins, without a probe
    sd = minisd.load(path, config=tiny_config("sd2"), prediction_type="v_prediction")
    assert (sd.family.name, sd.prediction_reason) == ("sd2-v", "prediction_type given by the caller")
