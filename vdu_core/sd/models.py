"""Model I/O for Stable Diffusion pipelines (SD 1.x / 2.x layout), with the safety rules of
``vdu_core.models``: never unpickle, validate every safetensors header and config before loading,
assemble the pipeline from an allow-list of classes (no ``trust_remote_code``, no custom code).

Accepted: a ``StableDiffusionPipeline`` folder (``model_index.json`` + ``unet`` (UNet2DConditionModel),
``vae`` (AutoencoderKL), ``text_encoder`` (CLIPTextModel), ``tokenizer`` (CLIPTokenizer), ``scheduler``;
an optional safety checker is loaded only from safetensors and kept as it is), a hub id at a pinned
revision (JSON and tokenizer files first, then only the non-variant safetensors), or a single-file
``.safetensors`` checkpoint (original LDM layout) together with a local diffusers folder of the same
architecture for its configs (``config_dir``; single-file loading never reaches the network).

The output is what ``StableDiffusionPipeline.save_pretrained`` writes (safetensors), so it loads with
plain ``StableDiffusionPipeline.from_pretrained``; a partial update (cross-attention, LoRA) also
leaves a small delta file under ``delta/`` (see ``save_sd_pipeline``).

torch, diffusers and transformers are imported lazily; ``is_sd_model`` and ``describe_sd_model`` are
torch-free so the API can vet an upload cheaply.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from vdu_core import models as base
from vdu_core.errors import ModelLoadError

SD_PIPELINE_CLASSES = ("StableDiffusionPipeline",)
#: component -> (library, accepted classes, safetensors weight name or None, required)
COMPONENTS: dict[str, tuple[str, tuple[str, ...], str | None, bool]] = {
    "unet": ("diffusers", ("UNet2DConditionModel",), base.WEIGHTS_NAME, True),
    "vae": ("diffusers", ("AutoencoderKL",), base.WEIGHTS_NAME, True),
    "text_encoder": ("transformers", ("CLIPTextModel",), "model.safetensors", True),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast"), None, True),
    "scheduler": ("diffusers", base.SCHEDULER_CLASSES, None, True),
    "safety_checker": ("stable_diffusion", ("StableDiffusionSafetyChecker",), "model.safetensors", False),
    "feature_extractor": ("transformers", ("CLIPImageProcessor", "CLIPFeatureExtractor"), None, False),
    "image_encoder": ("transformers", (), None, False),  # IP-Adapter slot: accepted only when empty
}
#: A tokenizer folder holds the slow files (vocab + merges) or the fast one (tokenizer.json).
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
DELTA_DIR = "delta"


def is_sd_model(ref: str | Path, *, revision: str | None = None) -> bool:
    """True when ``ref`` is a Stable Diffusion pipeline (folder, hub id, or LDM single file); torch-free.

    Errors resolving ``ref`` are left to the loader: this only routes a job, so it answers False.
    """
    try:
        path = Path(ref)
        if os.path.lexists(path):
            if path.is_dir():
                index = path / "model_index.json"
                return index.is_file() and _index_class(index) in SD_PIPELINE_CLASSES
            if path.suffix.lower() == ".safetensors":
                return any(k.startswith("model.diffusion_model.") for k in base.read_safetensors_header(path))
            return False
        if isinstance(ref, str) and revision and base._HUB_ID.match(ref):
            folder = base._hub_download(ref, revision, ["model_index.json"])
            index = folder / "model_index.json"
            return index.is_file() and _index_class(index) in SD_PIPELINE_CLASSES
    except (ModelLoadError, OSError):
        return False
    return False


def _index_class(index: Path) -> Any:
    return base._read_json(index, "pipeline index").get("_class_name")


def resolve_sd_folder(path: Path) -> dict[str, Any]:
    """Validate a pipeline folder without torch; return its components, configs and weight headers."""
    path = Path(path)
    index = base._read_json(path / "model_index.json", "pipeline index")
    if index.get("_class_name") not in SD_PIPELINE_CLASSES:
        raise ModelLoadError(f"{path}: pipeline {index.get('_class_name')!r} is not a StableDiffusionPipeline",
                             rule="unsupported_architecture")
    declared = {k: v for k, v in index.items() if not k.startswith("_") and k != "requires_safety_checker"}
    unknown = sorted(set(declared) - set(COMPONENTS))
    if unknown:
        raise ModelLoadError(f"{path}: unknown pipeline component {unknown[0]!r} (custom pipelines are not "
                             "supported)", rule="unsupported_architecture")
    out: dict[str, Any] = {"root": path, "components": {}, "tensors": {}}
    for name, (lib, classes, weight_name, required) in COMPONENTS.items():
        entry = declared.get(name)
        if entry is None or entry == [None, None]:
            if required:
                raise ModelLoadError(f"{path}: model_index.json has no {name}", rule="unsupported_architecture")
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == lib and entry[1] in classes):
            raise ModelLoadError(f"{path}: {name} must be one of {', '.join(classes)}; got {entry!r}",
                                 rule="unsupported_architecture")
        folder = path / name
        if not folder.is_dir():
            raise ModelLoadError(f"{path}: the {name} folder is missing", rule="not_found")
        for f in folder.iterdir():
            if f.suffix.lower() in (".py", ".pyc", ".so"):
                raise ModelLoadError(f"{name}/{f.name}: code files are refused", rule="unsupported_format")
        config_name = {"scheduler": "scheduler_config.json", "tokenizer": "tokenizer_config.json",
                       "feature_extractor": "preprocessor_config.json"}.get(name, "config.json")
        config = base._read_json(folder / config_name, f"{name} config") if (folder / config_name).is_file() else {}
        if name == "scheduler":
            base._check_scheduler_config({"_class_name": entry[1], **config}, f"{path}/scheduler")
        if name == "tokenizer":
            if not any(all((folder / f).is_file() for f in files) for files in TOKENIZER_FILES):
                raise ModelLoadError(f"{path}: tokenizer/ needs vocab.json + merges.txt or tokenizer.json",
                                     rule="not_found")
        if name in ("unet", "vae") and config.get("_class_name") not in classes:
            raise ModelLoadError(f"{path}: {name}/config.json names {config.get('_class_name')!r}",
                                 rule="invalid_config")
        tensors = {}
        if weight_name is not None:
            for f in base.weight_files(folder, weight_name):
                tensors.update(base.read_safetensors_header(f))
        out["components"][name] = {"class": entry[1], "config": config, "folder": folder}
        out["tensors"][name] = tensors
    return out


def describe_sd_model(ref: str | Path, *, revision: str | None = None) -> dict[str, Any]:
    """Validate and summarise an SD pipeline folder or hub id (torch-free)."""

    def run() -> dict[str, Any]:
        layout = resolve_sd_folder(_local_folder(ref, revision))
        unet_cfg = layout["components"]["unet"]["config"]
        dtypes: Counter = Counter()
        params = {}
        for comp, tensors in layout["tensors"].items():
            params[comp] = sum(t.numel for t in tensors.values())
            for t in tensors.values():
                dtypes[t.dtype] += t.numel
        vae_blocks = layout["components"]["vae"]["config"].get("block_out_channels", [1, 1, 1, 1])
        return {
            "ref": str(ref),
            "family": "sd",
            "revision": revision,
            "kind": "pipeline",
            "class_name": "UNet2DConditionModel",
            "pipeline_class": "StableDiffusionPipeline",
            "scheduler_class": layout["components"]["scheduler"]["class"],
            "parameters": params["unet"],
            "parameters_by_component": params,
            "weights_dtypes": dict(dtypes),
            "sample_size": unet_cfg.get("sample_size"),
            "image_size": (unet_cfg.get("sample_size") or 64) * 2 ** (len(vae_blocks) - 1),
            "in_channels": unet_cfg.get("in_channels", 4),
            "cross_attention_dim": unet_cfg.get("cross_attention_dim"),
            "safety_checker": "safety_checker" in layout["components"],
        }

    return base._guard(ref, run)


def _local_folder(ref: str | Path, revision: str | None) -> Path:
    path = Path(ref)
    if os.path.lexists(path):
        if not path.is_dir():
            raise ModelLoadError(f"{path}: give a pipeline folder (or a single file with config_dir)",
                                 rule="unsupported_format")
        return path
    if isinstance(ref, str) and base._HUB_ID.match(ref) and ".." not in ref:
        if revision is None:
            raise ModelLoadError(f"{ref}: pin a revision (a commit sha, or a tag) so that the job is reproducible",
                                 rule="revision_required")
        patterns = ["model_index.json", "*/config.json", "*/*_config.json", "tokenizer/*", "*/*.safetensors.index.json",
                    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model-*.safetensors",
                    "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                    "text_encoder/model-*.safetensors", "safety_checker/model.safetensors"]
        return base._hub_download(ref, revision, patterns)
    raise ModelLoadError(f"{ref} does not exist (and is not a hub id 'org/name')", rule="not_found")


def _check_against_meta(module_cls, config: dict, tensors: dict, where: str, *, strict: bool) -> None:
    """Build on the meta device and compare names and shapes with the weights' headers."""
    import torch

    try:
        with torch.device("meta"):
            meta = module_cls.from_config(config) if hasattr(module_cls, "from_config") else module_cls(config)
    except Exception as exc:
        raise ModelLoadError(f"{where}: the config does not build ({exc})", rule="invalid_config") from None
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    found = tensors if strict else {k: v for k, v in tensors.items() if k in expected}
    base._compare(expected, found, rule="config_mismatch", what=f"{where}: the weights do not fit config.json")


