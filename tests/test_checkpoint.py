"""minisd.load / detect / save on tiny random checkpoints in the exact official layouts.

The files are built by tests/tiny.py from independent sources (transformers and open_clip state
dicts for the text encoders; U-Net/VAE names that tests/test_unet.py and tests/test_vae.py check
against diffusers' converter). What is loaded is compared with the references: diffusers'
U-Net and VAE made by diffusers' own single-file converter from the same file, and the
transformers / open_clip models the text weights came from.

Tolerance: 1e-5 relative in fp32 (tests.utils.assert_rel_close), as in the component tests: the
same arithmetic in another summation order. A wrongly mapped or skipped tensor errs by order 1.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers.loaders.single_file_utils import infer_diffusers_model_type

import minisd
from minisd import detection
from minisd.checkpoint import build
from minisd.detection import KNOWN_SHA256, TensorInfo, detect_keys, probe_prediction_type
from minisd.families import FAMILIES, UNET_PREFIX
from minisd.keymap import CheckpointError
from minisd.layouts import official_tables
from minisd.schedules import ddpm_alphas_cumprod
from tests.test_unet import run_ours, run_theirs
from tests.tiny import diffusers_unet, diffusers_vae, official_checkpoint, tiny_config
from tests.utils import assert_rel_close

REL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def write(tensors, path, metadata=None):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def ids(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    body = torch.randint(0, 49406, (batch, 6), generator=g)
    return torch.cat([torch.full((batch, 1), 49406), body, torch.full((batch, 70), 49407)], dim=1)


def inputs(cfg) -> dict:
    """U-Net inputs at timesteps 0, 999 and 500. The tiny SDXL-like configs have context widths
    diffusers' converter maps to a "projection" class embedding, which takes y whole."""
    g = torch.Generator().manual_seed(1)
    out = dict(x=torch.randn(3, cfg.in_channels, 16, 16, generator=g), timesteps=torch.tensor([0.0, 999.0, 500.0]),
               context=torch.randn(3, 7, cfg.context_dim, generator=g))
    if cfg.adm_in_channels is not None:
        out["y"] = torch.randn(3, cfg.adm_in_channels, generator=g)
    return out


@torch.no_grad()
def check_against_references(sd, ckpt, *, ema=False):
    """Every component of a loaded model against its reference."""
    inp = inputs(sd.unet.config)
    assert_rel_close(run_ours(sd.unet, inp), run_theirs(diffusers_unet(ckpt, ema=ema), inp), REL, "U-Net")
    ref_vae = diffusers_vae(ckpt)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    assert_rel_close(sd.vae.encode(images).mean, ref_vae.encode(images).latent_dist.mean, REL, "VAE encode")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    assert_rel_close(sd.vae.decode(z), ref_vae.decode(z).sample, REL, "VAE decode")
    for ours, ref in zip(sd.text_encoders, ckpt.text_refs):
        x = ids()
        if hasattr(ref, "encode_text"):  # open_clip: pooled through text_projection
            assert_rel_close(ours(x).pooled, ref.encode_text(x, normalize=False), REL, "open_clip text")
        else:
            assert_rel_close(ours(x).last_hidden_state, ref(x).last_hidden_state, REL, "HF text")


# ------------------------------------------------------------------------------ loading, per family
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner", "sd1-inpaint", "sd2-inpaint"])
def test_load_matches_references(family, tmp_path):
    # mixed dtypes: an fp16 U-Net beside fp32 VAE and text encoders, plus every extra
    ckpt = official_checkpoint(family, unet_dtype=torch.float16)
    meta = {"modelspec.prediction_type": "epsilon"} if family == "sd2" else None
    path = write(ckpt.tensors, tmp_path / "model.safetensors", meta)
    sd = minisd.load(path, config=tiny_config(family))
    assert sd.family.name == family and sd.prediction_type == "epsilon"
    assert sd.scale_factor == FAMILIES[family].vae.scale_factor
    assert all(p.dtype == torch.float32 for p in sd.unet.parameters())  # cast once, at load time
    check_against_references(sd, ckpt)
    # the extras are ignored, each with its reason
    assert "alphas_cumprod" in sd.ignored and "schedule" in sd.ignored["alphas_cumprod"]
    if family.startswith("sd1"):
        assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in sd.ignored
    if family.startswith(("sd2", "sdxl")):
        assert any(k.endswith("logit_scale") for k in sd.ignored)


