"""Shared set-up of the benchmarks: one set of random weights, run through minisd and a reference.

Every benchmark compares minisd with its reference library *on the same weights*:
the weights are made once, in minisd's (official) layout, and the reference model
receives the very same tensors through minisd's own key tables
(`diffusers_format.unet_table`, `diffusers_format.vae_table`, `layouts.hf_table`), loaded with
`assign=True` so the two models share storage instead of holding two copies.

Random weights are seeded normals of a modest std (0.02; norm scales 1 + 0.02 n):
large enough that every layer does real work, small enough that fp16 stays finite.
Full-size models are built on the meta device and materialised directly on the
target device, so a GPU run never generates billions of numbers on the CPU.

The GPU scripts' shared parts are at the end: their report (markdown tables, notes and a JSON
copy, rewritten after every item), its environment header, their options and the item runner.

Only the benchmarks import this module (it needs diffusers / transformers).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minisd import clip as mclip
from minisd import speed
from minisd import unet as munet
from minisd import vae as mvae
from minisd.diffusers_format import text_to_hf, unet_table, unet_to_diffusers, vae_table, vae_to_diffusers
from minisd.keymap import load_strict
from minisd.layouts import hf_table
from minisd.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SOT, EOT = SOT_TOKEN_ID, EOT_TOKEN_ID
FOURIER = 256  # SDXL's size/crop embeddings: 256 features per number (diffusers addition_time_embed_dim)


# --------------------------------------------------------------------------- weights
def random_state_dict(
    meta_model: nn.Module, *, seed: int, device: str | torch.device, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """fp32 seeded normal weights for every tensor of `meta_model` (built on the meta device).

    Tensors are drawn one by one in sorted-name order from one generator on `device`,
    so the same seed gives the same weights in any process on the same device kind."""
    g = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in sorted(meta_model.state_dict().items()):
        x = torch.empty(t.shape, dtype=torch.float32, device=device)
        # 1-d "weight"s are norm scales: around 1, so no layer is switched off.
        x.normal_(1.0 if name.endswith("weight") and t.dim() == 1 else 0.0, std, generator=g)
        out[name] = x
    return out


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A cast copy (the same tensors when `dtype` is already theirs)."""
    return {k: v.to(dtype) for k, v in sd.items()}


# --------------------------------------------------------------------------- component specs
@dataclass(frozen=True)
class Spec:
    """One component at one size: how to build both sides and feed them."""

    # "unet", "vae" (decode), "vae-encode", "clip" (SD1: last hidden state), "clip-sdxl" (as SDXL reads
    # its encoders: CLIP-L's penultimate hidden state; bigG's penultimate hidden state and pooled output)
    kind: str
    config: Any  # UNetConfig, VAEConfig or TextConfig
    label: str


def meta_ours(spec: Spec) -> nn.Module:
    with torch.device("meta"):
        if spec.kind == "unet":
            return munet.UNetModel(spec.config)
        if spec.kind.startswith("vae"):
            return mvae.AutoencoderKL(spec.config)
        return mclip.TextTransformer(spec.config)


