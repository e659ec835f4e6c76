"""Record a `minisd parity` bundle from Stability's own code (generative-models `sgm`, or stablediffusion `ldm`).

NOT RUN IN minisd's TESTS: it needs the official repository importable and its inference YAML, which
minisd's CI does not have. Run it on a machine that has them (a GPU machine, for an fp16 bundle):

    pip install -e /path/to/generative-models        # or put stablediffusion/ on PYTHONPATH for ldm
    python tools/record_official_bundle.py sd_xl_base_1.0.safetensors \\
        --yaml generative-models/configs/inference/sd_xl_base.yaml --code sgm --dtype fp16 \\
        --device cuda \\
        --out sdxl-official-fp16.bundle.safetensors

then, with minisd alone:

    minisd parity sd_xl_base_1.0.safetensors --bundle sdxl-official-fp16.bundle.safetensors

The inputs are minisd's (`minisd.parity.make_inputs`, from the file's header only: minisd loads on the meta
device); the outputs are the official modules': the conditioner's embedders on the prompts (they tokenize
the strings themselves, so the text rows check minisd's tokenizer too), `model.diffusion_model`, and the
first stage's encode / decode. SDXL's `y` is made by sgm's own `ConcatTimestepEmbedderND`. There are no
sampling rows: the official samplers are not the diffusers schedulers minisd's sampler names reproduce.
"""

from __future__ import annotations

import argparse
import importlib.metadata

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from minisd import load
from minisd.parity import DTYPES, PROMPTS, TIMESTEPS, Settings, make_inputs, write_bundle


def official_outputs(model, inputs: dict, dtype: torch.dtype, device: str, code: str, guidance: float) -> dict:
    """The official modules' outputs named as minisd's rows (`minisd.parity.run_minisd`)."""
    out, embedders = {}, (model.conditioner.embedders if code == "sgm" else [model.cond_stage_model])
    for i, emb in enumerate([e for e in embedders if getattr(e, "input_key", "txt") == "txt"]):
        z = emb(list(PROMPTS))  # sgm's FrozenOpenCLIPEmbedder2 returns (context, pooled)
        out[f"text{i}.context"], pooled = (z[0], z[1]) if isinstance(z, (tuple, list)) else (z, None)
        if pooled is not None:
            out[f"text{i}.pooled"] = pooled
    unet, cond = model.model.diffusion_model, {"context": inputs["unet.context"].to(device, dtype)}
    if "unet.pooled" in inputs:  # y = [pooled, each size pair / score embedded by sgm's ConcatTimestepEmbedderND]
        from sgm.modules.encoders.modules import ConcatTimestepEmbedderND

        ids, parts = inputs["unet.time_ids"], [inputs["unet.pooled"]]
        embed = ConcatTimestepEmbedderND(outdim=256)
        parts += [embed(ids[:, j : j + 2]) for j in range(0, ids.shape[1] - 1, 2)]
        parts += [embed(ids[:, -1:])] if ids.shape[1] % 2 else []  # the refiner's aesthetic score
        cond["y"] = torch.cat(parts, dim=1).to(device, dtype)
    x = inputs["unet.x"].to(device, dtype)
    for t in TIMESTEPS:
        raw = unet(x, timesteps=torch.full((2,), t, device=device), **cond).float()
        out[f"unet.t{t}"], out[f"unet.t{t}.guided"] = raw, raw[:1] + guidance * (raw[1:] - raw[:1])
    vae = model.first_stage_model
    out["vae.encode"] = vae.encode(inputs["vae.image"].to(device, dtype)).mode()
    out["vae.decode"] = vae.decode(inputs["vae.latents"].to(device, dtype))
    return {k: v.detach().float().cpu() for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--yaml", required=True, help="the official inference config of the checkpoint")
    p.add_argument("--code", choices=("sgm", "ldm"), required=True)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    settings = Settings(DTYPES[a.dtype], a.device, a.seed, samplers=())
    inputs = make_inputs(load(a.checkpoint, device="meta"), a.seed)  # shapes only: no weights are read
    instantiate = importlib.import_module(f"{a.code}.util").instantiate_from_config
    model = instantiate(OmegaConf.load(a.yaml).model)
    model.load_state_dict(load_file(a.checkpoint), strict=False)
    model = model.to(a.device, DTYPES[a.dtype]).eval()
    with torch.no_grad():
        outputs = official_outputs(model, inputs, DTYPES[a.dtype], a.device, a.code, settings.guidance)
    versions = {n: importlib.metadata.version(n) for n in ("torch",)}
    meta = {"reference": {"implementation": f"official ({a.code})", **versions}, "settings": settings.as_json(),
            "checkpoint": a.checkpoint, "yaml": a.yaml}  # fmt: skip
    print("recorded", write_bundle(a.out, inputs, outputs, meta))


if __name__ == "__main__":
    main()
