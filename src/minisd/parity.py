"""`minisd parity`: a checkpoint through minisd and through the reference implementations, component by component.

    python -m minisd.parity model.safetensors --dtype fp16 --device cuda --samplers euler,dpmpp_2m

1. **Load twice.** minisd loads the checkpoint; `parity_reference` loads the same file with diffusers'
   single-file converters (`from_single_file`, the text encoders as transformers models), offline: the
   config folder diffusers needs is written from minisd's own resolved architecture.
2. **Fixed, seeded inputs** (`make_inputs`): three prompts per text encoder ("", a sentence, one that
   fills all 77 tokens); the U-Net at t = 999, 500, 20 on a batch [uncond, cond] (with SDXL's pooled
   vector and size ids), raw and guided; the VAE's encode and decode; a short guided sampling run per
   sampler, against the matching diffusers scheduler.
3. **A table** (`Report.table`): per output, max |ours - theirs|, that over max |theirs|, the tolerance of
   the dtype (`tolerance`, derived in docs/parity.md) and PASS/FAIL.
4. **Localise** a failure: forward hooks on both sides, modules paired through the key tables; the first
   module whose difference jumps is reported with both names and its weights' keys (`Divergence`).

A run can be recorded (`record`) into a bundle: one safetensors file of the inputs and the reference's
outputs, with the package versions, dtype, device and seed in its metadata. `check(..., bundle=)` then
compares minisd against it without any reference package installed. The bundle format is in
docs/parity.md; tools/record_official_bundle.py writes one from Stability's own code.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .conditioning import _WIDTHS, vector_conditioning
from .denoisers import DiscreteDenoiser, cfg_denoiser
from .files import atomic_write
from .model import StableDiffusion, load
from .samplers import SAMPLER_NAMES, plan_sampler
from .schedules import DiscreteSchedule, to_variance_preserving
from .tokenizer import CLIPTokenizer

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Unit roundoff u = 2^-p of each dtype, p the significand bits with the implicit one (Higham, "Accuracy and
# Stability of Numerical Algorithms", 2nd ed., Table 2.1): fp32 p=24, fp16 p=11, bf16 p=8.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# The constant of `tolerance` (max over elements and the network's amplification); docs/parity.md derives it.
GROWTH = 4.0
# diffusers builds its DDPM table in fp32: alphabar_t is a product of t fp32 factors, a random walk of up to
# T = 1000 roundings (minisd's table is fp64 rounded once), so each sigma a sampler steps to differs by ~sqrt(T) u.
SCHEDULE_ROUNDING = math.sqrt(1000) * 2.0**-24
TIMESTEPS = (999, 500, 20)  # high, middle and low noise
PROMPTS = ("", "a photograph of an astronaut riding a horse", " ".join(["a red cube on a blue sphere"] * 16))
GUIDANCE = 7.5
# Samplers whose diffusers scheduler draws its noise as minisd does (DPMSolverSDE's Brownian tree does not).
PARITY_SAMPLERS = tuple(n for n in SAMPLER_NAMES if not n.startswith("dpmpp_sde"))
BUNDLE_KEY = "minisd.parity"  # the metadata entry of a bundle (JSON)


class ParityError(ValueError):
    """A parity run cannot start: a reference package is missing, a bundle is not one, or a setting is bad."""


def tolerance(dtype: torch.dtype, depth: int, fan_in: int = 1, steps: int = 0) -> float:
    """The largest max|ours - theirs| / max|theirs| two correct implementations differ by in `dtype`
    (derivation: docs/parity.md): each of `depth` stages rounds its output to `dtype` (u) after a sum of
    `fan_in` terms accumulated in fp32 (sqrt(fan_in) u32); independent roundings add as a random walk,
    sqrt(depth), on each of the two sides, sqrt(2); GROWTH covers the max over elements and the network's
    amplification. A sampling run of `steps` steps adds the schedule table's rounding per step."""
    per_stage = UNIT_ROUNDOFF[dtype] + math.sqrt(fan_in) * UNIT_ROUNDOFF[torch.float32]
    return GROWTH * (math.sqrt(2 * max(depth, 1)) * per_stage + steps * SCHEDULE_ROUNDING)


