"""Metrics against hand computations, on hand-made predictions and dummy components.

The story: a healthy unlearning moves only the forgotten class; a collapse turns everything into one
blob. PUL reads 100 % for both; retained-kept, the largest class share and the collapse check tell
them apart.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from tests.conftest import make_tiny_unet
from vdu_core.classifier import DigitClassifier
from vdu_core.config import EvalConfig
from vdu_core.errors import ConfigError
from vdu_core.metrics import (
    COLLAPSE_LARGEST_SHARE_MAX,
    COLLAPSE_RETAINED_KEPT_MIN,
    class_histogram,
    classify,
    collapse_check,
    evaluate,
    evaluate_dirs,
    feature_stats,
    forget_set_loss,
    forget_set_loss_profile,
    format_table,
    frechet_distance,
    frechet_distance_from_stats,
    largest_class_share,
    load_classifier,
    null_steps,
    pul,
    retained_kept,
    timestep_grid,
    u_fid,
)
from vdu_core.reference import REFERENCE_DIR

HAS_BUILTIN = (REFERENCE_DIR / "classifier" / "model.safetensors").is_file()


def dummy_unet(sample_size: int = 16, seed: int = 0) -> UNet2DModel:
    return make_tiny_unet(seed=seed, sample_size=sample_size, attention=True)


def dummy_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def dummy_classifier(seed: int = 0) -> DigitClassifier:
    torch.manual_seed(seed)
    return DigitClassifier().eval()


# --- Fréchet distance ----------------------------------------------------------------------------


def test_frechet_1d_matches_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.0, 1.0, (400, 1)), rng.normal(3.0, 2.0, (300, 1))
    # 1-D Gaussians: d = (m1 - m2)^2 + (s1 - s2)^2 with the sample statistics.
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance_from_stats([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_2d_hand_computed():
    # Diagonal covariances: d = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    d = frechet_distance_from_stats([1.0, 2.0], np.diag([4.0, 9.0]), [0.0, 0.0], np.diag([1.0, 1.0]))
    assert d == pytest.approx(5.0 + 1.0 + 4.0)
    # Non-diagonal: S1 = [[2, 1], [1, 2]] has eigenvalues 3 and 1, so tr sqrt(S1 I) = sqrt(3) + 1 and
    # d = tr S1 + tr I - 2 (sqrt(3) + 1) = 4 - 2 sqrt(3).
    d = frechet_distance_from_stats([0.0, 0.0], [[2.0, 1.0], [1.0, 2.0]], [0.0, 0.0], np.eye(2))
    assert d == pytest.approx(4.0 - 2.0 * math.sqrt(3.0), abs=1e-12)


def test_frechet_general_case_matches_eigenvalues_of_product():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    lam = np.linalg.eigvals(s1 @ s2)  # real and positive: S1 S2 is similar to an SPD matrix
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(lam.real))
    assert frechet_distance_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_identical_and_singular_sets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    few = rng.normal(size=(4, 8))  # 4 samples in 8-d: singular covariance, still finite and >= 0
    d = frechet_distance(few, x)
    assert np.isfinite(d) and d >= 0
    mu, sigma = feature_stats(x)
    assert mu.shape == (8,) and sigma.shape == (8, 8) and sigma.dtype == np.float64
    with pytest.raises(ValueError):
        feature_stats(x[:1])


# --- Classifier-based metrics on hand-made predictions -------------------------------------------

BEFORE = torch.arange(100) % 10  # the original draws each digit 10 times


def test_pul_and_retained_kept_on_healthy_forgetting():
    after = BEFORE.clone()
    after[BEFORE == 0] = torch.tensor([6, 8] * 5)  # 0s become other digits; nothing else moves
    p = pul(BEFORE, after, 0, seed=5)
    assert p["value"] == 100.0 and p["n_before"] == 10 and p["n_after"] == 0
    assert p["num_samples"] == 100 and p["seed"] == 5 and "N_before(k)" in p["implementation"]
    rk = retained_kept(BEFORE, after, 0)
    assert rk["value"] == 1.0 and rk["num_retained"] == 90 and rk["to_forget_class"] == 0.0
    check = collapse_check(BEFORE, after, 0, u_fid_ratio=1.1)
    assert check["value"] is False and check["reasons"] == []
    assert largest_class_share(after)["value"] == pytest.approx(0.15)


def test_retained_kept_splits_by_the_originals_confidence():
    after = BEFORE.clone()
    conf = torch.full((100,), 0.99)
    conf[BEFORE == 2] = 0.5  # the original's twos are borderline
    after[BEFORE == 2] = 7  # ... and they are the ones that flip
    after[BEFORE == 0] = 6
    rk = retained_kept(BEFORE, after, 0, before_conf=conf)
    assert rk["value"] == pytest.approx(80 / 90)
    split = rk["by_confidence"]
    assert split["threshold"] == 0.9
    assert split["confident"] == {"n": 80, "kept": 1.0}
    assert split["unsure"] == {"n": 10, "kept": 0.0}
    assert "by_confidence" not in retained_kept(BEFORE, after, 0)
    everyone_sure = retained_kept(BEFORE, after, 0, before_conf=torch.ones(100))["by_confidence"]
    assert everyone_sure["unsure"] == {"n": 0, "kept": None}
    nan = retained_kept(BEFORE, after, 0, before_conf=torch.full((100,), float("nan")))["by_confidence"]
    assert nan["confident"]["n"] == 0 and nan["unsure"]["n"] == 90  # every retained sample lands in a bin
    with pytest.raises(ValueError, match="before_conf has 99 values for 100"):
        retained_kept(BEFORE, after, 0, before_conf=torch.ones(99))


def test_collapse_scores_full_pul_but_is_flagged():
    collapsed = torch.full((100,), 3)  # every sample one blob the classifier calls "3"
    assert pul(BEFORE, collapsed, 0)["value"] == 100.0
    rk = retained_kept(BEFORE, collapsed, 0)
    assert rk["value"] == pytest.approx(10 / 90)  # only the original 3s are "kept"
    assert rk["per_class"]["3"]["kept"] == 1.0 and rk["per_class"]["5"]["kept"] == 0.0
    share = largest_class_share(collapsed, num_classes=10)
    assert share["value"] == 1.0 and share["class"] == 3 and share["histogram"][3] == 100
    check = collapse_check(BEFORE, collapsed, 0, u_fid_ratio=20.0)
    assert check["value"] is True
    assert set(check["reasons"]) == {"retained_kept", "largest_class_share", "u_fid_ratio"}
    assert check["criteria"]["retained_kept"]["threshold"] == COLLAPSE_RETAINED_KEPT_MIN
    assert check["criteria"]["largest_class_share"]["threshold"] == COLLAPSE_LARGEST_SHARE_MAX


def test_partial_collapse_trips_one_criterion():
    after = BEFORE.clone()
    after[:60] = 7  # 60 % of the samples turn into 7s
    check = collapse_check(BEFORE, after, 0)
    assert check["value"] is True and "largest_class_share" in check["reasons"]
    assert check["criteria"]["u_fid_ratio"]["skipped"]


def test_pul_is_not_clipped_and_undefined_without_forget_samples():
    after = BEFORE.clone()
    after[BEFORE == 1] = 0  # the "unlearned" model draws 0 twice as often
    assert pul(BEFORE, after, 0)["value"] == -100.0
    no_zero = torch.arange(1, 10).repeat(3)
    p = pul(no_zero, no_zero, 0)
    assert p["value"] is None and p["computed"] is False and "no sample of class 0" in p["reason"]
    with pytest.raises(ValueError, match="differ in length"):
        pul(BEFORE, BEFORE[:5], 0)
    with pytest.raises(ValueError):
        pul(BEFORE.float(), BEFORE, 0)


def test_histogram_and_retained_kept_without_retained_samples():
    assert class_histogram(torch.tensor([0, 2, 2]), 4) == [1, 0, 2, 0]
    only_k = torch.zeros(8, dtype=torch.long)
    rk = retained_kept(only_k, only_k, 0)
    assert rk["value"] is None and rk["reason"]
    assert collapse_check(only_k, only_k, 0)["criteria"]["retained_kept"]["fired"] is False


# --- Classifier loading and classification -------------------------------------------------------


def test_load_classifier_refusals(tmp_path):
    for spec in ("builtin:cifar10", "", str(tmp_path / "missing")):
        with pytest.raises(ConfigError) as exc:
            load_classifier(spec)
        assert exc.value.field == "evaluation.classifier"
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "model.pt").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="model.safetensors"):
        load_classifier(str(pickled))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_classifier(str(broken))


def test_load_custom_folder_and_classify_converts_inputs(tmp_path):
    dummy_classifier().save(tmp_path / "clf")
    clf = load_classifier(str(tmp_path / "clf"))
    assert clf.vdu_info["name"] == "vdu-mnist-cnn-v1" and len(clf.vdu_info["weights_sha256"]) == 64
    torch.manual_seed(0)
    rgb = torch.rand(5, 3, 16, 16) * 2 - 1
    preds, conf = classify(clf, rgb, batch_size=2)
    assert preds.dtype == torch.long and preds.shape == (5,)
    assert conf.dtype == torch.float32 and bool(((conf > 0) & (conf <= 1)).all())
    preds_full, _ = classify(clf, rgb, batch_size=256)
    assert torch.equal(preds, preds_full)


def test_u_fid_names_its_feature_network():
    clf = dummy_classifier()
    torch.manual_seed(0)
    x = torch.rand(20, 1, 28, 28) * 2 - 1
    rec = u_fid(x, x, clf, seed=3)
    assert rec["value"] == pytest.approx(0.0, abs=1e-6)
    assert "penultimate features (128-d)" in rec["implementation"]
    assert "not Inception" in rec["implementation"]
    assert rec["num_samples"] == 20 and rec["seed"] == 3 and "singular" in rec["note"]
    assert u_fid(x[:10], x[10:], clf)["value"] > 0


# --- Forget-set loss -----------------------------------------------------------------------------


def test_forget_set_loss_equal_for_identical_models_and_reproducible():
    unet, sched = dummy_unet(8), dummy_scheduler()
    twin = copy.deepcopy(unet)
    torch.manual_seed(1)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    a = forget_set_loss(unet, sched, images, seed=0, timesteps=4)
    assert a == forget_set_loss(twin, sched, images, seed=0, timesteps=4)
    rebatched = forget_set_loss(unet, sched, images, seed=0, timesteps=4, batch_size=4)
    assert a == pytest.approx(rebatched, rel=1e-6)
    assert a != forget_set_loss(unet, sched, images, seed=1, timesteps=4)
    prof = forget_set_loss_profile(unet, sched, images, seed=0, timesteps=[0, 500, 999], repeats=2)
    assert prof["timesteps"] == [0, 500, 999] and len(prof["per_timestep"]) == 3
    assert prof["value"] == pytest.approx(np.mean(prof["per_timestep"]))
    assert timestep_grid(1000, 10)[0] == 0 and timestep_grid(1000, 10)[-1] == 999
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert forget_set_loss(twin, sched, images, seed=0, timesteps=4) != a
    with pytest.raises(ValueError):
        forget_set_loss(unet, sched, torch.zeros(2, 3, 8, 8), seed=0)


# --- evaluate() end to end -----------------------------------------------------------------------


def _pipes():
    unet = dummy_unet(16)
    original = DDPMPipeline(unet=unet, scheduler=dummy_scheduler())
    unlearned = DDPMPipeline(unet=copy.deepcopy(unet), scheduler=dummy_scheduler())
    return original, unlearned


def test_evaluate_without_forget_class_needs_no_classifier(tmp_path):
    original, unlearned = _pipes()
    original.save_pretrained(tmp_path / "orig")
    unlearned.save_pretrained(tmp_path / "unl")
    cfg = EvalConfig(forget_class=None, classifier="/nonexistent", num_samples=8, grid_samples=4,
                     sample_steps=2)
    forget = torch.rand(4, 1, 16, 16) * 2 - 1
    res = evaluate_dirs(tmp_path / "orig", tmp_path / "unl", forget, cfg, out_dir=tmp_path / "out")
    m = res["metrics"]
    assert m["forget_loss_ratio"]["value"] == pytest.approx(1.0)
    assert m["pul"]["computed"] is False and "forget_class" in m["pul"]["reason"]
    assert (tmp_path / "out" / "samples" / "before.png").is_file()
    json.dumps(res)
    assert "not computed" in format_table(res)


def test_evaluate_refuses_a_bad_classifier_before_sampling():
    original, unlearned = _pipes()
    cfg = EvalConfig(forget_class=0, classifier="builtin:imagenet", num_samples=8, sample_steps=2)
    with pytest.raises(ConfigError) as exc:
        evaluate(original, unlearned, None, cfg, on_progress=lambda *a: pytest.fail("sampled"))
    assert exc.value.field == "evaluation.classifier"


@pytest.mark.skipif(not HAS_BUILTIN, reason="reference/classifier not trained: scripts/train_reference.py")
def test_evaluate_end_to_end_with_builtin_classifier(tmp_path):
    original, unlearned = _pipes()
    cfg = EvalConfig(forget_class=0, num_samples=8, grid_samples=6, sample_steps=2, seed=7, null_yardstick=True)
    torch.manual_seed(0)
    forget = torch.rand(4, 1, 16, 16) * 2 - 1
    phases = []
    res = evaluate(original, unlearned, forget, cfg, out_dir=tmp_path,
                   on_progress=lambda phase, done, total: phases.append(phase))
    json.dumps(res)  # JSON-serialisable
    m = res["metrics"]
    for key in ("pul", "retained_kept", "largest_class_share_before", "largest_class_share_after",
                "u_fid_original", "u_fid_unlearned", "u_fid_ratio", "forget_loss_before",
                "forget_loss_after", "forget_loss_ratio", "collapse"):
        assert "implementation" in m[key], key
        assert m[key]["seed"] == 7, key
    # Identical weights: same samples, so nothing forgotten, everything kept, no collapse.
    assert m["retained_kept"]["value"] in (1.0, None)
    if m["retained_kept"]["value"] is not None:  # the split by the original's confidence covers every retained one
        split = m["retained_kept"]["by_confidence"]
        assert split["confident"]["n"] + split["unsure"]["n"] == m["retained_kept"]["num_retained"]
    assert m["pul"]["value"] in (0.0, None)
    assert m["u_fid_original"]["value"] == pytest.approx(m["u_fid_unlearned"]["value"])
    assert "not Inception" in m["u_fid_original"]["implementation"]
    assert m["u_fid_original"]["num_real"] == 4500
    assert "resized 16x16" in m["pul"]["input_conversion"]
    assert m["forget_loss_ratio"]["value"] == pytest.approx(1.0)
    assert res["collapsed"] is False
    assert {"sample_original", "sample_unlearned", "classify", "u_fid", "forget_loss", "sample_null"} <= set(phases)
    # the yardstick: the original against itself with twice the steps, split by confidence like retained_kept
    null = m["retained_kept_null"]
    assert null["null_sample_steps"] == 4 and "DDIM-4 instead of DDIM-2" in null["implementation"]
    assert null["seed"] == 7 and null["num_samples"] == 8
    assert null["value"] is None or 0.0 <= null["value"] <= 1.0
    assert "retained-kept, null yardstick" in format_table(res)
    for name in ("before.png", "after.png"):
        with Image.open(tmp_path / "samples" / name) as img:
            assert img.size == (6 * 18 + 2, 18 + 2)
    table = format_table(res)
    assert "PUL" in table and "u-FID, original" in table and "collapse" in table
    assert "8 paired samples, seed 7" in table


@pytest.mark.skipif(not HAS_BUILTIN, reason="reference/classifier not trained: scripts/train_reference.py")
def test_null_yardstick_steps_and_switch():
    assert null_steps(25, 1000) == 50 and null_steps(600, 1000) == 300 and null_steps(1, 1) == 1
    original, unlearned = _pipes()
    cfg = EvalConfig(forget_class=0, num_samples=8, sample_steps=2)  # off by default: it costs a sampling pass
    phases = []
    res = evaluate(original, unlearned, None, cfg, on_progress=lambda phase, done, total: phases.append(phase))
    assert "retained_kept_null" not in res["metrics"] and "sample_null" not in phases
    with pytest.raises(ConfigError) as exc:
        EvalConfig.from_dict({"null_yardstick": "yes"}, prefix="evaluation")
    assert exc.value.field == "evaluation.null_yardstick"


def test_format_table_accepts_a_run_record():
    # vdu_core.run stores the metrics with extra, non-metric records beside them.
    metrics = {"pul": pul(BEFORE, BEFORE, 0, seed=1), "collapse": collapse_check(BEFORE, BEFORE, 0),
               "unlearning": {"steps_run": 3, "implementation": "loop record"},
               "evaluation_record": {"evaluation": {"num_samples": 100, "seed": 1, "forget_class": 0}}}
    table = format_table({"metrics": metrics})
    names = [line.split("  ")[0] for line in table.splitlines()]
    assert "0.0 (10 -> 10)" in table and "unlearning" not in names and "evaluation_record" not in table
    conf = torch.where(BEFORE == 2, 0.5, 0.99)
    split = format_table({"metrics": {"retained_kept": retained_kept(BEFORE, BEFORE, 0, before_conf=conf)}})
    assert ("1.000 (originals the classifier was sure of / unsure of: confident 1.000 of 80, "
            "unsure 1.000 of 10)") in split
    assert "100 paired samples, seed 1" in table


def _patterns(kind: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """16x16 images in [-1, 1]: a bright block at one of four places (``kind``), plus a little noise."""
    x = -torch.ones(len(kind), 1, 16, 16)
    for i, k in enumerate(kind.tolist()):
        r, c = divmod(int(k), 2)
        x[i, :, r * 8 + 1 : r * 8 + 7, c * 8 + 1 : c * 8 + 7] = 1.0
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def test_data_free_forgetting_reads_the_vote_on_the_paired_samples():
    """Without a classifier: the forget-like share of the original's samples, and how many fewer the unlearned
    model draws, each unlearned sample voted in place of its paired original one."""
    from vdu_core.metrics import data_free_forgetting

    unet, sch = dummy_unet(16).eval(), dummy_scheduler()
    g = torch.Generator().manual_seed(0)
    i = torch.arange(48)
    kind = torch.where(i % 8 == 0, 0, 1 + i % 3)  # every eighth sample is of kind 0, the kind to forget
    before = _patterns(kind, g)
    forget = _patterns(torch.zeros(12, dtype=torch.long), g)
    same = data_free_forgetting(unet, sch, before, before.clone(), forget, seed=3)
    assert same["forget_like_drop"]["value"] == 0.0 and same["moved_other"]["value"] == 0.0
    assert same["forget_like_drop"]["n_before"] == 6  # exactly the kind-0 samples
    after = before.clone()
    after[kind == 0] = _patterns(torch.ones(6, dtype=torch.long), g)  # they now draw kind 1
    res = data_free_forgetting(unet, sch, before, after, forget, seed=3)
    rec = res["forget_like_drop"]
    assert (rec["value"], rec["n_after"], rec["seed"]) == (100.0, 0, 3)
    assert res["moved_forget_like"]["value"] > 0.5 and res["moved_other"]["value"] == 0.0
    json.dumps(res)
    far = data_free_forgetting(unet, sch, before[kind != 0], before[kind != 0], forget, seed=3)
    assert far["forget_like_drop"]["computed"] is False and "none" in far["forget_like_drop"]["reason"]
    with pytest.raises(ValueError, match="forget images"):
        data_free_forgetting(unet, sch, before, after, forget[:0], seed=3)
