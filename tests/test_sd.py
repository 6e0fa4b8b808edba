"""Stable Diffusion feature unlearning on tiny components built from configs (CPU, no download,
fixed seeds), as diffusers' own pipeline tests do: the loss, each trainable mode, the posterior,
captions, output loading and the ESD baseline."""

from __future__ import annotations

import io
import json
import shutil
import zipfile

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vdu_core.errors import ConfigError, ForgetSetError, ModelLoadError  # noqa: E402
from vdu_core.forget_set import decode_forget_set, decode_forget_set_with_texts, parse_texts  # noqa: E402
from vdu_core.sd.config import SDEvalConfig, SDUnlearnConfig  # noqa: E402


def red_forget_zip(n: int = 4, captions: str = "jsonl") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(n):
            b = io.BytesIO()
            Image.new("RGB", (32, 32), (200 + 10 * i, 10, 20)).save(b, "PNG")
            z.writestr(f"img/red{i}.png", b.getvalue())
        if captions == "jsonl":
            z.writestr("img/captions.jsonl", "\n".join(
                json.dumps({"file": f"red{i}.png", "caption": f"a red square, number {i}"}) for i in range(2)))
        elif captions == "csv":
            z.writestr("captions.csv", "file_name,text\nimg/red0.png,a red square\nred1.png,\"red, square\"\n")
        z.writestr("prompts.txt", "# the feature\na red square\nred\n")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from vdu_core.sd.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe", seed=0)


@pytest.fixture()
def pipe(tiny_sd):
    from vdu_core.sd.models import load_sd_pipeline

    p = load_sd_pipeline(tiny_sd)
    p.set_progress_bar_config(disable=True)
    return p


def _data(pipe, n=4):
    from vdu_core.sd import train

    torch.manual_seed(0)
    latents = torch.randn(n, 4, 8, 8)
    strings = ["", "a red square", "a cat", "a house"]
    emb = train.encode_prompts(pipe, strings, torch.device("cpu"))
    return train.SDData(latents=latents, cond_idx=torch.ones(n, dtype=torch.long), feature_idx=torch.tensor([1]),
                        uncond_idx=0, emb=emb, anchors=torch.randn(4, 4, 8, 8), anchor_idx=torch.tensor([2, 3, 2, 3]))


# --------------------------------------------------------------------------- forget sets with captions


def test_captions_jsonl_csv_and_prompts_are_parsed_beside_the_images():
    images, texts = decode_forget_set_with_texts(red_forget_zip(captions="jsonl"))
    assert [i.name for i in images] == [f"img/red{i}.png" for i in range(4)]
    assert texts.captions == {"img/red0.png": "a red square, number 0", "img/red1.png": "a red square, number 1"}
    assert texts.prompts == ["a red square", "red"]
    _, texts = decode_forget_set_with_texts(red_forget_zip(captions="csv"))
    assert texts.captions == {"img/red0.png": "a red square", "img/red1.png": "red, square"}
    # models without text conditioning ignore the text files
    assert len(decode_forget_set(red_forget_zip())) == 4


@pytest.mark.parametrize(
    ("name", "body", "rule"),
    [
        ("captions.jsonl", b'{"file": "nope.png", "caption": "x"}', "caption_without_image"),
        ("captions.jsonl", b"not json", "bad_captions"),
        ("captions.jsonl", b'{"file": "a.png", "caption": "x"}\n{"file": "a.png", "caption": "y"}', "bad_captions"),
        ("captions.jsonl", json.dumps({"file": "a.png", "caption": "x" * 1001}).encode(), "bad_captions"),
        ("prompts.txt", b"\xff\xfe", "bad_captions"),
    ],
)
def test_bad_captions_are_refused_naming_the_file(name, body, rule):
    with pytest.raises(ForgetSetError) as err:
        parse_texts({name: body}, ["a.png"])
    assert err.value.rule == rule and err.value.file == name and err.value.field == "forget_set"


# --------------------------------------------------------------------------- models


