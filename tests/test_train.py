"""minisd.train: the objective against diffusers' training utilities, the loop's guarantees (resume is
bit-identical, 2 DDP ranks equal 1 process), fine-tuning SD1 / SD2-v / SDXL from official files,
the VAE stage, and the command line. Tiny models only: the whole file runs in well under a minute."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import minisd
from minisd.cli import main as cli_main
from minisd.clip import TextConfig
from minisd.conditioning import sdxl_vector
from minisd.train import (
    ImageCaptionFolder,
    TrainConfig,
    VAETrainConfig,
    apply_ema,
    condition,
    estimate_scale_factor,
    init_model,
    loss_weights,
    noised_and_target,
    snr,
    train,
    train_vae,
    training_alphas_cumprod,
)
from minisd.trainkit import EMA, Draws, Processes, Progress, derived_generator
from minisd.unet import UNetConfig
from minisd.vae import VAEConfig

# diffusers and tests.tiny (which imports diffusers) are imported by the tests that use them, so that the
# DDP test's worker processes, which import this file, start in a second or two.

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


class Pictures(torch.utils.data.Dataset):
    """`n` random 16x16 pictures with distinct captions (a pure function of the seed)."""

    def __init__(self, n: int = 8, size: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g)
        self.captions = [f"a {c} square number {i}" for i, c in enumerate(["red", "blue"] * (n // 2))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": self.captions[i]}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see tests/conftest.py


# tests/tiny.py's tiny SD1 architecture (1.6M of its 2M parameters are CLIP's 49408-token embedding).
TINY_SD1 = {
    "unet": UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                       num_heads=4, context_dim=32),
    "vae": VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1),
    "text_encoders": [TextConfig(width=32, heads=4, layers=3, mlp_width=48, act="quick_gelu", projection_dim=None)],
}  # fmt: skip


def tiny_sd1(seed: int = 0) -> minisd.StableDiffusion:
    return init_model("sd1", config=TINY_SD1, seed=seed)


def quick(**kw) -> TrainConfig:
    base = dict(steps=2, batch_size=4, log_every=0, checkpoint_every=0, ema_decay=0.999)
    return TrainConfig(**{**base, **kw})


def unet_state(sd) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in sd.unet.state_dict().items()}


# ------------------------------------------------------------------------------ the objective vs diffusers
def ddpm(zero_terminal_snr: bool):
    """The SD training scheduler as diffusers builds it (fp32 betas and cumprod)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         rescale_betas_zero_snr=zero_terminal_snr)  # fmt: skip


