"""The `minisd` command line: info, convert, generate, demo, and its error handling."""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import pytest
import safetensors.torch
import torch
from PIL import Image

import minisd
from minisd import cli, cli_generate, detection
from minisd.checkpoint import apply_config
from minisd.families import family_spec
from tests.test_files import fifo, kernel_permissions, listing, reachable_folder, read_only_folder
from tests.tiny import official_checkpoint, tiny_config


def tiny_file(tmp_path, family="sd1", **kw):
    path = tmp_path / f"{family}.safetensors"
    safetensors.torch.save_file(official_checkpoint(family, **kw).tensors, str(path))
    return path


def config_json(tmp_path, family="sd1"):
    cfg = tiny_config(family)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"unet": dataclasses.asdict(cfg["unet"]), "vae": dataclasses.asdict(cfg["vae"]),
                                "text_encoders": [dataclasses.asdict(c) for c in cfg["text_encoders"]]}))
    return path


def test_info_reports_family_evidence_counts_and_ignored(tmp_path, capsys, monkeypatch):
    path = tiny_file(tmp_path, "sdxl", ema=True)
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:      sdxl" in out and "conditioner.embedders.1.model.ln_final.weight present" in out
    assert "EMA copy of the U-Net (pass use_ema=True" in out and "292 key(s)" in out
    assert "text encoder 1 (open_clip)" in out and "F32 x806" in out
    assert "differs from the official sdxl preset" in out  # a tiny model is not the full-size preset
    assert "(not a known official file)" in out
    # with the tiny architecture as "the preset" and the file's hash as "official", info says so
    digest = detection.sha256(path)
    monkeypatch.setitem(detection.KNOWN_SHA256, digest,
                        detection.KnownFile("sd_xl_base_1.0.safetensors", ".safetensors", "sdxl", "epsilon"))
    detected = cli.detect(path)
    tiny = dataclasses.replace(detected, family=apply_config(detected.family, tiny_config("sdxl")))
    monkeypatch.setattr(cli, "detect", lambda p: tiny)
    cli.main(["info", str(path)])
    out = capsys.readouterr().out
    assert "the official sdxl preset, key for key" in out and "= official sd_xl_base_1.0.safetensors" in out


def test_sd2_prediction_from_a_known_hash(tmp_path, monkeypatch):
    path = tiny_file(tmp_path, "sd2")
    known = detection.KnownFile("v2-1_768-ema-pruned.safetensors", ".safetensors", "sd2-v", "v_prediction")
    monkeypatch.setitem(detection.KNOWN_SHA256, detection.sha256(path), known)
    sd = minisd.load(path, config=tiny_config("sd2"))
    assert (sd.family.name, sd.prediction_type) == ("sd2-v", "v_prediction")
    assert sd.prediction_reason == "SHA-256 of the official v2-1_768-ema-pruned.safetensors"


def test_info_shows_the_a1111_short_hash(tmp_path, capsys, monkeypatch):
    path = tiny_file(tmp_path, "sd2")
    digest = detection.sha256(path)
    assert cli.main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    sha = next(i for i, line in enumerate(lines) if line.startswith("  sha256:"))
    # right under the full hash: its first 10 hex digits, the "Model hash" A1111 writes into images
    assert lines[sha].split()[1] == digest and lines[sha + 1].split()[:3] == ["short", "hash:", digest[:10]]
    monkeypatch.setitem(detection.KNOWN_SHA256, digest,
                        detection.KnownFile("v2-1_512-ema-pruned.safetensors", ".safetensors", "sd2", "epsilon"))
    assert cli.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{digest}  = official v2-1_512-ema-pruned.safetensors" in out and f"short hash:  {digest[:10]}" in out
    assert cli.main(["info", "--no-hash", str(path)]) == 0
    assert "short hash" not in capsys.readouterr().out


