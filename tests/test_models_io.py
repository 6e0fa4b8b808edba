"""Model I/O: round trips with dummy components, and every refusal of an unsafe or wrong model.

Dummy components follow diffusers' own tests: a two-block UNet2DModel built from a config under a
fixed seed, small enough that each test runs in milliseconds on a CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from vdu_core import models
from vdu_core.errors import ModelLoadError
from vdu_core.models import (
    describe_model,
    load_pipeline,
    load_unet_state,
    read_safetensors_header,
    save_pipeline,
    sha256_file,
    sha256_tree,
)

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    layers_per_block=1,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
)


def dummy_unet(seed: int = 0, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**{**UNET_CONFIG, **overrides})


def dummy_pipeline(seed: int = 0) -> DDPMPipeline:
    return DDPMPipeline(unet=dummy_unet(seed), scheduler=DDPMScheduler(num_train_timesteps=100))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def expect(rule: str, fn, *args, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        fn(*args, **kwargs)
    assert info.value.rule == rule, f"{info.value.rule}: {info.value}"
    return info.value


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipe") / "ddpm"
    save_pipeline(dummy_pipeline(), out)
    return out


class Payload:
    """Unpickling this creates a marker file: proof that a pickle was (never) loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# --------------------------------------------------------------------------- happy paths


def test_pipeline_round_trip(pipeline_dir):
    original = dummy_pipeline()
    loaded = load_pipeline(pipeline_dir)
    assert isinstance(loaded, DDPMPipeline)
    assert_same_weights(original.unet, loaded.unet)
    assert loaded.unet.dtype == torch.float32 and not loaded.unet.training
    assert all(p.requires_grad for p in loaded.unet.parameters())
    assert loaded.scheduler.config.num_train_timesteps == 100
    # What we save loads with plain diffusers, and runs.
    out = pipeline_dir.parent / "resaved"
    save_pipeline(loaded, out)
    plain = DDPMPipeline.from_pretrained(out)
    assert_same_weights(original.unet, plain.unet)
    images = plain(
        batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np"
    ).images
    assert images.shape == (1, 8, 8, 1)
    assert not list(out.rglob("*.bin"))


def test_unet_folder_with_default_or_sibling_scheduler(tmp_path):
    unet = dummy_unet(1)
    unet.save_pretrained(tmp_path / "u", safe_serialization=True)
    pipe = load_pipeline(tmp_path / "u")
    assert_same_weights(unet, pipe.unet)
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.scheduler.config.num_train_timesteps == 1000
    DDPMScheduler(num_train_timesteps=50).save_pretrained(tmp_path / "u")  # scheduler_config.json beside it
    assert load_pipeline(tmp_path / "u").scheduler.config.num_train_timesteps == 50


def test_single_file_safetensors_needs_config_beside_it(tmp_path):
    unet = dummy_unet(2)
    save_file(unet.state_dict(), str(tmp_path / "weights.safetensors"))
    err = expect("missing_config", load_pipeline, tmp_path / "weights.safetensors")
    assert "config.json" in str(err)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **UNET_CONFIG}))
    pipe = load_pipeline(str(tmp_path / "weights.safetensors"))
    assert_same_weights(unet, pipe.unet)


