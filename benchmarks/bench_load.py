"""Loading a full-size SD1.5 single file: `minisd.load` against diffusers' `from_single_file`.

    python benchmarks/bench_load.py                 # writes weights/bench_sd15_fp16.safetensors once, then measures
    python benchmarks/bench_load.py --sides diffusers --rounds 3

1. The checkpoint. Official weights cannot be downloaded here, so the script writes
   a file with the official SD1.5 layout and random fp16 weights (seeded normals,
   std 0.02): the U-Net under `model.diffusion_model.`, the VAE under
   `first_stage_model.` and CLIP-L under `cond_stage_model.transformer.text_model.`,
   plus what the official `v1-5-pruned-emaonly.safetensors` also holds besides the
   weights: the DDPM schedule buffers (`betas`, `alphas_cumprod`, ...) and CLIP's
   `position_ids` (`--bare` leaves them out). The key set comes from minisd's own
   modules, built on the meta device, and `layouts.hf_table(...).to_theirs`. The
   tensors are generated and written one at a time (the safetensors format is a
   JSON header and the raw bytes), so the writer never holds the model in memory.
   `weights/` is git-ignored; the file (about 2 GB) is kept for later runs.

2. The reference's configuration, offline. `from_single_file` needs the diffusers
   configs of the pipeline and its components, normally fetched from the hub. The
   script writes them into `weights/bench_sd15_config/` (model_index.json, the
   unet/vae/text_encoder/scheduler configs of `stable-diffusion-v1-5/stable-diffusion-v1-5`,
   and a tokenizer made from minisd's bundled CLIP BPE vocabulary) and passes
   `config=<that folder>, local_files_only=True`, with HF_HUB_OFFLINE=1. The safety
   checker and feature extractor are null in model_index.json (from_single_file does
   not load the safety checker anyway).

3. The measurement. Each side loads in its own fresh subprocess (`--rounds` times,
   alternating which side goes first), after the file was read once so both find it
   in the page cache. A subprocess reports: the import time of its library; the load
   time (the call alone, to a ready-to-use fp16 model on the CPU); and the resident
   set size (Linux VmRSS / VmHWM from /proc/self/status, the high-water mark reset
   after the imports through /proc/self/clear_refs): after the imports, the peak
   during the load, and the peak after one element of every 4 KiB page of every
   parameter has been read (with the time that took). The second peak matters
   because a loader may return tensors that still point into the memory-mapped
   file: such pages count towards RSS only once read, and the first forward pass
   pays for faulting them in. Finally each side sums its parameters per component
   (fp32), a fingerprint checked against the same sums taken from the file.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmem import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO / "weights" / "bench_sd15_fp16.safetensors"
UNET, VAE, CLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."


# --------------------------------------------------------------------------- memory (Linux)
# --------------------------------------------------------------------------- the checkpoint
def official_tensors(bare: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    """(key, safetensors dtype, shape) of an official SD1.5 file, from minisd's modules on meta."""
    import torch

    from minisd.clip import CLIP_VIT_L14, TextTransformer
    from minisd.layouts import hf_table
    from minisd.unet import SD1_UNET, UNetModel
    from minisd.vae import SD_VAE, AutoencoderKL

    with torch.device("meta"):
        unet, vae, text = UNetModel(SD1_UNET), AutoencoderKL(SD_VAE), TextTransformer(CLIP_VIT_L14)
    out = []
    if not bare:
        # ldm DDPM.register_schedule buffers (fp32, one entry per training step) and the HF
        # CLIP position_ids buffer (int64), as the official file stores them.
        schedule = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")
        out += [(k, "F32", (1000,)) for k in schedule]
        out.append((CLIP + "text_model.embeddings.position_ids", "I64", (1, 77)))
    out += [(UNET + k, "F16", tuple(v.shape)) for k, v in unet.state_dict().items()]
    out += [(VAE + k, "F16", tuple(v.shape)) for k, v in vae.state_dict().items()]
    theirs = hf_table(CLIP_VIT_L14).to_theirs(text.state_dict())  # HF names, q/k/v apart
    out += [(CLIP + k, "F16", tuple(v.shape)) for k, v in theirs.items()]
    return out