def test_fp16_file_loads_as_fp16_without_upcast(tmp_path):
    ckpt = official_checkpoint("sd1")
    half = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.tensors.items()}
    sd = minisd.load(write(half, tmp_path / "m.safetensors"), config=tiny_config("sd1"), dtype=torch.float16)
    assert {p.dtype for p in sd.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in sd.text_encoders[0].parameters()} == {torch.float16}
    assert {p.dtype for p in sd.vae.parameters()} == {torch.float32}  # the VAE stays fp32 by default
    key = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(sd.unet.state_dict()[key], half[UNET_PREFIX + key])


def test_bf16_tensors_load(tmp_path):
    ckpt = official_checkpoint("sd1", unet_dtype=torch.bfloat16)
    sd = minisd.load(write(ckpt.tensors, tmp_path / "m.safetensors"), config=tiny_config("sd1"), dtype=torch.bfloat16)
    key = "out.2.weight"
    assert torch.equal(sd.unet.state_dict()[key], ckpt.tensors[UNET_PREFIX + key])


def test_ema_weights(tmp_path):
    ckpt = official_checkpoint("sd1", ema=True)
    path = write(ckpt.tensors, tmp_path / "full.safetensors")
    assert minisd.detect(path).has_ema
    regular = minisd.load(path, config=tiny_config("sd1"))
    assert any(r.startswith("EMA copy") for r in regular.ignored.values())
    ema = minisd.load(path, config=tiny_config("sd1"), use_ema=True)
    assert all(r.startswith("non-EMA") for k, r in ema.ignored.items() if k.startswith(UNET_PREFIX))
    check_against_references(ema, ckpt, ema=True)
    inp = inputs(ema.unet.config)
    assert (run_ours(ema.unet, inp) - run_ours(regular.unet, inp)).abs().max() > 1e-2


def test_use_ema_on_a_pruned_file(tmp_path):
    path = write(official_checkpoint("sd1").tensors, tmp_path / "pruned.safetensors")
    with pytest.raises(CheckpointError, match="no `model_ema"):
        minisd.load(path, config=tiny_config("sd1"), use_ema=True)


def test_legacy_sd1_text_layout_without_text_model_level(tmp_path):
    # SD1 files written with transformers 3.x lack the `text_model.` level.
    ckpt = official_checkpoint("sd1")
    pre = "cond_stage_model.transformer.text_model."
    t = {
        ("cond_stage_model.transformer." + k[len(pre):]) if k.startswith(pre) else k: v
        for k, v in ckpt.tensors.items()
    }
    sd = minisd.load(write(t, tmp_path / "old.safetensors"), config=tiny_config("sd1"))
    check_against_references(sd, ckpt)


def test_config_from_json_file(tmp_path):
    ckpt = official_checkpoint("sd1")
    cfg = tiny_config("sd1")
    as_json = {"unet": cfg["unet"].__dict__, "vae": cfg["vae"].__dict__,
               "text_encoders": [c.__dict__ for c in cfg["text_encoders"]]}
    (tmp_path / "cfg.json").write_text(json.dumps(as_json))
    sd = minisd.load(write(ckpt.tensors, tmp_path / "m.safetensors"), config=tmp_path / "cfg.json")
    assert sd.unet.config == cfg["unet"]
    with pytest.raises(ValueError, match="unknown UNetConfig fields"):
        minisd.load(tmp_path / "m.safetensors", config={"unet": {"model_channel": 32}})


def test_schedule_buffers_checked(tmp_path, caplog):
    ckpt = official_checkpoint("sd1")
    ok = write(ckpt.tensors, tmp_path / "ok.safetensors")
    with caplog.at_level(logging.WARNING, logger="minisd"):
        minisd.load(ok, config=tiny_config("sd1"))
    assert "alphas_cumprod" not in caplog.text
    ckpt.tensors["alphas_cumprod"] = ddpm_alphas_cumprod(zero_terminal_snr=True).float()
    zsnr = write(ckpt.tensors, tmp_path / "zsnr.safetensors")
    with caplog.at_level(logging.WARNING, logger="minisd"):
        minisd.load(zsnr, config=tiny_config("sd1"))
    assert "alphas_cumprod differs" in caplog.text and "zero-terminal-SNR" in caplog.text