def test_describe_model_is_torch_light(pipeline_dir):
    info = describe_model(pipeline_dir)
    unet = dummy_unet()
    assert info["parameters"] == sum(p.numel() for p in unet.parameters())
    assert info["sample_size"] == 8 and info["in_channels"] == 1 and info["kind"] == "pipeline"
    assert info["scheduler_class"] == "DDPMScheduler" and info["num_train_timesteps"] == 100
    code = (
        "import sys, vdu_core.models as m; d = m.describe_model(sys.argv[1]); "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'; "
        "print(d['parameters'])"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(pipeline_dir)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == info["parameters"]


def test_hashes_are_stable_and_sensitive(tmp_path, pipeline_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(pipeline_dir, copy)
    assert sha256_tree(copy) == sha256_tree(pipeline_dir)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    assert sha256_file(weights) == sha256_file(pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    (copy / "scheduler" / "scheduler_config.json").rename(copy / "scheduler" / "renamed.json")
    assert sha256_tree(copy) != sha256_tree(pipeline_dir)


def test_load_unet_state_same_lineage(tmp_path, pipeline_dir):
    sibling = dummy_unet(seed=7)
    save_file(sibling.state_dict(), str(tmp_path / "snap.safetensors"))
    like = dummy_unet(seed=0)
    for ref in (tmp_path / "snap.safetensors", pipeline_dir, pipeline_dir / "unet"):
        state = load_unet_state(ref, like)
        assert state.keys() == like.state_dict().keys()
    state = load_unet_state(tmp_path / "snap.safetensors", like)
    assert all(torch.equal(state[k], v) for k, v in sibling.state_dict().items())


# --------------------------------------------------------------------------- hub ids (offline)

SHA = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, repo: str, files_from: Path) -> None:
    """Lay ``files_from`` out as huggingface_hub's cache would after a download of ``repo``@SHA."""
    import shutil

    base = root / ("models--" + repo.replace("/", "--"))
    shutil.copytree(files_from, base / "snapshots" / SHA)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(SHA)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_id_from_local_cache_offline(offline_hub, pipeline_dir):
    fake_hub_cache(offline_hub, "acme/tiny-ddpm", pipeline_dir)
    for revision in (SHA, "main"):
        pipe = load_pipeline("acme/tiny-ddpm", revision=revision)
        assert_same_weights(dummy_pipeline().unet, pipe.unet)
    assert describe_model("acme/tiny-ddpm", revision=SHA)["revision"] == SHA


def test_hub_refusals_offline(offline_hub, tmp_path):
    expect("revision_required", load_pipeline, "acme/tiny-ddpm")
    expect("hub_unavailable", load_pipeline, "acme/not-cached", revision=SHA)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    fake_hub_cache(offline_hub, "acme/bert", bert)
    err = expect("unsupported_architecture", load_pipeline, "acme/bert", revision=SHA)
    assert "BertModel" in str(err)
    expect("not_found", load_pipeline, "no-such-folder-or-id")


# --------------------------------------------------------------------------- pickles are never loaded


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth", ".pkl", ".safetensors", ".weights"])
def test_payload_pickles_are_refused_and_never_run(tmp_path, suffix):
    marker = tmp_path / "PWNED"
    path = tmp_path / f"model{suffix}"
    if suffix == ".pkl":
        path.write_bytes(pickle.dumps({"x": Payload(marker)}))
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload(marker)}, path)
    assert not marker.exists()
    err = expect("pickle_refused", load_pipeline, path)
    assert path.name in str(err)
    expect("pickle_refused", load_unet_state, path, dummy_unet())
    expect("pickle_refused", describe_model, path)
    assert not marker.exists()


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    unet_dir = tmp_path / "u"
    unet_dir.mkdir()
    (unet_dir / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **UNET_CONFIG}))
    torch.save(
        {"payload": Payload(marker), **dummy_unet().state_dict()}, unet_dir / "diffusion_pytorch_model.bin"
    )
    err = expect("pickle_refused", load_pipeline, unet_dir)
    assert "diffusion_pytorch_model.bin" in str(err)
    expect("pickle_refused", load_unet_state, unet_dir, dummy_unet())
    only_ckpt = tmp_path / "ckpt"
    only_ckpt.mkdir()
    torch.save({"payload": Payload(marker)}, only_ckpt / "last.ckpt")
    assert "last.ckpt" in str(expect("pickle_refused", load_pipeline, only_ckpt))
    assert not marker.exists()


