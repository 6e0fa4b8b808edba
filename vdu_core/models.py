"""Model I/O for unconditional diffusers DDPMs (a ``UNet2DModel`` and a scheduler).

Safety before convenience, because model files come from users:

- **Never unpickle.** Only ``.safetensors`` weights are read. Pickle files (``.bin``, ``.pt``,
  ``.ckpt``, ``.pth``, ``.pkl``) are refused by name, and a pickle renamed ``.safetensors`` is
  recognised when its header fails validation. Nothing here calls ``torch.load`` or ``pickle``.
- **Validate every safetensors header ourselves** before a tensor is read: 8-byte little-endian
  length (at most ``MAX_HEADER_BYTES``), a JSON object, known dtypes, each tensor's ``data_offsets``
  inside the file and equal to dtype x shape, tensors contiguous with no overlap, gap or tail.
- **Validate and bound configs** (``config.json``, ``scheduler_config.json``, ``model_index.json``)
  before anything is built, then build the UNet on the *meta* device and compare its parameter
  names and shapes with the weights header: a config cannot make us allocate more than the weight
  file holds, and weights that do not fit the config are refused instead of being silently
  re-initialised (which is what ``from_pretrained`` does with missing keys).
- **Assemble pipelines from an allow-list** (``UNet2DModel`` + a known diffusers scheduler) instead
  of letting ``model_index.json`` name any importable class; no ``trust_remote_code``, no custom
  pipelines. Hub snapshots are fetched with ``huggingface_hub.snapshot_download`` (JSON files first,
  then only the UNet's safetensors: pickles are never even downloaded) and go through the same
  local checks. ``HF_HUB_OFFLINE`` is honoured, also when set after import.

Every failure is a :class:`~vdu_core.errors.ModelLoadError` whose ``rule`` is one of:
``not_found``, ``hub_unavailable``, ``revision_required``, ``pickle_refused``,
``corrupt_safetensors``, ``invalid_config``, ``unsupported_architecture``, ``config_mismatch``,
``missing_config``, ``unsupported_format``, ``lineage_mismatch``, ``load_failed`` (anything
unexpected, wrapped with its cause).

torch and diffusers are imported lazily: ``describe_model`` and every validation run without them,
so the API can vet a model registration cheaply.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdu_core.errors import ModelLoadError

if TYPE_CHECKING:  # pragma: no cover
    import diffusers
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth", ".pkl", ".pickle")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_CONFIG_BYTES = 4 * 1024 * 1024
PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")
SCHEDULER_CLASSES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
)
#: Bits per element of every safetensors dtype.
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
#: Sanity bounds on UNet config values: a config cannot ask for an absurd build.
_UNET_INT_BOUNDS = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "layers_per_block": (1, 64),
    "norm_num_groups": (1, 16384),
    "attention_head_dim": (1, 16384),
    "time_embedding_dim": (1, 65536),
    "num_train_timesteps": (1, 1_000_000),
    "attn_norm_num_groups": (1, 16384),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Layout:
    """A validated model on disk: where the pieces are and what their headers say (no torch)."""

    kind: str  # "pipeline" | "unet" | "single_file"
    root: Path
    unet_config: dict[str, Any] | None
    weight_files: list[Path]
    tensors: dict[str, TensorInfo]
    scheduler_class: str = "DDPMScheduler"
    scheduler_config: dict[str, Any] | None = None
    pipeline_class: str = "DDPMPipeline"
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- public API


def load_pipeline(ref: str | Path, *, revision: str | None = None) -> diffusers.DDPMPipeline:
    """Load a DDPM pipeline from a pipeline folder, a UNet folder, a single ``.safetensors`` file
    (with ``config.json`` beside it) or a hub id ``org/name`` at a pinned ``revision``.

    A UNet without a scheduler gets ``scheduler_config.json`` from beside it, else ``DDPMScheduler()``.
    Weights are loaded as float32 on the CPU, the UNet in eval mode. ``revision`` applies to hub ids
    only, and is required for them; an existing local path always wins over a hub id of the same name.
    """
    return _guard(ref, lambda: _load_pipeline(ref, revision))


def load_unet_state(ref: str | Path, like: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Load a same-lineage UNet checkpoint (UNet folder, pipeline folder or single-file safetensors)
    whose every key and shape match ``like.state_dict()`` (checked on the header, before reading).

    Tensors come back on the CPU in the dtype of the matching tensor of ``like``.
    """
    return _guard(ref, lambda: _load_unet_state(ref, like))


