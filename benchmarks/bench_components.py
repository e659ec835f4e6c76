"""Speed and memory of minisd's components against their references, on the same weights.

    python benchmarks/bench_components.py                       # CPU, fp32, the defaults below
    python benchmarks/bench_components.py --components unet --unet-config sdxl --unet-size 64 --batch 2
    python benchmarks/bench_components.py --components unet --minisd-opts "fused;fused,channels_last"
    python benchmarks/bench_components.py --device cuda --dtype fp16 --unet-size 64 --batch 2

Three pairs, each at full size (random weights):
- U-Net (`--unet-config sd15|sdxl`): minisd `UNetModel(SD1_UNET)` (860M) or
  `UNetModel(SDXL_BASE_UNET)` (2.6B) vs diffusers `UNet2DConditionModel`, one denoising
  step at `--unet-size` latents with a (batch, 77, 768) or (batch, 77, 2048) context
  (SDXL: plus the pooled-text + size/crop vector);
- VAE decode: minisd `AutoencoderKL(SD_VAE).decode` vs diffusers `AutoencoderKL.decode`
  at `--vae-size` latents (SDXL's VAE has the same architecture);
- text (`--text sd1|sdxl`) on `--tokens` token ids: SD1's CLIP-L (last hidden state),
  minisd `TextTransformer(CLIP_VIT_L14)` vs transformers `CLIPTextModel`; or SDXL's two
  encoders as SDXL's pipelines read them, each its own row: CLIP-L's penultimate hidden
  state (minisd runs 11 of the 12 blocks; diffusers runs all 12 with
  output_hidden_states=True) and bigG's penultimate hidden state and pooled output
  (transformers `CLIPTextModelWithProjection`, all 32 blocks on both sides).

Optimisations. `--minisd-opts "fused;fused,channels_last"` adds one more minisd side per
`;`-separated variant, the same module with those optimisations applied (see
`common.MINISD_OPTS`: fused projections, channels_last, packed, subpixel, compile), timed
in the same interleaved run, so each optimisation's effect is read off against the plain
model. `--ref-opts` does the same for the reference (diffusers' `fuse_qkv_projections`,
channels_last, `torch.compile`); one the reference model lacks (diffusers' CLIP has no
`fuse_qkv_projections`) is skipped and the table says so.

Method. Time: all sides of a component in one subprocess, holding the same weights
(drawn once, seeded; the reference receives the very same tensors through minisd's key
tables), calls interleaved with the order rotated every round (A B C, B C A, ...), so a
change in machine load hits every side alike; `--warmup` untimed rounds, then
`--repeats` timed ones under `torch.inference_mode()`; the median per side. Memory: each
side alone in its own fresh subprocess, so sides cannot share caches, allocator pools or
memory high-water marks.
`torch.set_flush_denormal(True)` on both sides (random weights otherwise produce
denormals that slow CPU math 2-3x). Both sides use PyTorch's SDPA for attention,
the libraries' defaults.

Memory is the Linux resident set size of the subprocess, read from /proc/self/status:
`RSS model` (VmRSS once the model is built, temporaries freed: Python + torch +
the library's imports + weights), and `peak RSS` (VmHWM, the high-water mark, reset
through /proc/self/clear_refs just before the first call, so it covers only the
warm-up and timed calls: weights + activations + allocator slack). On CUDA the
peak of `torch.cuda.max_memory_allocated` over the calls is reported as well.

Each subprocess also saves its output, and the table's last column is the relative
difference of the two outputs (max|a - b| / max|b|): a check that both sides really
computed the same function of the same weights.

This is a benchmark, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    MINISD_OPTS,
    Spec,
    apply_minisd_opts,
    apply_ref_opts,
    build_ours,
    build_theirs,
    call_ours,
    call_theirs,
    fmt_bytes,
    make_inputs,
    markdown_table,
    median,
    meta_ours,
    param_bytes,
    parse_variants,
    random_state_dict,
    rel_err,
    time_runs,
)
from minisd.clip import CLIP_VIT_L14, OPENCLIP_VIT_BIGG14  # noqa: E402
from minisd.unet import SD1_UNET, SDXL_BASE_UNET  # noqa: E402
from minisd.vae import SD_VAE  # noqa: E402
from procmem import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

# Every measurable item, by the name the worker subprocesses receive.
SPECS = {
    "unet-sd15": Spec("unet", SD1_UNET, "U-Net SD1.5 (860M)"),
    "unet-sdxl": Spec("unet", SDXL_BASE_UNET, "U-Net SDXL base (2.6B)"),
    "vae": Spec("vae", SD_VAE, "VAE decode (84M)"),
    "text-sd1": Spec("clip", CLIP_VIT_L14, "CLIP-L text (123M)"),
    "text-sdxl-l": Spec("clip-sdxl", CLIP_VIT_L14, "SDXL text 1: CLIP-L, penultimate (123M)"),
    "text-sdxl-g": Spec("clip-sdxl", OPENCLIP_VIT_BIGG14, "SDXL text 2: bigG, penultimate + pooled (695M)"),
}


def items_of(component: str, args: argparse.Namespace) -> list[str]:
    """The SPECS names a `--components` entry stands for under the config flags."""
    if component == "unet":
        return [f"unet-{args.unet_config}"]
    if component == "clip":
        return ["text-sd1"] if args.text == "sd1" else ["text-sdxl-l", "text-sdxl-g"]
    return [component]


def reference_name(item: str) -> str:
    return "transformers" if item.startswith("text") else "diffusers"


def sides_of(args: argparse.Namespace) -> list[str]:
    """"minisd", one "minisd+opts" per --minisd-opts variant, "reference", one "reference+opts" per --ref-opts."""
    extra = [("minisd", v) for v in parse_variants(args.minisd_opts, tuple(MINISD_OPTS))] + [("reference", v)
                                                                          for v in parse_variants(args.ref_opts)]
    return ["minisd", "reference"] + [f"{who}+{','.join(v)}" for who, v in extra]


# --------------------------------------------------------------------------- workers (subprocesses)
def size_of(item: str, args: argparse.Namespace) -> int:
    return args.unet_size if item.startswith("unet") else args.vae_size if item == "vae" else args.tokens


def build_sides(item: str, args: argparse.Namespace, sides: list[str]) -> tuple[dict, dict, list[str]]:
    """Each side's model (all on one set of shared weights) and call; notes on skipped optimisations."""
    spec, device, dtype = SPECS[item], args.device, DTYPES[args.dtype]
    weights = build_ours(spec, random_state_dict(meta_ours(spec), seed=args.seed, device=device), dtype).state_dict()
    models, calls, notes = {}, {}, []
    for side in sides:
        who, _, opts = side.partition("+")
        opts_t = tuple(o for o in opts.split(",") if o)
        if who == "minisd":
            model = apply_minisd_opts(build_ours(spec, weights, dtype), opts_t)
            calls[side] = call_ours(spec, model)
        else:
            model, skipped = apply_ref_opts(build_theirs(spec, weights, device), opts_t)
            calls[side] = call_theirs(spec, model)
            notes += [f"{side}: skipped {s}" for s in skipped]
        models[side] = model
    return models, calls, notes