def test_source_never_calls_torch_load_or_pickle():
    import ast

    tree = ast.parse(Path(models.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in {
                ("torch", "load"),
                ("pickle", "load"),
                ("pickle", "loads"),
            }
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n.split(".")[0] in ("pickle", "dill", "joblib") for n in names)
        if isinstance(node, ast.keyword):
            assert node.arg != "trust_remote_code"


# --------------------------------------------------------------------------- lying safetensors headers


def write_safetensors(path: Path, header: dict, data: bytes, *, length: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    "case, header, data, length",
    [
        ("header runs past the end", GOOD, bytes(16), 10_000),
        ("huge header length", GOOD, bytes(16), 2**62),
        (
            "offsets beyond the file",
            {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 1600]}},
            bytes(16),
            None,
        ),
        (
            "shape disagrees with size",
            {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}},
            bytes(16),
            None,
        ),
        ("unknown dtype", {"w": {"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}}, bytes(16), None),
        (
            "negative shape",
            {"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}},
            bytes(16),
            None,
        ),
        (
            "overlapping tensors",
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            bytes(16),
            None,
        ),
        ("trailing bytes", GOOD, bytes(32), None),
        ("header is a list", [1, 2], bytes(16), None),
    ],
)
def test_lying_safetensors_headers_are_refused(tmp_path, case, header, data, length):
    path = write_safetensors(tmp_path / "model.safetensors", header, data, length=length)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", **UNET_CONFIG}))
    expect("corrupt_safetensors", read_safetensors_header, path)
    expect("corrupt_safetensors", load_pipeline, path)
    expect("corrupt_safetensors", load_unet_state, path, dummy_unet())


def test_not_json_header_and_short_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    expect("corrupt_safetensors", read_safetensors_header, path)
    path.write_bytes(b"\x01\x02")
    expect("corrupt_safetensors", read_safetensors_header, path)
    assert read_safetensors_header(write_safetensors(path, GOOD, bytes(16)))["w"].shape == (2, 2)


def test_lying_weights_inside_a_pipeline_folder(tmp_path, pipeline_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(pipeline_dir, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])  # truncated: offsets now point past the end
    expect("corrupt_safetensors", load_pipeline, bad)
    expect("corrupt_safetensors", describe_model, bad)


# --------------------------------------------------------------------------- wrong architectures and configs


def unet_folder(tmp_path: Path, config: dict, name: str = "u") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    save_file(dummy_unet().state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "config",
    [
        {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 32, **UNET_CONFIG},
        {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 32},
        {"_class_name": "UNet2DModel", "num_class_embeds": 10, **UNET_CONFIG},
        {"_class_name": "AutoencoderKL", "latent_channels": 4},
    ],
    ids=["conditional-unet", "text-model", "class-conditional", "vae"],
)
def test_wrong_architecture_is_refused(tmp_path, config):
    folder = unet_folder(tmp_path, config)
    expect("unsupported_architecture", load_pipeline, folder)
    expect("unsupported_architecture", describe_model, folder)


def test_wrong_pipeline_index_is_refused(tmp_path, pipeline_dir):
    import shutil

    for name, index in {
        "sd": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]},
        "evil-lib": {
            "_class_name": "DDPMPipeline",
            "unet": ["os", "system"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        },
        "extra": {
            "_class_name": "DDPMPipeline",
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
        },
    }.items():
        folder = tmp_path / name
        shutil.copytree(pipeline_dir, folder)
        (folder / "model_index.json").write_text(json.dumps(index))
        expect("unsupported_architecture", load_pipeline, folder)


def test_config_that_does_not_fit_the_weights(tmp_path):
    # A config asking for a (much) bigger model than the weights hold: refused before allocating it.
    folder = unet_folder(
        tmp_path, {"_class_name": "UNet2DModel", **UNET_CONFIG, "block_out_channels": [64, 128]}
    )
    expect("config_mismatch", load_pipeline, folder)
    absurd = unet_folder(
        tmp_path, {"_class_name": "UNet2DModel", **UNET_CONFIG, "layers_per_block": 10**9}, "x"
    )
    expect("invalid_config", load_pipeline, absurd)
    garbage = unet_folder(tmp_path, {}, "g")
    (garbage / "config.json").write_text("{not json")
    expect("invalid_config", load_pipeline, garbage)


def test_lineage_mismatch(tmp_path, pipeline_dir):
    other = dummy_unet(block_out_channels=(8, 32))
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    err = expect("lineage_mismatch", load_unet_state, tmp_path / "other.safetensors", dummy_unet())
    assert "shape" in str(err)
    partial = {k: v for i, (k, v) in enumerate(dummy_unet().state_dict().items()) if i % 2}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    assert "missing" in str(
        expect("lineage_mismatch", load_unet_state, tmp_path / "partial.safetensors", dummy_unet())
    )


def test_missing_paths_and_other_formats(tmp_path):
    expect("not_found", load_pipeline, tmp_path / "nope")
    expect("not_found", load_unet_state, tmp_path / "nope", dummy_unet())
    (tmp_path / "empty").mkdir()
    expect("not_found", load_pipeline, tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    expect("unsupported_format", load_pipeline, tmp_path / "notes.txt")
    expect("not_found", load_pipeline, "https://example.com/model.safetensors")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    expect("not_found", load_pipeline, tmp_path / "dangling")