def load_sd_pipeline(ref: str | Path, *, revision: str | None = None, config_dir: str | Path | None = None):
    """Load a ``StableDiffusionPipeline`` in float32 on the CPU, components in eval mode.

    Folders and hub snapshots are validated by ``resolve_sd_folder`` first; every weight is read
    from safetensors (``use_safetensors=True``, ``local_files_only=True``).
    """
    return base._guard(ref, lambda: _load(ref, revision, config_dir))


def _load(ref, revision, config_dir):
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(ref)
    if os.path.lexists(path) and path.is_file():
        return _load_single_file(path, config_dir)
    folder = _local_folder(ref, revision)
    layout = resolve_sd_folder(folder)
    comps = layout["components"]
    unet_cls, vae_cls = diffusers.UNet2DConditionModel, diffusers.AutoencoderKL
    _check_against_meta(unet_cls, comps["unet"]["config"], layout["tensors"]["unet"], f"{folder}/unet", strict=True)
    _check_against_meta(vae_cls, comps["vae"]["config"], layout["tensors"]["vae"], f"{folder}/vae", strict=True)
    te_config = CLIPTextConfig.from_dict({k: v for k, v in comps["text_encoder"]["config"].items()
                                          if k not in ("auto_map",)})
    _check_against_meta(CLIPTextModel, te_config, layout["tensors"]["text_encoder"], f"{folder}/text_encoder",
                        strict=False)
    kw = {"use_safetensors": True, "local_files_only": True}
    unet = unet_cls.from_pretrained(folder / "unet", **kw).eval()
    vae = vae_cls.from_pretrained(folder / "vae", **kw).eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    scheduler = getattr(diffusers, comps["scheduler"]["class"]).from_config(comps["scheduler"]["config"])
    safety_checker = feature_extractor = None
    if "safety_checker" in comps:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        safety_checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker", **kw).eval()
    if "feature_extractor" in comps:
        from transformers import CLIPImageProcessor

        feature_extractor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor", local_files_only=True)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=safety_checker, feature_extractor=feature_extractor,
        requires_safety_checker=safety_checker is not None)