def test_convert_ckpt_needs_allow_pickle(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": official_checkpoint("sd1").tensors}, ckpt)
    cfg = config_json(tmp_path)
    out = tmp_path / "model.safetensors"
    assert cli.main(["convert", str(ckpt), str(out), "--config", str(cfg)]) == 1
    assert "refuses them by default" in capsys.readouterr().err and not out.exists()
    assert cli.main(["convert", str(ckpt), str(out), "--config", str(cfg), "--allow-pickle"]) == 0
    assert minisd.detect(out).family.name == "sd1"
    assert cli.main(["convert", str(ckpt), str(out), "--config", str(cfg), "--allow-pickle"]) == 1  # exists
    assert "exists" in capsys.readouterr().err


def test_generate_writes_png(tmp_path, capsys):
    path, cfg, out = tiny_file(tmp_path), config_json(tmp_path), tmp_path / "cat.png"
    args = ["generate", "a cat", "--model", str(path), "-o", str(out), "--config", str(cfg), "--steps", "2",
            "--width", "64", "--height", "64", "--device", "cpu"]
    assert cli.main(args) == 0
    assert Image.open(out).size == (64, 64)
    before = out.read_bytes()
    assert cli.main(args) == 0 and out.read_bytes() == before  # the user's file is kept: the next free name
    assert capsys.readouterr().out.split()[-1] == str(tmp_path / "cat-1.png")
    assert (tmp_path / "cat-1.png").read_bytes() == before  # same request, same picture


def one_error_line(capsys, *fragments: str) -> str:
    """The stderr of a user error: one `minisd: error:` line naming the problem, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("minisd: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment.lower() in err.lower(), (fragment, err)
    return err


@pytest.mark.reliability(
    "command line",
    "a missing, corrupt, unreadable (permission denied) or FIFO checkpoint",
    "`minisd: error: ...` in one line naming the file, exit status 1; the traceback only with `--debug`",
)
def test_errors_exit_1_with_a_message(tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing.safetensors")]) == 1
    one_error_line(capsys, "no such file")
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)  # a corrupt file
    assert cli.main(["info", str(tmp_path / "garbage.safetensors")]) == 1
    one_error_line(capsys, "garbage.safetensors")
    with fifo(tmp_path / "fifo.safetensors") as path:  # refused before it is opened, so nothing blocks
        assert cli.main(["info", str(path)]) == 1
    one_error_line(capsys, "fifo.safetensors", "not a regular file")
    with reachable_folder(tmp_path) as base:
        secret = base / "secret.safetensors"
        secret.write_bytes(b"")
        secret.chmod(0o000)
        with kernel_permissions():
            assert cli.main(["info", str(secret)]) == 1
        one_error_line(capsys, "secret.safetensors", "permission denied")
    # --debug shows the traceback too, before or after the command; --verbose only logs
    for argv in (["--debug", "info"], ["info", "--debug"]):
        assert cli.main([*argv, str(tmp_path / "missing.safetensors")]) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "minisd: error: " in err
    assert cli.main(["-v", "info", str(tmp_path / "missing.safetensors")]) == 1
    one_error_line(capsys, "no such file")


@pytest.mark.reliability(
    "command line",
    "a non-positive `--num-images` or `--steps`, an unknown `--device`",
    "one error line naming the option (and `see --help`), exit status 2",
)
@pytest.mark.parametrize("argv", [["--num-images", "0"], ["--steps", "-1"], ["--device", "nonsense"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "a cat", "--model", "model.safetensors", *argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("minisd generate: error: argument " + argv[0]) and "minisd generate --help" in err


# ------------------------------------------------------------------------------ generate's files, without a model
class FakeModel:
    """Stands in for a loaded SD1 model: records its calls, returns one 8x8 image per image asked for, its red
    channel 40 x the image's seed."""

    family = family_spec("sd1")
    scale_factor = 0.18215

    def __init__(self, calls: list):
        self.calls = calls

    def generate(self, prompts, **kw):
        self.calls.append(("generate", prompts, kw["seed"]))
        return [Image.new("RGB", (8, 8), (40 * (kw["seed"] + i), 0, 0)) for i in range(len(prompts))]


@pytest.fixture
def fake_load(monkeypatch):
    """Replaces `load` in the CLI; the list it returns says whether a model was loaded or used."""
    calls: list = []

    def load(path, **kw):
        calls.append(("load", path))
        return FakeModel(calls)

    monkeypatch.setattr(cli, "load", load)
    monkeypatch.setattr(cli_generate, "load", load)
    monkeypatch.setattr(cli_generate, "sha256", lambda path: "0" * 64)
    return calls


def generate(out, *extra) -> int:
    return cli.main(["generate", "a cat", "--model", "model.safetensors", "-o", str(out), "--device", "cpu", *extra])


@pytest.mark.reliability(
    "command line",
    "`--num-images 3` where the second name exists; a missing `--model`",
    "the existing image is kept and the next free names are used (`--overwrite` replaces it); a missing model is "
    "one line, exit status 1, before anything is loaded or written",
)
def test_generate_never_replaces_an_image_without_overwrite(tmp_path, fake_load, capsys):
    (tmp_path / "cat-1.png").write_bytes(b"the user's image")
    assert generate(tmp_path / "cat.png", "--num-images", "3") == 1  # the model is checked before loading
    one_error_line(capsys, "model.safetensors", "no such file")
    assert fake_load == [] and listing(tmp_path) == ["cat-1.png"]  # nothing loaded, generated or written
    (tmp_path / "model.safetensors").write_bytes(b"")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert generate(tmp_path / "cat.png", "--num-images", "3", "--seed", "1") == 0
        assert listing(tmp_path) == ["cat-1.png", "cat-2.png", "cat-3.png", "cat.png", "model.safetensors"]
        assert (tmp_path / "cat-1.png").read_bytes() == b"the user's image"
        red = [Image.open(tmp_path / f).getpixel((0, 0))[0] for f in ("cat.png", "cat-2.png", "cat-3.png")]
        assert red == [40, 80, 120]  # seeds 1, 2, 3: image i of a command uses seed + i
        assert generate(tmp_path / "cat.png", "--num-images", "2", "--overwrite") == 0
    finally:
        os.chdir(cwd)
    assert Image.open(tmp_path / "cat-1.png").getpixel((0, 0)) == (40, 0, 0)  # replaced, as asked
    assert [c[0] for c in fake_load] == ["load", "generate", "generate", "generate", "load", "generate", "generate"]


@pytest.mark.reliability(
    "command line",
    "`-o` a folder, in a missing folder, under a file, with an unknown extension, a FIFO, or in an "
    "unwritable folder",
    "one line naming the path and the problem, exit status 1, before the model is loaded",
)
def test_generate_destination_errors_before_loading(tmp_path, fake_load, capsys):
    (tmp_path / "a-file").write_bytes(b"")
    (tmp_path / "a-folder").mkdir()
    os.mkfifo(tmp_path / "a-fifo.png")
    cases = [
        (tmp_path / "a-folder", ["is a folder"]),
        (tmp_path / "missing" / "cat.png", ["does not exist"]),
        (tmp_path / "a-file" / "cat.png", ["is not a folder"]),
        (tmp_path / "cat.xyz", ["cannot tell the image format"]),
        (tmp_path / "a-fifo.png", ["not a regular file"]),
    ]
    for out, fragments in cases:
        assert generate(out, "--overwrite") == 1
        one_error_line(capsys, str(out), *fragments)
    with read_only_folder(tmp_path) as folder:
        assert generate(folder / "cat.png") == 1
        one_error_line(capsys, "cat.png", "not writable")
    assert fake_load == []


@pytest.mark.reliability(
    "command line",
    "a full disk while `--overwrite` replaces an image",
    "`minisd: error: out.png: No space left on device`, exit status 1; the old image is intact, no "
    "temporary file",
)
def test_generate_on_a_full_disk_keeps_the_old_image(tmp_path, fake_load, capsys, monkeypatch):
    out = tmp_path / "cat.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out)
    old = out.read_bytes()
    monkeypatch.setattr(cli_generate, "check_source", lambda path: path)

    def save_half(image, fp, format=None, **kw):
        fp.write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Image.Image, "save", save_half)
    assert generate(out, "--overwrite") == 1
    one_error_line(capsys, f"{out}: No space left on device")
    assert out.read_bytes() == old and listing(tmp_path) == ["cat.png"]


