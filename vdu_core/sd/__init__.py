"""Feature unlearning for text-conditional latent diffusion (Stable Diffusion 1.x/2.x pipelines).

Needs the extra ``sd`` (transformers, peft, accelerate); every module imports them lazily, so the
unconditional (MNIST) path works without them. Entry points: ``vdu_core.sd.run.run_sd_unlearning``
(library) and ``run_job`` (the worker).
"""