# ------------------------------------------------------------------------------ SD2: epsilon or v
def test_sd2_prediction_from_metadata(tmp_path):
    ckpt = official_checkpoint("sd2")
    path = write(ckpt.tensors, tmp_path / "v.safetensors", {"modelspec.architecture": "stable-diffusion-v2-768-v"})
    d = minisd.detect(path)
    assert (d.family.name, d.prediction_type) == ("sd2-v", "v_prediction")
    assert "modelspec.architecture" in d.prediction_reason
    sd = minisd.load(path, config=tiny_config("sd2"))
    assert (sd.family.name, sd.prediction_type) == ("sd2-v", "v_prediction")
    # an explicit override wins, and is recorded
    sd = minisd.load(path, config=tiny_config("sd2"), prediction_type="epsilon")
    assert (sd.family.name, sd.prediction_type) == ("sd2", "epsilon") and "caller" in sd.prediction_reason


def test_sd2_without_metadata_runs_the_probe(tmp_path):
    path = write(official_checkpoint("sd2").tensors, tmp_path / "plain.safetensors")
    d = minisd.detect(path)
    assert d.family.name == "sd2" and d.prediction_type is None and "identical keys" in d.prediction_reason
    sd = minisd.load(path, config=tiny_config("sd2"))
    # random weights: the probe is unsure and the family's default stands (tests/test_probe.py)
    assert sd.prediction_reason.startswith("probe unsure:") and "kept sd2's default" in sd.prediction_reason
    assert (sd.family.name, sd.prediction_type) == ("sd2", "epsilon")


class _AnalyticUNet(torch.nn.Module):
    """The exact epsilon- or v-prediction for data x_0 ~ N(mu, s^2) i.i.d. (what a perfectly
    trained model of that data returns), in the U-Net's calling convention."""

    def __init__(self, kind: str, mu: float, s: float):
        super().__init__()
        self.kind, self.mu, self.s = kind, mu, s
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"in_channels": 4, "out_channels": 4, "context_dim": 8, "adm_in_channels": None})()

    def forward(self, x, t, context, y=None):
        a = ddpm_alphas_cumprod()[int(t[0])].float()
        sa, sb = a.sqrt(), (1 - a).sqrt()
        x0 = self.mu + sa * self.s**2 * (x - sa * self.mu) / (a * self.s**2 + sb**2)  # E[x_0 | x_t]
        eps = (x - sa * x0) / sb
        return eps if self.kind == "epsilon" else sa * eps - sb * x0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("mu, s", [(0.0, 1.0), (0.3, 0.5), (-0.5, 1.2), (0.1, 3.0)])
def test_probe_on_exact_denoisers(kind, mu, s):
    result = probe_prediction_type(_AnalyticUNet(kind, mu, s))
    assert result.verdict == kind and result.residual < 1e-4, result.reason


def test_known_files_table():
    """Each entry's name agrees with its format, family and prediction type; no hash or name twice."""
    names = [k.name for k in KNOWN_SHA256.values()]
    assert len(set(names)) == len(names)
    assert {k.format for k in KNOWN_SHA256.values()} == {".ckpt", ".safetensors"}
    for digest, k in KNOWN_SHA256.items():
        assert re.fullmatch("[0-9a-f]{64}", digest), k
        assert k.format == Path(k.name).suffix, k
        family = FAMILIES[k.family]
        assert k.prediction_type == family.prediction_type, k
        assert ("inpainting" in k.name) == family.inpainting, k
        assert ("768" in k.name) == (k.family == "sd2-v") == (k.prediction_type == "v_prediction"), k
        assert ("refiner" in k.name) == (k.family == "sdxl-refiner"), k
        assert ("_xl_" in k.name) == k.family.startswith("sdxl"), k
        assert k.name.startswith(("sd-v1-", "v1-")) == k.family.startswith("sd1"), k
        assert k.name.startswith(("v2-1_", "512-", "768-")) == k.family.startswith("sd2"), k
    # a hash listed twice is refused where the table is built (a dict literal would keep the last)
    row = ("0" * 64, "v1-5-pruned.ckpt", ".ckpt", "sd1", "epsilon")
    with pytest.raises(ValueError, match="twice"):
        detection._known(row, (*row[:1], "v1-5-pruned.safetensors", ".safetensors", "sd1", "epsilon"))
    # the two files, under their own names (the table once gave them the .ckpt hashes)
    assert KNOWN_SHA256["dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac"].name == (
        "v2-1_768-ema-pruned.safetensors")
    assert KNOWN_SHA256["ad2a33c361c1f593c4a1fb32ea81afce2b5bb7d1983c6b94793a26a3b54b08a0"].name == (
        "v2-1_768-ema-pruned.ckpt")