def _load_single_file(path: Path, config_dir):
    if path.suffix.lower() in base.PICKLE_SUFFIXES:
        raise base._pickle_error(path, path.parent)
    tensors = base.read_safetensors_header(path)  # refuses a pickle renamed .safetensors
    if not any(k.startswith("model.diffusion_model.") for k in tensors):
        raise ModelLoadError(f"{path.name} is not a Stable Diffusion single-file checkpoint (no "
                             "model.diffusion_model.* tensors)", rule="unsupported_architecture")
    if config_dir is None:
        raise ModelLoadError(f"{path.name} is a single-file checkpoint: give config_dir, a local diffusers "
                             "folder of the same architecture (its configs and tokenizer are used)",
                             rule="missing_config")
    resolve_sd_folder(Path(config_dir))
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def save_sd_pipeline(pipe, out_dir: Path, *, trainable: str, delta: dict | None = None) -> list[str]:
    """Write the pipeline folder (safetensors); with a partial update, also ``delta/``.

    * ``full``: the pipeline only.
    * ``cross_attn``: ``delta/unet_cross_attn.safetensors`` holds the new attn2 tensors (names as in the
      UNet's state dict): apply with ``unet.load_state_dict(tensors, strict=False)``.
    * ``lora``: the adapters are merged into the saved UNet; ``delta/pytorch_lora_weights.safetensors``
      is diffusers' LoRA format (``pipe.load_lora_weights(out_dir / "delta")`` on the original model).

    Returns the relative paths of the delta files written.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    written = []
    if delta:
        (out_dir / DELTA_DIR).mkdir(parents=True, exist_ok=True)
        name = "pytorch_lora_weights.safetensors" if trainable == "lora" else f"unet_{trainable}.safetensors"
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in delta.items()}
        save_file(tensors, out_dir / DELTA_DIR / name, metadata={"vdu_trainable": trainable, "format": "pt"})
        written.append(f"{DELTA_DIR}/{name}")
    return written