def layer_count(module: torch.nn.Module) -> int:
    """The rounding stages of a module: its modules that hold weights (each rounds its output once)."""
    return sum(1 for m in module.modules() if any(True for _ in m.parameters(recurse=False)))


def fan_in(module: torch.nn.Module) -> int:
    """The longest sum any of its layers accumulates: in_features, or in_channels x kernel area."""
    return max([m.weight[0].numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))],
               default=1)  # fmt: skip


# ----------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Settings:
    """What a run does: dtype and device, the seed of every input, the samplers and their steps."""

    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0
    samplers: tuple[str, ...] = ("euler", "dpmpp_2m")
    steps: int = 4
    guidance: float = GUIDANCE

    def __post_init__(self) -> None:
        if self.dtype not in UNIT_ROUNDOFF:
            raise ParityError(f"dtype must be one of {list(DTYPES)}, got {self.dtype}")
        bad = [s for s in self.samplers if s not in PARITY_SAMPLERS]
        if bad:
            raise ParityError(f"samplers {bad} have no parity run; expected names from {list(PARITY_SAMPLERS)}")
        if not 1 <= self.steps <= 1000:
            raise ParityError(f"steps must be in [1, 1000], got {self.steps}")

    def as_json(self) -> dict:
        """The settings as a JSON-ready dict (dtype by name, samplers as a list)."""
        d = dataclasses.asdict(self)
        return {**d, "dtype": _dtype_name(self.dtype), "samplers": list(self.samplers)}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


@dataclass(frozen=True)
class Row:
    """One output compared: max |ours - theirs|, that over max |theirs|, the tolerance on the latter."""

    name: str
    max_abs: float
    max_rel: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """Whether the relative difference is within tolerance (False for NaN)."""
        return self.max_rel <= self.tolerance  # False for NaN as well

    def as_json(self) -> dict:
        """The row as a JSON-ready dict, with `passed`."""
        return {**dataclasses.asdict(self), "passed": self.passed}


@dataclass(frozen=True)
class Divergence:
    """Where a failing output first departs: the first module whose output difference jumps.

    `input_rel` / `output_rel` are max |ours - theirs| / max |theirs| of the module's input and output;
    `our_keys` / `their_keys` the weights the module holds on each side."""

    row: str
    ours: str
    theirs: str
    input_rel: float
    output_rel: float
    our_keys: tuple[str, ...]
    their_keys: tuple[str, ...]

    def describe(self) -> str:
        """One line: where the two models first diverge, by how much, and the weights involved."""
        return (f"{self.row}: first diverges at {self.ours} (reference: {self.theirs}); difference "
                f"{self.input_rel:.2e} in, {self.output_rel:.2e} out; weights {', '.join(self.our_keys)} "
                f"(reference: {', '.join(self.their_keys)})")  # fmt: skip


@dataclass
class Report:
    """The result of a parity run: the rows, the divergences found, and what was compared with what."""

    rows: list[Row]
    divergences: list[Divergence] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether there are rows and every one passed."""
        return bool(self.rows) and all(r.passed for r in self.rows)

    def table(self) -> str:
        """The rows as a fixed-width text table, then the divergences."""
        lines = [f"{'output':<28} {'max abs':>10} {'max rel':>10} {'tolerance':>10}  result", "-" * 68]
        for r in self.rows:
            verdict = "PASS" if r.passed else "FAIL"
            lines.append(f"{r.name:<28} {r.max_abs:>10.2e} {r.max_rel:>10.2e} {r.tolerance:>10.2e}  {verdict}")
        lines += ["", *(d.describe() for d in self.divergences)] if self.divergences else []
        return "\n".join(lines)

    def as_json(self) -> dict:
        """The report as a JSON-ready dict: passed, rows, divergences and meta."""
        return {"passed": self.passed, "rows": [r.as_json() for r in self.rows],
                "divergences": [dataclasses.asdict(d) for d in self.divergences], "meta": self.meta}  # fmt: skip


# ----------------------------------------------------------------------------------------- inputs
def latent_side(sd: StableDiffusion) -> int:
    """The side of the latents the checks use: 4 times the U-Net's downsampling (32 for SD: 256 px images)."""
    return 4 * sd.unet.config.downsample_factor