def _schedule(name: str):
    """The ldm DDPM buffers of SD1's scaled-linear schedule (beta 0.00085 .. 0.012, 1000 steps)."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    table = {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(), "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": post_var, "posterior_log_variance_clipped": post_var.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - ac),
    }
    return table[name].float()


def write_checkpoint(path: Path, *, seed: int, bare: bool) -> None:
    """Stream a safetensors file: header first, then each tensor generated and written in turn."""
    import torch

    specs = official_tensors(bare)
    itemsize = {"F16": 2, "F32": 4, "I64": 8}
    header, offset = {"__metadata__": {"format": "pt", "minisd.benchmark": "random weights, not a real model"}}, 0
    for key, dtype, shape in specs:  # the 8-byte-aligned F32/I64 tensors come first
        n = itemsize[dtype]
        for s in shape:
            n *= s
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to a multiple of 8 bytes
    g = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, dtype, shape in specs:
            if dtype == "F32":
                t = _schedule(key)
            elif dtype == "I64":
                t = torch.arange(77, dtype=torch.int64)[None]
            else:
                # weights ~ N(0, 0.02); 1-d "weight"s (norm scales) ~ N(1, 0.02), so no layer is off
                mean = 1.0 if key.endswith("weight") and len(shape) == 1 else 0.0
                t = torch.empty(shape).normal_(mean, 0.02, generator=g).half()
            f.write(t.contiguous().numpy().tobytes())
    tmp.rename(path)


def write_diffusers_config(folder: Path) -> None:
    """The diffusers configs of stable-diffusion-v1-5/stable-diffusion-v1-5 (architecture fields,
    as on the hub), plus a transformers CLIP tokenizer built from minisd's bundled BPE file."""
    configs = {
        "model_index.json": {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
        "unet/config.json": {
            "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
            "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
            "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        },
        "vae/config.json": {
            "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
        },
        "text_encoder/config.json": {
            "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
            "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
            "vocab_size": 49408,
        },
        "scheduler/scheduler_config.json": {
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
        },
    }
    for name, content in configs.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content, indent=1))
    # the tokenizer files (vocab.json, merges.txt, configs) from minisd's bundled BPE vocabulary
    from minisd.diffusers_format import write_tokenizer

    write_tokenizer(folder / "tokenizer", pad_token="<|endoftext|>")


def file_sums(path: Path) -> dict[str, float]:
    """Per-component fp32 sums of the file's floating-point weights (the buffers excluded)."""
    import torch
    from safetensors import safe_open

    sums = {"unet": 0.0, "vae": 0.0, "text": 0.0}
    prefixes = {"unet": UNET, "vae": VAE, "text": CLIP}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            part = next((p for p, prefix in prefixes.items() if key.startswith(prefix)), None)
            t = f.get_tensor(key)
            if part and t.dtype == torch.float16:  # weights only: not the schedule buffers, position_ids
                sums[part] += t.sum(dtype=torch.float32).item()
    return sums


# --------------------------------------------------------------------------- one load, in a subprocess
# minisd's sides: `minisd.load` keyword arguments (besides dtype=float16).
MINISD_SIDES = {
    "minisd": {},  # the default: every tensor copied out of the file, the VAE in fp32 (minisd's vae_dtype)
    "minisd-fp16vae": {"vae_dtype": "float16"},  # all fp16, as diffusers' torch_dtype=float16 loads it
    # tensors left as views of the file's memory map, as diffusers leaves them (the VAE's cast from the map)
    "minisd-mmap": {"mmap": True},
    "minisd-mmap-fp16vae": {"mmap": True, "vae_dtype": "float16"},  # zero-copy throughout, like diffusers
}


def worker(side: str, path: str, config: str) -> dict:
    t0 = time.perf_counter()
    import torch

    if side.startswith("minisd"):
        import minisd
    else:
        from diffusers import StableDiffusionPipeline
    t_import = time.perf_counter() - t0
    rss_import = rss_bytes()
    reset = reset_peak_rss()

    t0 = time.perf_counter()
    if side.startswith("minisd"):
        kwargs = {k: getattr(torch, v) if k == "vae_dtype" else v for k, v in MINISD_SIDES[side].items()}
        model = minisd.load(path, dtype=torch.float16, **kwargs)
        parts = {"unet": model.unet, "vae": model.vae, "text": model.text_encoders[0]}
    else:
        pipe = StableDiffusionPipeline.from_single_file(
            path, config=config, local_files_only=True, torch_dtype=torch.float16
        )
        parts = {"unet": pipe.unet, "vae": pipe.vae, "text": pipe.text_encoder}
    t_load = time.perf_counter() - t0
    rss_load, peak_load = rss_bytes(), peak_rss_bytes()

    # Read one element of every 4 KiB page of every parameter: pages still mapped from the
    # file are faulted in now (the first forward pass would pay this), nothing else is done.
    t0 = time.perf_counter()
    with torch.no_grad():
        for m in parts.values():
            for p in m.parameters():
                p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
    t_touch = time.perf_counter() - t0
    peak_touched = peak_rss_bytes()
    with torch.no_grad():  # a fingerprint of the values, to check that both sides loaded the same
        sums = {name: sum(p.sum(dtype=torch.float32).item() for p in m.parameters()) for name, m in parts.items()}
    dtypes = sorted({str(p.dtype) for m in parts.values() for p in m.parameters()})
    return dict(
        side=side, import_s=t_import, load_s=t_load, touch_s=t_touch, rss_import=rss_import, rss_load=rss_load,
        peak_load=peak_load if reset else None, peak_touched=peak_touched if reset else None,
        param_bytes=sum(p.numel() * p.element_size() for m in parts.values() for p in m.parameters()),
        sums=sums, dtypes=dtypes,
    )


