"""The SD unlearning loop and what it needs: which parameters move, the posterior over them, cached
latents and text embeddings, and the anchors (the original's own latents for neutral prompts).

**Which parameters move** (``trainable``): ``full`` (every UNet parameter), ``cross_attn`` (the
``attn2`` blocks: the text-to-image path, ESD-x's choice: 44.0M of SD 1.5's 859.5M UNet parameters) or ``lora``
(peft LoRA adapters of rank ``lora_rank`` on attention projections; the base stays frozen). The
stability regularizer applies to exactly the parameters that move.

**Posterior at this scale** (memory-light, never K copies of the model): ``isotropic`` keeps μ* = the
initial values of the trainable parameters and σ* = ``posterior_sigma`` (one copy of what moves);
``fisher`` (``auto``) is a data-free Laplace approximation on what moves: precision = N·F + 1/σ²,
F the diagonal empirical Fisher of the denoising loss on the original's own latents for neutral
prompts (per-sample squared gradients over ``posterior_samples`` latents, one timestep each). It
holds μ*, the precision and one accumulator: three copies of the *trainable* parameters only
(for SD 1.5 cross-attention, 3 × 44M floats = 0.5 GiB; for LoRA, the adapters).

**The frozen original**: with LoRA it is the same UNet with its adapters disabled (no copy); with
``full``/``cross_attn`` a frozen copy of the UNet is kept (on the GPU beside the trained one).

**GPU economy**: autocast in bf16 (or fp16) on CUDA, gradient checkpointing (``auto``: on with CUDA),
peak memory and mean step time reported in the run's metrics when CUDA is present.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from vdu_core.config import Progress
from vdu_core.errors import Cancelled
from vdu_core.loop import UnlearnReport, add_stability, autocast_dtype, pick_device, stability_regularizer
from vdu_core.objective import per_sample_mse, timestep_weights
from vdu_core.posterior import Posterior, _report, trainable
from vdu_core.sd.config import SDUnlearnConfig
from vdu_core.sd.methods import SDBatch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# --------------------------------------------------------------------------- what moves


def select_trainable(unet, config: SDUnlearnConfig):
    """Freeze the UNet, then enable (or add) what ``config.trainable`` names. Returns the UNet
    (the same object; with LoRA, adapters are injected in place)."""
    unet.requires_grad_(False)
    if config.trainable == "full":
        unet.requires_grad_(True)
    elif config.trainable == "cross_attn":
        for name, p in unet.named_parameters():
            if ".attn2." in name:
                p.requires_grad_(True)
    else:
        from peft import LoraConfig

        alpha = config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank)
        unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=LORA_TARGETS))
    if not any(p.requires_grad for p in unet.parameters()):
        from vdu_core.errors import ConfigError

        raise ConfigError(f"trainable={config.trainable!r} selects no parameter of this UNet",
                          field="params.trainable")
    return unet


def trainable_delta(unet, config: SDUnlearnConfig) -> dict[str, torch.Tensor] | None:
    """The small file of a partial update: the attn2 tensors, or the LoRA layers in diffusers' format."""
    if config.trainable == "full":
        return None
    if config.trainable == "cross_attn":
        return {n: p.detach() for n, p in unet.named_parameters() if ".attn2." in n}
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    return {f"unet.{k}": v for k, v in state.items()}


def merge_lora(unet, config: SDUnlearnConfig):
    """Fold LoRA adapters into the base weights and drop them, so the saved UNet loads with plain
    diffusers (``save_pretrained`` then writes base-layer names only)."""
    if config.trainable != "lora":
        return unet
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in list(unet.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge()
                setattr(module, child_name, child.get_base_layer())
    unet._hf_peft_config_loaded = False
    unet.peft_config = {}
    return unet


@contextmanager
def lora_disabled(unet):
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


class FrozenLoRABase(torch.nn.Module):
    """The original model of a LoRA run: the same UNet with its adapters switched off (no copy)."""

    def __init__(self, unet):
        super().__init__()
        self._unet = [unet]  # a list: not registered as a submodule

    def forward(self, *args, **kwargs):
        unet = self._unet[0]
        with lora_disabled(unet):
            return unet(*args, **kwargs)


def frozen_original(unet, config: SDUnlearnConfig):
    if config.trainable == "lora":
        return FrozenLoRABase(unet)
    return copy.deepcopy(unet).eval().requires_grad_(False)


# --------------------------------------------------------------------------- text and latents


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device) -> torch.Tensor:
    """(len(prompts), tokens, dim) embeddings from the frozen text encoder."""
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    pipe.text_encoder.to(device)
    return pipe.text_encoder(tok.input_ids.to(device))[0].float()


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, device, batch_size: int = 8) -> torch.Tensor:
    """VAE-encode images in [-1, 1] once: the posterior mean × the VAE's scaling factor (deterministic)."""
    vae.to(device)
    out = []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images[i : i + batch_size].to(device)).latent_dist
        out.append(dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)