def _setup(args: argparse.Namespace) -> None:
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)


def timing_worker(args: argparse.Namespace) -> dict:
    """Every side in one process on shared weights, calls interleaved with the order rotated each
    round (A B C, B C A, C A B, ...), so a change in machine load hits all sides alike; the median
    of each side's times, and each side's output against the reference's."""
    _setup(args)
    sides = sides_of(args)
    spec, device, dtype = SPECS[args.component], args.device, DTYPES[args.dtype]
    _, calls, notes = build_sides(args.component, args, sides)
    inputs = make_inputs(spec, batch=args.batch, size=size_of(args.component, args), device=device, dtype=dtype)
    times: dict[str, list[float]] = {s: [] for s in sides}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            k = i % len(sides)
            for side in sides[k:] + sides[:k]:
                t = time_runs(lambda side=side: calls[side](inputs), device, warmup=0, repeats=1)[0]
                if i >= args.warmup:
                    times[side].append(t)
        expected = calls["reference"](inputs)
        errs = {s: rel_err(calls[s](inputs), expected) for s in sides if s != "reference"}
    return dict(times=times, rel_err=errs, notes=notes, threads=torch.get_num_threads(), load=os.getloadavg())


def memory_worker(args: argparse.Namespace) -> dict:
    """One side alone in a fresh process: resident memory after building, and its peak over calls."""
    _setup(args)
    spec, device, dtype = SPECS[args.component], args.device, DTYPES[args.dtype]
    if not args.side.startswith("minisd"):  # import the reference's classes before the first RSS reading
        import diffusers.loaders.single_file_utils  # noqa: F401
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401
    rss_import = rss_bytes()
    models, calls, _ = build_sides(args.component, args, [args.side])  # minisd's own module dropped for the ref
    model, call = models[args.side], calls[args.side]
    inputs = make_inputs(spec, batch=args.batch, size=size_of(args.component, args), device=device, dtype=dtype)
    gc.collect()
    rss_model = rss_bytes()
    reset = reset_peak_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        time_runs(lambda: call(inputs), device, warmup=1, repeats=1)
    result = dict(rss_import=rss_import, rss_model=rss_model, peak_rss=peak_rss_bytes() if reset else None,
                  weights=param_bytes(model))
    if device == "cuda":
        result["cuda_peak"] = torch.cuda.max_memory_allocated() - cuda_base
    return result


