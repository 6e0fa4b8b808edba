"""Typed, validated configuration of an unlearning run and of its evaluation.

Torch-free on purpose: the API validates job parameters with these classes without importing torch.
``from_dict`` refuses unknown fields, wrong types and out-of-range values with a ``ConfigError``
whose ``field`` names the parameter (``params.gamma``), so every bad input gets a precise answer.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from vdu_core.errors import ConfigError

#: Method names; ``vdu_core.methods`` registers one class for each (a test keeps them in step).
METHOD_NAMES = ("vdu", "vdu_paper", "gradient_ascent")
POSTERIOR_KINDS = ("auto", "lineage", "self_snapshots", "fisher", "isotropic")


def _spec(default, *, ge=None, le=None, gt=None, lt=None, doc: str = "", factory=None):
    meta = {"ge": ge, "le": le, "gt": gt, "lt": lt, "doc": doc}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Validated:
    """Mixin: build from a dict with strict checks; serialise back to plain JSON types."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, prefix: str = "params"):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix} must be an object", field=prefix)
        data = dict(data)
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown parameter {unknown[0]!r}; known: {', '.join(sorted(known))}",
                field=f"{prefix}.{unknown[0]}",
            )
        kwargs = {}
        defaults = getattr(cls, "method_defaults", None)
        if defaults is not None:
            method = data.get("method", "vdu")
            if method in defaults:
                for name, value in defaults[method].items():
                    data.setdefault(name, value)
        # then the chosen target's own defaults for what is still left out (the method's win)
        for name, value in getattr(cls, "target_defaults", {}).get(data.get("plasticity_target"), {}).items():
            data.setdefault(name, value)
        for name, value in data.items():
            kwargs[name] = _coerce(value, hints[name], known[name], f"{prefix}.{name}")
        obj = cls(**kwargs)
        obj.validate(prefix=prefix)
        return obj

    def validate(self, *, prefix: str = "params") -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _coerce(getattr(self, f.name), hints[f.name], f, f"{prefix}.{f.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value, hint, f: dataclasses.Field, name: str):
    origin = get_origin(hint)
    args = get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], f, name)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(repr, args))}; got {value!r}", field=name)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false; got {value!r}", field=name)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and math.isfinite(value):
                value = int(value)
            else:
                raise ConfigError(f"{name} must be an integer; got {value!r}", field=name)
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number; got {value!r}", field=name)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number; got {value!r}", field=name)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string; got {value!r}", field=name)
        if len(value) > 1000 or any(ord(c) < 32 for c in value):
            raise ConfigError(f"{name} must be a short printable string", field=name)
        return value
    elif origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} must be a list; got {value!r}", field=name)
        return [_coerce(v, args[0], f, f"{name}[{i}]") for i, v in enumerate(value)]
    m = f.metadata
    if m.get("ge") is not None and value < m["ge"]:
        raise ConfigError(f"{name} must be >= {m['ge']}; got {value}", field=name)
    if m.get("le") is not None and value > m["le"]:
        raise ConfigError(f"{name} must be <= {m['le']}; got {value}", field=name)
    if m.get("gt") is not None and value <= m["gt"]:
        raise ConfigError(f"{name} must be > {m['gt']}; got {value}", field=name)
    if m.get("lt") is not None and value >= m["lt"]:
        raise ConfigError(f"{name} must be < {m['lt']}; got {value}", field=name)
    return value


#: Hard ceilings an operator may lower (the service passes its own max_steps to ``check_limits``).
MAX_STEPS = 20000


