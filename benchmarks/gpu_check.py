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

import math
import sys
import time
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
    call_ours,
    call_theirs,
    environment,
    event_seconds,
    free,
    interleaved,
    make_inputs,
    median,
    meta_ours,
    param_bytes,
    peak_extra,
    random_state_dict,
    rel_err,
    script_device,
    script_parser,
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


PARITY = "(a) Parity: max|a - b| / max|b| (TF32 off)"
PARITY_COLUMNS = ["model", "inputs", "dtype", "**minisd vs ref, same dtype**", "minisd vs ref fp32", "ref vs ref fp32"]
SPEED = "(b) Speed: median per call, CUDA events (PyTorch default backend flags)"
SPEED_COLUMNS = ["model", "inputs", "dtype", "minisd", "reference", "**minisd / ref**", "minisd peak extra",
                 "ref peak extra", "weights (shared)", "output rel diff"]  # fmt: skip


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
        report.add(PARITY, PARITY_COLUMNS, [row["model"], row["inputs"], name, f"**{fmt_rel(row['minisd_vs_ref'])}**",
                                            fmt_rel(row["minisd_vs_ref32"]) if name != "fp32" else "",
                                            fmt_rel(row["ref_vs_ref32"]) if name != "fp32" else ""], row)
    if upcast:
        report.notes.append(f"{spec.label}: minisd's VAE overflowed in {upcast} and upcast itself to fp32 "
                            "(its documented fallback); the reference stayed in half precision.")


# --------------------------------------------------------------------------- (b) speed
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
    runs = {side: (lambda call=call: call(inp)) for side, call in calls.items()}
    with torch.inference_mode():
        times = interleaved(runs, device, warmup, repeats, timer=event_seconds)
        err = rel_err(runs["minisd"](), runs["ref"]())
        peaks = {side: peak_extra(run, device) for side, run in runs.items()}
    if spec.kind.startswith("vae") and ours.dtype != dtype:
        report.notes.append(f"speed {spec.label} {dtype_name}: minisd's VAE overflowed and upcast itself to "
                            f"{ours.dtype}, so its times are not {dtype_name} times.")
    med = {s: median(t) for s, t in times.items()}
    row = dict(model=spec.label, inputs=inputs_label(spec, batch, size), dtype=dtype_name, times=times,
               median=med, ratio=med["minisd"] / med["ref"], peak_extra=peaks, weights=param_bytes(ours), rel_err=err)
    report.add(SPEED, SPEED_COLUMNS, [spec.label, row["inputs"], dtype_name, f"{med['minisd'] * 1e3:.1f} ms",
                                      f"{med['ref'] * 1e3:.1f} ms", f"**{row['ratio']:.3f}**", mib(peaks["minisd"]),
                                      mib(peaks["ref"]), mib(row["weights"]), fmt_rel(err)], row)


# --------------------------------------------------------------------------- driver
def main() -> None:
    p = script_parser(__doc__, "minisd_gpu_check")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per side (default 5; smoke 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 20; smoke 3)")
    p.add_argument("--budget-s", type=float, default=330, help="skip the remaining items after this many seconds")
    p.add_argument("--skip", default="", help="comma-separated: parity, speed")
    args = p.parse_args()
    t_start = time.perf_counter()
    device = script_device(p, args.smoke)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    repeats = args.repeats if args.repeats is not None else (3 if args.smoke else 20)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    title = "# minisd GPU check" + (" (SMOKE: tiny models on the CPU)" if args.smoke else "")
    report = Report(args.out, f"{title}\n\n{environment(device)}\n", "gpu_report.md", "gpu_results.json")
    report.flush()

    def over_budget(what: str) -> bool:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            report.notes.append(f"skipped {what}: {elapsed:.0f} s elapsed, over --budget-s {args.budget_s:.0f}")
            return True
        return False

    if "parity" not in skip:
        # fp32 parity means fp32: TF32 off for matmuls and convolutions, restored after.
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        for spec, batch, size in PARITY_SMOKE if args.smoke else PARITY_FULL:
            if over_budget(f"parity {spec.label}"):
                break
            attempt(report, f"parity {spec.label}", device, t_start, parity_item, spec, batch, size, device, report)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    if "speed" not in skip:
        for spec, batch, size, dtype in SPEED_SMOKE if args.smoke else SPEED_FULL:
            what = f"speed {spec.label} {dtype} {inputs_label(spec, batch, size)}"
            if over_budget(what):
                break
            item = (spec, batch, size, dtype, device, warmup, repeats, report)
            attempt(report, what, device, t_start, speed_item, *item)

    report.notes.append(f"total {time.perf_counter() - t_start:.0f} s; warm-up {warmup}, repeats {repeats} per side")
    report.flush()
    print("\n" + report.text(), flush=True)


if __name__ == "__main__":
    main()
