"""Step time and peak GPU memory of SD unlearning per trainable-parameter mode, on a full-size
Stable Diffusion 1.5 UNet built from its config (random weights: no download is possible or needed).

    python bench/bench_sd.py                  # on a GPU machine: SD 1.5 UNet, 512x512 (latents 64x64)
    python bench/bench_sd.py --tiny           # a CPU smoke check on the tiny test UNet

For each row (trainable mode x method) it runs ``vdu_core.sd.train.unlearn_sd`` — the loop the jobs
run, with the frozen original, the anchors' function-space term and the stability term — for
``--steps`` steps after ``--warmup`` steps, and prints: parameters that move, seconds per step
(median over the measured steps), peak GPU memory (``torch.cuda.max_memory_allocated``), autocast
dtype and gradient checkpointing. Text embeddings and latents are random tensors of the real shapes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

#: Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), 859.5M parameters.
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
ROWS = [("full", "vdu"), ("cross_attn", "vdu"), ("lora", "vdu"), ("cross_attn", "esd")]


def build(tiny: bool):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from vdu_core.sd.tiny import TINY_UNET

    cfg = TINY_UNET if tiny else SD15_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return unet, sched, int(cfg["cross_attention_dim"]), int(cfg["sample_size"])


def data(dim: int, side: int, device, n: int = 8):
    from vdu_core.sd.train import SDData

    g = torch.Generator().manual_seed(0)
    return SDData(latents=torch.randn(n, 4, side, side, generator=g).to(device),
                  cond_idx=torch.arange(n) % 3 + 1, feature_idx=torch.tensor([1]), uncond_idx=0,
                  emb=torch.randn(6, 77, dim, generator=g).to(device),
                  anchors=torch.randn(n, 4, side, side, generator=g).to(device), anchor_idx=torch.arange(n) % 2 + 4)


def run_row(mode: str, method: str, args) -> dict:
    from vdu_core.posterior import trainable
    from vdu_core.sd import train
    from vdu_core.sd.config import SDUnlearnConfig

    unet, sched, dim, side = build(args.tiny)
    params = {"trainable": mode, "method": method, "steps": args.warmup + args.steps, "batch_size": args.batch_size,
              "probe_every": 10_000, "mixed_precision": args.precision, "gradient_checkpointing": args.checkpointing}
    if method == "vdu":
        params["posterior"] = "isotropic"
    cfg = SDUnlearnConfig.from_dict(params)
    device = train.pick_device(cfg)
    unet.to(device)
    d = data(dim, side, device)
    train.select_trainable(unet, cfg)
    _, moving = trainable(unet)
    post = train.estimate_posterior(unet, sched, cfg, None, None) if method == "vdu" else None
    times: list[float] = []
    last = [time.perf_counter()]

    def tick(p):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if p.step > args.warmup:
            times.append(now - last[0])
        last[0] = now

    report = train.unlearn_sd(unet, sched, d, cfg, post, on_progress=tick)
    step_s = statistics.median(times) if times else float("nan")
    return {"mode": mode, "method": method, "moving": sum(p.numel() for p in moving), "step_s": step_s, **report.gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test UNet (CPU smoke check)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    ap.add_argument("--checkpointing", default="auto", choices=["auto", "on", "off"])
    args = ap.parse_args()
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    rows = []
    for mode, method in ROWS:
        rows.append(run_row(mode, method, args))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    gpu = rows[0].get("gpu", "none (CPU)")
    unet = "tiny test UNet" if args.tiny else "SD 1.5 (random weights)"
    print(f"UNet: {unet}; device: {gpu}; batch {args.batch_size}; {args.steps} measured steps after {args.warmup}")
    print("| trainable | method | parameters moving | s/step | peak GPU GiB | autocast | grad. checkpointing |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peak = r.get("peak_memory_gib")
        print(f"| {r['mode']} | {r['method']} | {r['moving'] / 1e6:.2f}M | {r['step_s']:.3f} | "
              f"{peak if peak is not None else 'n/a'} | {r['autocast']} | {r['gradient_checkpointing']} |")


if __name__ == "__main__":
    main()