def make_inputs(sd: StableDiffusion, seed: int) -> dict[str, torch.Tensor]:
    """Every input of a parity run, on the CPU in fp32 (token ids int64), drawn from `seed`.

    text{i}.ids (3, 77): PROMPTS tokenized as encoder i's embedder does; unet.x (2, in, s, s),
    unet.context (2, 77, context_dim) as [uncond, cond], unet.timesteps; with `y`, unet.pooled and
    unet.time_ids (diffusers' `add_time_ids` order, = `Family.y_inputs`); vae.image (1, 3, S, S) in
    [-1, 1], vae.latents; sample.noise (1, 4, s, s) and, for 9-channel U-Nets, sample.concat."""
    g = torch.Generator("cpu").manual_seed(seed)
    tok, cfg, s = CLIPTokenizer(), sd.unet.config, latent_side(sd)
    out: dict[str, torch.Tensor] = {}
    for i, use in enumerate(sd.text_uses):
        out[f"text{i}.ids"] = tok(list(PROMPTS), pad_token_id=use.pad_token_id, special_tokens=use.tokenizer).input_ids
    out["unet.x"] = torch.randn(2, cfg.in_channels, s, s, generator=g)
    out["unet.context"] = torch.randn(2, 77, cfg.context_dim, generator=g)
    out["unet.timesteps"] = torch.tensor(TIMESTEPS, dtype=torch.float32)
    if cfg.adm_in_channels is not None:
        pooled_dim = cfg.adm_in_channels - 256 * sum(_WIDTHS[n] for n in sd.family.y_inputs)
        out["unet.pooled"] = torch.randn(2, pooled_dim, generator=g)
        px = float(s * sd.vae.config.downsample_factor)
        values = {"original_size": (px, px), "crop_coords_top_left": (0.0, 0.0), "target_size": (px, px)}
        rows = [[*(v for n in sd.family.y_inputs for v in values.get(n, (score,)))] for score in (2.5, 6.0)]
        out["unet.time_ids"] = torch.tensor(rows)  # the refiner's aesthetic score: 2.5 uncond, 6.0 cond
    side = s * sd.vae.config.downsample_factor
    out["vae.image"] = torch.rand(1, sd.vae.config.in_channels, side, side, generator=g) * 2 - 1
    out["vae.latents"] = torch.randn(1, sd.vae.config.embed_dim, s, s, generator=g)
    out["sample.noise"] = torch.randn(1, cfg.out_channels, s, s, generator=g)
    if cfg.in_channels != cfg.out_channels:  # inpainting: mask and masked-image latents, fixed for the run
        out["sample.concat"] = torch.randn(1, cfg.in_channels - cfg.out_channels, s, s, generator=g)
    return out


