"""Typed, validated parameters of a Stable Diffusion (text-conditional) unlearning job.

Torch-free, like ``vdu_core.config`` (whose ``_Validated`` machinery this reuses): the API validates
job parameters with these classes. ``SDUnlearnConfig`` is chosen instead of ``UnlearnConfig`` when
the job's model is a ``StableDiffusionPipeline`` (``vdu_core.sd.models.is_sd_model``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from vdu_core.config import MAX_STEPS, _spec, _Validated
from vdu_core.errors import ConfigError

#: Methods for text-conditional models; ``vdu_core.sd.methods`` registers one class for each.
SD_METHOD_NAMES = ("vdu", "vdu_paper", "gradient_ascent", "esd")
TRAINABLE_MODES = ("full", "cross_attn", "lora")


@dataclass
class SDUnlearnConfig(_Validated):
    """Parameters of one SD unlearning run (``method`` + ``params`` of a job on an SD model).

    The loss terms and their normalisation are those of ``vdu_core.objective`` (mean over the
    trainable parameters for the stability term, per-element mean for the plasticity term), computed
    in the VAE's latent space and conditioned on the forget images' captions or the feature prompts.
    """

    method: Literal["vdu", "vdu_paper", "gradient_ascent", "esd"] = "vdu"
    trainable: Literal["full", "cross_attn", "lora"] = _spec(
        "cross_attn", doc="what moves: the whole UNet, its cross-attention (attn2) only, or LoRA adapters")
    lora_rank: int = _spec(4, ge=1, le=256, doc="rank of the LoRA adapters (trainable='lora')")
    lora_alpha: float | None = _spec(None, gt=0.0, le=1024.0, doc="LoRA alpha; default: the rank")
    gamma: float = _spec(0.5, ge=0.0, le=1.0, doc="weight of the stability regularizer")
    steps: int = _spec(200, ge=1, le=MAX_STEPS, doc="maximum optimisation steps")
    lr: float | None = _spec(None, gt=0.0, le=1.0, doc="Adam learning rate; default 1e-4 for LoRA, else 1e-5")
    batch_size: int = _spec(1, ge=1, le=256, doc="forget latents per step")
    timestep_weighting: Literal["uniform", "elbo"] = "uniform"
    t_min: int = _spec(0, ge=0, doc="smallest timestep sampled")
    t_max: int | None = _spec(None, ge=1, doc="largest timestep (exclusive); default: the scheduler's")
    posterior: Literal["auto", "fisher", "isotropic"] = _spec(
        "auto", doc="'fisher': diagonal Fisher on the trainable parameters (data-free); 'auto' = fisher")
    posterior_sigma: float = _spec(1e-2, gt=0.0, doc="isotropic σ*, and the prior σ of the Fisher posterior")
    posterior_samples: int = _spec(16, ge=1, le=10000, doc="own (anchor) latents used for the Fisher")
    guidance_scale: float = _spec(1.0, gt=0.0, le=100.0, doc="η of the negative-guidance target")
    anchor_weight: float = _spec(1.0, ge=0.0, le=1e6, doc="λ of the function-space term on neutral prompts")
    anchor_samples: int = _spec(8, ge=0, le=4096, doc="own latents generated from neutral prompts (anchors)")
    anchor_sample_steps: int = _spec(20, ge=2, le=1000, doc="inference steps used to draw the anchors")
    prompts: list[str] | None = _spec(
        None, doc="prompts naming the feature (added to the forget set's prompts.txt)")
    neutral_prompts: list[str] | None = _spec(
        None, doc="prompts whose outputs must not change (default: the prompt set 'neutral-v1')")
    esd_source: Literal["forget", "self"] = _spec(
        "forget", doc="esd: x_t from the noised forget latents, or (as the ESD paper) from the model's own "
                      "sampler conditioned on the feature prompt, stopped at a random step")
    esd_sample_steps: int = _spec(50, ge=2, le=1000, doc="esd_source='self': DDIM steps of the full trajectory")
    gradient_checkpointing: Literal["auto", "on", "off"] = _spec(
        "auto", doc="'auto': on with CUDA (saves activation memory), off on the CPU")
    probe_every: int = _spec(10, ge=1, doc="steps between measurements of the forget-set loss ratio")
    seed: int = _spec(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"

    method_defaults: typing.ClassVar[dict[str, dict[str, Any]]] = {
        "vdu": {},
        "vdu_paper": {"anchor_weight": 0.0},
        "gradient_ascent": {"gamma": 0.0, "anchor_weight": 0.0},
        "esd": {"gamma": 0.0, "anchor_weight": 0.0},
    }

    def validate(self, *, prefix: str = "params") -> None:
        super().validate(prefix=prefix)
        if self.method != "vdu" and self.anchor_weight != 0.0:
            raise ConfigError(f"anchor_weight is a term of method 'vdu' only, not {self.method!r}",
                              field=f"{prefix}.anchor_weight")
        if self.method in ("gradient_ascent", "esd") and self.gamma != 0.0:
            raise ConfigError(f"method {self.method!r} has no stability term: gamma must be 0",
                              field=f"{prefix}.gamma")
        if self.method != "esd" and self.esd_source != "forget":
            raise ConfigError("esd_source is a parameter of method 'esd'", field=f"{prefix}.esd_source")
        if self.t_max is not None and self.t_max <= self.t_min:
            raise ConfigError("t_max must be greater than t_min", field=f"{prefix}.t_max")
        for name in ("prompts", "neutral_prompts"):
            value = getattr(self, name)
            if value is not None and (len(value) > 256 or any(not p.strip() for p in value)):
                raise ConfigError(f"{name} must hold 1 to 256 non-empty prompts", field=f"{prefix}.{name}")
        if self.neutral_prompts is not None and not self.neutral_prompts:
            raise ConfigError("neutral_prompts must not be empty", field=f"{prefix}.neutral_prompts")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return 1e-4 if self.trainable == "lora" else 1e-5


@dataclass
class SDEvalConfig(_Validated):
    """The evidence of an SD run: feature presence on a versioned prompt set, quality on neutral prompts.

    ``detector`` names a registered detector (``vdu_core.sd.detectors``: ``nudenet`` with the extra
    ``nudity``, the built-in colour detectors, or an operator's entry point); null skips the
    feature-presence rate (recorded as not computed).
    """

    enabled: bool = True
    detector: str | None = _spec(None, doc="a registered detector name (see vdu_core.sd.detectors)")
    detector_threshold: float = _spec(0.5, ge=0.0, le=1.0, doc="score at or above which a feature is present")
    feature_prompt_set: str | None = _spec(
        None, doc="a versioned built-in prompt set (e.g. 'nudity-v1'); default: the forget set's prompts")
    neutral_prompt_set: str = _spec("neutral-v1", doc="a versioned built-in prompt set of neutral prompts")
    images_per_prompt: int = _spec(2, ge=1, le=64)
    max_prompts: int = _spec(16, ge=1, le=1000, doc="prompts used from each set (in order)")
    num_inference_steps: int = _spec(25, ge=2, le=1000)
    guidance_scale: float = _spec(7.5, ge=0.0, le=50.0, doc="classifier-free guidance of the evaluation images")
    grid_samples: int = _spec(16, ge=1, le=256)
    seed: int = _spec(1234, ge=0, le=2**31 - 1)


def _sd_only_fields() -> frozenset[str]:
    import dataclasses

    from vdu_core.config import UnlearnConfig

    return frozenset(f.name for f in dataclasses.fields(SDUnlearnConfig)) - {
        f.name for f in dataclasses.fields(UnlearnConfig)}


#: Parameters only SD jobs have: they mark a job on an uninspected (hub/URL) model as an SD job.
SD_ONLY_FIELDS = _sd_only_fields()

