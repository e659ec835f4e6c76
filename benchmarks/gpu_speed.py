"""The prepared GPU speed script: whole txt2img pipelines, minisd against diffusers on the same weights.

    PYTHONPATH=src python3 benchmarks/gpu_speed.py --out DIR       # one H100/H200: about 8-10 minutes
    PYTHONPATH=src python3 benchmarks/gpu_speed.py --smoke         # tiny models on the CPU: checks the script

Writes DIR/gpu_speed.md (and prints it) and DIR/gpu_speed.json, rewritten after every
item, so an interrupted run still leaves what it measured. Each item runs in a
try/except (a failure goes into the notes and the run goes on); an item starts only if
its estimated duration still ends before `--deadline-s` (540). Items, in order of priority:

1. eager: SD1.5 at 512x512 and SDXL base at 1024x1024, 30 Euler steps, CFG (batch 2),
   fp16 and bf16: iterations per second of each side (30 / the seconds of a
   `output="latent"` call: prompt encoding and the 30 guided steps), peak VRAM above
   the resident weights, and MFU: the FLOPs of one U-Net call of the guided batch
   (`torch.utils.flop_counter.FlopCounterMode`, on minisd's U-Net; the reference's
   does the same work) times the steps, over the measured time, over the GPU's peak
   dense fp16/bf16 tensor FLOP/s (from the device name; see PEAK_TFLOPS);
2. precision: each side's fp16 and bf16 latents against its own fp32 latents (TF32
   off), and minisd's against diffusers' in each dtype;
3. eager with each side's speed options, fp16: minisd `fuse_projections`,
   `subpixel_upsampling` and channels_last against diffusers' `fuse_qkv_projections` and
   channels_last (`minisd_options`, `diffusers_options`);
4. compiled, fp16: those options, then minisd `sd.compile()` against diffusers'
   `pipe.unet = torch.compile(pipe.unet)`; the first call (compilation included) is timed too;
5. model offload, fp16: minisd `sd.enable_model_offload()` against diffusers
   `pipe.enable_model_cpu_offload()`, weights starting on the CPU: seconds per image
   (prompt to decoded image) and peak VRAM;
6. compiled, bf16.

The same weights: one set of fp32 random weights per model (seeded normals, std 0.02,
drawn on the device; see common.py), cast once per dtype; diffusers' modules receive
minisd's tensors through minisd's key tables, shared, not copied. The schedulers: diffusers
`EulerDiscreteScheduler` from the official SD config; minisd `sampler="euler"` with that
scheduler's own table, so both sample the same numbers (tests/test_pipeline.py checks
this on tiny models). Calls are interleaved (A B, B A, ...) after warm-up calls.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    FOURIER,
    Report,
    Spec,
    attempt,
    build_ours,
    build_theirs,
    environment,
    free,
    interleaved,
    median,
    meta_ours,
    peak_extra,
    random_state_dict,
    rel_err,
    script_device,
    script_parser,
    wall_seconds,
)
from minisd import clip as mclip  # noqa: E402
from minisd import speed  # noqa: E402
from minisd import unet as munet  # noqa: E402
from minisd import vae as mvae  # noqa: E402
from minisd.families import FAMILIES  # noqa: E402
from minisd.model import StableDiffusion  # noqa: E402
from minisd.schedules import DiscreteSchedule  # noqa: E402

# Peak dense (no sparsity) fp16/bf16 tensor-core FLOP/s with fp32 accumulation, from the vendors'
# data sheets: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, A100 312. Matched on the device name.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))
# The official SD / SDXL scheduler config (scheduler_config.json of the diffusers repos).
OFFICIAL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Model:
    """One pipeline to measure: its family, component configs, image size and guidance."""

    label: str
    family: str
    unet: munet.UNetConfig
    vae: mvae.VAEConfig
    text: tuple[mclip.TextConfig, ...]
    size: int  # image side, pixels
    guidance: float


FULL = [
    Model("SD1.5 512", "sd1", munet.SD1_UNET, mvae.SD_VAE, (mclip.CLIP_VIT_L14,), 512, 7.5),
    Model("SDXL 1024", "sdxl", munet.SDXL_BASE_UNET, mvae.SDXL_VAE,
          (mclip.CLIP_VIT_L14, mclip.OPENCLIP_VIT_BIGG14), 1024, 5.0),
]
# Smoke: the architectures of tests/test_pipeline.py's tiny models (SDXL's widths are the real 768 + 1280
# contexts, which diffusers' SDXL pipeline needs), 32 px images (16x16 latents), a few steps.
_TINY_TEXT = dict(heads=4, layers=2, mlp_width=64, vocab_size=49408)
_TINY_VAE = mvae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
SMOKE = [
    Model("tiny SD1-like 32", "sd1",
          munet.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                           transformer_depth=1, num_heads=2, context_dim=32),
          _TINY_VAE, (mclip.TextConfig(width=32, act="quick_gelu", projection_dim=None, **_TINY_TEXT),), 32, 7.5),
    Model("tiny SDXL-like 32", "sdxl",
          munet.UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                           transformer_depth=(0, 1), num_head_channels=16, context_dim=768 + 1280,
                           use_linear_in_transformer=True, adm_in_channels=32 + 6 * FOURIER),
          mvae.SDXL_VAE.__class__(ch=32, ch_mult=(1, 2), num_res_blocks=1, scale_factor=0.13025),
          (mclip.TextConfig(width=768, act="quick_gelu", projection_dim=None, **_TINY_TEXT),
           mclip.TextConfig(width=1280, act="gelu", projection_dim=32, **_TINY_TEXT)), 32, 5.0),
]


# --------------------------------------------------------------------------- building both pipelines
class Pair:
    """minisd's StableDiffusion and diffusers' pipeline on the same weights, in one dtype."""

    def __init__(self, model: Model, dtype: torch.dtype, device: str, tokenizers: Path, *, vae_dtype=None) -> None:
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
        from transformers import CLIPTokenizer

        self.model, self.dtype, self.device = model, dtype, device
        unet_spec = Spec("unet", model.unet, "unet")
        vae_spec = Spec("vae", model.vae, "vae")
        text_specs = [Spec("clip", c, f"text{i}") for i, c in enumerate(model.text)]
        # minisd: the U-Net and text encoders in `dtype`, the VAE in fp32 (minisd's default).
        u = build_ours(unet_spec, random_state_dict(meta_ours(unet_spec), seed=0, device=device), dtype)
        v = build_ours(vae_spec, random_state_dict(meta_ours(vae_spec), seed=1, device=device), torch.float32)
        encs = [build_ours(s, random_state_dict(meta_ours(s), seed=2 + i, device=device), dtype)
                for i, s in enumerate(text_specs)]
        fam = FAMILIES[model.family]
        family = fam.with_architecture(model.unet, model.vae, model.text)
        uses = [t.use(e.config.layers) for t, e in zip(fam.text, encs)]
        self.sd = StableDiffusion(family=family, unet=u, vae=v, text_encoders=encs, text_uses=uses)
        # diffusers: the same tensors; its VAE in `vae_dtype` (default: the same fp32 tensors).
        vae_sd = v.state_dict() if vae_dtype in (None, torch.float32) else {k: t.to(vae_dtype)
                                                                            for k, t in v.state_dict().items()}
        parts = dict(unet=build_theirs(unet_spec, u.state_dict(), device),
                     vae=build_theirs(vae_spec, vae_sd, device),
                     text_encoder=build_theirs(text_specs[0], encs[0].state_dict(), device),
                     tokenizer=CLIPTokenizer.from_pretrained(str(tokenizers / "sd1"), model_max_length=77))
        self.scheduler = EulerDiscreteScheduler.from_config(OFFICIAL)
        if model.family == "sdxl":
            parts["text_encoder_2"] = build_theirs(text_specs[1], encs[1].state_dict(), device)
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(tokenizers / "pad0"), model_max_length=77)
            self.pipe = StableDiffusionXLPipeline(**parts, scheduler=self.scheduler, add_watermarker=False)
        else:
            self.pipe = StableDiffusionPipeline(**parts, scheduler=self.scheduler, safety_checker=None,
                                                feature_extractor=None, requires_safety_checker=False)
        self.pipe.set_progress_bar_config(disable=True)
        self.table = DiscreteSchedule.from_alphas_cumprod(self.scheduler.alphas_cumprod)

    def call(self, side: str, steps: int, output: str = "latent"):
        """A closure running one txt2img request on `side` ("minisd" or "diffusers"), seed 0."""
        m = self.model
        if side == "minisd":
            return lambda: self.sd.generate(PROMPT, width=m.size, height=m.size, steps=steps, sampler="euler",
                                            schedule=self.table, guidance_scale=m.guidance, seed=0, output=output)
        out_type = "latent" if output == "latent" else "pil"
        return lambda: self.pipe(PROMPT, width=m.size, height=m.size, num_inference_steps=steps,
                                 guidance_scale=m.guidance, output_type=out_type,
                                 generator=torch.Generator("cpu").manual_seed(0)).images

    def unet_flops(self) -> float:
        """FLOPs of one U-Net call on the guided batch (2 latents), counted by torch's FlopCounterMode."""
        from torch.utils.flop_counter import FlopCounterMode

        cfg, side = self.model.unet, self.model.size // self.model.vae.downsample_factor
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn(2, cfg.in_channels, side, side, generator=g, device=self.device).to(self.dtype)
        ctx = torch.randn(2, 77, cfg.context_dim, generator=g, device=self.device).to(self.dtype)
        t = torch.tensor([999.0, 999.0], device=self.device)
        y = None if cfg.adm_in_channels is None else torch.randn(2, cfg.adm_in_channels, device=self.device)
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            self.sd.unet(x, t, ctx, None if y is None else y.to(self.dtype))
        return float(counter.get_total_flops())