def save_pipeline(pipe: diffusers.DiffusionPipeline, out_dir: Path) -> None:
    """Write ``pipe`` with ``save_pretrained`` as safetensors; the folder loads with plain diffusers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(directory: str | Path) -> str:
    """Hex sha256 of a folder: the sha256 of the lines ``<relative posix path>\\0<sha256 of file>\\n``
    for every file, sorted by path. Stable across machines and copy order; symlinked files (as in a
    hub cache) are hashed by their content, symlinked folders are not entered.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    lines = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            path = Path(folder) / name
            if path.is_file():
                lines.append((path.relative_to(root).as_posix(), sha256_file(path)))
    h = hashlib.sha256()
    for rel, digest in sorted(lines):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def describe_model(ref: str | Path, *, revision: str | None = None) -> dict[str, Any]:
    """Validate ``ref`` as :func:`load_pipeline` would and summarise it, without importing torch.

    The parameter count is read from the safetensors headers; nothing is loaded.
    """

    from vdu_core.sd.models import describe_sd_model, is_sd_model

    if is_sd_model(ref, revision=revision):  # a Stable Diffusion pipeline: vdu_core.sd validates it
        return describe_sd_model(ref, revision=revision)

    def run() -> dict[str, Any]:
        layout = _resolve(ref, revision)
        cfg = layout.unet_config or {}
        dtypes = Counter()
        for info in layout.tensors.values():
            dtypes[info.dtype] += info.numel
        sched = layout.scheduler_config or {}
        return {
            "ref": str(ref),
            "revision": revision if layout.extra.get("hub") else None,
            "kind": layout.kind,
            "class_name": "UNet2DModel",
            "pipeline_class": layout.pipeline_class,
            "scheduler_class": layout.scheduler_class,
            "num_train_timesteps": sched.get("num_train_timesteps", 1000),
            "parameters": sum(info.numel for info in layout.tensors.values()),
            "weights_bytes": sum(info.nbytes for info in layout.tensors.values()),
            "weights_dtypes": dict(dtypes),
            "sample_size": cfg.get("sample_size"),
            "in_channels": cfg.get("in_channels", 3),
            "out_channels": cfg.get("out_channels", 3),
            "block_out_channels": list(cfg.get("block_out_channels", (224, 448, 672, 896))),
            "layers_per_block": cfg.get("layers_per_block", 2),
        }

    return _guard(ref, run)