def draws(b: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    t[:3] = torch.tensor([0, 1, 999])  # both ends of the schedule
    return x0, noise, t


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_noised_and_target_match_diffusers_on_the_same_schedule(zero_terminal_snr):
    """Same alphabar table (ours, cast to fp32 as diffusers stores it): add_noise and get_velocity agree to
    fp32 round-off. Each output is a*x + b*y with a, b in [0, 1]; diffusers takes the square roots in fp32,
    we in float64, so a, b differ by <= 1 ulp and the sum by a few ulps of max|x|+max|y|: 4 eps * scale."""
    x0, noise, t = draws()
    ours = training_alphas_cumprod(zero_terminal_snr)
    sched = ddpm(zero_terminal_snr)
    sched.alphas_cumprod = ours.float()
    bound = 4 * EPS32 * float(x0.abs().max() + noise.abs().max())
    x_t, eps_target = noised_and_target(x0, noise, t, ours, "epsilon")
    _, v_target = noised_and_target(x0, noise, t, ours, "v_prediction")
    assert (x_t - sched.add_noise(x0, noise, t)).abs().max() <= bound
    assert torch.equal(eps_target, noise)
    assert (v_target - sched.get_velocity(x0, noise, t)).abs().max() <= bound


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_noised_and_target_match_diffusers_own_schedule(zero_terminal_snr):
    """diffusers' own fp32 schedule against ours (float64): the error is bounded by the coefficients'
    difference, max|d sqrt(a)| max|x0| + max|d sqrt(1-a)| max|n| (measured ~1e-6 each), plus round-off."""
    x0, noise, t = draws(seed=1)
    ours, sched = training_alphas_cumprod(zero_terminal_snr), ddpm(zero_terminal_snr)
    theirs = sched.alphas_cumprod.double()
    d_a = (ours.sqrt() - theirs.sqrt()).abs().max()
    d_b = ((1 - ours).sqrt() - (1 - theirs).sqrt()).abs().max()
    assert d_a < 1e-6 and d_b < 2e-6  # the schedules themselves agree (fp32 cumprod vs float64)
    bound = float(d_a + d_b) * float(x0.abs().max() + noise.abs().max()) + 4 * EPS32 * float(
        x0.abs().max() + noise.abs().max()
    )
    x_t, _ = noised_and_target(x0, noise, t, ours, "epsilon")
    _, v = noised_and_target(x0, noise, t, ours, "v_prediction")
    assert (x_t - sched.add_noise(x0, noise, t)).abs().max() <= bound
    assert (v - sched.get_velocity(x0, noise, t)).abs().max() <= bound


def test_zero_terminal_snr_endpoints():
    """Lin et al. 2023: at t = 999 the input is pure noise and v = -x0 (exactly: alphabar_999 = 0)."""
    x0, noise, _ = draws(b=4)
    t = torch.full((4,), 999)
    x_t, v = noised_and_target(x0, noise, t, training_alphas_cumprod(True), "v_prediction")
    assert torch.equal(x_t, noise) and torch.equal(v, -x0)
    assert float(snr(t, training_alphas_cumprod(True))[0]) == 0.0


def test_v_target_inverts_to_x0_and_noise():
    """Salimans & Ho 2022, sec. 4: x0 = sqrt(a) x_t - sqrt(1-a) v and eps = sqrt(1-a) x_t + sqrt(a) v."""
    x0, noise, t = draws(seed=2)
    ac = training_alphas_cumprod()
    x_t, v = noised_and_target(x0.double(), noise.double(), t, ac, "v_prediction")
    a = ac[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0.double(), rtol=0, atol=1e-12)
    torch.testing.assert_close((1 - a).sqrt() * x_t + a.sqrt() * v, noise.double(), rtol=0, atol=1e-12)


def test_snr_matches_compute_snr():
    """compute_snr squares sqrt(a)/sqrt(1-a) in fp32 after fp32 square roots (a few ulps); we divide in
    float64. Both on the same fp32 table: relative error <= 8 eps."""
    from diffusers.training_utils import compute_snr

    _, _, t = draws()
    sched = ddpm(False)
    sched.alphas_cumprod = training_alphas_cumprod().float()
    ours, theirs = snr(t, sched.alphas_cumprod), compute_snr(sched, t)
    assert ((ours - theirs).abs() / theirs).max() <= 8 * EPS32


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_diffusers_recipe(prediction_type):
    """diffusers' train_text_to_image.py: min(snr, gamma) / snr (epsilon) or / (snr + 1) (v)."""
    from diffusers.training_utils import compute_snr

    _, _, t = draws()
    sched = ddpm(False)
    sched.alphas_cumprod = training_alphas_cumprod().float()
    s = compute_snr(sched, t)
    clipped = torch.stack([s, 5.0 * torch.ones_like(s)], dim=1).min(dim=1)[0]
    expected = clipped / s if prediction_type == "epsilon" else clipped / (s + 1)
    ours = loss_weights(t, sched.alphas_cumprod, prediction_type, 5.0)
    assert ((ours - expected).abs() / expected).max() <= 16 * EPS32
    assert torch.equal(loss_weights(t, sched.alphas_cumprod, prediction_type, None), torch.ones(t.shape))


def test_min_snr_epsilon_weight_at_zero_snr_is_its_limit():
    t = torch.tensor([998, 999])
    w = loss_weights(t, training_alphas_cumprod(True), "epsilon", 5.0)
    assert torch.isfinite(w).all() and float(w[1]) == 1.0


def test_objective_errors_name_the_field():
    x0, noise, t = draws(b=4)
    with pytest.raises(ValueError, match="prediction_type"):
        noised_and_target(x0, noise, t, training_alphas_cumprod(), "sample")
    with pytest.raises(ValueError, match="noise, t"):
        noised_and_target(x0, noise[:1], t, training_alphas_cumprod(), "epsilon")


# ------------------------------------------------------------------------------ configs
@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("lr", 0.0), ("caption_dropout", 1.5), ("mixed_precision", "fp8"), ("ema_decay", 1.0),
     ("min_snr_gamma", -1.0), ("betas", (0.9, 1.0)), ("log_every", -1)],
)  # fmt: skip
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}: expected"):
        TrainConfig(**{"steps": 1, "batch_size": 1, field: value})