def test_pipeline_folder_loads_and_refuses_pickles_and_custom_components(tiny_sd, tmp_path):
    from vdu_core.sd.models import describe_sd_model, is_sd_model, load_sd_pipeline

    assert is_sd_model(tiny_sd) and describe_sd_model(tiny_sd)["family"] == "sd"
    bad = tmp_path / "pickled"
    shutil.copytree(tiny_sd, bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (bad / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelLoadError) as err:
        load_sd_pipeline(bad)
    assert err.value.rule == "pickle_refused"
    custom = tmp_path / "custom"
    shutil.copytree(tiny_sd, custom)
    index = json.loads((custom / "model_index.json").read_text())
    index["unet"] = ["my_module", "EvilUNet"]
    (custom / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        load_sd_pipeline(custom)
    assert err.value.rule == "unsupported_architecture"


def test_hub_id_at_a_pinned_revision_loads_offline_and_single_files_need_their_configs(tiny_sd, tmp_path,
                                                                                        monkeypatch):
    from tests.test_models_io import SHA, fake_hub_cache
    from vdu_core.sd.models import is_sd_model, load_sd_pipeline

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    fake_hub_cache(cache, "acme/tiny-sd", tiny_sd)
    assert is_sd_model("acme/tiny-sd", revision=SHA)
    assert load_sd_pipeline("acme/tiny-sd", revision=SHA).unet.config.cross_attention_dim == 32
    with pytest.raises(ModelLoadError) as err:
        load_sd_pipeline("acme/tiny-sd")
    assert err.value.rule == "revision_required"
    from safetensors.torch import save_file

    single = tmp_path / "sd-v1.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, single)
    assert is_sd_model(single)
    with pytest.raises(ModelLoadError) as err:
        load_sd_pipeline(single)
    assert err.value.rule == "missing_config"
    pickle = tmp_path / "sd-v1.ckpt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ModelLoadError) as err:
        load_sd_pipeline(pickle)
    assert err.value.rule == "pickle_refused"


# --------------------------------------------------------------------------- the loss and the methods


def test_vdu_target_without_caption_is_the_esd_target_and_terms_are_reported(pipe):
    from vdu_core.methods import get_sd_method
    from vdu_core.sd import train
    from vdu_core.sd.methods import SDBatch, esd_target, frozen_eps

    cfg = SDUnlearnConfig.from_dict({"batch_size": 2, "guidance_scale": 2.0})
    data = _data(pipe)
    unet = train.select_trainable(pipe.unet, cfg)
    ctx = train.SDContext(unet, train.frozen_original(unet, cfg), pipe.scheduler, cfg, torch.device("cpu"),
                          torch.Generator().manual_seed(0), data)
    x_t, t, noise = ctx.noised(data.latents[:2])
    emb = data.emb
    batch = SDBatch(data.latents[:2], noise, t, x_t, torch.ones(2), cond=emb[[1, 1]], feature=emb[[1, 1]],
                    uncond=emb[[0, 0]])
    eps_c, eps_p, eps_u = frozen_eps(ctx, x_t, t, batch.cond, batch.feature, batch.uncond)
    vdu_target = eps_c - (1 + cfg.guidance_scale) * (eps_p - eps_u)
    assert torch.allclose(vdu_target, esd_target(eps_p, eps_u, cfg.guidance_scale), atol=1e-5)
    terms = get_sd_method("vdu")(cfg).compute(ctx, batch)
    assert {"redirect", "plasticity", "function_space"} <= set(terms.report)
    assert terms.stability_scale == cfg.gamma and torch.isfinite(terms.loss)
    paper = get_sd_method("vdu_paper")(SDUnlearnConfig.from_dict({"method": "vdu_paper"})).compute(ctx, batch)
    assert paper.loss.item() == pytest.approx(-(1 - 0.5) * paper.report["plasticity"], rel=1e-5)


@pytest.mark.parametrize("mode", ["full", "cross_attn", "lora"])
def test_each_trainable_mode_moves_only_what_it_names(pipe, mode):
    from vdu_core.posterior import trainable
    from vdu_core.sd import train

    cfg = SDUnlearnConfig.from_dict({"trainable": mode, "steps": 2, "batch_size": 2, "lr": 1e-2,
                                     "posterior": "isotropic"})
    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    train.select_trainable(unet, cfg)
    names, params = trainable(unet)
    total = sum(p.numel() for p in unet.parameters())
    if mode == "cross_attn":
        assert names and all(".attn2." in n for n in names) and sum(p.numel() for p in params) < total / 4
    if mode == "lora":
        assert names and all("lora_" in n for n in names)
    data = _data(pipe)
    post = train.estimate_posterior(unet, pipe.scheduler, cfg, data.anchors, data.emb[data.anchor_idx])
    report = train.unlearn_sd(unet, pipe.scheduler, data, cfg, post)
    assert report.steps_run == 2 and {"stability", "redirect", "function_space"} <= set(report.history[-1])
    if mode == "lora":
        delta = train.trainable_delta(unet, cfg)
        assert delta and all(k.startswith("unet.") and "lora" in k for k in delta)
        train.merge_lora(unet, cfg)
    after = unet.state_dict()
    assert set(after) == set(before)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    if mode == "cross_attn":
        assert moved and all(".attn2." in k for k in moved)
    elif mode == "lora":
        assert moved and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in moved)
    else:
        assert len(moved) > len(names) / 2


def test_a_cancel_stops_the_sd_loop_at_the_next_step(pipe):
    from vdu_core.errors import Cancelled
    from vdu_core.sd import train

    cfg = SDUnlearnConfig.from_dict({"method": "esd", "steps": 50, "batch_size": 1})
    unet = train.select_trainable(pipe.unet, cfg)
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled, match="step 2 of 50"):
        train.unlearn_sd(unet, pipe.scheduler, _data(pipe), cfg, should_cancel=should_cancel)