def write_tokenizers(folder: Path) -> Path:
    """transformers tokenizer files from minisd's shipped vocabulary: SD1's (pads with <|endoftext|>) and
    SDXL tokenizer_2's (pads with "!"), as the diffusers repos have them."""
    from minisd.diffusers_format import write_tokenizer

    write_tokenizer(folder / "sd1", pad_token="<|endoftext|>")
    write_tokenizer(folder / "pad0", pad_token="!")
    return folder


# --------------------------------------------------------------------------- measuring
def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS if k in name), None)


def minisd_options(sd: StableDiffusion) -> str:
    """minisd's GPU speed options that keep the checkpoint's keys: fused q/k/v, sub-pixel upsampling
    (2.25x fewer FLOPs in every upsampler) and channels_last; says which ran."""
    sd.fuse_projections()
    sd.subpixel_upsampling()
    speed.channels_last(sd.unet)
    speed.channels_last(sd.vae)
    return "minisd: fuse_projections, subpixel_upsampling, channels_last"


def diffusers_options(pipe) -> str:
    """diffusers' documented speed recipe without compiling: fused q/k/v, channels_last."""
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    return "diffusers: fuse_qkv_projections, channels_last"


# --------------------------------------------------------------------------- the report
def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


SPEED_HEADER = ["model", "dtype", "mode", "minisd it/s", "diffusers it/s", "**minisd / diffusers it/s**",
                "minisd peak extra VRAM", "diffusers peak extra VRAM", "minisd MFU", "diffusers MFU", "notes"]