def sdxl_y(sd: StableDiffusion, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """SDXL's `y` from the pooled vectors and the time ids (None for families without one)."""
    if "unet.pooled" not in inputs:
        return None
    ids, values, at = inputs["unet.time_ids"], {}, 0
    for name in sd.family.y_inputs:
        values[name] = ids[:, at : at + _WIDTHS[name]]
        at += _WIDTHS[name]
    return vector_conditioning(inputs["unet.pooled"], sd.family.y_inputs, values)


# ----------------------------------------------------------------------------------------- minisd's side
def output_budgets(sd: StableDiffusion, settings: Settings) -> dict[str, tuple[int, int, int]]:
    """(depth, fan_in, steps) behind each output, the arguments of `tolerance`; a sampling run is
    `steps` U-Net calls deep."""
    unet = (layer_count(sd.unet), fan_in(sd.unet), 0)
    budgets = {}
    for i, (enc, use) in enumerate(zip(sd.text_encoders, sd.text_uses)):
        per_block = layer_count(enc.transformer.resblocks[0]) if enc.config.layers else 1
        budgets[f"text{i}.context"] = (1 + per_block * use.layer + use.final_ln, fan_in(enc), 0)
        if use.pooled:
            budgets[f"text{i}.pooled"] = (layer_count(enc), fan_in(enc), 0)
    for t in TIMESTEPS:
        budgets[f"unet.t{t}"] = budgets[f"unet.t{t}.guided"] = unet
    budgets["vae.encode"] = (layer_count(sd.vae.encoder) + 1, fan_in(sd.vae.encoder), 0)
    budgets["vae.decode"] = (layer_count(sd.vae.decoder) + 1, fan_in(sd.vae.decoder), 0)
    for name in settings.samplers:
        budgets[f"sample.{name}"] = (unet[0] * settings.steps, unet[1], settings.steps)
    return budgets


@torch.no_grad()
def run_minisd(sd: StableDiffusion, inputs: dict[str, torch.Tensor], settings: Settings) -> dict[str, torch.Tensor]:
    """minisd's output for every check, as fp32 CPU tensors named as in `output_budgets`."""
    dev, out = torch.device(settings.device), {}
    for i, (enc, use) in enumerate(zip(sd.text_encoders, sd.text_uses)):
        o = enc(inputs[f"text{i}.ids"].to(dev))
        hidden = o.hidden_states[use.layer]
        out[f"text{i}.context"] = enc.ln_final(hidden) if use.final_ln else hidden
        if use.pooled:
            out[f"text{i}.pooled"] = o.pooled
    x, ctx = inputs["unet.x"].to(dev, settings.dtype), inputs["unet.context"].to(dev)
    y = sdxl_y(sd, inputs)
    y = None if y is None else y.to(dev)
    for t in TIMESTEPS:
        raw = sd.unet(x, torch.full((2,), float(t), device=dev), ctx, y).float()
        out[f"unet.t{t}"] = raw
        out[f"unet.t{t}.guided"] = raw[:1] + settings.guidance * (raw[1:] - raw[:1])
    out["vae.encode"] = sd.vae.encode(inputs["vae.image"].to(dev)).mode()
    out["vae.decode"] = sd.vae.decode(inputs["vae.latents"].to(dev))
    for name in settings.samplers:
        out[f"sample.{name}"] = _sample(sd, inputs, settings, name, y)
    return {k: v.detach().float().cpu() for k, v in out.items()}


def _sample(sd: StableDiffusion, inputs, settings: Settings, name: str, y: torch.Tensor | None) -> torch.Tensor:
    """A guided run of sampler `name` from sample.noise, in the VP form diffusers' schedulers end in."""
    dev = torch.device(settings.device)
    concat = inputs.get("sample.concat")

    def unet(x_in: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        if concat is not None:  # inpainting: [latents, mask, masked latents] on the channel axis
            x_in = torch.cat([x_in, concat.to(x_in).expand(x_in.shape[0], -1, -1, -1)], dim=1)
        return sd.unet(x_in, t, **cond)

    schedule = DiscreteSchedule.scaled_linear()
    plan = plan_sampler(name, schedule, settings.steps)
    denoiser = DiscreteDenoiser(unet, schedule, sd.prediction_type, quantize=plan.quantize, model_dtype=settings.dtype)
    ctx = inputs["unet.context"].to(dev)
    uncond, cond = {"context": ctx[:1]}, {"context": ctx[1:]}
    if y is not None:
        uncond["y"], cond["y"] = y[:1], y[1:]
    guided = cfg_denoiser(denoiser, cond, uncond, settings.guidance)
    x = inputs["sample.noise"].to(dev) * plan.init_noise_sigma
    x = plan.run(guided, x, plan.sigmas, generator=torch.Generator("cpu").manual_seed(settings.seed))
    return to_variance_preserving(x, float(plan.sigmas[-1]))


# ----------------------------------------------------------------------------------------- comparing
def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], budgets: dict[str, tuple[int, int, int]],
            dtype: torch.dtype) -> list[Row]:  # fmt: skip
    """A row per output the reference has, in its order: the errors against `tolerance(dtype, *budget)`."""
    rows = []
    for name, ref in theirs.items():
        if name not in ours:
            raise ParityError(f"the reference has an output {name!r} that minisd's run does not make")
        a, b = ours[name].double(), ref.double()
        if a.shape != b.shape:
            raise ParityError(f"{name}: minisd's output has shape {tuple(a.shape)}, the reference's {tuple(b.shape)}")
        err = (a - b).abs().max().item() if a.numel() else 0.0
        scale = b.abs().max().item() if b.numel() else 0.0
        rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
        rows.append(Row(name, err, rel if math.isfinite(err) else math.nan, tolerance(dtype, *budgets[name])))
    return rows


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for two zero tensors; inf when only b is zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err, scale = (a - b).abs().max().item(), b.abs().max().item()
    return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)