def run_worker(args: argparse.Namespace, mode: str, component: str, side: str = "") -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--component", component, "--side", side]
    for flag in ("device", "dtype", "unet_size", "vae_size", "tokens", "batch", "warmup", "repeats", "threads", "seed",
                 "minisd_opts", "ref_opts"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {component} {side} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# --------------------------------------------------------------------------- the driver
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    desc = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, Python {platform.python_version()}"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--components", default="unet,vae,clip", help="comma-separated subset of unet,vae,clip")
    p.add_argument("--unet-config", default="sd15", choices=["sd15", "sdxl"], help="which U-Net (SD1.5 or SDXL base)")
    p.add_argument("--text", default="sd1", choices=["sd1", "sdxl"], help="SD1's CLIP-L, or SDXL's two encoders")
    p.add_argument("--unet-size", type=int, default=32, help="U-Net latent side (32: a 256 px image)")
    p.add_argument("--vae-size", type=int, default=16, help="VAE decode latent side (16: a 128 px image)")
    p.add_argument("--tokens", type=int, default=77, help="CLIP sequence length")
    p.add_argument("--batch", type=int, default=1, help="batch (2 = a guided step's cond + uncond)")
    p.add_argument("--minisd-opts", default="", help='extra minisd sides, e.g. "fused;fused,channels_last" '
                   "(each of: " + ", ".join(MINISD_OPTS) + ")")
    p.add_argument("--ref-opts", default="", help="extra reference sides, the same syntax")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the per-side memory subprocesses")
    p.add_argument("--memory-all", action="store_true", help="memory of the optimised sides too (default: plain)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    # internal: a subprocess measuring one thing
    p.add_argument("--worker", choices=["timing", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--component", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        result = (timing_worker if args.worker == "timing" else memory_worker)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    components = [c.strip() for c in args.components.split(",") if c.strip()]
    unknown = [c for c in components if c not in ("unet", "vae", "clip")]
    if unknown:
        p.error(f"unknown components {unknown}; expected a subset of unet, vae, clip")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")
    try:
        sides = sides_of(args)
    except ValueError as e:
        p.error(str(e))

    print(f"machine: {machine()}", flush=True)
    results, rows = [], []
    for item in [it for c in components for it in items_of(c, args)]:
        print(f"  {item}: timing ({len(sides)} sides, interleaved) ...", file=sys.stderr, flush=True)
        timing = run_worker(args, "timing", item)
        memory = {}
        for side in () if args.no_memory else sides if args.memory_all else ("minisd", "reference"):
            print(f"  {item}: memory of {side} alone ...", file=sys.stderr, flush=True)
            memory[side] = run_worker(args, "memory", item, side)
        results.append(dict(component=item, timing=timing, memory=memory))
        rows += table_rows(item, sides, timing, memory, args)

    header = ["component", "side", "median (min) per call", "/ reference"]
    if not args.no_memory:
        header += ["weights", "RSS after imports", "RSS model built", "peak RSS (calls)"]
        header += ["CUDA peak (calls)"] if args.device == "cuda" else []
    header.append("output rel diff")
    load = results[-1]["timing"]["load"] if results else (0, 0, 0)
    print(f"\n{args.device}, {args.dtype}, batch {args.batch}; U-Net {args.unet_config} {args.unet_size}x"
          f"{args.unet_size} latent, VAE decode {args.vae_size}x{args.vae_size} latent, text {args.text} "
          f"{args.tokens} tokens; {args.warmup} warm-up + {args.repeats} timed calls per side, interleaved; "
          f"{results[0]['timing']['threads'] if results else '?'} threads; load average at the end "
          f"{load[0]:.2f}\n")
    print(markdown_table(header, rows))
    notes = sorted({n for r in results for n in r["timing"]["notes"]})
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))
    if args.json:
        raw = {"args": vars(args) | {"json": str(args.json)}, "machine": machine(), "results": results}
        args.json.write_text(json.dumps(raw, indent=1))


def table_rows(item: str, sides: list[str], timing: dict, memory: dict, args: argparse.Namespace) -> list[list]:
    """One row per side: median (min), the ratio to the plain reference, memory, output difference."""
    times = timing["times"]
    med = {s: median(t) for s, t in times.items()}
    rows = []
    for side in sides:
        name = side.replace("reference", reference_name(item))
        ratio = med[side] / med["reference"]
        row = [SPECS[item].label, name, f"{med[side] * 1e3:.0f} ms ({min(times[side]) * 1e3:.0f})",
               f"**{ratio:.2f}**" if side != "reference" else "1"]
        if not args.no_memory:
            m = memory.get(side)
            row += ([fmt_bytes(m["weights"]), fmt_bytes(m["rss_import"]), fmt_bytes(m["rss_model"]),
                     fmt_bytes(m["peak_rss"]) if m["peak_rss"] else "n/a"] if m else ["", "", "", ""])
            if args.device == "cuda":
                row.append(fmt_bytes(m["cuda_peak"]) if m else "")
        row.append(f"{timing['rel_err'][side]:.1e}" if side in timing["rel_err"] else "")
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