def run_side(side: str, path: Path, config: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else src
    cmd = [sys.executable, __file__, "--worker", side, "--path", str(path), "--config", str(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# --------------------------------------------------------------------------- the driver
def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--path", type=Path, default=DEFAULT_PATH, help="the checkpoint (written if missing)")
    p.add_argument("--config", type=Path, help="diffusers config folder (default: next to --path; always rewritten)")
    p.add_argument("--regenerate", action="store_true", help="rewrite the checkpoint even if it exists")
    p.add_argument("--bare", action="store_true", help="weights only: no DDPM buffers, no position_ids")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sides", default="minisd,diffusers",
                   help="comma-separated: diffusers and MINISD_SIDES' names (minisd: the default load, VAE in fp32)")
    p.add_argument("--rounds", type=int, default=1, help="loads per side, alternating which side goes first")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    config = args.config or args.path.parent / "bench_sd15_config"
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, str(args.path), str(config))), flush=True)
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not set(sides) <= {*MINISD_SIDES, "diffusers"}:
        p.error(f"--sides must name some of {', '.join(MINISD_SIDES)}, diffusers; got {sides}")
    if args.regenerate or not args.path.exists():
        print(f"writing {args.path} (random weights) ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        write_checkpoint(args.path, seed=args.seed, bare=args.bare)
        print(f"  {gib(args.path.stat().st_size)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    write_diffusers_config(config)
    size = args.path.stat().st_size
    with open(args.path, "rb") as f:  # into the page cache, so neither side pays for the disk
        while f.read(1 << 24):
            pass

    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            print(f"  loading with {side} (round {r + 1}) ...", file=sys.stderr, flush=True)
            runs[side].append(run_side(side, args.path, config))

    def med(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"file: {args.path.name}, {gib(size)} ({size:,} bytes), fp16, page cache warm; "
          f"{args.rounds} round(s), median\n")
    header = ["side", "import", "load", "import + load", "first touch of all weights", "RSS after imports",
              "peak RSS during load", "peak RSS after touching all weights", "(peak - imports) / file size",
              "weights loaded"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for side in sides:
        rs, last = runs[side], runs[side][-1]
        peak = last["peak_touched"]
        row = [side, f"{med([x['import_s'] for x in rs]):.1f} s", f"**{med([x['load_s'] for x in rs]):.1f} s**",
               f"{med([x['import_s'] + x['load_s'] for x in rs]):.1f} s",
               f"{med([x['touch_s'] for x in rs]):.1f} s", gib(last["rss_import"]),
               gib(last["peak_load"]) if last["peak_load"] else "n/a", gib(peak) if peak else "n/a",
               f"{(peak - last['rss_import']) / size:.2f}" if peak else "n/a",
               f"{gib(last['param_bytes'])} {'/'.join(d.removeprefix('torch.') for d in last['dtypes'])}"]
        print("| " + " | ".join(row) + " |")
    if "diffusers" in runs:  # the targets: load and import + load <= 0.5x, RSS <= 1.15x the file
        ref = runs["diffusers"]
        for side in [s for s in sides if s != "diffusers"]:
            rs = runs[side]
            load = med([x["load_s"] for x in rs]) / med([x["load_s"] for x in ref])
            both = med([x["import_s"] + x["load_s"] for x in rs]) / med([x["import_s"] + x["load_s"] for x in ref])
            print(f"\n{side} / diffusers: load call {load:.2f}x, import + load {both:.2f}x")
    # Fingerprint check: each side's parameter sums against the file's own. fp32 sums of the same
    # values grouped differently (fused vs separate q/k/v) agree to ~1e-6 relative.
    expected = file_sums(args.path)
    for side in sides:
        got = runs[side][-1]["sums"]
        same = all(abs(got[k] - expected[k]) <= 1e-5 * max(1.0, abs(expected[k])) for k in expected)
        print(f"\n{side}: parameter sums {'match the file' if same else 'DIFFER FROM THE FILE'}: "
              + ", ".join(f"{k} {got[k]:.7g} (file {expected[k]:.7g})" for k in expected))
    if args.json:
        args.json.write_text(json.dumps(dict(file_bytes=size, runs=runs), indent=1))


if __name__ == "__main__":
    main()