def latents_key(vae_digest: str, content_sha: str, resolution: int) -> str:
    return hashlib.sha256(f"{vae_digest}:{content_sha}:{resolution}".encode()).hexdigest()[:32]


@torch.no_grad()
def draw_anchors(pipe, neutral: list[str], n: int, steps: int, seed: int, device,
                 should_cancel=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's own latents for neutral prompts (prompt i % len(neutral)); returns (latents, prompt idx)."""
    from vdu_core.sampling import initial_noise

    unet = pipe.unet
    shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
    idx = torch.arange(n) % len(neutral)
    latents = []
    for i in range(0, n, 8):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled while drawing anchor latents ({i}/{n})")
        j = idx[i : i + 8]
        noise = initial_noise(len(j), shape, seed, start=i).to(device)
        out = pipe([neutral[k] for k in j.tolist()], num_inference_steps=steps, latents=noise,
                   output_type="latent", guidance_scale=7.5)
        latents.append(out.images.float())
    return torch.cat(latents), idx


# --------------------------------------------------------------------------- posterior


def estimate_posterior(unet, scheduler, config: SDUnlearnConfig, anchors, anchor_emb, *,
                       on_progress=None, should_cancel=None) -> Posterior:
    """``isotropic`` or diagonal-Fisher posterior over the trainable parameters (see module docstring)."""
    names, params = trainable(unet)
    floor = config.posterior_sigma**2
    kind = "isotropic" if config.posterior == "isotropic" else "fisher"
    mu = [p.detach().clone().float() for p in params]
    if kind == "isotropic" or anchors is None or len(anchors) == 0:
        return Posterior(names, mu, [torch.full_like(m, floor) for m in mu], "isotropic",
                         {"sigma": config.posterior_sigma, "parameters": sum(m.numel() for m in mu),
                          "note": "no anchors: isotropic" if kind == "fisher" else ""})
    n = min(config.posterior_samples, len(anchors))
    g = torch.Generator().manual_seed(config.seed + 2)
    fisher = [torch.zeros_like(m) for m in mu]
    t0 = time.time()
    for i in range(n):
        if should_cancel is not None and should_cancel():
            raise Cancelled("cancelled while estimating the posterior")
        x0 = anchors[i : i + 1]
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=g).to(x0.device)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=anchor_emb[i : i + 1]).sample
        loss = per_sample_mse(pred, noise).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for f, gr in zip(fisher, grads, strict=True):
            if gr is not None:
                f.add_(gr.detach().float().pow(2))
        _report(on_progress, i + 1, n, t0, {"posterior_loss": float(loss.detach())})
    prior = 1.0 / floor
    var = [1.0 / (f + prior) for f in fisher]  # N_eff = n: n · (Σ g² / n) = Σ g²
    return Posterior(names, mu, var, "fisher",
                     {"samples": n, "n_eff": n, "sigma_prior": config.posterior_sigma,
                      "data": "the original's own latents for neutral prompts",
                      "parameters": sum(m.numel() for m in mu)})


# --------------------------------------------------------------------------- the loop


@dataclass
class SDData:
    """Everything the loop draws from, on the training device."""

    latents: torch.Tensor  # (N, 4, h, w) forget latents
    cond_idx: torch.Tensor  # (N,) row of ``emb`` conditioning each latent (caption or prompt)
    feature_idx: torch.Tensor  # rows of ``emb`` that are prompts naming the feature
    uncond_idx: int
    emb: torch.Tensor  # (E, tokens, dim)
    anchors: torch.Tensor | None = None
    anchor_idx: torch.Tensor | None = None  # rows of ``emb`` of each anchor's neutral prompt
    info: dict = field(default_factory=dict)


class SDContext:
    def __init__(self, unet, original, scheduler, config, device, generator, data: SDData):
        self.unet, self.original, self.scheduler = unet, original, scheduler
        self.config, self.device, self.generator, self.data = config, device, generator, data
        self.t_min = config.t_min
        self.t_max = config.t_max or scheduler.config.num_train_timesteps

    def noised(self, x0):
        g = self.generator
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = torch.randint(self.t_min, self.t_max, (x0.shape[0],), generator=g).to(self.device)
        return self.scheduler.add_noise(x0, noise, t), t, noise

    def anchor_batch(self):
        d = self.data
        idx = torch.randint(0, len(d.anchors), (self.config.batch_size,), generator=self.generator)
        a_t, t, _ = self.noised(d.anchors[idx.to(d.anchors.device)])
        return a_t, t, d.emb[d.anchor_idx[idx].to(d.emb.device)]


