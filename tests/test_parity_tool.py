"""`minisd parity` (issue 11): the tool itself, on tiny official-layout checkpoints of every family.

- Every family passes against diffusers / transformers in fp32 (and SDXL in fp16), through the command
  line with `--json`: the references are loaded by their own single-file converters, so a wrong key
  table, config or forward on minisd's side would show as a failing row.
- Injected faults: one weight changed on minisd's side only, in the U-Net, the VAE and each kind of text
  encoder; the rows of that component fail, no other, and the localised module is the one holding the weight,
  paired with the reference module diffusers' own converter put that weight in.
- Bundles: recorded from diffusers, checked in a process where diffusers, transformers and open_clip
  cannot be imported; a changed weight fails against the same bundle. Without a bundle, that process gets
  the missing-package error and exit status 2.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from minisd import parity
from minisd.families import family_spec
from minisd.parity_reference import load_reference, localise, run_reference
from tests.tiny import official_checkpoint, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py

FAMILIES = ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "sdxl", "sdxl-refiner")
# A process that cannot import the references: a meta-path finder refuses them before any other finder.
BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "transformers", "open_clip"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import json
from minisd.parity import main
for argv in json.loads(sys.argv[1]):  # several runs, one start-up
    print("exit status", main(argv), file=sys.stderr)
"""


def write_tiny(family: str, tmp_path, tensors: dict | None = None):
    """A tiny official file of `family` and its architecture JSON (`--config`)."""
    tensors = official_checkpoint(family).tensors if tensors is None else tensors
    file = tmp_path / f"{family}.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(file))
    cfg = tiny_config(family)
    as_json = {"unet": cfg["unet"].__dict__, "vae": cfg["vae"].__dict__,
               "text_encoders": [c.__dict__ for c in cfg["text_encoders"]]}  # fmt: skip
    (tmp_path / f"{family}.json").write_text(json.dumps(as_json))
    return file, tmp_path / f"{family}.json"


def expected_rows(family: str, samplers: tuple[str, ...]) -> set[str]:
    """The outputs a parity run of `family` must compare, from the family record (not from the tool)."""
    fam = family_spec(family)
    rows = {f"text{i}.context" for i in range(len(fam.text))}
    rows |= {f"text{i}.pooled" for i, t in enumerate(fam.text) if t.pooled}
    rows |= {f"unet.t{t}{g}" for t in (999, 500, 20) for g in ("", ".guided")}
    return rows | {"vae.encode", "vae.decode"} | {f"sample.{s}" for s in samplers}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_passes_against_diffusers(family, tmp_path, capsys):
    file, cfg = write_tiny(family, tmp_path)
    out = tmp_path / "table.json"
    rc = parity.main([str(file), "--config", str(cfg), "--family", family, "--samplers", "euler,dpmpp_2m_karras",
                      "--json", str(out)])  # fmt: skip
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert rc == 0, table
    assert report["passed"] and report["meta"]["family"] == family
    assert {r["name"] for r in report["rows"]} == expected_rows(family, ("euler", "dpmpp_2m_karras"))
    for r in report["rows"]:
        assert r["passed"] and r["max_rel"] <= r["tolerance"], r
        assert f"{r['name']:<28}" in table and "FAIL" not in table