def test_fisher_posterior_is_diagonal_over_what_moves_and_bounded_by_the_prior(pipe):
    from vdu_core.sd import train

    cfg = SDUnlearnConfig.from_dict({"trainable": "cross_attn", "posterior_samples": 3, "posterior_sigma": 0.05})
    unet = train.select_trainable(pipe.unet, cfg)
    data = _data(pipe)
    post = train.estimate_posterior(unet, pipe.scheduler, cfg, data.anchors, data.emb[data.anchor_idx])
    assert post.kind == "fisher" and post.info["samples"] == 3
    assert all(".attn2." in n for n in post.names)
    var = torch.cat([v.flatten() for v in post.var])
    assert (var > 0).all() and (var <= 0.05**2 + 1e-12).all() and (var < 0.05**2).any()
    iso = train.estimate_posterior(unet, pipe.scheduler, SDUnlearnConfig.from_dict(
        {"trainable": "cross_attn", "posterior": "isotropic"}), None, None)
    assert iso.kind == "isotropic" and torch.cat([v.flatten() for v in iso.var]).eq(1e-4).all()


def test_esd_baseline_lowers_its_own_loss(pipe):
    from vdu_core.sd import train

    cfg = SDUnlearnConfig.from_dict({"method": "esd", "steps": 8, "batch_size": 2, "lr": 3e-3, "t_min": 500})
    data = _data(pipe)
    unet = train.select_trainable(pipe.unet, cfg)
    report = train.unlearn_sd(unet, pipe.scheduler, data, cfg)
    losses = [h["esd"] for h in report.history]
    assert "stability" not in report.history[-1]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_esd_can_draw_x_t_from_the_models_own_sampler_as_the_paper_does(pipe):
    from vdu_core.sd import train

    cfg = SDUnlearnConfig.from_dict({"method": "esd", "esd_source": "self", "esd_sample_steps": 3, "steps": 2,
                                     "batch_size": 2})
    unet = train.select_trainable(pipe.unet, cfg)
    report = train.unlearn_sd(unet, pipe.scheduler, _data(pipe), cfg)
    assert report.steps_run == 2 and all(torch.isfinite(torch.tensor(h["esd"])) for h in report.history)
    with pytest.raises(ConfigError) as err:
        SDUnlearnConfig.from_dict({"esd_source": "self"})
    assert err.value.field == "params.esd_source"


def test_sd_config_refuses_what_a_method_does_not_have():
    with pytest.raises(ConfigError) as err:
        SDUnlearnConfig.from_dict({"method": "esd", "gamma": 0.3})
    assert err.value.field == "params.gamma"
    with pytest.raises(ConfigError) as err:
        SDUnlearnConfig.from_dict({"trainable": "attn"})
    assert err.value.field == "params.trainable"
    with pytest.raises(ConfigError) as err:
        SDEvalConfig.from_dict({"detector_threshold": 2}, prefix="evaluation")
    assert err.value.field == "evaluation.detector_threshold"


def acme_logo_detector():
    """An operator's detector plugin (entry point group ``vdu.detectors``): scores every image 0.9."""
    from vdu_core.sd.detectors import Detector

    return Detector("acme-logo", lambda images: [0.9] * len(images), "always 0.9 (test plugin)", "0.0.1")