# ----------------------------------------------------------------------------------------- runs
def load_for_parity(
    checkpoint: str | Path, settings: Settings, config=None, family: str | None = None
) -> StableDiffusion:
    """minisd's model for a parity run: every component (the VAE too) in the run's dtype and device."""
    return load(checkpoint, device=settings.device, dtype=settings.dtype, vae_dtype=settings.dtype,
                config=config, family=family)  # fmt: skip


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """fp32 means fp32 for the run: CUDA's TF32 matmuls and convolutions (10-bit significands; PyTorch turns
    them on for cuDNN convolutions by default) are switched off, and restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _reference_run(checkpoint, settings: Settings, config, family):
    """minisd's model, the reference's, the inputs, the reference's outputs and the run's metadata."""
    from . import parity_reference

    parity_reference.require_references()  # before minisd's load: a missing package is said at once
    sd = load_for_parity(checkpoint, settings, config, family)
    reference = parity_reference.load_reference(checkpoint, sd, settings)
    inputs = make_inputs(sd, settings.seed)
    outputs = parity_reference.run_reference(reference, sd, inputs, settings)
    meta = {"reference": parity_reference.versions(), "settings": settings.as_json(), "family": sd.family.name,
            "checkpoint": Path(checkpoint).name}  # fmt: skip
    return sd, reference, inputs, outputs, meta


@exact_fp32()
def check(checkpoint: str | Path, *, settings: Settings | None = None, config=None, family: str | None = None,
          bundle: str | Path | None = None, localise: bool = True) -> Report:  # fmt: skip
    """Compare minisd with the reference on `checkpoint`: live (diffusers and transformers), or against
    the outputs recorded in `bundle`, whose settings (dtype, seed, samplers, steps) then apply.

        report = parity.check("v1-5-pruned-emaonly.safetensors")   # report.passed, report.rows
    """
    settings = settings or Settings()
    if bundle is not None:
        inputs, theirs, meta = read_bundle(bundle)
        s = meta["settings"]
        settings = Settings(DTYPES[s["dtype"]], settings.device, s["seed"], tuple(s["samplers"]), s["steps"],
                            s["guidance"])  # fmt: skip
        sd, reference = load_for_parity(checkpoint, settings, config, family), None
    else:
        sd, reference, inputs, theirs, meta = _reference_run(checkpoint, settings, config, family)
    rows = compare(run_minisd(sd, inputs, settings), theirs, output_budgets(sd, settings), settings.dtype)
    report = Report(rows, meta={**meta, "checkpoint": str(checkpoint), "family": sd.family.name})
    if reference is not None and localise:
        from .parity_reference import localise as find

        first_failures = {r.name.split(".")[0]: r for r in reversed(rows) if not r.passed}  # one per component
        report.divergences = [d for r in first_failures.values() if (d := find(r, reference, sd, inputs, settings))]
    return report


@exact_fp32()
def record(checkpoint: str | Path, bundle: str | Path, *, settings: Settings | None = None, config=None,
           family: str | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Run the reference on `checkpoint` and save its inputs and outputs into the safetensors file `bundle`.

        parity.record("model.safetensors", "bundle.safetensors")   # later: check(..., bundle="bundle.safetensors")
    """
    _, _, inputs, outputs, meta = _reference_run(checkpoint, settings or Settings(), config, family)
    return write_bundle(bundle, inputs, outputs, meta, overwrite=overwrite)


def write_bundle(path: str | Path, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], meta: dict,
                 *, overwrite: bool = False) -> Path:  # fmt: skip
    """A bundle: `input/<name>` and `output/<name>` tensors, and `meta` as JSON under BUNDLE_KEY."""
    path = Path(path)
    tensors = {f"input/{k}": v.detach().cpu().contiguous() for k, v in inputs.items()}
    tensors.update({f"output/{k}": v.detach().float().cpu().contiguous() for k, v in outputs.items()})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={BUNDLE_KEY: json.dumps(meta)}),
                 overwrite=overwrite)  # fmt: skip
    return path