class SDProbe:
    """Fixed forget latents × timesteps × noise, conditioned as in training: a repeatable forget loss."""

    def __init__(self, data: SDData, scheduler, t_min, t_max, seed, max_items=16, n_timesteps=4):
        g = torch.Generator().manual_seed(seed + 99)
        x0 = data.latents[:max_items]
        ts = torch.linspace(t_min, t_max - 1, n_timesteps).round().long()
        self.x0 = x0.repeat_interleave(len(ts), 0)
        self.t = ts.repeat(len(x0)).to(x0.device)
        self.emb = data.emb[data.cond_idx[:max_items].repeat_interleave(len(ts)).to(data.emb.device)]
        self.noise = torch.randn(self.x0.shape, generator=g).to(x0.device)
        self.x_t = scheduler.add_noise(self.x0, self.noise, self.t)

    @torch.no_grad()
    def loss(self, unet, batch_size: int = 16) -> float:
        total = 0.0
        for i in range(0, len(self.x_t), batch_size):
            s = slice(i, i + batch_size)
            pred = unet(self.x_t[s], self.t[s], encoder_hidden_states=self.emb[s]).sample
            total += float(per_sample_mse(pred, self.noise[s]).sum())
        return total / len(self.x_t)


def use_checkpointing(config: SDUnlearnConfig, device) -> bool:
    return config.gradient_checkpointing == "on" or (config.gradient_checkpointing == "auto" and device.type == "cuda")


def unlearn_sd(unet, scheduler, data: SDData, config: SDUnlearnConfig, posterior: Posterior | None = None, *,
               original=None, on_progress: Callable[[Progress], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> UnlearnReport:
    """Unlearn in place: the trainable parameters of ``unet`` (already selected) move."""
    from vdu_core.methods import get_sd_method

    method = get_sd_method(config.method)(config)
    device = pick_device(config)
    unet.to(device)
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    if method.needs_anchors and (data.anchors is None or len(data.anchors) == 0):
        raise ValueError("method 'vdu' with anchor_weight > 0 needs anchor latents")
    if method.needs_original and original is None:
        original = frozen_original(unet, config)
    if original is not None:
        original.to(device)
    ctx = SDContext(unet, original, scheduler, config, device, g, data)
    names, params = trainable(unet)
    regularizer = stability_regularizer(method, config, params, posterior)
    opt = torch.optim.Adam(params, lr=config.learning_rate)
    probe = SDProbe(data, scheduler, ctx.t_min, ctx.t_max, config.seed)
    unet.eval()
    p0 = probe.loss(unet)
    ratio = 1.0
    amp = autocast_dtype(config, device)
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    if use_checkpointing(config, device):
        unet.enable_gradient_checkpointing()
    unet.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history: list[dict] = []
    t_start = time.time()
    step = 0
    for step in range(1, config.steps + 1):
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled at step {step - 1} of {config.steps}")
        idx = torch.randint(0, len(data.latents), (config.batch_size,), generator=g)
        x0 = data.latents[idx.to(data.latents.device)]
        x_t, t, noise = ctx.noised(x0)
        feat = data.feature_idx[torch.randint(0, len(data.feature_idx), (config.batch_size,), generator=g)]
        emb = data.emb
        batch = SDBatch(x0, noise, t, x_t, timestep_weights(scheduler, t, config.timestep_weighting),
                        cond=emb[data.cond_idx[idx].to(emb.device)], feature=emb[feat.to(emb.device)],
                        uncond=emb[[data.uncond_idx] * config.batch_size])
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            terms = method.compute(ctx, batch)
        scaler.scale(terms.loss).backward()
        scaler.unscale_(opt)  # the analytic stability gradient below is added unscaled
        losses = add_stability(regularizer, terms)
        losses["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        scaler.step(opt)
        scaler.update()
        if step % config.probe_every == 0 or step == config.steps:
            unet.eval()
            ratio = probe.loss(unet) / max(p0, 1e-12)
            unet.train()
        elapsed = time.time() - t_start
        history.append({"step": step, "forget_loss_ratio": ratio, **losses})
        if on_progress is not None:
            on_progress(Progress(step=step, total=config.steps, losses=losses, forget_loss_ratio=ratio,
                                 elapsed_s=elapsed, eta_s=elapsed / step * (config.steps - step)))
    seconds = time.time() - t_start
    if use_checkpointing(config, device):
        unet.disable_gradient_checkpointing()
    unet.eval()
    final = probe.loss(unet)
    report = UnlearnReport(steps_run=step, stopped_by="max_steps", initial_probe_loss=p0, final_probe_loss=final,
                           history=history, seconds=seconds, device=str(device))
    report.gpu = gpu_record(device, seconds, step, amp, use_checkpointing(config, device))
    return report


def gpu_record(device, seconds: float, steps: int, amp, checkpointing: bool) -> dict:
    rec = {"device": str(device), "step_seconds_mean": round(seconds / max(steps, 1), 4),
           "autocast": str(amp).replace("torch.", "") if amp is not None else None,
           "gradient_checkpointing": checkpointing}
    if device.type == "cuda":
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        rec["gpu"] = torch.cuda.get_device_name(device)
    return rec