# --------------------------------------------------------------------------- safetensors headers


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Validate a ``.safetensors`` file's header against the file and return its tensors.

    Raises ``ModelLoadError`` (``corrupt_safetensors``, or ``pickle_refused`` when the file is in
    fact a pickle / ``torch.save`` archive) without reading any tensor data.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                _bad_safetensors(path, prefix, f"{size} bytes is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                _bad_safetensors(path, prefix, f"header length {n} is above the {MAX_HEADER_BYTES}-byte cap")
            if 8 + n > size:
                _bad_safetensors(path, prefix, f"header length {n} runs past the end of the {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise ModelLoadError(f"{path} cannot be read ({exc.strerror or exc})", rule="not_found") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        _bad_safetensors(path, prefix, "the header is not UTF-8 JSON")
    if not isinstance(header, dict):
        _bad_safetensors(path, prefix, "the header is not a JSON object")
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                _bad_safetensors(path, prefix, "__metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict):
            _bad_safetensors(path, prefix, f"tensor {name!r} is not described by an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            _bad_safetensors(path, prefix, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not _int_list(shape) or len(shape) > 16:
            _bad_safetensors(path, prefix, f"tensor {name!r} has an invalid shape {shape!r}")
        if not _int_list(offsets) or len(offsets) != 2:
            _bad_safetensors(path, prefix, f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if begin > end or end > data_len:
            _bad_safetensors(
                path,
                prefix,
                f"tensor {name!r}: data_offsets {offsets} outside the {data_len}-byte data section",
            )
        bits = math.prod(shape) * _DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            _bad_safetensors(
                path,
                prefix,
                f"tensor {name!r}: shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets "
                f"span {end - begin}",
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), end - begin)
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps another tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            _bad_safetensors(path, prefix, f"tensor {name!r} {what}")
        pos = end
    if pos != data_len:
        _bad_safetensors(path, prefix, f"{data_len - pos} trailing bytes belong to no tensor")
    return tensors


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _looks_like_pickle(prefix: bytes) -> bool:
    """A pickle (protocol 2+) or a ``torch.save`` zip archive."""
    return (len(prefix) >= 2 and prefix[0] == 0x80 and 2 <= prefix[1] <= 5) or prefix[:4] == b"PK\x03\x04"


def _bad_safetensors(path: Path, prefix: bytes, why: str):
    if _looks_like_pickle(prefix):
        raise ModelLoadError(
            f"{path.name} is a pickle / torch.save file, not safetensors; pickles are never loaded "
            "(convert it to safetensors in a trusted environment)",
            rule="pickle_refused",
        )
    raise ModelLoadError(f"{path.name} is not a valid safetensors file: {why}", rule="corrupt_safetensors")


# --------------------------------------------------------------------------- configs


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ModelLoadError(
                f"{what} {path.name} is {size} bytes (cap {MAX_CONFIG_BYTES})", rule="invalid_config"
            )
        data = json.loads(path.read_bytes().decode("utf-8"))
    except ModelLoadError:
        raise
    except OSError as exc:
        raise ModelLoadError(
            f"{what} {path} cannot be read ({exc.strerror or exc})", rule="not_found"
        ) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelLoadError(f"{what} {path.name} is not valid JSON ({exc})", rule="invalid_config") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path.name} is not a JSON object", rule="invalid_config")
    return data


def _describe_foreign(cfg: dict[str, Any]) -> str:
    for key in ("_class_name", "architectures", "model_type"):
        if cfg.get(key):
            return f"{key}={cfg[key]!r}"
    return "a config without _class_name"


def _check_unet_config(cfg: dict[str, Any], where: str) -> None:
    """Refuse anything but an unconditional ``UNet2DModel`` and absurd values (torch-free)."""
    cls = cfg.get("_class_name")
    if cls != "UNet2DModel":
        raise ModelLoadError(
            f"{where}: {_describe_foreign(cfg)} is not supported; only unconditional diffusers UNet2DModel",
            rule="unsupported_architecture",
        )
    if cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
        raise ModelLoadError(
            f"{where}: a class-conditional UNet2DModel is not supported (unconditional models only)",
            rule="unsupported_architecture",
        )

    def bad(msg: str):
        raise ModelLoadError(f"{where}: {msg}", rule="invalid_config")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for key, (lo, hi) in _UNET_INT_BOUNDS.items():
        v = cfg.get(key)
        if v is not None and (not is_int(v) or not lo <= v <= hi):
            bad(f"{key} must be an integer in [{lo}, {hi}]; got {v!r}")
    sample = cfg.get("sample_size")
    sides = sample if isinstance(sample, list) else [sample]
    if sample is not None and (
        len(sides) not in (1, 2) or not all(is_int(s) and 1 <= s <= 8192 for s in sides)
    ):
        bad(f"sample_size must be an integer (or two) in [1, 8192]; got {sample!r}")
    blocks = cfg.get("block_out_channels")
    if blocks is not None and (
        not isinstance(blocks, list)
        or not 1 <= len(blocks) <= 16
        or not all(is_int(b) and 1 <= b <= 16384 for b in blocks)
    ):
        bad(f"block_out_channels must be 1 to 16 integers in [1, 16384]; got {blocks!r}")
    for key in ("down_block_types", "up_block_types"):
        types = cfg.get(key)
        if types is not None and (not isinstance(types, list) or not all(isinstance(t, str) for t in types)):
            bad(f"{key} must be a list of block names")
        if types is not None and blocks is not None and len(types) != len(blocks):
            bad(f"{key} has {len(types)} entries but block_out_channels has {len(blocks)}")


def _check_scheduler_config(cfg: dict[str, Any], where: str) -> str:
    cls = cfg.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULER_CLASSES:
        raise ModelLoadError(
            f"{where}: scheduler {cls!r} is not supported (allowed: {', '.join(SCHEDULER_CLASSES)})",
            rule="unsupported_architecture",
        )
    steps = cfg.get("num_train_timesteps", 1000)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 100_000:
        raise ModelLoadError(
            f"{where}: num_train_timesteps must be in [1, 100000]; got {steps!r}", rule="invalid_config"
        )
    betas = cfg.get("trained_betas")
    if betas is not None and (not isinstance(betas, list) or len(betas) != steps):
        raise ModelLoadError(
            f"{where}: trained_betas must list num_train_timesteps numbers", rule="invalid_config"
        )
    return cls


# --------------------------------------------------------------------------- resolving a reference


def _resolve(ref: str | Path, revision: str | None, *, with_weights: bool = True) -> _Layout:
    if isinstance(ref, str) and "://" in ref:
        raise ModelLoadError(
            f"{ref!r}: URLs are fetched by the service, not the library; give a folder, a file or a hub id",
            rule="not_found",
        )
    path = Path(ref)
    if os.path.lexists(path):
        return _resolve_local(path, with_weights=with_weights)
    if isinstance(ref, str) and _HUB_ID.match(ref) and ".." not in ref and "--" not in ref:
        return _resolve_hub(ref, revision)
    raise ModelLoadError(f"{ref} does not exist (and is not a hub id 'org/name')", rule="not_found")


def _resolve_local(path: Path, *, with_weights: bool = True) -> _Layout:
    if not path.exists():
        raise ModelLoadError(f"{path} does not exist (a dangling link?)", rule="not_found")
    if path.is_file():
        return _resolve_file(path)
    if (path / "model_index.json").is_file():
        return _resolve_pipeline_folder(path, with_weights=with_weights)
    if (path / "config.json").is_file():
        cfg, files, tensors = _unet_folder(path, with_weights=with_weights)
        layout = _Layout("unet", path, cfg, files, tensors)
        _attach_scheduler(layout, path / "scheduler_config.json", required=False)
        return layout
    pickles = _pickles_in(path)
    if pickles:
        raise _pickle_error(pickles[0], path)
    raise ModelLoadError(
        f"{path} holds neither a pipeline (model_index.json) nor a UNet (config.json + {WEIGHTS_NAME})",
        rule="not_found",
    )


def _resolve_file(path: Path) -> _Layout:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise _pickle_error(path, path.parent)
    if suffix != ".safetensors":
        with open(path, "rb") as fh:
            prefix = fh.read(8)
        if _looks_like_pickle(prefix):
            raise _pickle_error(path, path.parent)
        raise ModelLoadError(
            f"{path.name}: give a .safetensors file, a UNet or pipeline folder, or a hub id",
            rule="unsupported_format",
        )
    tensors = read_safetensors_header(path)
    config_path = path.parent / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{path.name} is a bare state dict: put the UNet's config.json beside it "
            "(the one UNet2DModel.save_pretrained writes)",
            rule="missing_config",
        )
    cfg = _read_json(config_path, "UNet config")
    _check_unet_config(cfg, str(config_path))
    layout = _Layout("single_file", path, cfg, [path], tensors)
    _attach_scheduler(layout, path.parent / "scheduler_config.json", required=False)
    return layout


def _resolve_pipeline_folder(path: Path, *, with_weights: bool = True) -> _Layout:
    index = _read_json(path / "model_index.json", "pipeline index")
    pipe_cls = index.get("_class_name")
    if pipe_cls not in PIPELINE_CLASSES:
        raise ModelLoadError(
            f"{path}: pipeline {pipe_cls!r} is not supported (only {' / '.join(PIPELINE_CLASSES)})",
            rule="unsupported_architecture",
        )
    components = {k: v for k, v in index.items() if not k.startswith("_")}
    if set(components) != {"unet", "scheduler"}:
        raise ModelLoadError(
            f"{path}: a DDPM pipeline has exactly a unet and a scheduler; found {sorted(components)}",
            rule="unsupported_architecture",
        )
    if components["unet"] != ["diffusers", "UNet2DModel"]:
        raise ModelLoadError(
            f"{path}: unet must be diffusers UNet2DModel; got {components['unet']!r}",
            rule="unsupported_architecture",
        )
    sched = components["scheduler"]
    if not (
        isinstance(sched, list)
        and len(sched) == 2
        and sched[0] == "diffusers"
        and sched[1] in SCHEDULER_CLASSES
    ):
        raise ModelLoadError(f"{path}: scheduler {sched!r} is not supported", rule="unsupported_architecture")
    unet_dir = path / "unet"
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(f"{path}: unet/config.json is missing", rule="not_found")
    cfg, files, tensors = _unet_folder(unet_dir, with_weights=with_weights)
    layout = _Layout("pipeline", path, cfg, files, tensors, pipeline_class=pipe_cls)
    _attach_scheduler(layout, path / "scheduler" / "scheduler_config.json", required=True)
    if layout.scheduler_class != sched[1]:
        raise ModelLoadError(
            f"{path}: model_index.json names {sched[1]}, scheduler_config.json {layout.scheduler_class}",
            rule="invalid_config",
        )
    return layout


def _attach_scheduler(layout: _Layout, config_path: Path, *, required: bool) -> None:
    if not config_path.is_file():
        if required:
            raise ModelLoadError(f"{config_path} is missing", rule="not_found")
        return
    cfg = _read_json(config_path, "scheduler config")
    layout.scheduler_class = _check_scheduler_config(cfg, str(config_path))
    layout.scheduler_config = cfg


def _pickles_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    except OSError:
        return []


def _pickle_error(path: Path, base: Path) -> ModelLoadError:
    try:
        shown = path.relative_to(base).as_posix()
    except ValueError:
        shown = path.name
    return ModelLoadError(
        f"{shown} is a pickle file ({path.suffix or 'no extension'}); pickles can run code when loaded "
        "and are never unpickled; provide safetensors (save_pretrained(..., safe_serialization=True)).",
        rule="pickle_refused",
    )


def weight_files(folder: Path, weights_name: str = WEIGHTS_NAME) -> list[Path]:
    """The safetensors weights of a model folder: ``weights_name``, or the shards its
    ``.index.json`` names (checked: plain names, all present); a folder with only pickles is refused."""
    weights = folder / weights_name
    index = folder / f"{weights_name}.index.json"
    if weights.is_file():
        return [weights]
    if index.is_file():
        weight_map = _read_json(index, "weights index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index.name} has no weight_map", rule="invalid_config")
        names = sorted(set(weight_map.values()))
        for name in names:
            if not isinstance(name, str) or "/" in name or "\\" in name or not name.endswith(".safetensors"):
                raise ModelLoadError(f"{index.name} names an invalid shard {name!r}", rule="invalid_config")
        files = [folder / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard {missing[0]} is missing", rule="not_found")
        return files
    pickles = _pickles_in(folder)
    if pickles:
        raise _pickle_error(pickles[0], folder.parent)
    raise ModelLoadError(f"{folder}: {weights_name} is missing", rule="not_found")


def _unet_folder(
    folder: Path, *, with_weights: bool = True
) -> tuple[dict, list[Path], dict[str, TensorInfo]]:
    """Validate ``config.json`` and the weights of a UNet folder (a single file or an index of shards)."""
    cfg = _read_json(folder / "config.json", "UNet config")
    _check_unet_config(cfg, str(folder / "config.json"))
    if not with_weights:
        return cfg, [], {}
    files = weight_files(folder)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for key, info in read_safetensors_header(f).items():
            if key in tensors:
                raise ModelLoadError(
                    f"{f.name}: tensor {key!r} appears in two shards", rule="corrupt_safetensors"
                )
            tensors[key] = info
    return cfg, files, tensors


def _resolve_hub(repo_id: str, revision: str | None) -> _Layout:
    if revision is None:
        raise ModelLoadError(
            f"{repo_id}: pin a revision (a commit sha, or a tag) so that the job is reproducible",
            rule="revision_required",
        )
    if not isinstance(revision, str) or not _REVISION.match(revision) or ".." in revision:
        raise ModelLoadError(f"{repo_id}: invalid revision {revision!r}", rule="not_found")
    # JSON first: the architecture is checked before any weight is downloaded.
    folder = _hub_download(repo_id, revision, ["*.json"])
    config_only = _resolve_local(folder, with_weights=False)
    prefix = "unet/" if config_only.kind == "pipeline" else ""
    folder = _hub_download(
        repo_id, revision, [f"{prefix}{WEIGHTS_NAME}", f"{prefix}diffusion_pytorch_model*.safetensors*"]
    )
    try:
        layout = _resolve_local(folder)
    except ModelLoadError as exc:
        if exc.rule == "not_found" and not _hub_offline():
            pickle = _hub_pickle_name(repo_id, revision)
            if pickle:
                raise ModelLoadError(
                    f"{repo_id}@{revision} has only pickle weights ({pickle}); pickles are never loaded",
                    rule="pickle_refused",
                ) from None
        if exc.rule == "not_found" and _hub_offline():
            raise ModelLoadError(
                f"{repo_id}@{revision}: the weights are not in the local cache and HF_HUB_OFFLINE is set",
                rule="hub_unavailable",
            ) from None
        raise
    layout.extra["hub"] = {"repo_id": repo_id, "revision": revision}
    return layout


def _hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def _hub_download(repo_id: str, revision: str, patterns: list[str]) -> Path:
    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    where = f"{repo_id}@{revision}"
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=_hub_offline(),
        )
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as exc:
        raise ModelLoadError(
            f"{where} was not found on the hub (or is gated): {exc}", rule="not_found"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelLoadError(
            f"{where} is not in the local cache and the hub cannot be reached (HF_HUB_OFFLINE or no network)",
            rule="hub_unavailable",
        ) from None
    except ValueError as exc:  # HFValidationError: a malformed repo id or revision
        raise ModelLoadError(f"{where}: {exc}", rule="not_found") from None
    except Exception as exc:  # OfflineModeIsEnabled, HTTP and connection errors
        raise ModelLoadError(
            f"{where}: the hub is unavailable ({type(exc).__name__}: {exc})", rule="hub_unavailable"
        ) from None
    return Path(folder)


def _hub_pickle_name(repo_id: str, revision: str) -> str | None:
    try:
        from huggingface_hub import list_repo_files

        files = list_repo_files(repo_id, revision=revision)
    except Exception:
        return None
    return next((f for f in files if f.lower().endswith(PICKLE_SUFFIXES)), None)


# --------------------------------------------------------------------------- loading (torch)


def _guard(ref, fn):
    try:
        return fn()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"{ref}: loading failed ({type(exc).__name__}: {exc})", rule="load_failed"
        ) from exc


def _meta_unet(cfg: dict[str, Any], where: str):
    """Build the UNet on the meta device (no memory) to learn its parameter names and shapes."""
    import torch
    from diffusers import UNet2DModel

    try:
        with torch.device("meta"):
            return UNet2DModel.from_config(cfg)
    except Exception as exc:
        raise ModelLoadError(
            f"{where}: the config does not build a UNet2DModel ({exc})", rule="invalid_config"
        ) from None


def _compare(
    expected: dict[str, tuple[int, ...]], found: dict[str, TensorInfo], *, rule: str, what: str
) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != found[k].shape)
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} with another shape (e.g. {k}: {found[k].shape} instead of {tuple(expected[k])})"
        )
    raise ModelLoadError(f"{what}: " + "; ".join(parts), rule=rule)