def test_sdxl_fp16_passes_with_fp16_tolerances(tmp_path, capsys):
    # fp16 on both sides: the errors are rounding (measured 4e-4 .. 4e-3 of max|output|, docs/parity.md),
    # inside the fp16 tolerance; the fp32 tolerance would fail them, which shows the dtype's u is applied.
    file, cfg = write_tiny("sdxl", tmp_path)
    out = tmp_path / "table.json"
    rc = parity.main([str(file), "--config", str(cfg), "--dtype", "fp16", "--samplers", "euler_a", "--json", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, capsys.readouterr().out
    assert report["meta"]["settings"]["dtype"] == "fp16"
    for r in report["rows"]:
        # Rounding shows (fp32 runs of these models agree to < 1e-5), and stays within the fp16 tolerance.
        assert 1e-5 < r["max_rel"] <= r["tolerance"] or r["max_abs"] == 0, r
    assert max(r["max_rel"] for r in report["rows"]) > 1e-4


# (the component's tensor on minisd's side, the failing rows' component, minisd module, diffusers / transformers module)
FAULTS = [
    ("unet", "middle_block.1.transformer_blocks.1.attn2.to_k.weight", "unet",
     "middle_block.1.transformer_blocks.1.attn2.to_k", "mid_block.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("unet", "output_blocks.2.0.in_layers.2.weight", "unet", "output_blocks.2.0.in_layers.2",
     "up_blocks.1.resnets.0.conv1"),
    ("vae", "decoder.mid.attn_1.v.weight", "vae", "decoder.mid.attn_1.v", "decoder.mid_block.attentions.0.to_v"),
    ("vae", "encoder.down.1.block.0.nin_shortcut.weight", "vae", "encoder.down.1.block.0.nin_shortcut",
     "encoder.down_blocks.1.resnets.0.conv_shortcut"),
    ("text1", "transformer.resblocks.1.attn.in_proj_weight", "text1", "transformer.resblocks.1.attn",
     "text_model.encoder.layers.1.self_attn"),  # open_clip's fused q/k/v <-> HF's self_attn holding q, k, v
    ("text0", "transformer.resblocks.0.mlp.c_fc.weight", "text0", "transformer.resblocks.0.mlp.c_fc",
     "encoder.layers.0.mlp.fc1"),
]  # fmt: skip


def test_localises_injected_faults(tmp_path):
    file, cfg = write_tiny("sdxl", tmp_path)
    settings = parity.Settings(samplers=())
    sd = parity.load_for_parity(file, settings, cfg)
    reference = load_reference(file, sd, settings)
    inputs = parity.make_inputs(sd, settings.seed)
    theirs = run_reference(reference, sd, inputs, settings)
    modules = {"unet": sd.unet, "vae": sd.vae, "text0": sd.text_encoders[0], "text1": sd.text_encoders[1]}
    budgets = parity.output_budgets(sd, settings)
    ours = parity.run_minisd(sd, inputs, settings)
    assert all(r.passed for r in parity.compare(ours, theirs, budgets, torch.float32))
    for part, key, component, ours, their_module in FAULTS:
        weight = modules[part].get_parameter(key)
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.view(-1)[3] += 0.5  # one element of one weight
        try:
            rows = parity.compare(parity.run_minisd(sd, inputs, settings), theirs, budgets, torch.float32)
            failed = [r for r in rows if not r.passed]
            assert failed and {r.name.split(".")[0] for r in failed} == {component}, (key, failed)
            found = localise(failed[0], reference, sd, inputs, settings)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
        assert found is not None, key
        assert (found.ours, found.theirs) == (ours, their_module), found.describe()
        # Every module before the fault runs the same kernels on both sides in fp32: its input agrees to
        # fp32 rounding; the changed weight moves the output by ~1e-1 of its scale.
        assert key in found.our_keys and found.input_rel <= 1e-5 < 1e-2 < found.output_rel, found.describe()
        # The reference's module holds the weight diffusers' converter made from the same official tensor.
        holder = reference.unet if part == "unet" else reference.vae if part == "vae" else (
            reference.text_encoders[int(part[4:])])
        assert all(k.startswith(their_module + ".") for k in found.their_keys)
        assert all(holder.get_parameter(k) is not None for k in found.their_keys)


def test_bundle_round_trip_without_references(tmp_path, capsys):
    file, cfg = write_tiny("sd1", tmp_path)
    bundle = tmp_path / "sd1.bundle.safetensors"
    rc = parity.main([str(file), "--config", str(cfg), "--samplers", "euler_a", "--record", str(bundle)])
    assert rc == 0, capsys.readouterr()
    inputs, outputs, meta = parity.read_bundle(bundle)
    assert meta["settings"]["dtype"] == "fp32" and meta["settings"]["seed"] == 0
    assert {"torch", "diffusers", "transformers"} <= set(meta["reference"]) and meta["family"] == "sd1"
    assert set(outputs) == expected_rows("sd1", ("euler_a",)) and "unet.x" in inputs

    # One process without the references: the bundle check, then a live run (which cannot start).
    argv = [str(file), "--config", str(cfg)]
    run = subprocess.run([sys.executable, "-c", BLOCKER, json.dumps([[*argv, "--bundle", str(bundle)], argv])],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0 and "exit status 0\n" in run.stderr, run.stdout + run.stderr
    assert "sample.euler_a" in run.stdout and "PASS" in run.stdout and "FAIL" not in run.stdout
    # The live run says which package is missing and how to install it, with exit status 2.
    assert "exit status 2\n" in run.stderr and "pip install 'minisd[parity]'" in run.stderr, run.stderr
    assert "'diffusers', which is not installed" in run.stderr
    # A changed weight fails against the bundle recorded from the unchanged file.
    tensors = safetensors.torch.load_file(str(file))
    tensors["model.diffusion_model.out.2.weight"] = tensors["model.diffusion_model.out.2.weight"] * 1.01
    (tmp_path / "changed").mkdir()
    changed, _ = write_tiny("sd1", tmp_path / "changed", tensors)
    report = parity.check(changed, config=cfg, bundle=bundle)
    assert not report.passed and {r.name for r in report.rows if not r.passed} >= {"unet.t999", "sample.euler_a"}
    assert all(r.passed for r in report.rows if not r.name.startswith(("unet", "sample")))


@pytest.mark.reliability("parity", "a file that is not a parity bundle", "ParityError naming the file; exit status 2")
def test_not_a_bundle(tmp_path, capsys):
    file, cfg = write_tiny("sd1", tmp_path)
    with pytest.raises(parity.ParityError, match="not a bundle written by minisd parity"):
        parity.read_bundle(file)  # a checkpoint: safetensors, but no parity metadata
    assert parity.main([str(file), "--config", str(cfg), "--bundle", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: not a readable parity bundle" in capsys.readouterr().err


@pytest.mark.reliability("parity", "a sampler without a diffusers parity run", "ParityError listing the samplers")
def test_unknown_sampler(tmp_path):
    with pytest.raises(parity.ParityError, match="dpmpp_sde.*no parity run"):
        parity.Settings(samplers=("dpmpp_sde",))