# ------------------------------------------------------------------------------ save round trip
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_official_round_trip(family, tmp_path):
    ckpt = official_checkpoint(family, ema=True)
    path = write(ckpt.tensors, tmp_path / "in.safetensors", {"modelspec.prediction_type": "epsilon"})
    sd = minisd.load(path, config=tiny_config(family))
    out = minisd.save(sd, tmp_path / "out.safetensors")
    saved = safetensors.torch.load_file(str(out))
    kept = {k: v for k, v in ckpt.tensors.items() if k not in sd.ignored}
    assert set(saved) == set(kept)
    for k, v in kept.items():
        assert saved[k].dtype == v.dtype and torch.equal(saved[k], v), k
    with pytest.raises(FileExistsError):
        minisd.save(sd, out)  # nothing the user owns is overwritten
    again = minisd.load(out, config=tiny_config(family))
    assert again.family.name == sd.family.name and again.prediction_type == sd.prediction_type


# ------------------------------------------------------------------------------ full size on meta
def full_size_keys(family: str) -> dict[str, TensorInfo]:
    """The key/shape set of a full-size official file of `family`, built on the meta device."""
    spec = FAMILIES[family]
    unet, vae, encoders = build(spec)
    theirs = {}
    for table, module in zip(official_tables(spec, set(), use_ema=False).values(), [unet, vae, *encoders]):
        theirs.update(table.to_theirs(module.state_dict()))
    return {k: TensorInfo("F16", tuple(v.shape)) for k, v in theirs.items()}


_DIFFUSERS_NAMES = {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base", "sdxl-refiner": "xl_refiner",
                    "sd1-inpaint": "inpainting", "sd2-inpaint": "inpainting_v2"}


@pytest.mark.parametrize("family", list(_DIFFUSERS_NAMES))
def test_full_size_detection_and_tables_cover_the_layout(family):
    keys = full_size_keys(family)
    detected = detect_keys(keys, {}, "full-size")
    assert detected.family.name == family
    # diffusers' own detector agrees on these key sets
    stand_in = {k: torch.empty(v.shape, device="meta") for k, v in keys.items()}
    assert infer_diffusers_model_type(stand_in) == _DIFFUSERS_NAMES[family]
    # the loader's tables are total over the file: every key is used, and nothing is missing
    tables = official_tables(FAMILIES[family], set(keys), use_ema=False)
    used = [k for t in tables.values() for k in t.theirs_keys]
    assert len(used) == len(set(used)) and set(used) == set(keys)


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    return write(official_checkpoint("sd1").tensors, path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        minisd.load(tmp_path / "nope.safetensors")


def test_truncated_file(sd1_file, tmp_path):
    data = sd1_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: truncated"):
        minisd.load(cut, config=tiny_config("sd1"))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="too short"):
        minisd.detect(tiny)


def test_corrupt_header(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10) + b"{not json}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        minisd.load(bad)
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="noise.safetensors"):
        minisd.load(noise)


