"""Official releases recognised by their SHA-256 (`KNOWN_SHA256`): what `minisd info` names them, and
the prediction type `load` takes for a file whose header does not say (SD2's 512 and 768 files share
every key). Read through `detection` (which hashes files: `detection.sha256`) and `sources`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownFile:
    """An official release, recognised by its SHA-256: what `info` names it, and the prediction
    type `load` takes for it when the header does not say (SD2's 512 and 768 files share every key)."""

    name: str  # the file name as published
    format: str  # ".ckpt" or ".safetensors"
    family: str  # a `families.FAMILIES` name
    prediction_type: str  # "epsilon" or "v_prediction"


def _known(*rows: tuple[str, str, str, str, str]) -> dict[str, KnownFile]:
    """{sha256: KnownFile} from (sha256, name, format, family, prediction type) rows; a hash listed
    twice is an error (a dict literal would silently keep the last)."""
    table: dict[str, KnownFile] = {}
    for digest, *fields in rows:
        if digest in table:
            raise ValueError(f"KNOWN_SHA256: {digest} listed twice ({table[digest].name}, {fields[0]})")
        table[digest] = KnownFile(*fields)
    return table


_CK, _ST, _EPS, _V = ".ckpt", ".safetensors", "epsilon", "v_prediction"
# Every value is copied from a public listing found while writing it (named per group), none from
# memory; where two listings were needed to tie a hash to a file name, both are named. They cannot be
# re-checked offline here. A wrong entry could only misname a file in `info` or decide SD2's epsilon/v
# for that one file; it never decides a family (the header does).
KNOWN_SHA256: dict[str, KnownFile] = _known(
    # SD 1.4 / 1.5 .ckpt (CompVis, runwayml): Deforum's `model_map` (sha256 + huggingface.co URL per
    # file); sd-v1-5-inpainting.ckpt: aiNodes' hash -> version table, and several download pins that
    # give huggingface.co/.../stable-diffusion-inpainting, 4,265,437,280 bytes.
    ("fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556", "sd-v1-4.ckpt", _CK, "sd1", _EPS),
    ("14749efc0ae8ef0329391ad4436feb781b402f4fece4883c7ad8d10556d8a36a", "sd-v1-4-full-ema.ckpt", _CK, "sd1", _EPS),
    ("cc6cb27103417325ff94f52b7a5d2dde45a7515b25c255d8e396c90014281516", "v1-5-pruned-emaonly.ckpt", _CK, "sd1", _EPS),
    ("e1441589a6f3c5a53f5f54d0975a18a7feb7cdf0b0dee276dfc3331ae376a053", "v1-5-pruned.ckpt", _CK, "sd1", _EPS),
    ("c6bbc15e3224e6973459ba78de4998b80b50112b0ae5b5c67113d56b4e366b19",
     "sd-v1-5-inpainting.ckpt", _CK, "sd1-inpaint", _EPS),
    # SD 1.5 .safetensors (runwayml/stable-diffusion-v1-5): Hugging Face's own LFS download links
    # (cdn-lfs.huggingface.co/repos/.../<sha256>?...filename="v1-5-pruned....safetensors") in a public
    # A1111 install script; the same prefixes in sd-webui-model-mixer's base-model list ("[6ce0161689]").
    ("6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
     "v1-5-pruned-emaonly.safetensors", _ST, "sd1", _EPS),
    ("1a189f0be69d6106a48548e7626207dddd7042a418dbf372cefd05e0cdba61b6", "v1-5-pruned.safetensors", _ST, "sd1", _EPS),
    # The A1111 org's safetensors conversion of the inpainting .ckpt (webui/stable-diffusion-inpainting):
    # two model catalogs that pin that URL with this sha256 (4,265,203,873 bytes).
    ("0ec8f8585b104417a8c34a9fbcc1e922a70b8c15490ec4553087f01c8cf33673",
     "sd-v1-5-inpainting.safetensors", _ST, "sd1-inpaint", _EPS),
    # SD 2.0 .ckpt (stabilityai/stable-diffusion-2, -2-base, -2-inpainting): Deforum's `model_map` and
    # aiNodes' hash -> version/config table (both name the file); 512-base-ema.ckpt also in public
    # download scripts that check it with `sha256sum -c`.
    ("d635794c1fedfdfa261e065370bea59c651fc9bfa65dc6d67ad29e11869a1824", "512-base-ema.ckpt", _CK, "sd2", _EPS),
    ("bfcaf0755797b0c30eb00a3787e8b423eb1f5decd8de76c4d824ac2dd27e139f", "768-v-ema.ckpt", _CK, "sd2-v", _V),
    ("2a208a7ded5d42dcb0c0ec908b23c631002091e06afe7e76d16cd11079f8d4e3",
     "512-inpainting-ema.ckpt", _CK, "sd2-inpaint", _EPS),
    # 512-inpainting-ema.safetensors: its LFS OID (5,214,662,094 bytes) as several project notes record
    # it from stabilityai/stable-diffusion-2-inpainting; A1111 infotexts show its prefix "b29e2ed9a8".
    ("b29e2ed9a8fe58e76f7e801bda091d23738bd74c1da3f339bcbe2d40922fcb60",
     "512-inpainting-ema.safetensors", _ST, "sd2-inpaint", _EPS),
    # SD 2.1 .ckpt: Deforum's `model_map` and aiNodes' table (ema-pruned); v2-1_768-nonema-pruned.ckpt: the
    # full hash from a public hash -> model database ("stable-diffusion 2.1 768"), tied to the file name by
    # sd-webui-model-mixer's list ("v2-1_768-nonema-pruned.ckpt [4711ff4dd2]").
    ("88ecb782561455673c4b78d05093494b9c539fc6bfc08f3a9a4a0dd7b0b10f36", "v2-1_512-ema-pruned.ckpt", _CK, "sd2", _EPS),
    ("ad2a33c361c1f593c4a1fb32ea81afce2b5bb7d1983c6b94793a26a3b54b08a0", "v2-1_768-ema-pruned.ckpt", _CK, "sd2-v", _V),
    ("4711ff4dd270067f71d5ea0725e83e4dc7c41f586a588531ee1c3bd549e9119d",
     "v2-1_768-nonema-pruned.ckpt", _CK, "sd2-v", _V),
    # SD 2.1 .safetensors: issue 17 (768 and 512 ema-pruned); the 768 files also in SwarmUI's
    # `CommonModels` registry and in Hugging Face LFS download links (the A1111 install script above);
    # the 512 one also as the blob name of a Hugging Face hub cache listing (sd2-community mirror).
    ("dcd690123cfc64383981a31d955694f6acf2072a80537fdb612c8e58ec87a8ac",
     "v2-1_768-ema-pruned.safetensors", _ST, "sd2-v", _V),
    ("ff144a49841cf383adbc68841272ce639e1032b0a1f0f6586347feb953c244f4",
     "v2-1_768-nonema-pruned.safetensors", _ST, "sd2-v", _V),
    ("df955bdf6b682338ea9b55dfc0d8f3475aadf4836e204893d28b82355e0956d2",
     "v2-1_512-ema-pruned.safetensors", _ST, "sd2", _EPS),
    # SDXL 1.0 (stabilityai/stable-diffusion-xl-base-1.0, -refiner-1.0): SwarmUI's `CommonModels`
    # (base, refiner) and Hugging Face LFS download links in a public download script (both base files);
    # the 0.9-VAE files in SimpleSDXL's default models_info (sha256 + size), and their A1111 short
    # hashes ("[e6bb9ea85b]", "[8d0ce6c016]") in other checkpoint lists.
    ("31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b",
     "sd_xl_base_1.0.safetensors", _ST, "sdxl", _EPS),
    ("e6bb9ea85bbf7bf6478a7c6d18b71246f22e95d41bcdd80ed40aa212c33cfeff",
     "sd_xl_base_1.0_0.9vae.safetensors", _ST, "sdxl", _EPS),
    ("7440042bbdc8a24813002c09b6b69b64dc90fded4472613437b7f55f9b7d9c5f",
     "sd_xl_refiner_1.0.safetensors", _ST, "sdxl-refiner", _EPS),
    ("8d0ce6c016004cbdacd50f937dad381d8c396628d621a7f97191470532780164",
     "sd_xl_refiner_1.0_0.9vae.safetensors", _ST, "sdxl-refiner", _EPS),
)  # fmt: skip
# Not listed, for want of a listing that ties a full hash to the file: 768-v-ema.safetensors and
# 512-base-ema.safetensors (SD 2.0), v2-1_512-nonema-pruned.ckpt/.safetensors (SD 2.1). No official
# SD 2.1 inpainting or SD 1.4 .safetensors release was found.


@dataclass(frozen=True)
class KnownVAE:
    """A published standalone VAE, recognised by its SHA-256, and whether it decodes safely in fp16."""

    name: str  # the file name as published
    fp16_safe: bool  # decodes in fp16 without overflow: no fp32 upcast needed (diffusers' force_upcast=False)


# madebyollin/sdxl-vae-fp16-fix `sdxl_vae.safetensors` (the SDXL VAE fine-tuned to keep its activations
# inside fp16's range; its diffusers config.json says force_upcast false, but this single file carries
# no config): SwarmUI's `CommonModels` registry ("sdxl-vae") and a public install script that pins its
# URL with this sha256 and 334,641,162 bytes.
KNOWN_VAES: dict[str, KnownVAE] = {
    "235745af8d86bf4a4c1b5b4f529868b37019a10f7c0b2e79ad0abca3a22bc6e1": KnownVAE("sdxl_vae.safetensors (fp16 fix)",
                                                                                  fp16_safe=True),
}  # fmt: skip