def build_ours(spec: Spec, sd: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """minisd's model holding `sd` cast to `dtype` (no copy when already `dtype`)."""
    return load_strict(meta_ours(spec), sd, source="benchmark weights", dtype=dtype).eval()


def unet_diffusers_config(cfg: munet.UNetConfig) -> dict:
    """The UNet2DConditionModel config of `cfg` (minisd's own writer, which
    tests/test_diffusers_folder.py checks by loading its output into diffusers)."""
    return {k: v for k, v in unet_to_diffusers(cfg).items() if k != "_class_name"}


def vae_diffusers_config(cfg: mvae.VAEConfig) -> dict:
    return {k: v for k, v in vae_to_diffusers(cfg).items() if k != "_class_name"}


def hf_clip_config(cfg: mclip.TextConfig):
    """The transformers CLIPTextConfig of `cfg` (SD1's text_encoder/config.json for CLIP-L)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{k: v for k, v in text_to_hf(cfg).items() if k not in ("architectures", "model_type")})


@functools.cache
def _table(kind: str, config: Any):
    """minisd's key table to the reference's layout (built once per config: it builds a meta model)."""
    if kind == "unet":
        return unet_table(config)
    if kind.startswith("vae"):
        return vae_table(config)
    return hf_table(config)  # CLIP kinds


def build_theirs(spec: Spec, ours_sd: dict[str, torch.Tensor], device: str | torch.device) -> nn.Module:
    """The reference model holding the same tensors as `ours_sd` (minisd names), shared, not copied."""
    if spec.kind == "unet":
        from diffusers import UNet2DConditionModel

        sd = _table(spec.kind, spec.config).to_theirs(ours_sd)
        with torch.device("meta"):
            model = UNet2DConditionModel(**dict(unet_diffusers_config(spec.config)))
    elif spec.kind.startswith("vae"):
        from diffusers import AutoencoderKL

        sd = _table(spec.kind, spec.config).to_theirs(ours_sd)
        with torch.device("meta"):
            model = AutoencoderKL(**dict(vae_diffusers_config(spec.config)))
    else:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        sd = _table(spec.kind, spec.config).to_theirs(ours_sd)
        # Built for real (123M / 695M parameters, cheap enough): its `position_ids` buffer is not in the
        # state dict, so a meta-built model would keep it on the meta device. A projected encoder (bigG) is
        # diffusers' SDXL text_encoder_2, `CLIPTextModelWithProjection`.
        cls = CLIPTextModelWithProjection if spec.config.projection_dim else CLIPTextModel
        with torch.device(device):
            model = cls(hf_clip_config(spec.config))
        if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta:
        raise RuntimeError(f"{spec.label}: reference tensors left on meta: {on_meta[:5]}")
    return model.eval()


# --------------------------------------------------------------------------- optimisations
# What `--minisd-opts` / `--ref-opts` can switch on, each measured against the plain model in the same run.
OPTS = ("fused", "channels_last", "compile")  # what both sides have; minisd's own: MINISD_OPTS


def parse_variants(text: str, allowed: tuple[str, ...] = OPTS) -> list[tuple[str, ...]]:
    """"fused;fused,channels_last" -> [("fused",), ("fused", "channels_last")]: one extra side per variant."""
    variants = []
    for part in text.split(";"):
        opts = tuple(o.strip() for o in part.split(",") if o.strip())
        unknown = [o for o in opts if o not in allowed]
        if unknown:
            raise ValueError(f"unknown optimisation(s) {unknown}; expected some of {list(allowed)}")
        if opts:
            variants.append(opts)
    return variants


# minisd's speed options (`--minisd-opts`), each a function of the module (docs/performance.md).
MINISD_OPTS = {
    "fused": speed.fuse_projections,  # one GEMM for q/k/v (self-attention) and k/v (cross-attention)
    "channels_last": speed.channels_last,  # NHWC weights, so every conv runs on the NHWC kernels
    "packed": speed.pack_convolutions,  # conv weights in oneDNN's blocked layout, packed once (CPU)
    "subpixel": speed.subpixel_upsampling,  # nearest x2 + 3x3 conv as one 2x2 conv on the input, 2.25x fewer FLOPs
    "compile": speed.compile_module,  # torch.compile(fullgraph=True)
}


def apply_minisd_opts(model: nn.Module, opts: tuple[str, ...]) -> nn.Module:
    """`model` with minisd's optimisations `opts` applied (in place), in the order given, by name:
    `MINISD_OPTS` (`minisd.speed`)."""
    for opt in opts:
        model = MINISD_OPTS[opt](model) or model
    return model


def apply_ref_opts(model: nn.Module, opts: tuple[str, ...]) -> tuple[nn.Module, list[str]]:
    """The reference's own versions: diffusers' `fuse_qkv_projections()` (U-Net, VAE), channels_last,
    `torch.compile(model)` (diffusers' documented recipe, without fullgraph)."""
    skipped = []
    for opt in opts:
        if opt == "fused":
            if hasattr(model, "fuse_qkv_projections"):
                model.fuse_qkv_projections()
            else:
                skipped.append(f"fused (no fuse_qkv_projections on {type(model).__name__})")
        elif opt == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        elif opt == "compile":
            model = torch.compile(model)
    return model, skipped


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------- inputs and calls
def make_inputs(
    spec: Spec, *, batch: int, size: int, device: str | torch.device, dtype: torch.dtype, seed: int = 1
) -> dict:
    """Seeded inputs for both sides. `size` is the latent side (U-Net, VAE decode), the image
    side (VAE encode) or the token count (CLIP)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if spec.kind == "unet":
        cfg = spec.config
        inp = dict(
            x=torch.randn(batch, cfg.in_channels, size, size, generator=g, device=device).to(dtype),
            t=torch.linspace(999, 0, batch, device=device).round(),  # distinct timesteps per row
            context=torch.randn(batch, 77, cfg.context_dim, generator=g, device=device).to(dtype),
        )
        if cfg.adm_in_channels is not None:
            # SDXL's y, as diffusers' "text_time" embedding rebuilds it from its parts: pooled
            # text, then a 256-wide [cos, sin] embedding of each size/crop number (diffusers'
            # own get_timestep_embedding, so it does not rely on minisd).
            from diffusers.models.embeddings import get_timestep_embedding

            # SDXL base layout: 6 numbers (original size, crop, target size); the pooled text
            # fills the rest of adm_in_channels (1280 of 2816 for the full-size model).
            pooled = cfg.adm_in_channels - 6 * FOURIER
            text_embeds = torch.randn(batch, pooled, generator=g, device=device).to(dtype)
            time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device)
            fourier = get_timestep_embedding(time_ids.flatten(), FOURIER, flip_sin_to_cos=True, downscale_freq_shift=0)
            inp["y"] = torch.cat([text_embeds.float(), fourier.reshape(batch, -1)], dim=1)
            inp["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        return inp
    if spec.kind == "vae":
        return dict(z=torch.randn(batch, spec.config.embed_dim, size, size, generator=g, device=device).to(dtype))
    if spec.kind == "vae-encode":
        img = torch.rand(batch, spec.config.in_channels, size, size, generator=g, device=device) * 2 - 1
        return dict(images=img.to(dtype))
    # CLIP: [SOT, random ids, EOT, EOT padding], as SD1's tokenizer pads.
    n = max(2, size // 2)
    body = torch.randint(0, SOT, (batch, n - 2), generator=g, device=device)
    ids = torch.full((batch, size), EOT, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1 : n - 1] = SOT, body
    return dict(ids=ids)


def call_ours(spec: Spec, model: nn.Module) -> Callable[[dict], torch.Tensor]:
    if spec.kind == "unet":
        return lambda i: model(i["x"], i["t"], i["context"], i.get("y"))
    if spec.kind == "vae":
        return lambda i: model.decode(i["z"])
    if spec.kind == "vae-encode":
        return lambda i: model.encode(i["images"]).mean
    if spec.kind == "clip-sdxl":
        if spec.config.projection_dim is None:  # CLIP-L: only the blocks up to the penultimate one run
            return lambda i: model(i["ids"], num_layers=spec.config.layers - 1).hidden_states[-1]
        return lambda i: _penultimate_and_pooled(model(i["ids"]))
    return lambda i: model(i["ids"]).last_hidden_state


def _penultimate_and_pooled(out) -> torch.Tensor:
    """bigG as SDXL reads it: the penultimate hidden state (compared) and the pooled output (computed)."""
    assert out.pooled is not None
    return out.hidden_states[-2]


def call_theirs(spec: Spec, model: nn.Module) -> Callable[[dict], torch.Tensor]:
    if spec.kind == "unet":
        return lambda i: model(
            i["x"], i["t"], encoder_hidden_states=i["context"], added_cond_kwargs=i.get("added_cond_kwargs")
        ).sample
    if spec.kind == "vae":
        return lambda i: model.decode(i["z"]).sample
    if spec.kind == "vae-encode":
        return lambda i: model.encode(i["images"]).latent_dist.mean
    if spec.kind == "clip-sdxl":
        # diffusers' StableDiffusionXLPipeline.encode_prompt: every layer runs (output_hidden_states=True),
        # then hidden_states[-2] is read (and text_embeds, the pooled output, of text_encoder_2).
        return lambda i: model(input_ids=i["ids"], output_hidden_states=True).hidden_states[-2]
    return lambda i: model(input_ids=i["ids"]).last_hidden_state


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (tests.utils.assert_rel_close's measure); inf if not finite."""
    a, e = actual.detach().double(), expected.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def event_seconds(fn: Callable[[], Any], device: str | torch.device) -> float:
    """One call's seconds: CUDA events on a GPU (the device's own time), perf_counter on a CPU."""
    if torch.device(device).type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def wall_seconds(fn: Callable[[], Any], device: str | torch.device) -> float:
    """One call's wall-clock seconds between two syncs: the host's work counts too (whole pipelines)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_runs(fn: Callable[[], Any], device: str | torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call after `warmup` untimed calls (`event_seconds`)."""
    for _ in range(warmup):
        fn()
    sync(device)
    return [event_seconds(fn, device) for _ in range(repeats)]


def interleaved(calls: dict[str, Callable[[], Any]], device: str, warmup: int, repeats: int,
                timer: Callable[[Callable[[], Any], str], float] = wall_seconds) -> dict[str, list[float]]:  # fmt: skip
    """Seconds per call of each side, the sides alternating (A B, B A, ...) so that drift (clocks, heat)
    falls on both alike; the first `warmup` rounds are not kept."""
    sides = list(calls)
    times: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(warmup + repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            t = timer(calls[side], device)
            if i >= warmup:
                times[side].append(t)
    return times


def peak_extra(fn: Callable[[], Any], device: str) -> int | None:
    """Peak CUDA memory of one call above what was allocated before it (weights, inputs); None on a CPU."""
    if device != "cuda":
        return None
    free(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the GPU scripts' reports
class Report:
    """Markdown tables and notes under a header (`environment`), rewritten with a JSON copy of the raw rows
    after every item (`attempt`), so an interrupted run still leaves what it measured: DIR/`md`, DIR/`json`."""

    def __init__(self, out: Path, header: str, md: str, json_name: str) -> None:
        self.out, self.header, self.md, self.json = out, header, md, json_name
        self.tables: dict[str, tuple[list[str], list[list[str]]]] = {}  # title -> (columns, rows)
        self.notes: list[str] = []
        self.raw: dict = {"items": [], "notes": self.notes}

    def add(self, table: str, header: list[str], row: list, raw: dict) -> None:
        """A row of the table titled `table` (made with `header` on first use) and its raw numbers."""
        self.tables.setdefault(table, (header, []))[1].append([str(c) for c in row])
        self.raw["items"].append(dict(raw, table=table))

    def text(self) -> str:
        parts = [self.header.rstrip("\n")]
        for title, (header, rows) in self.tables.items():
            parts += [f"\n## {title}\n", markdown_table(header, rows)]
        if self.notes:
            parts.append("\n## Notes\n\n" + "\n".join(f"- {n}" for n in self.notes))
        return "\n".join(parts) + "\n"

    def flush(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / self.md).write_text(self.text())
        (self.out / self.json).write_text(json.dumps(self.raw, indent=1, default=str))


def environment(device: str, *gpu_lines: str) -> str:
    """The report's header lines: versions, then the GPU (and `gpu_lines`) and its backend flags, or the CPU."""
    import diffusers
    import transformers

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
             f"transformers {transformers.__version__}"]  # fmt: skip
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")  # fmt: skip
        lines += gpu_lines
        b = torch.backends
        lines.append(f"flags: cuda.matmul.allow_tf32={b.cuda.matmul.allow_tf32}, "
                     f"cudnn.allow_tf32={b.cudnn.allow_tf32}, cudnn.benchmark={b.cudnn.benchmark}")  # fmt: skip
    else:
        lines.append(f"CPU: {platform.machine()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads")
    return "\n".join(f"- {ln}" for ln in lines)


def script_parser(doc: str, out_name: str) -> argparse.ArgumentParser:
    """The options every GPU script has: `--out` (default $OUT, the folder the device runner brings back,
    else a temporary folder named `out_name`) and `--smoke` (tiny models on the CPU: checks the script)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / out_name)
    p.add_argument("--out", type=Path, default=default_out, help="report folder (default: $OUT, else a temp folder)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to check the script itself")
    return p


def script_device(p: argparse.ArgumentParser, smoke: bool) -> str:
    """The device: the CPU for a smoke run, else CUDA (an argparse error when there is none)."""
    device = "cpu" if smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --smoke for the CPU check of the script)")
    torch.set_flush_denormal(True)  # CPU (smoke) only; no effect on CUDA kernels
    return device


def attempt(report: Report, what: str, device: str, t_start: float, fn: Callable[..., Any], *args: Any) -> None:
    """Run one item of a GPU script, `fn(*args)`. A failure goes into the report's notes (its traceback to stdout) and
    the run goes on: one broken item must not lose the others. Then memory is freed (compiled graphs
    hold their modules' weights), the item's seconds recorded and the report rewritten."""
    t0 = time.perf_counter()
    print(f"[{t0 - t_start:6.1f} s] {what} ...", flush=True)
    try:
        fn(*args)
    except Exception as e:
        tb = traceback.format_exc().strip().splitlines()
        report.notes.append(f"{what} FAILED: {type(e).__name__}: {e} ({' | '.join(tb[-4:])})")
        print(traceback.format_exc(), flush=True)
    finally:
        torch._dynamo.reset()
        free(device)
    report.raw.setdefault("seconds", {})[what] = time.perf_counter() - t0
    report.flush()