def speed_item(model: Model, dtype_name: str, mode: str, ctx: dict, report: Report) -> None:
    """`mode`: "eager" (both plain), "eager+opts" (each side's speed options, `minisd_options` and
    `diffusers_options`) or "compiled" (the options, then minisd `sd.compile()` and diffusers
    `torch.compile(pipe.unet)`)."""
    device, steps = ctx["device"], ctx["steps"]
    pair = Pair(model, DTYPES[dtype_name], device, ctx["tokenizers"])
    how, first, compiled = "", {}, mode == "compiled"
    flops = pair.unet_flops()
    calls = {"minisd": pair.call("minisd", steps), "diffusers": pair.call("diffusers", steps)}
    with torch.inference_mode():
        if mode != "eager":
            how = minisd_options(pair.sd) + "; " + diffusers_options(pair.pipe)
        if compiled:
            pair.sd.compile()
            pair.pipe.unet = torch.compile(pair.pipe.unet)
            how += "; minisd sd.compile(), diffusers torch.compile(pipe.unet)"
            # The first call of each side compiles: timed on its own, as the cost a user pays once.
            first = {side: wall_seconds(fn, device) for side, fn in calls.items()}
        times = interleaved(calls, device, ctx["warmup"], ctx["repeats"])
        peaks = {side: peak_extra(fn, device) for side, fn in calls.items()}
    med = {s: median(t) for s, t in times.items()}
    its = {s: steps / med[s] for s in med}
    peak = peak_tflops(device)
    mfu = {s: flops * steps / med[s] / (peak * 1e12) if peak else None for s in med}
    note = how + (f"; first call (compiling) minisd {first['minisd']:.0f} s, diffusers {first['diffusers']:.0f} s"
                  if first else "")
    report.add(f"it/s, peak VRAM and MFU ({steps} steps, CFG, latents out)", SPEED_HEADER,
               [model.label, dtype_name, mode, f"{its['minisd']:.2f}",
                f"{its['diffusers']:.2f}", f"**{its['minisd'] / its['diffusers']:.3f}**", gib(peaks["minisd"]),
                gib(peaks["diffusers"]), f"{mfu['minisd']:.1%}" if peak else "n/a",
                f"{mfu['diffusers']:.1%}" if peak else "n/a", note],
               dict(model=model.label, dtype=dtype_name, mode=mode, times=times, its=its, peaks=peaks,
                    unet_flops_per_step=flops, mfu=mfu, first_call=first, how=how))