def read_bundle(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(inputs, outputs, metadata) of a bundle written by `write_bundle` (or the official-code script)."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            raw, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a missing or unreadable file
        raise ParityError(f"{path}: not a readable parity bundle ({e})") from None
    if BUNDLE_KEY not in raw:
        raise ParityError(f"{path}: no {BUNDLE_KEY!r} metadata: not a bundle written by minisd parity --record")
    meta = json.loads(raw[BUNDLE_KEY])
    inputs = {k.removeprefix("input/"): v for k, v in tensors.items() if k.startswith("input/")}
    outputs = {k.removeprefix("output/"): v for k, v in tensors.items() if k.startswith("output/")}
    if not outputs:
        raise ParityError(f"{path}: the bundle holds no outputs")
    return inputs, outputs, meta


# ----------------------------------------------------------------------------------------- command line
_EXAMPLES = """examples:
  minisd parity v1-5-pruned-emaonly.safetensors
  minisd parity sd_xl_base_1.0.safetensors --dtype fp16 --device cuda --samplers euler,dpmpp_2m_karras
  minisd parity finetune.safetensors --config arch.json --json parity.json
  minisd parity model.safetensors --dtype fp16 --device cuda --record model-fp16.bundle.safetensors
  minisd parity model.safetensors --bundle model-fp16.bundle.safetensors   # no diffusers needed

exit status: 0 when every output is within its tolerance, 1 when one is not, 2 when the run could not start.
The tolerances and the bundle format: docs/parity.md."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `parity` to an argparse subparsers object (`minisd.cli`)."""
    p = sub.add_parser(
        "parity", help="compare a checkpoint's outputs with diffusers/transformers, component by component",
        description="Load CHECKPOINT with minisd and with the reference implementations (diffusers, transformers; "
        "`pip install minisd[parity]`), run every component on fixed seeded inputs, and print the differences "
        "with the tolerance of the dtype. A failing output is localised to the first module that diverges.",
        epilog=_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("checkpoint", help="an official single file or a diffusers folder")
    p.add_argument("--config", help="architecture JSON for a custom model (as minisd.load's config=)")
    p.add_argument("--family", help="force the family (sd1, sd2, sd2-v, sdxl, ...)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of every component (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1 (default cpu)")
    p.add_argument("--samplers", default="euler,dpmpp_2m", help="comma-separated samplers to run (default "
                   "euler,dpmpp_2m; '' for none)")  # fmt: skip
    p.add_argument("--steps", type=int, default=4, help="steps of each sampling run (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of every input (default 0)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--record", metavar="BUNDLE", help="save the reference's inputs and outputs; compare nothing")
    where.add_argument("--bundle", metavar="BUNDLE", help="compare against a recorded bundle (no reference needed)")
    p.add_argument("--no-localise", action="store_true", help="do not look for the first diverging module")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    """The `parity` command: print the table; 0 if every output passes, 1 if not, 2 if it cannot run."""
    try:
        samplers = tuple(s for s in args.samplers.split(",") if s)
        settings = Settings(DTYPES[args.dtype], args.device, args.seed, samplers, args.steps)
        if args.record:
            path = record(args.checkpoint, args.record, settings=settings, config=args.config, family=args.family)
            print(f"recorded {path}")
            return 0
        report = check(args.checkpoint, settings=settings, config=args.config, family=args.family,
                       bundle=args.bundle, localise=not args.no_localise)  # fmt: skip
    except (ValueError, ImportError, OSError) as e:  # ParityError, CheckpointError, a missing file
        print(f"minisd parity: {e}", file=sys.stderr)
        return 2
    print(report.table())
    if args.json:
        text = json.dumps(report.as_json(), indent=2)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(text), overwrite=True)
    return 0 if report.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m minisd.parity ARGS` (the same as `minisd parity ARGS`)."""
    parser = argparse.ArgumentParser(prog="minisd")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["parity", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