@pytest.mark.parametrize(
    "keys, match",
    [
        ({"lora_unet_down_blocks_0.lora_down.weight": (4, 8)}, "LoRA"),
        ({"encoder.down.0.block.0.conv1.weight": (8, 8, 3, 3)}, "VAE-only"),
        ({"first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3)}, "only the VAE"),
        ({"conv_in.weight": (8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}, "diffusers folder"),
        ({"bert.embeddings.word_embeddings.weight": (8, 8)}, "not a Stable Diffusion"),
    ],
)
def test_wrong_kind_of_file(keys, match, tmp_path):
    path = write({k: torch.zeros(s) for k, s in keys.items()}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=match):
        minisd.load(path)


def test_unet_only_file_is_partial(tmp_path):
    t = {k: v for k, v in official_checkpoint("sd1").tensors.items() if k.startswith(UNET_PREFIX)}
    with pytest.raises(CheckpointError, match="partial checkpoint.*no text encoder"):
        minisd.load(write(t, tmp_path / "unet.safetensors"), config=tiny_config("sd1"))


def test_missing_component_keys_are_named(tmp_path):
    t = official_checkpoint("sd1").tensors
    del t["first_stage_model.decoder.conv_out.weight"]
    with pytest.raises(CheckpointError, match=r"VAE: 1 missing key\(s\): first_stage_model.decoder.conv_out.weight"):
        minisd.load(write(t, tmp_path / "m.safetensors"), config=tiny_config("sd1"))
    t["first_stage_model.decoder.conv_out.weight"] = torch.zeros(3, 32, 3, 3)
    t["model.diffusion_model.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match="unexpected key.*model.diffusion_model.extra.weight"):
        minisd.load(write(t, tmp_path / "m2.safetensors"), config=tiny_config("sd1"))


def test_shape_mismatch_names_key_expected_and_got(sd1_file):
    cfg = tiny_config("sd1")
    cfg["unet"] = type(cfg["unet"])(**{**cfg["unet"].__dict__, "model_channels": 64})
    with pytest.raises(CheckpointError, match=r"wrong shape: .*expected \(64,.*got \(32,"):
        minisd.load(sd1_file, config=cfg)


def test_full_size_preset_on_a_tiny_file_fails_clearly(sd1_file):
    # the full-size SD1 preset has far more tensors than the tiny file: refused from the header's sizes
    # alone, before anything is built, every component named with both sizes
    with pytest.raises(CheckpointError, match=r"far smaller.*\n  U-Net: the architecture has 859,520,964 parameters "
                       r"in 686 tensors; the file holds [\d,]+ in 286 under `model.diffusion_model.`") as e:
        minisd.load(sd1_file)
    assert "\n  VAE: the architecture has 83,653,863 parameters" in str(e.value)
    assert "\n  text encoder 0 (hf): " in str(e.value) and "Pass config=" in str(e.value)


def test_directory_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(CheckpointError, match="without model_index.json"):
        minisd.load(tmp_path)


def test_pickle_refused_by_default(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="refuses them by default.*allow_pickle=True"):
        minisd.load(path)


class _Payload:
    """A pickle whose unpickling would create a file: the code-execution attack on .ckpt files."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": _Payload(marker)}}, f)
    for allow in (False, True):
        with pytest.raises(CheckpointError):
            minisd.load(path, allow_pickle=allow)
    assert not marker.exists()
    # the payload is real: plain pickle would have run it
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_trusted_ckpt_loads_with_allow_pickle(tmp_path):
    ckpt = official_checkpoint("sd1")
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": ckpt.tensors, "global_step": 10}, path)
    sd = minisd.load(path, config=tiny_config("sd1"), allow_pickle=True)
    check_against_references(sd, ckpt)


def test_tensors_sharing_storage(tmp_path):
    # A .ckpt whose EMA copy is saved as views of the regular weights (one storage for both): the
    # loaded parameters must not alias each other, and a save afterwards must not trip safetensors'
    # refusal of shared storage.
    ckpt = official_checkpoint("sd1")
    tensors = dict(ckpt.tensors)
    for k in [k for k in tensors if k.startswith(UNET_PREFIX)]:
        ema_key = "model_ema." + ("diffusion_model." + k[len(UNET_PREFIX):]).replace(".", "")
        tensors[ema_key] = tensors[k].view(tensors[k].shape)
    path = tmp_path / "shared.ckpt"
    torch.save({"state_dict": tensors}, path)
    sd = minisd.load(path, config=tiny_config("sd1"), allow_pickle=True, use_ema=True)
    ptrs = [p.untyped_storage().data_ptr() for p in sd.unet.parameters()]
    assert len(ptrs) == len(set(ptrs))
    check_against_references(sd, ckpt)  # the EMA copy holds the same values as the regular weights here
    minisd.save(sd, tmp_path / "out.safetensors")
    assert minisd.detect(tmp_path / "out.safetensors").family.name == "sd1"