def _load_tensors(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f), device="cpu"))
        except Exception as exc:
            raise ModelLoadError(
                f"{f.name}: safetensors could not read it ({exc})", rule="corrupt_safetensors"
            ) from None
    return state


def _load_pipeline(ref: str | Path, revision: str | None):
    import diffusers

    layout = _resolve(ref, revision)
    where = str(layout.root)
    meta = _meta_unet(layout.unet_config, where)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    _compare(
        expected, layout.tensors, rule="config_mismatch", what=f"{where}: the weights do not fit config.json"
    )
    state = _load_tensors(layout.weight_files)
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    persistent = set(expected)
    if all(name in persistent for name, _ in meta.named_buffers()):
        unet = meta
        unet.load_state_dict(state, strict=True, assign=True)
    else:  # non-persistent buffers would stay on the meta device: build for real
        unet = diffusers.UNet2DModel.from_config(layout.unet_config)
        unet.load_state_dict(state, strict=True)
    leftovers = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.device.type == "meta"]
    if leftovers:
        raise ModelLoadError(f"{where}: {leftovers[0]} was not loaded", rule="config_mismatch")
    unet.eval()
    scheduler_cls = getattr(diffusers, layout.scheduler_class)
    try:
        scheduler = (
            scheduler_cls.from_config(layout.scheduler_config) if layout.scheduler_config else scheduler_cls()
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{where}: the scheduler config is invalid ({exc})", rule="invalid_config"
        ) from None
    return diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)


def _load_unet_state(ref: str | Path, like) -> dict:
    path = Path(ref)
    if not os.path.lexists(path):
        raise ModelLoadError(f"{ref} does not exist", rule="not_found")
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            _resolve_file(path)  # raises pickle_refused / unsupported_format
        files = [path]
        tensors = read_safetensors_header(path)
    else:
        folder = path / "unet" if (path / "model_index.json").is_file() else path
        if not (folder / "config.json").is_file():
            pickles = _pickles_in(folder)
            if pickles:
                raise _pickle_error(pickles[0], path)
            raise ModelLoadError(f"{path} holds no UNet (config.json + {WEIGHTS_NAME})", rule="not_found")
        _, files, tensors = _unet_folder(folder)
    reference = like.state_dict()
    _compare(
        {k: tuple(v.shape) for k, v in reference.items()},
        tensors,
        rule="lineage_mismatch",
        what=f"{path} is not of the same lineage (keys or shapes differ)",
    )
    state = _load_tensors(files)
    return {k: v.to(dtype=reference[k].dtype) for k, v in state.items()}