def test_run_errors():
    sd = tiny_sd1()
    with pytest.raises(ValueError, match="zero_terminal_snr: expected a v_prediction model"):
        train(sd, Pictures(), quick(zero_terminal_snr=True), tempfile.mkdtemp())
    with pytest.raises(ValueError, match="data: expected at least batch_size=16 items, got 8"):
        train(sd, Pictures(), quick(batch_size=16), tempfile.mkdtemp())
    with pytest.raises(ValueError, match="mixed_precision: fp16 needs CUDA"):
        train(sd, Pictures(), quick(mixed_precision="fp16"), tempfile.mkdtemp())
    with pytest.raises(ValueError, match="sample_prompts"):
        quick(sample_every=1)


# ------------------------------------------------------------------------------ the loop
def test_resume_is_bit_identical(tmp_path):
    """6 steps straight == 3 steps, stop, resume from checkpoint.pt, 3 more: every weight, EMA weight and
    loss equal bit for bit (per-step seeds, the optimizer/EMA state in the checkpoint). The resumed log
    holds each step once."""
    cfg = quick(steps=6, checkpoint_every=3, train_text_encoder=True)
    straight = tiny_sd1()
    r6 = train(straight, Pictures(), cfg, tmp_path / "straight")
    interrupted = tiny_sd1()
    r3 = train(interrupted, Pictures(), dataclasses.replace(cfg, steps=3), tmp_path / "resumed")
    resumed = tiny_sd1()
    with torch.no_grad():  # other trained weights (the frozen VAE stays): the checkpoint must replace them
        for p in [*resumed.unet.parameters(), *resumed.text_encoders[0].parameters()]:
            p.add_(0.1)
    r33 = train(resumed, Pictures(), cfg, tmp_path / "resumed")
    assert r33.start_step == 3 and r6.losses == r3.losses + r33.losses
    for (k, a), b in zip(straight.unet.state_dict().items(), resumed.unet.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(straight.text_encoders[0].parameters(), resumed.text_encoders[0].parameters()):
        assert torch.equal(a, b)
    for name in r6.ema:
        assert all(torch.equal(r6.ema[name][k], r33.ema[name][k]) for k in r6.ema[name])
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_another_recipe(tmp_path):
    train(tiny_sd1(), Pictures(), quick(steps=1), tmp_path)
    with pytest.raises(ValueError, match="TrainConfig.lr: the checkpoint .* trained with 0.0001, got 0.001"):
        train(tiny_sd1(), Pictures(), quick(steps=2, lr=1e-3), tmp_path)


def test_training_learns_and_seeds_decide(tmp_path):
    """A fixed batch: the loss falls; the same seed repeats the run exactly, another seed does not."""
    cfg = quick(steps=12, lr=1e-3, caption_dropout=0.0, ema_decay=None)
    data = Pictures(n=4)
    a = train(tiny_sd1(), data, cfg, tmp_path / "a")
    b = train(tiny_sd1(), data, cfg, tmp_path / "b")
    c = train(tiny_sd1(), data, dataclasses.replace(cfg, seed=1), tmp_path / "c")
    assert a.losses == b.losses and a.losses != c.losses
    assert np.mean(a.losses[-4:]) < np.mean(a.losses[:4])


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    """Recomputing the blocks in the backward pass changes nothing but round-off (one step of AdamW moves
    each weight by ~lr: 1e-6 absolute is 1% of a step); bf16 autocast trains with a finite loss."""
    plain, ckpt = tiny_sd1(), tiny_sd1()
    train(plain, Pictures(), quick(steps=1), tmp_path / "plain")
    train(ckpt, Pictures(), quick(steps=1, gradient_checkpointing=True), tmp_path / "ckpt")
    for a, b in zip(plain.unet.parameters(), ckpt.unet.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert ckpt.unet.gradient_checkpointing is False  # restored
    r = train(tiny_sd1(), Pictures(), quick(steps=1, mixed_precision="bf16"), tmp_path / "bf16")
    assert np.isfinite(r.losses).all()


def test_ema_follows_litema():
    """LitEma: d = min(decay, (1 + n) / (10 + n)); shadow = d * shadow + (1 - d) * theta."""
    m = torch.nn.Linear(2, 2)
    ema = EMA({"m": m}, decay=0.9999)
    before = ema.shadow["m"]["weight"].clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update({"m": m})
    d = 2 / 11
    torch.testing.assert_close(ema.shadow["m"]["weight"], d * before + (1 - d) * m.weight.detach())


def test_draws_are_the_global_batch_sliced():
    """Rank r of 2 with batch 4 draws exactly rows 2r..2r+1 of what one process with batch 4 draws."""
    one = Draws(derived_generator(0, "step", 5), 4, Processes().part(4), torch.device("cpu"))
    whole = (one.randn(3), one.randint(1000), one.rand())
    for rank in range(2):
        part = Processes(rank, 2).part(4)
        d = Draws(derived_generator(0, "step", 5), 4, part, torch.device("cpu"))
        assert all(torch.equal(w[part], x) for w, x in zip(whole, (d.randn(3), d.randint(1000), d.rand())))


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    for tty in (False, True):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        bar = Progress(total=10, start=0, enabled=True)
        bar.update(10, 0.5)
        bar.close()
        err = capsys.readouterr().err
        assert ("10/10 [" in err and "loss 0.5000" in err) if tty else err == ""


def _ddp_worker(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        sd = tiny_sd1()
        train(sd, Pictures(), quick(steps=1, batch_size=4, ema_decay=None), os.path.join(out, "run"))
        if rank == 0:
            torch.save(sd.unet.state_dict(), os.path.join(out, "unet.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """One step with global batch 4: 2 DDP processes (gloo, CPU, batch 2 each) vs 1 process (batch 4).
    Same items, noise, timesteps and dropout (`Draws`); only the gradient's summation order differs (DDP
    sums two half-batch means then halves). AdamW's first step is lr * g / (|g| + eps), so a relative
    round-off of ~1e-7 in g moves a weight by ~1e-7 * lr unless |g| ~ eps: 1e-3 * lr bounds it."""
    # spawn, not fork: a forked child cannot run autograd once the parent's autograd engine has started its
    # threads (earlier tests in the same session, e.g. torch.compile's, do); a spawned one re-imports torch (~5 s)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "unet.pt", weights_only=True)
    single = tiny_sd1()
    train(single, Pictures(), quick(steps=1, batch_size=4, ema_decay=None), tmp_path / "single")
    start = tiny_sd1().unet.state_dict()
    lr = 1e-4
    for k, v in single.unet.state_dict().items():
        assert (v - ddp[k]).abs().max() <= 1e-3 * lr, k
    assert any(not torch.equal(v, start[k]) for k, v in ddp.items())  # the step did move the weights


# ------------------------------------------------------------------------------ fine-tuning loaded models
def picture_folder(root, sizes=((40, 24), (24, 36), (32, 32), (50, 30))):
    """Images of several sizes (w, h) with same-named captions."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        PIL.Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a picture number {i}\n")
    return root


def official_file(family: str, path):
    from tests.tiny import official_checkpoint

    tensors = {k: v.contiguous() for k, v in official_checkpoint(family).tensors.items()}
    safetensors.torch.save_file(tensors, str(path))
    return path


def test_image_caption_folder(tmp_path):
    """Each item: the image resized to cover the size and cropped, the caption, the original (h, w) and
    the crop's (top, left) in the resized image (the SDXL paper's c_size and c_crop)."""
    data = ImageCaptionFolder(picture_folder(tmp_path / "pics"), 16, seed=3)
    item = data[0]  # 40 x 24 (w x h) -> resized to 27 x 16, cropped to 16 x 16
    assert item["image"].shape == (3, 16, 16) and item["caption"] == "a picture number 0"
    assert item["original_size"].tolist() == [24, 40]
    top, left = item["crop_coords_top_left"].tolist()
    assert top == 0 and 0 <= left <= 27 - 16
    resized = PIL.Image.open(data.files[0]).convert("RGB").resize((27, 16), PIL.Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255).permute(2, 0, 1)[:, :, left : left + 16]
    assert torch.equal(item["image"], expected)
    assert data[0]["crop_coords_top_left"].tolist() == [top, left]  # seeded: the same crop again
    lefts = set()
    for epoch in range(8):
        data.set_epoch(epoch)
        lefts.add(data[0]["crop_coords_top_left"][1].item())
    assert len(lefts) > 1  # a new crop per epoch
    centre = ImageCaptionFolder(tmp_path / "pics", 16, random_crop=False)[0]
    assert centre["crop_coords_top_left"].tolist() == [0, round((27 - 16) / 2)]
    (tmp_path / "pics" / "00.txt").unlink()
    with pytest.raises(ValueError, match="captions: expected a .txt beside every image"):
        ImageCaptionFolder(tmp_path / "pics", 16)


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_fine_tune_an_official_file(family, tmp_path):
    """minisd.load -> train on an ImageCaptionFolder -> model.safetensors in the official layout, which
    reloads to the EMA weights; SD2-v trains the v target (the family's prediction type)."""
    from tests.tiny import tiny_config

    prediction = "v_prediction" if family == "sd2-v" else None
    sd = minisd.load(official_file(family, tmp_path / "in.safetensors"), config=tiny_config(family),
                     prediction_type=prediction)  # fmt: skip
    before = unet_state(sd)
    data = ImageCaptionFolder(picture_folder(tmp_path / "pics"), 16)
    result = train(sd, data, quick(steps=2, batch_size=2), tmp_path / "out")
    assert any(not torch.equal(v, before[k]) for k, v in sd.unet.state_dict().items())
    again = minisd.load(result.model_path, config=tiny_config(family))
    assert again.family.name == sd.family.name and again.prediction_type == sd.prediction_type
    for k, v in again.unet.state_dict().items():
        assert torch.equal(v, result.ema["unet"][k]), k
    apply_ema(sd, result)
    assert all(torch.equal(v, result.ema["unet"][k]) for k, v in sd.unet.named_parameters())


def test_sdxl_conditioning_reads_size_and_crop(tmp_path):
    """SDXL's y = pooled + embedded (original size, crop top-left, target size) of each item; a dropped
    caption is zero context and zero pooled (Family.zero_empty_negative), SD1's is the encoded ""."""
    from tests.tiny import tiny_config

    sd = minisd.load(official_file("sdxl", tmp_path / "xl.safetensors"), config=tiny_config("sdxl"))
    micro = {"original_size": torch.tensor([[24.0, 40.0], [64.0, 16.0]]),
             "crop_coords_top_left": torch.tensor([[0.0, 5.0], [7.0, 0.0]]),
             "target_size": torch.tensor([[16.0, 16.0]] * 2)}  # fmt: skip
    with torch.no_grad():
        context, y = condition(sd, ["a cat", "a dog"], torch.tensor([False, True]), micro, grad=False)
        c = sd.encode_prompt(["a cat", "a dog"])
    assert torch.equal(context[1], torch.zeros_like(context[1])) and torch.equal(context[0], c.context[0])
    expected = sdxl_vector(c.pooled * torch.tensor([[1.0], [0.0]]), micro["original_size"],
                           micro["crop_coords_top_left"], micro["target_size"])  # fmt: skip
    assert torch.equal(y, expected)
    sd1 = tiny_sd1()
    with torch.no_grad():
        context, y = condition(sd1, ["a cat"], torch.tensor([True]), {}, grad=False)
        assert y is None and torch.equal(context, sd1.encode_prompt([""]).context)


# ------------------------------------------------------------------------------ the VAE
def test_vae_training_and_scale_factor(tmp_path):
    """The VAE loss falls on a fixed batch; the scale factor is 1 / std of posterior samples (LDM)."""
    sd = tiny_sd1()
    data = Pictures(n=4)
    cfg = VAETrainConfig(steps=10, batch_size=4, lr=2e-3, log_every=0, checkpoint_every=0, scale_samples=4)
    result = train_vae(sd.vae, data, cfg, tmp_path)
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])
    assert sd.vae.config.scale_factor == result.scale_factor
    with torch.no_grad():
        images = torch.stack([data[i]["image"] for i in range(4)])
        posterior = sd.vae.encode(2 * images - 1)
        g = derived_generator(cfg.seed, "scale_factor")
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    assert result.scale_factor == pytest.approx(1 / z.flatten().double().std().item(), rel=1e-6)
    assert estimate_scale_factor(sd.vae, data, n=4, seed=cfg.seed) == pytest.approx(result.scale_factor, rel=1e-12)
    saved = safetensors.torch.load_file(str(result.model_path))
    assert all(torch.equal(saved[k], v) for k, v in sd.vae.state_dict().items())


# ------------------------------------------------------------------------------ the command line
def test_cli_trains_from_scratch_and_resumes(tmp_path, capsys):
    arch = tmp_path / "arch.json"
    cfg = TINY_SD1
    arch.write_text(json.dumps({"unet": dataclasses.asdict(cfg["unet"]), "vae": dataclasses.asdict(cfg["vae"]),
                                "text_encoders": [dataclasses.asdict(t) for t in cfg["text_encoders"]]}))  # fmt: skip
    pics = picture_folder(tmp_path / "pics")
    args = ["train", str(pics), "-o", str(tmp_path / "out"), "--new", "sd1", "--config", str(arch), "--size", "16",
            "--steps", "2", "--batch-size", "2", "--train-text-encoder", "--sample-every", "2",
            "--sample-prompts", "a picture", "--sample-steps", "2", "--log-every", "0"]  # fmt: skip
    assert cli_main(args) == 0
    assert (tmp_path / "out" / "samples" / "step-0000002.png").exists()
    sd = minisd.load(tmp_path / "out" / "model.safetensors", config=arch)
    assert sd.generate("a picture", steps=2, width=16, height=16, seed=0)[0].size == (16, 16)
    args[args.index("--steps") + 1] = "3"
    assert cli_main(args) == 0  # resumes at step 2
    log = (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]
    assert cli_main(["train", str(pics), "-o", str(tmp_path / "o2"), "--new", "sd1", "--steps", "0",
                     "--batch-size", "2"]) == 2  # fmt: skip
    assert "TrainConfig.steps: expected an integer >= 1, got 0" in capsys.readouterr().err
