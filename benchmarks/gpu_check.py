"""The one prepared GPU check: CUDA parity and speed of minisd against diffusers / transformers.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR      # on the GPU (meant to end well inside 6 min)
    PYTHONPATH=src python3 benchmarks/gpu_check.py --smoke        # tiny models on the CPU: checks the script

Writes DIR/gpu_report.md (and prints it) and DIR/gpu_results.json. The report is
rewritten after every item, so an interrupted run still leaves what it measured.

(a) Parity, in fp32, fp16 and bf16, each model built once from one set of fp32
    random weights (seeded normals, std 0.02, drawn on the GPU) and cast; the
    reference gets the same tensors through minisd's key tables:
    - U-Net: tiny SD1 and SDXL-like configs, full-size SD1.5 and SDXL base, vs
      diffusers `UNet2DConditionModel`;
    - VAE (SD): decode and encode (posterior mean), vs diffusers `AutoencoderKL`;
    - CLIP-L text encoder (last hidden state), vs transformers `CLIPTextModel`.
    For each dtype three numbers, all max|a - b| / max|b|: minisd vs the reference in
    that dtype (the parity), and each side against the reference's fp32 output (how
    far half precision moves each, which should be alike). TF32 is off for this part,
    so fp32 means fp32.

(b) Speed, with PyTorch's default backend settings (cuDNN may use TF32 for fp32
    convolutions; matmuls stay fp32): full-size SD1.5 U-Net at 64x64 latents, batch
    2, fp16; SDXL base U-Net at 128x128, batch 2, fp16; SD VAE decode at 64x64
    latents (512 px), batch 1, fp32 and bf16. Both sides hold the same weights; calls
    are interleaved (A B, B A, ...) after a warm-up, timed with CUDA events; the
    median. Peak CUDA memory per side: `torch.cuda.max_memory_allocated` above the
    resident weights and inputs, over one call, reset between sides.

No new item starts after `--budget-s` seconds; a failing item is written into the
report's notes and the run goes on.

Parity numbers need no GPU to be meaningful, but fp16/bf16 kernels (flash attention,
cuDNN) differ from the CPU's; the speed numbers are the point of running here.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DTYPES,
    FOURIER,
    Spec,
    build_ours,
    build_theirs,
    call_ours,
    call_theirs,
    make_inputs,
    markdown_table,
    median,
    meta_ours,
    param_bytes,
    random_state_dict,
    rel_err,
    time_runs,
)
from minisd.clip import CLIP_VIT_L14, TextConfig  # noqa: E402
from minisd.unet import SD1_UNET, SDXL_BASE_UNET, UNetConfig  # noqa: E402
from minisd.vae import SD_VAE, VAEConfig  # noqa: E402

# Tiny configs (as tests/test_unet.py's): SD1-like with 1x1-conv projections, and SDXL-like
# (no attention at level 0, a depth list, linear projections, the text_time vector y).
TINY_SD1 = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                      transformer_depth=1, num_heads=2, context_dim=768)
TINY_SDXL = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(4, 2),
                       transformer_depth=(0, 1, 2), num_head_channels=16, context_dim=2048,
                       use_linear_in_transformer=True, adm_in_channels=32 + 6 * FOURIER)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)
TINY_CLIP = TextConfig(width=64, heads=4, layers=2, mlp_width=128, act="quick_gelu", projection_dim=None)

# (spec, batch, size) for the parity part; size = latent side, image side or tokens.
PARITY_FULL = [
    (Spec("unet", TINY_SD1, "U-Net tiny SD1-like"), 2, 16),
    (Spec("unet", TINY_SDXL, "U-Net tiny SDXL-like"), 2, 16),
    (Spec("unet", SD1_UNET, "U-Net SD1.5 (860M)"), 2, 64),
    (Spec("unet", SDXL_BASE_UNET, "U-Net SDXL base (2.6B)"), 2, 64),
    (Spec("vae", SD_VAE, "VAE decode (SD)"), 1, 64),
    (Spec("vae-encode", SD_VAE, "VAE encode mean (SD)"), 1, 512),
    (Spec("clip", CLIP_VIT_L14, "CLIP-L text (123M)"), 2, 77),
]
PARITY_SMOKE = [
    (Spec("unet", TINY_SD1, "U-Net tiny SD1-like"), 2, 16),
    (Spec("unet", TINY_SDXL, "U-Net tiny SDXL-like"), 2, 16),
    (Spec("vae", TINY_VAE, "VAE decode (tiny)"), 1, 16),
    (Spec("vae-encode", TINY_VAE, "VAE encode mean (tiny)"), 1, 64),
    (Spec("clip", TINY_CLIP, "CLIP text (tiny)"), 2, 77),
]
# (spec, batch, size, dtype) for the speed part.
SPEED_FULL = [
    (Spec("unet", SD1_UNET, "U-Net SD1.5"), 2, 64, "fp16"),
    (Spec("unet", SDXL_BASE_UNET, "U-Net SDXL base"), 2, 128, "fp16"),
    (Spec("vae", SD_VAE, "VAE decode (SD)"), 1, 64, "fp32"),
    (Spec("vae", SD_VAE, "VAE decode (SD)"), 1, 64, "bf16"),
]
SPEED_SMOKE = [
    (Spec("unet", TINY_SDXL, "U-Net tiny SDXL-like"), 2, 16, "bf16"),
    (Spec("vae", TINY_VAE, "VAE decode (tiny)"), 1, 16, "fp32"),
]


class Report:
    """Collects rows and rewrites the markdown report (and JSON) after every item."""

    def __init__(self, out: Path, header: str) -> None:
        self.out, self.header = out, header
        self.parity: list[list[str]] = []
        self.speed: list[list[str]] = []
        self.notes: list[str] = []
        self.raw: dict = {"parity": [], "speed": [], "notes": self.notes}

    def text(self) -> str:
        parts = [self.header]
        if self.parity:
            parts.append("## (a) Parity: max|a - b| / max|b| (TF32 off)\n")
            parts.append(markdown_table(
                ["model", "inputs", "dtype", "**minisd vs ref, same dtype**", "minisd vs ref fp32", "ref vs ref fp32"],
                self.parity))
        if self.speed:
            parts.append("\n## (b) Speed: median per call, CUDA events (PyTorch default backend flags)\n")
            parts.append(markdown_table(
                ["model", "inputs", "dtype", "minisd", "reference", "**minisd / ref**", "minisd peak extra",
                 "ref peak extra", "weights (shared)", "output rel diff"], self.speed))
        if self.notes:
            parts.append("\n## Notes\n\n" + "\n".join(f"- {n}" for n in self.notes))
        return "\n".join(parts) + "\n"

    def flush(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_report.md").write_text(self.text())
        (self.out / "gpu_results.json").write_text(json.dumps(self.raw, indent=1, default=str))


def fmt_rel(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else "inf/NaN"


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB"


def inputs_label(spec: Spec, batch: int, size: int) -> str:
    if spec.kind == "clip":
        return f"{batch}x{size} tokens"
    if spec.kind == "vae-encode":
        return f"{batch}x3x{size}x{size} image"
    return f"{batch}x{spec.config.in_channels if spec.kind == 'unet' else spec.config.embed_dim}x{size}x{size} latent"


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- (a) parity
def parity_item(spec: Spec, batch: int, size: int, device: str, report: Report) -> None:
    master = random_state_dict(meta_ours(spec), seed=0, device=device)  # fp32
    outs: dict[str, dict[str, torch.Tensor]] = {}
    upcast = []
    for name in ("fp32", "fp16", "bf16"):
        dtype = DTYPES[name]
        ours = build_ours(spec, master, dtype)  # fp32: the master tensors themselves
        # A separate copy for the reference when minisd may change its own weights (the VAE's
        # fp16 overflow fallback upcasts the module); otherwise the same tensors, shared.
        sd = {k: v.clone() for k, v in ours.state_dict().items()} if spec.kind.startswith("vae") else ours.state_dict()
        theirs = build_theirs(spec, sd, device)
        inp = make_inputs(spec, batch=batch, size=size, device=device, dtype=dtype)
        with torch.inference_mode():
            a, b = call_ours(spec, ours)(inp), call_theirs(spec, theirs)(inp)
        if spec.kind.startswith("vae") and ours.dtype != dtype:
            upcast.append(name)
        outs[name] = {"minisd": a.float(), "ref": b.float()}
        del ours, theirs, sd, inp, a, b
        free(device)
    del master
    ref32 = outs["fp32"]["ref"]
    for name, o in outs.items():
        row = dict(model=spec.label, inputs=inputs_label(spec, batch, size), dtype=name,
                   minisd_vs_ref=rel_err(o["minisd"], o["ref"]), minisd_vs_ref32=rel_err(o["minisd"], ref32),
                   ref_vs_ref32=rel_err(o["ref"], ref32), max_abs_ref=o["ref"].abs().max().item())
        report.raw["parity"].append(row)
        report.parity.append([row["model"], row["inputs"], name, f"**{fmt_rel(row['minisd_vs_ref'])}**",
                              fmt_rel(row["minisd_vs_ref32"]) if name != "fp32" else "",
                              fmt_rel(row["ref_vs_ref32"]) if name != "fp32" else ""])
    if upcast:
        report.notes.append(f"{spec.label}: minisd's VAE overflowed in {upcast} and upcast itself to fp32 "
                            "(its documented fallback); the reference stayed in half precision.")


# --------------------------------------------------------------------------- (b) speed
def peak_extra(call, inputs: dict, device: str) -> int | None:
    """Peak CUDA memory of one call above what is allocated before it (weights, inputs)."""
    if device != "cuda":
        return None
    free(device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out = call(inputs)
        torch.cuda.synchronize()
    del out
    return torch.cuda.max_memory_allocated() - base


def speed_item(spec: Spec, batch: int, size: int, dtype_name: str, device: str, warmup: int, repeats: int,
               report: Report) -> None:
    dtype = DTYPES[dtype_name]
    # Drawn in fp32 and cast, so the weights are the same numbers as in the parity part.
    master = random_state_dict(meta_ours(spec), seed=0, device=device)
    ours = build_ours(spec, master, dtype)
    del master
    theirs = build_theirs(spec, ours.state_dict(), device)  # shared tensors: no second copy
    inp = make_inputs(spec, batch=batch, size=size, device=device, dtype=dtype)
    calls = {"minisd": call_ours(spec, ours), "ref": call_theirs(spec, theirs)}
    times: dict[str, list[float]] = {"minisd": [], "ref": []}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for side in ("minisd", "ref") if i % 2 == 0 else ("ref", "minisd"):
                t = time_runs(lambda side=side: calls[side](inp), device, warmup=0, repeats=1)[0]
                if i >= warmup:
                    times[side].append(t)
        err = rel_err(calls["minisd"](inp), calls["ref"](inp))
    peaks = {side: peak_extra(calls[side], inp, device) for side in ("minisd", "ref")}
    if spec.kind.startswith("vae") and ours.dtype != dtype:
        report.notes.append(f"speed {spec.label} {dtype_name}: minisd's VAE overflowed and upcast itself to "
                            f"{ours.dtype}, so its times are not {dtype_name} times.")
    med = {s: median(t) for s, t in times.items()}
    row = dict(model=spec.label, inputs=inputs_label(spec, batch, size), dtype=dtype_name, times=times,
               median=med, ratio=med["minisd"] / med["ref"], peak_extra=peaks, weights=param_bytes(ours), rel_err=err)
    report.raw["speed"].append(row)
    report.speed.append([spec.label, row["inputs"], dtype_name, f"{med['minisd'] * 1e3:.1f} ms",
                         f"{med['ref'] * 1e3:.1f} ms", f"**{row['ratio']:.3f}**", mib(peaks["minisd"]),
                         mib(peaks["ref"]), mib(row["weights"]), fmt_rel(err)])


# --------------------------------------------------------------------------- driver
def environment(device: str) -> str:
    import diffusers
    import transformers

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
             f"transformers {transformers.__version__}"]
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs, "
                     f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
        b = torch.backends
        flags = (f"cuda.matmul.allow_tf32={b.cuda.matmul.allow_tf32}, cudnn.allow_tf32={b.cudnn.allow_tf32}, "
                 f"cudnn.benchmark={b.cudnn.benchmark}")
        lines.append(f"default flags: {flags}")
    else:
        threads = torch.get_num_threads()
        lines.append(f"CPU: {platform.machine()}, {os.cpu_count()} logical CPUs, {threads} torch threads")
    return "\n".join(f"- {ln}" for ln in lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_out = Path(os.environ.get("OUT") or Path(tempfile.gettempdir()) / "minisd_gpu_check")
    p.add_argument("--out", type=Path, default=default_out, help="report folder (default: $OUT, else a temp folder)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU, to check the script itself")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side (default 5; smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 20; smoke 3)")
    p.add_argument("--budget-s", type=float, default=330, help="skip the remaining items after this many seconds")
    p.add_argument("--skip", default="", help="comma-separated: parity, speed")
    args = p.parse_args()
    t_start = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device (use --smoke for the CPU check of the script)")
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    repeats = args.repeats if args.repeats is not None else (3 if args.smoke else 20)
    torch.set_flush_denormal(True)  # CPU (smoke) only; no effect on CUDA kernels
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    title = "# minisd GPU check" + (" (SMOKE: tiny models on the CPU)" if args.smoke else "")
    report = Report(args.out, f"{title}\n\n{environment(device)}\n")
    report.flush()

    def over_budget(what: str) -> bool:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            report.notes.append(f"skipped {what}: {elapsed:.0f} s elapsed, over --budget-s {args.budget_s:.0f}")
            return True
        return False

    def attempt(what: str, fn, *a) -> None:
        t0 = time.perf_counter()
        print(f"[{time.perf_counter() - t_start:6.1f} s] {what} ...", flush=True)
        try:
            fn(*a)
        except Exception as e:  # keep going: one broken item must not lose the others
            tb = traceback.format_exc().strip().splitlines()
            report.notes.append(f"{what} FAILED: {type(e).__name__}: {e} ({' | '.join(tb[-4:])})")
            print(traceback.format_exc(), flush=True)
        finally:
            free(device)
        report.raw.setdefault("seconds", {})[what] = time.perf_counter() - t0
        report.flush()

    if "parity" not in skip:
        # fp32 parity means fp32: TF32 off for matmuls and convolutions, restored after.
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        for spec, batch, size in PARITY_SMOKE if args.smoke else PARITY_FULL:
            if over_budget(f"parity {spec.label}"):
                break
            attempt(f"parity {spec.label}", parity_item, spec, batch, size, device, report)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    if "speed" not in skip:
        for spec, batch, size, dtype in SPEED_SMOKE if args.smoke else SPEED_FULL:
            what = f"speed {spec.label} {dtype} {inputs_label(spec, batch, size)}"
            if over_budget(what):
                break
            attempt(what, speed_item, spec, batch, size, dtype, device, warmup, repeats, report)

    report.notes.append(f"total {time.perf_counter() - t_start:.0f} s; warm-up {warmup}, repeats {repeats} per side")
    report.flush()
    print("\n" + report.text(), flush=True)


if __name__ == "__main__":
    main()