@dataclass
class UnlearnConfig(_Validated):
    """Parameters of one unlearning run (``method`` + ``params`` of a job).

    Normalisation (see ``vdu_core.objective``): the stability term is the *mean* over trainable
    parameters of (θ−μ*)²/(2σ*²) and the plasticity term the mean squared error per element, so
    γ weighs two O(1) quantities whatever the model's size.
    """

    method: Literal["vdu", "vdu_paper", "gradient_ascent"] = "vdu"
    gamma: float = _spec(
        0.0, ge=0.0, le=1.0,
        doc="weight of the diagonal stability regularizer (the plasticity term gets 1 - gamma); the default "
            "target holds the model with the Kronecker-factored Laplace term (laplace_weight) instead",
    )
    steps: int = _spec(150, ge=1, le=MAX_STEPS, doc="maximum optimisation steps (the forget-image targets: 400)")
    lr: float = _spec(2e-4, gt=0.0, le=1.0,
                      doc="Adam learning rate (the peak of the schedule; the forget-image targets: 1e-4, constant)")
    lr_schedule: Literal["constant", "cosine"] = _spec(
        "cosine", doc="'cosine': linear warm-up over the first 5 % of the steps, then cosine decay to 0")
    batch_size: int = _spec(
        64, ge=1, le=1024,
        doc="forget points (and anchor points) per step (the trajectory target sends both through the network in "
            "one pass of twice this; the forget-image targets: 16)")
    timestep_weighting: Literal["uniform", "elbo"] = "uniform"
    t_min: int = _spec(0, ge=0, doc="smallest timestep sampled for the plasticity term")
    t_max: int | None = _spec(None, ge=1, doc="largest timestep (exclusive); default: the scheduler's")
    posterior: Literal["auto", "lineage", "self_snapshots", "fisher", "isotropic"] = "auto"
    posterior_sigma: float = _spec(1e-2, gt=0.0, doc="isotropic σ*, and the floor of estimated σ*")
    posterior_samples: int = _spec(256, ge=8, le=100000, doc="self-generated samples for data-free posteriors")
    posterior_steps: int = _spec(200, ge=1, le=100000, doc="continued-training steps for self_snapshots")
    grad_clip: float | None = _spec(
        None, gt=0.0, doc="global gradient-norm clip; null for none (the forget-image targets clip at 1)")
    plasticity_bound: float | None = _spec(
        3.0, gt=1.0,
        doc="per sample, push the forget loss to at most this multiple of the original model's (null: unbounded)",
    )
    plasticity_target: Literal["trajectory", "ascent", "negative_guidance"] = _spec(
        "trajectory",
        doc="vdu: 'trajectory' regresses the denoiser, on the original's own DDIM paths that end forget-like, "
            "toward the empirical denoiser of its other samples, and anchors the other paths "
            "(vdu_core.trajectory); 'ascent' raises the forget loss (bounded); 'negative_guidance' regresses the "
            "denoiser on noised forget images to the original's prediction guided away from the forget set's "
            "empirical score",
    )
    guidance_scale: float = _spec(2.5, gt=0.0, le=100.0,
                                  doc="η of the trajectory or negative guidance target (negative guidance: 5)")
    push_band: list[float] = _spec(
        None, ge=0.0, le=1.0, factory=lambda: [0.3, 0.7],
        doc="trajectory: the noise levels pushed, [low, high) as fractions of the training timesteps",
    )
    trajectory_steps: int = _spec(25, ge=2, le=1000, doc="trajectory: DDIM steps of the recorded paths")
    anchor_margin: int = _spec(
        1, ge=0, le=10,
        doc="trajectory: leave out of the anchors and push targets the paths the vote is not sure are retained, "
            "those with at least this many forget images or forget-like paths among their 10 nearest (0: off)",
    )
    vote_spread: int = _spec(
        0, ge=0, le=10,
        doc="trajectory: also push the paths with at least this many forget images or forget-like paths among "
            "their 10 nearest, repeated up to 3 times (the vote spread through the neighbours; 0: off)",
    )
    guidance_weighting: Literal["uniform", "posterior", "odds"] = _spec(
        "posterior",
        doc="negative_guidance: push every forget input by η ('uniform'), by η × the kernel posterior r that the "
            "input is forget-like rather than the model's other output ('posterior'), or by η × r/(1−r), the "
            "exact shift to the model conditioned on not-forget ('odds', capped); both also applied to anchors",
    )
    forget_prior: float = _spec(0.1, gt=0.0, lt=1.0, doc="prior share of forget-like output ('posterior' weighting)")
    posterior_space: Literal["pixels", "features"] = _spec(
        "pixels",
        doc="'posterior'/'odds' weighting: kernel densities on pixels, or a k-NN density ratio in the original "
            "model's own mid-block features ('features'; bench/bench_posterior.py --features)",
    )
    posterior_bandwidth: float = _spec(
        0.0, ge=0.0, le=1e6,
        doc="'posterior'/'odds' weighting: blur each kernel in clean space by this multiple of the forget set's "
            "median nearest-neighbour squared distance (per pixel); 0: the exact empirical kernels",
    )
    anchor_weight: float = _spec(
        10.0, ge=0.0, le=1e6,
        doc="λ of the function-space term (0: off); with the trajectory target each anchor point is also "
            "weighted by its sampler step's sensitivity",
    )
    laplace_weight: float = _spec(
        1e4, ge=0.0, le=1e9,
        doc="weight of the Kronecker-factored Laplace stability term (vdu only; 0: off): the Gauss-Newton of the "
            "original's outputs on its own noised samples, weighted by the sampler's per-step sensitivity "
            "(vdu_core.laplace)",
    )
    laplace_points: int = _spec(512, ge=16, le=100000, doc="noised own samples the Laplace factors are measured on")
    step_direction: Literal["adam", "natural"] = _spec(
        "adam",
        doc="vdu with the Laplace term: the direction of each step; 'natural': the K-FAC natural gradient of the "
            "gradient's momentum (damping ``natural_damping``), moved as far in the Laplace term's metric as Adam's "
            "step would move (only the direction differs; docs/quality-study.md, section 19)",
    )
    natural_damping: float = _spec(
        10.0, gt=0.0, le=1e6,
        doc="step_direction 'natural': each Kronecker factor's damping, a multiple of its mean eigenvalue",
    )
    anchor_samples: int = _spec(
        2048, ge=0, le=100000,
        doc="own samples of the original model used as anchors (trajectory: the paths recorded)",
    )
    anchor_exclude_fraction: float = _spec(
        0.0, ge=0.0, lt=1.0, doc="share of anchors nearest the forget set left out"
    )
    self_forget_fraction: float = _spec(
        0.0, ge=0.0, lt=1.0,
        doc="share of the original's own samples nearest the forget set added to the forget set (vdu only)",
    )
    guard_every: int = _spec(0, ge=0, doc="steps between guard checks of a fixed-seed sample (0: off)")
    guard_samples: int = _spec(64, ge=4, le=4096, doc="fixed-seed samples the guard watches")
    guard_sample_steps: int = _spec(10, ge=2, le=1000, doc="DDIM steps of the guard's samples")
    guard_max_drift: float = _spec(
        0.35, gt=0.0, doc="roll back and stop once retained samples move more than this (see vdu_core.guard)"
    )
    probe_every: int = _spec(10, ge=1, doc="steps between measurements of the forget-set loss ratio")
    target_loss_ratio: float | None = _spec(
        None, gt=1.0, doc="stop once the forget-set loss reaches this multiple of its initial value"
    )
    seed: int = _spec(0, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"

    #: Per-method defaults applied by ``from_dict`` to the fields a caller leaves out. The literal
    #: paper objective and gradient ascent have neither the bound nor the function-space term.
    method_defaults: typing.ClassVar[dict[str, dict[str, Any]]] = {
        "vdu": {},
        "vdu_paper": {"plasticity_bound": None, "anchor_weight": 0.0, "self_forget_fraction": 0.0,
                      "plasticity_target": "ascent", "laplace_weight": 0.0},
        "gradient_ascent": {"gamma": 0.0, "plasticity_bound": None, "anchor_weight": 0.0,
                            "self_forget_fraction": 0.0, "plasticity_target": "ascent", "laplace_weight": 0.0},
    }
    #: Then the defaults of the plasticity target, for fields still left out. The dataclass defaults are
    #: the trajectory target's (the product default); the forget-image targets keep the settings they
    #: were studied with (docs/quality-study.md, sections 1-5).
    _FORGET_IMAGE_DEFAULTS: typing.ClassVar[dict[str, Any]] = {
        "gamma": 0.5, "steps": 400, "batch_size": 16, "anchor_weight": 1.0, "anchor_samples": 512,
        "laplace_weight": 0.0, "laplace_points": 1024, "guidance_scale": 5.0, "grad_clip": 1.0,
        "lr": 1e-4, "lr_schedule": "constant",
    }
    target_defaults: typing.ClassVar[dict[str, dict[str, Any]]] = {
        "ascent": _FORGET_IMAGE_DEFAULTS,
        "negative_guidance": _FORGET_IMAGE_DEFAULTS,
    }

    def validate(self, *, prefix: str = "params") -> None:
        super().validate(prefix=prefix)
        if self.method != "vdu":
            if self.anchor_weight != 0.0:
                raise ConfigError(f"anchor_weight is a term of method 'vdu' only, not {self.method!r}",
                                  field=f"{prefix}.anchor_weight")
            if self.laplace_weight != 0.0:
                raise ConfigError(f"laplace_weight is a term of method 'vdu' only, not {self.method!r}",
                                  field=f"{prefix}.laplace_weight")
            if self.plasticity_bound is not None:
                raise ConfigError(f"plasticity_bound is a term of method 'vdu' only, not {self.method!r}",
                                  field=f"{prefix}.plasticity_bound")
            if self.plasticity_target != "ascent":
                raise ConfigError(f"method {self.method!r} raises the forget loss: plasticity_target must be "
                                  "'ascent'", field=f"{prefix}.plasticity_target")
            if self.self_forget_fraction != 0.0:
                raise ConfigError(f"self_forget_fraction is a part of method 'vdu' only, not {self.method!r}",
                                  field=f"{prefix}.self_forget_fraction")
        if self.plasticity_target == "trajectory":
            low, high = (self.push_band + [None, None])[:2]
            if len(self.push_band) != 2 or not low < high:
                raise ConfigError("push_band must be [low, high] with low < high", field=f"{prefix}.push_band")
            for name in ("self_forget_fraction", "anchor_exclude_fraction"):
                if getattr(self, name) != 0.0:
                    raise ConfigError(f"{name} is not used by the trajectory target (its own paths are labelled "
                                      "by the data-free vote)", field=f"{prefix}.{name}")
            if self.anchor_samples < 2:
                raise ConfigError("the trajectory target needs at least 2 paths (anchor_samples >= 2)",
                                  field=f"{prefix}.anchor_samples")
        if self.step_direction == "natural" and (self.method != "vdu" or self.laplace_weight == 0.0):
            raise ConfigError("step_direction 'natural' needs the Laplace factors: method 'vdu' with "
                              "laplace_weight > 0", field=f"{prefix}.step_direction")
        if self.method == "gradient_ascent" and self.gamma != 0.0:
            raise ConfigError("gradient ascent is VDU with gamma = 0", field=f"{prefix}.gamma")
        if self.t_max is not None and self.t_max <= self.t_min:
            raise ConfigError("t_max must be greater than t_min", field=f"{prefix}.t_max")


@dataclass
class EvalConfig(_Validated):
    """What evidence a run produces. ``forget_class`` enables PUL/u-FID with a classifier."""

    forget_class: int | None = _spec(None, ge=0, le=9999)
    classifier: str = _spec("builtin:mnist", doc="'builtin:mnist' or a folder with a classifier")
    num_samples: int = _spec(512, ge=8, le=50000, doc="paired samples before and after")
    grid_samples: int = _spec(64, ge=1, le=256)
    sample_steps: int = _spec(25, ge=2, le=1000, doc="DDIM steps for sampling (the quality study's setting)")
    seed: int = _spec(1234, ge=0, le=2**31 - 1)
    null_yardstick: bool = _spec(
        False, doc="also draw the original with twice the DDIM steps (half, where twice is more than its "
                   "timesteps) from the same seeds: retained_kept_null, what a change that unlearns nothing keeps "
                   "(one more sampling pass at twice the steps: about half the evaluation's time again)")
    enabled: bool = True


@dataclass
class Limits(_Validated):
    """Limits on a forget-set archive and its images (the service sets these from its settings)."""

    max_files: int = _spec(1000, ge=1)
    max_total_bytes: int = _spec(200 * 1024 * 1024, ge=1)
    max_file_bytes: int = _spec(20 * 1024 * 1024, ge=1)
    max_pixels: int = _spec(4096 * 4096, ge=1)
    max_compression_ratio: float = _spec(200.0, gt=1.0)
    min_side: int = _spec(8, ge=1)


@dataclass
class Progress:
    """What the loop reports each step. ``losses`` holds every term separately."""

    step: int
    total: int
    losses: dict[str, float]
    forget_loss_ratio: float
    elapsed_s: float
    eta_s: float
    phase: str = "unlearn"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
