"""Speed and memory of minisd's components against their references, on the same weights.

    python benchmarks/bench_components.py                       # CPU, fp32, the defaults below
    python benchmarks/bench_components.py --device cuda --dtype fp16 --unet-size 64 --batch 2

Three pairs, each at full size (random weights):
- U-Net: minisd `UNetModel(SD1_UNET)` (860M) vs diffusers `UNet2DConditionModel`, one
  denoising step at `--unet-size` latents with a (batch, 77, 768) context;
- VAE decode: minisd `AutoencoderKL(SD_VAE).decode` vs diffusers `AutoencoderKL.decode`
  at `--vae-size` latents;
- CLIP-L: minisd `TextTransformer(CLIP_VIT_L14)` vs transformers `CLIPTextModel` on
  `--tokens` token ids.

Method. Each (component, side) runs in its own fresh subprocess, so the two sides
cannot share caches, allocator pools or memory high-water marks. The subprocess
draws the weights (seeded, so both sides get the same numbers; the reference
receives them through minisd's key tables), then runs `--warmup` untimed calls and
`--repeats` timed ones under `torch.inference_mode()` and reports the median.
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
    Spec,
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
    random_state_dict,
    rel_err,
    time_runs,
)
from minisd.clip import CLIP_VIT_L14  # noqa: E402
from minisd.unet import SD1_UNET  # noqa: E402
from minisd.vae import SD_VAE  # noqa: E402
from procmem import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

SPECS = {
    "unet": Spec("unet", SD1_UNET, "U-Net SD1.5 (860M)"),
    "vae": Spec("vae", SD_VAE, "VAE decode (84M)"),
    "clip": Spec("clip", CLIP_VIT_L14, "CLIP-L text (123M)"),
}
REFERENCE = {"unet": "diffusers", "vae": "diffusers", "clip": "transformers"}


# --------------------------------------------------------------------------- workers (subprocesses)
def size_of(component: str, args: argparse.Namespace) -> int:
    return {"unet": args.unet_size, "vae": args.vae_size, "clip": args.tokens}[component]


def _setup(args: argparse.Namespace) -> None:
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)


def timing_worker(args: argparse.Namespace) -> dict:
    """Both sides in one process on shared weights, calls interleaved (A B, B A, A B, ...), so a
    change in machine load hits both sides alike; the median of each side's times."""
    _setup(args)
    spec, device, dtype = SPECS[args.component], args.device, DTYPES[args.dtype]
    ours = build_ours(spec, random_state_dict(meta_ours(spec), seed=args.seed, device=device), dtype)
    theirs = build_theirs(spec, ours.state_dict(), device)  # the same tensors, shared
    calls = {"minisd": call_ours(spec, ours), "reference": call_theirs(spec, theirs)}
    inputs = make_inputs(spec, batch=args.batch, size=size_of(args.component, args), device=device, dtype=dtype)
    times: dict[str, list[float]] = {"minisd": [], "reference": []}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            for side in ("minisd", "reference") if i % 2 == 0 else ("reference", "minisd"):
                t = time_runs(lambda side=side: calls[side](inputs), device, warmup=0, repeats=1)[0]
                if i >= args.warmup:
                    times[side].append(t)
        err = rel_err(calls["minisd"](inputs), calls["reference"](inputs))
    return dict(times=times, rel_err=err, threads=torch.get_num_threads(), load=os.getloadavg())


def memory_worker(args: argparse.Namespace) -> dict:
    """One side alone in a fresh process: resident memory after building, and its peak over calls."""
    _setup(args)
    spec, device, dtype = SPECS[args.component], args.device, DTYPES[args.dtype]
    if args.side != "minisd":  # import the reference's classes before the first RSS reading
        import diffusers.loaders.single_file_utils  # noqa: F401
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
        from transformers import CLIPTextModel  # noqa: F401
    rss_import = rss_bytes()
    model = build_ours(spec, random_state_dict(meta_ours(spec), seed=args.seed, device=device), dtype)
    if args.side != "minisd":
        model = build_theirs(spec, model.state_dict(), device)  # minisd's module is dropped here
    call = (call_ours if args.side == "minisd" else call_theirs)(spec, model)
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
    for flag in ("device", "dtype", "unet_size", "vae_size", "tokens", "batch", "warmup", "repeats", "threads", "seed"):
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
    p.add_argument("--unet-size", type=int, default=32, help="U-Net latent side (32: a 256 px image)")
    p.add_argument("--vae-size", type=int, default=16, help="VAE decode latent side (16: a 128 px image)")
    p.add_argument("--tokens", type=int, default=77, help="CLIP sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per side")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side (the median is reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-memory", action="store_true", help="skip the per-side memory subprocesses")
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
    unknown = [c for c in components if c not in SPECS]
    if unknown:
        p.error(f"unknown components {unknown}; expected a subset of {list(SPECS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no GPU")

    print(f"machine: {machine()}", flush=True)
    results, rows = [], []
    for c in components:
        print(f"  {c}: timing (both sides, interleaved) ...", file=sys.stderr, flush=True)
        timing = run_worker(args, "timing", c)
        memory = {}
        for side in () if args.no_memory else ("minisd", REFERENCE[c]):
            print(f"  {c}: memory of {side} alone ...", file=sys.stderr, flush=True)
            memory[side] = run_worker(args, "memory", c, side)
        results.append(dict(component=c, timing=timing, memory=memory))
        med = {s: median(t) for s, t in timing["times"].items()}
        for side, key in (("minisd", "minisd"), (REFERENCE[c], "reference")):
            row = [
                SPECS[c].label, side,
                f"{med[key] * 1e3:.0f} ms ({min(timing['times'][key]) * 1e3:.0f})",
                f"**{med['minisd'] / med['reference']:.2f}**" if key == "reference" else "",
            ]
            m = memory.get(side)
            if m:
                row += [fmt_bytes(m["weights"]), fmt_bytes(m["rss_import"]), fmt_bytes(m["rss_model"]),
                        fmt_bytes(m["peak_rss"]) if m["peak_rss"] else "n/a"]
                row += [fmt_bytes(m["cuda_peak"])] if args.device == "cuda" else []
            row.append(f"{timing['rel_err']:.1e}" if key == "reference" else "")
            rows.append(row)

    header = ["component", "side", "median (min) per call", "minisd / ref"]
    if not args.no_memory:
        header += ["weights", "RSS after imports", "RSS model built", "peak RSS (calls)"]
        header += ["CUDA peak (calls)"] if args.device == "cuda" else []
    header.append("output rel diff")
    load = results[-1]["timing"]["load"] if results else (0, 0, 0)
    print(f"\n{args.device}, {args.dtype}, batch {args.batch}; U-Net {args.unet_size}x{args.unet_size} latent "
          f"(77x768 context), VAE decode {args.vae_size}x{args.vae_size} latent, CLIP {args.tokens} tokens; "
          f"{args.warmup} warm-up + {args.repeats} timed calls per side, interleaved; "
          f"{results[0]['timing']['threads'] if results else '?'} threads; load average at the end "
          f"{load[0]:.2f}\n")
    print(markdown_table(header, rows))
    if args.json:
        raw = {"args": vars(args) | {"json": str(args.json)}, "machine": machine(), "results": results}
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