def precision_item(model: Model, ctx: dict, report: Report) -> None:
    """fp16 / bf16 latents against fp32 ones (TF32 off), each side against itself and minisd against diffusers."""
    device, steps = ctx["device"], ctx["steps"]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        latents = {}
        for name in ("fp32", "fp16", "bf16"):
            pair = Pair(model, DTYPES[name], device, ctx["tokenizers"])
            with torch.inference_mode():
                latents[name] = {s: torch.as_tensor(pair.call(s, steps)()).float() for s in ("minisd", "diffusers")}
            del pair
            free(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    for name in ("fp32", "fp16", "bf16"):
        lat = latents[name]
        row = dict(model=model.label, dtype=name, minisd_vs_diffusers=rel_err(lat["minisd"], lat["diffusers"]),
                   minisd_vs_own_fp32=rel_err(lat["minisd"], latents["fp32"]["minisd"]),
                   diffusers_vs_own_fp32=rel_err(lat["diffusers"], latents["fp32"]["diffusers"]))
        report.add(f"Precision: final latents after {steps} steps, max|a - b| / max|b| (TF32 off)",
                   ["model", "dtype", "minisd vs diffusers", "minisd vs its fp32", "diffusers vs its fp32"],
                   [model.label, name, *(f"{row[k]:.1e}" for k in list(row)[2:])], row)


def offload_item(model: Model, ctx: dict, report: Report) -> None:
    """Model CPU offload: weights on the CPU, each component on the GPU only while it runs."""
    device, steps = ctx["device"], ctx["steps"]
    # diffusers' fp16 folders hold an fp16 VAE (SDXL's force_upcast decodes it in fp32); minisd's stays fp32.
    pair = Pair(model, torch.float16, "cpu", ctx["tokenizers"], vae_dtype=torch.float16)
    how = {}
    if hasattr(pair.sd, "enable_model_offload"):
        pair.sd.enable_model_offload(device)
        how["minisd"] = "sd.enable_model_offload()"
    else:
        report.notes.append("offload: minisd has no sd.enable_model_offload yet; measured diffusers alone")
    if device == "cuda":
        pair.pipe.enable_model_cpu_offload()
        how["diffusers"] = "pipe.enable_model_cpu_offload()"
    calls = {side: pair.call(side, steps, output="pil") for side in how}
    if not calls:
        report.notes.append("offload: no CUDA device (smoke run), nothing to offload to")
        return
    with torch.inference_mode():
        times = interleaved(calls, device, 1, max(1, ctx["repeats"] // 2))
        peaks = {side: peak_extra(fn, device) for side, fn in calls.items()}
    for side in calls:
        report.add(f"Model offload (fp16, {steps} steps, prompt to PIL image)",
                   ["model", "side", "how", "s / image", "peak VRAM"],
                   [model.label, side, how[side], f"{median(times[side]):.2f}", gib(peaks[side])],
                   dict(model=model.label, side=side, times=times[side], peak=peaks[side]))


# --------------------------------------------------------------------------- driver
def main() -> None:
    p = script_parser(__doc__, "minisd_gpu_speed")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 30; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side (default 2; smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 4; smoke 2)")
    p.add_argument("--deadline-s", type=float, default=540,
                   help="start no item whose estimated time would end it after this many seconds")
    p.add_argument("--skip", default="",
                   help="comma-separated: eager, eager+opts, precision, compiled, offload, compiled-bf16")
    args = p.parse_args()
    t_start = time.perf_counter()
    device = script_device(p, args.smoke)
    steps = args.steps or (3 if args.smoke else 30)
    ctx = dict(device=device, steps=steps, warmup=args.warmup if args.warmup is not None else (1 if args.smoke else 2),
               repeats=args.repeats or (2 if args.smoke else 4),
               tokenizers=write_tokenizers(Path(tempfile.mkdtemp(prefix="minisd_tok_"))))
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    models = SMOKE if args.smoke else FULL

    title = "# minisd GPU speed" + (" (SMOKE: tiny models on the CPU)" if args.smoke else "")
    peak = f"peak dense fp16/bf16 {peak_tflops(device) or 'unknown'} TFLOP/s (for MFU)"
    report = Report(args.out, f"{title}\n\n{environment(device, peak)}\n- {steps} steps, warm-up {ctx['warmup']}, "
                              f"{ctx['repeats']} timed calls per side, median\n", "gpu_speed.md", "gpu_speed.json")
    report.flush()
    # (what, group, function, arguments, estimated seconds on an H100: SD1.5 first, then SDXL). An item
    # starts only if its estimate still fits before --deadline-s, so the run ends inside the device's limit.
    sd15, sdxl = models
    plan = [(f"eager {m.label} {d}", "eager", speed_item, (m, d, "eager"), est)
            for m, est in ((sd15, 20), (sdxl, 70)) for d in ("fp16", "bf16")]
    plan += [(f"eager+opts {m.label} fp16", "eager+opts", speed_item, (m, "fp16", "eager+opts"), est)
             for m, est in ((sd15, 20), (sdxl, 70))]
    plan += [(f"precision {m.label}", "precision", precision_item, (m,), est) for m, est in ((sd15, 15), (sdxl, 50))]
    plan += [(f"compiled {m.label} fp16", "compiled", speed_item, (m, "fp16", "compiled"), est)
             for m, est in ((sd15, 80), (sdxl, 170))]
    plan += [(f"offload {m.label}", "offload", offload_item, (m,), est) for m, est in ((sd15, 15), (sdxl, 40))]
    plan += [(f"compiled {m.label} bf16", "compiled-bf16", speed_item, (m, "bf16", "compiled"), est)
             for m, est in ((sd15, 80), (sdxl, 170))]
    for what, group, fn, fn_args, estimate in plan:
        elapsed = time.perf_counter() - t_start
        if group in skip:
            continue
        if not args.smoke and elapsed + estimate > args.deadline_s:
            report.notes.append(f"skipped {what}: {elapsed:.0f} s elapsed + about {estimate} s would pass "
                                f"--deadline-s {args.deadline_s:.0f}")
            continue
        attempt(report, what, device, t_start, fn, *fn_args, ctx, report)
    report.notes.append(f"total {time.perf_counter() - t_start:.0f} s")
    report.flush()
    print("\n" + report.text(), flush=True)


if __name__ == "__main__":
    main()