@pytest.mark.reliability(
    "command line",
    "Ctrl-C while an image is written",
    "`minisd: interrupted`, exit status 130, no traceback; the old image is intact, no temporary file",
)
def test_interrupt_exits_130_and_leaves_nothing(tmp_path, fake_load, capsys, monkeypatch):
    out = tmp_path / "cat.png"
    out.write_bytes(b"old")
    monkeypatch.setattr(cli_generate, "check_source", lambda path: path)

    def interrupted(image, fp, format=None, **kw):
        fp.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", interrupted)
    assert generate(out, "--overwrite") == 130
    err = capsys.readouterr().err
    assert err == "minisd: interrupted\n"
    assert out.read_bytes() == b"old" and listing(tmp_path) == ["cat.png"]


@pytest.mark.reliability(
    "command line",
    "`convert` to an existing file, a folder, a name without `.safetensors`, a missing folder, a "
    "diffusers destination that is a file, or with a missing `--config`",
    "one line, exit status 1, before the source is loaded",
)
def test_convert_checks_the_destination_before_loading(tmp_path, fake_load, capsys):
    src = tmp_path / "src.safetensors"
    src.write_bytes(b"")
    (tmp_path / "taken.safetensors").write_bytes(b"mine")
    (tmp_path / "a-folder").mkdir()
    cases = [
        ([str(tmp_path / "taken.safetensors")], ["exists", "--overwrite"]),
        ([str(tmp_path / "a-folder"), "--overwrite"], ["is a folder"]),
        ([str(tmp_path / "out.bin")], ["must end in .safetensors"]),
        ([str(tmp_path / "missing" / "out.safetensors")], ["does not exist"]),
        ([str(src), "--format", "diffusers", "--overwrite"], ["is a file"]),
        ([str(tmp_path / "new.safetensors"), "--config", str(tmp_path / "missing.json")], ["missing.json"]),
    ]
    for argv, fragments in cases:
        assert cli.main(["convert", str(src), *argv]) == 1
        one_error_line(capsys, *fragments)
    assert fake_load == [] and (tmp_path / "taken.safetensors").read_bytes() == b"mine"


@pytest.mark.reliability(
    "command line",
    "`demo -o` an existing file",
    "one line, exit status 1, before the demo model is built",
)
def test_demo_checks_the_destination_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "demo_model", lambda folder: pytest.fail("built a model before checking -o"))
    (tmp_path / "demo.png").write_bytes(b"mine")
    assert cli.main(["demo", "-o", str(tmp_path / "demo.png")]) == 1
    one_error_line(capsys, "demo.png exists")
    assert (tmp_path / "demo.png").read_bytes() == b"mine"


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert cli.main(["demo", "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    assert "family:      sd1" in capsys.readouterr().out
