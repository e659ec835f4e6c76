"""Load a full-size SD1.5-layout fp16 file straight onto a CUDA device and generate from it.

Issue 4 asks that `minisd.load(..., device="cuda")` works; this is the check, run on the lent GPU:
load time, host peak RSS (ru_maxrss) and CUDA memory, then a 512x512 txt2img in fp16 (random
weights, so the picture is noise: the check is that every stage runs on the GPU and stays finite).

    python benchmarks/gpu_load_check.py [--path /tmp/sd15_fp16.safetensors]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minisd  # noqa: E402
from bench_load import write_checkpoint  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--path", type=Path, default=Path("/tmp/sd15_fp16.safetensors"))
    args = p.parse_args()
    if not args.path.exists():
        write_checkpoint(args.path, seed=0, bare=False)
    size = args.path.stat().st_size
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    sd = minisd.load(args.path, device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    devices = {str(q.device) for m in (sd.unet, sd.vae, *sd.text_encoders) for q in m.parameters()}
    print(f"file {size / 2**30:.2f} GiB; load {load_s:.2f} s; host peak RSS grew {(rss1 - rss0) / 2**30:.2f} GiB; "
          f"CUDA allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB; parameter devices {devices}; "
          f"family {sd.family.name}, unet {sd.dtype}, vae {sd.vae.dtype}")
    for steps in (2, 20):
        torch.cuda.synchronize()
        t = time.perf_counter()
        images = sd.generate("a photograph of an astronaut riding a horse", steps=steps, seed=0,
                             sampler="dpmpp_2m", output="tensor")
        torch.cuda.synchronize()
        print(f"txt2img 512x512, {steps} steps, CFG 7.5, fp16 U-Net / fp32 VAE: {time.perf_counter() - t:.2f} s; "
              f"finite={bool(torch.isfinite(images).all())}, shape {tuple(images.shape)}, "
              f"CUDA peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
