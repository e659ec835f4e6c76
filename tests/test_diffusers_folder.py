"""diffusers folders: made by diffusers itself (`save_pretrained` of tiny random pipelines), loaded
by minisd, and compared with the official-layout file holding the same weights and with diffusers'
own `encode_prompt`.

The folders' components come from a tiny official file (tests/tiny.py) through diffusers' own
single-file converters (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_open_clip_checkpoint`), so the folder and the file hold the same numbers.

Tolerances: 1e-6 relative between minisd-from-folder and minisd-from-file (the same weights through
two key tables, the same code: any difference is a mapping error); 1e-5 against diffusers'
`encode_prompt` (transformers' attention and summation order differ by fp32 ulps).
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import minisd
from minisd.diffusers_format import SCHEDULER_CONFIG, write_tokenizer
from minisd.keymap import CheckpointError
from tests.test_checkpoint import inputs
from tests.test_unet import run_ours
from tests.tiny import diffusers_unet, diffusers_vae, official_checkpoint, tiny_config
from tests.utils import assert_rel_close

# EulerDiscreteScheduler takes the official config less DDIM's two options
EULER_CONFIG = {k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor of a fox, by the sea"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


def tokenizer(tmp_path, pad: str) -> CLIPTokenizer:
    folder = tmp_path / f"tok_{'eot' if pad.startswith('<') else 'bang'}"
    write_tokenizer(folder, pad_token=pad)
    return CLIPTokenizer.from_pretrained(str(folder))


def hf_from_open_clip(tensors: dict, prefix: str) -> CLIPTextModelWithProjection:
    """diffusers' own conversion of an OpenCLIP tower into transformers' layout."""
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=4,
                         num_hidden_layers=3, max_position_embeddings=77, hidden_act="gelu", projection_dim=24)
    model = CLIPTextModelWithProjection(cfg)
    converted = convert_open_clip_checkpoint(model, tensors, prefix=prefix)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def save_file(tensors: dict, path) -> str:
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@torch.no_grad()
def same_model(a, b, rel=1e-6):
    """Two minisd models with the same weights give the same outputs."""
    inp = inputs(a.unet.config)
    assert_rel_close(run_ours(a.unet, inp), run_ours(b.unet, inp), rel, "U-Net")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    assert_rel_close(a.vae.decode(z), b.vae.decode(z), rel, "VAE")
    ca, cb = a.encode_prompt(PROMPTS), b.encode_prompt(PROMPTS)
    assert_rel_close(ca.context, cb.context, rel, "context")
    if ca.pooled is not None:
        assert_rel_close(ca.pooled, cb.pooled, rel, "pooled")


@torch.no_grad()
def test_sd1_folder(tmp_path):
    ckpt = official_checkpoint("sd1")
    file = save_file(ckpt.tensors, tmp_path / "sd1.safetensors")
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(ckpt), text_encoder=ckpt.text_refs[0], tokenizer=tokenizer(tmp_path, "<|endoftext|>"),
        unet=diffusers_unet(ckpt), scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "folder")
    d = minisd.detect(tmp_path / "folder")
    assert (d.format, d.family.name, d.prediction_type) == ("diffusers", "sd1", "epsilon")
    from_folder = minisd.load(tmp_path / "folder")
    assert from_folder.unet.config == ckpt.unet_config  # read from unet/config.json
    same_model(from_folder, minisd.load(file, config=tiny_config("sd1")))
    expected = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert_rel_close(from_folder.encode_prompt(PROMPTS).context, expected, 1e-5, "vs diffusers encode_prompt")


@torch.no_grad()
def test_sdxl_folder_and_fp16_variant(tmp_path):
    ckpt = official_checkpoint("sdxl")
    file = save_file(ckpt.tensors, tmp_path / "xl.safetensors")
    pipe = StableDiffusionXLPipeline(
        vae=diffusers_vae(ckpt), text_encoder=ckpt.text_refs[0],
        text_encoder_2=hf_from_open_clip(ckpt.tensors, "conditioner.embedders.1.model."),
        tokenizer=tokenizer(tmp_path, "<|endoftext|>"), tokenizer_2=tokenizer(tmp_path, "!"),
        unet=diffusers_unet(ckpt), scheduler=EulerDiscreteScheduler(**EULER_CONFIG),
    )
    pipe.save_pretrained(tmp_path / "xl")
    from_folder = minisd.load(tmp_path / "xl")
    assert from_folder.family.name == "sdxl"
    same_model(from_folder, minisd.load(file, config=tiny_config("sdxl")))
    context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    ours = from_folder.encode_prompt(PROMPTS)
    assert_rel_close(ours.context, context, 1e-5, "SDXL context vs diffusers")
    assert_rel_close(ours.pooled, pooled, 1e-5, "SDXL pooled vs diffusers")

    # the `.fp16.safetensors` variant, as `save_pretrained(variant="fp16")` writes it
    pipe.to(torch.float16).save_pretrained(tmp_path / "xl16", variant="fp16")
    assert (tmp_path / "xl16" / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    half = minisd.load(tmp_path / "xl16", dtype=torch.float16, variant="fp16")
    assert {p.dtype for p in half.unet.parameters()} == {torch.float16}
    key = "out.2.weight"
    assert torch.equal(half.unet.state_dict()[key], from_folder.unet.state_dict()[key].half())
    # without variant=, the only weights present (the fp16 ones) are found
    assert minisd.load(tmp_path / "xl16").family.name == "sdxl"


@torch.no_grad()
def test_sd2_v_folder_reads_the_last_of_its_blocks(tmp_path):
    # diffusers' SD2 folders hold the OpenCLIP-H encoder without its last block and read the last
    # remaining one (+ final LN): the official penultimate. A random 3-block HF encoder stands in.
    ckpt = official_checkpoint("sd2")
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=128, num_attention_heads=4,
                         num_hidden_layers=3, max_position_embeddings=77, hidden_act="gelu")
    torch.manual_seed(0)
    text = CLIPTextModel(cfg).eval()
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(ckpt), text_encoder=text, tokenizer=tokenizer(tmp_path, "!"), unet=diffusers_unet(ckpt),
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG, prediction_type="v_prediction"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "sd2v")
    sd = minisd.load(tmp_path / "sd2v")
    assert (sd.family.name, sd.prediction_type) == ("sd2-v", "v_prediction")
    assert "scheduler_config.json" in sd.prediction_reason
    expected = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert_rel_close(sd.encode_prompt(PROMPTS).context, expected, 1e-5, "SD2 context vs diffusers")

    # exported to the official layout, the encoder gets its (unused) last block back and reads the same
    out = minisd.save(sd, tmp_path / "sd2v.safetensors")
    assert "cond_stage_model.model.transformer.resblocks.3.ln_1.weight" in safetensors.torch.load_file(str(out))
    cfg = tiny_config("sd2")
    cfg["text_encoders"] = [
        type(cfg["text_encoders"][0])(**{**cfg["text_encoders"][0].__dict__, "layers": 4, "projection_dim": 32})
    ]
    official = minisd.load(out, config=cfg)
    assert (official.family.name, official.prediction_type) == ("sd2-v", "v_prediction")  # from minisd's metadata
    same_model(sd, official)


@torch.no_grad()
def test_minisd_diffusers_export_loads_in_diffusers(tmp_path):
    ckpt = official_checkpoint("sd1")
    sd = minisd.load(save_file(ckpt.tensors, tmp_path / "sd1.safetensors"), config=tiny_config("sd1"))
    minisd.save(sd, tmp_path / "export", format="diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "export"), local_files_only=True)
    inp = inputs(sd.unet.config)
    theirs = pipe.unet(inp["x"], inp["timesteps"], encoder_hidden_states=inp["context"]).sample
    assert_rel_close(run_ours(sd.unet, inp), theirs, 1e-5, "exported U-Net in diffusers")
    expected = pipe.encode_prompt(PROMPTS, "cpu", 1, False)[0]
    assert_rel_close(sd.encode_prompt(PROMPTS).context, expected, 1e-5, "exported text encoder in diffusers")
    same_model(sd, minisd.load(tmp_path / "export"))
    with pytest.raises(FileExistsError):
        minisd.save(sd, tmp_path / "export", format="diffusers")


def test_folder_errors(tmp_path):
    ckpt = official_checkpoint("sd1")
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(ckpt), text_encoder=ckpt.text_refs[0], tokenizer=tokenizer(tmp_path, "<|endoftext|>"),
        unet=diffusers_unet(ckpt), scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path / "f")
    weights = tmp_path / "f" / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="vae/diffusion_pytorch_model.safetensors: truncated"):
        minisd.load(tmp_path / "f")
    weights.unlink()
    with pytest.raises(CheckpointError, match="vae: no weights file"):
        minisd.load(tmp_path / "f")
    (tmp_path / "f" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="lists no text encoder"):
        minisd.load(tmp_path / "f")


def test_sharded_component(tmp_path):
    # large components come in shards listed by `*.safetensors.index.json` (transformers/diffusers)
    sd = minisd.load(
        save_file(official_checkpoint("sd1").tensors, tmp_path / "sd1.safetensors"), config=tiny_config("sd1")
    )
    minisd.save(sd, tmp_path / "f", format="diffusers")
    whole = tmp_path / "f" / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(str(whole))
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, whole.parent / name)
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (whole.parent / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    whole.unlink()
    same_model(minisd.load(tmp_path / "f"), sd)