def test_detectors_are_named_by_the_job_from_a_registry_of_builtins_and_operator_plugins(monkeypatch):
    from importlib import metadata

    from vdu_core.sd import detectors

    red, blue = Image.new("RGB", (8, 8), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))
    det = detectors.load_detector("builtin:color:red")
    assert det.score([red, blue]) == [1.0, 0.0] and det.version == "builtin-1"
    with pytest.raises(ConfigError) as err:
        detectors.load_detector("acme-logo")
    assert err.value.field == "evaluation.detector"
    plugin = metadata.EntryPoint(name="acme-logo", value="tests.test_sd:acme_logo_detector",
                                 group=detectors.ENTRY_POINT_GROUP)
    monkeypatch.setattr(detectors.metadata, "entry_points", lambda group=None: [plugin])
    assert "acme-logo" in detectors.detector_names()
    assert detectors.load_detector("acme-logo").score([red]) == [0.9]


# --------------------------------------------------------------------------- end to end in the library


def test_a_lora_run_writes_a_pipeline_that_plain_diffusers_loads_and_a_delta(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from vdu_core.sd.run import run_sd_unlearning

    forget = tmp_path / "red.zip"
    forget.write_bytes(red_forget_zip())
    cfg = SDUnlearnConfig.from_dict({"trainable": "lora", "steps": 3, "batch_size": 2, "anchor_samples": 2,
                                     "anchor_sample_steps": 2, "posterior_samples": 2})
    ev = SDEvalConfig.from_dict({"detector": "builtin:color:red", "images_per_prompt": 1, "num_inference_steps": 2,
                                 "max_prompts": 2, "grid_samples": 2})
    out = tmp_path / "out"
    result = run_sd_unlearning(tiny_sd, forget, out, cfg, ev, cache_dir=tmp_path / "cache")
    m = result.metrics
    assert m["feature_presence"]["threshold"] == 0.5 and m["feature_presence"]["num_samples"] == 2
    assert m["feature_presence"]["version"] == "builtin-1" and "prompts" in m["feature_presence"]
    assert {"neutral_pixel_change", "neutral_denoising_loss", "unlearning"} <= set(m)
    for grid in ("before", "after", "neutral_before", "neutral_after"):
        assert (out / "samples" / f"{grid}.png").is_file()
    record = json.loads((out / "metrics.json").read_text())["record"]
    assert record["forget_set"]["captions"] == 2 and record["posterior"]["kind"] == "fisher"
    assert (tmp_path / "cache" / "sd-latents").is_dir()

    loaded = StableDiffusionPipeline.from_pretrained(out)
    assert not any("lora" in k for k in loaded.unet.state_dict())
    delta = load_file(out / "delta" / "pytorch_lora_weights.safetensors")
    assert delta and all("lora" in k for k in delta)
    original = StableDiffusionPipeline.from_pretrained(tiny_sd)
    original.load_lora_weights(out / "delta")
    x, emb = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(1)), torch.randn(1, 77, 32)
    with torch.no_grad():
        via_delta = original.unet(x, 500, encoder_hidden_states=emb).sample
        merged = loaded.unet(x, 500, encoder_hidden_states=emb).sample
    assert torch.allclose(via_delta, merged, atol=1e-4)
    with torch.no_grad():
        image = loaded(["a cat"], num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def test_a_run_without_feature_prompts_is_refused(tiny_sd, tmp_path):
    from vdu_core.sd.run import run_sd_unlearning

    forget = tmp_path / "plain.zip"
    with zipfile.ZipFile(forget, "w") as z:
        b = io.BytesIO()
        Image.new("RGB", (32, 32), (255, 0, 0)).save(b, "PNG")
        z.writestr("a.png", b.getvalue())
    with pytest.raises(ConfigError) as err:
        run_sd_unlearning(tiny_sd, forget, tmp_path / "out", SDUnlearnConfig.from_dict({"steps": 1}),
                          SDEvalConfig(enabled=False), cache_dir=tmp_path / "cache")
    assert err.value.field == "params.prompts"


def test_the_nudenet_detector_scores_images_when_its_extra_is_installed():
    """The optional ``nudity`` extra (nudenet==3.4.2, whose wheel carries its ONNX model): the detector
    loads offline, names its version and scores clean images as showing nothing."""
    pytest.importorskip("nudenet")
    from PIL import Image

    from vdu_core.sd.detectors import load_detector

    detector = load_detector("nudenet")
    assert detector.name == "nudenet" and detector.version == "3.4.2"
    images = [Image.new("RGB", (64, 64), (200, 150, 120)), Image.new("RGB", (64, 64), (20, 40, 200))]
    scores = detector.score(images)
    assert len(scores) == 2 and all(0.0 <= s < 0.5 for s in scores)
