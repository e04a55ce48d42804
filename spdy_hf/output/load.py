"""Loading a saved SPDY output in its fast form: the job it was made by, and the removed heads and neurons cut out
with the sparse kernels of the backend it was profiled for (`spdy_hf.deploy`)."""

from __future__ import annotations

import logging
import os

import torch

from ..config import SPDYConfig
from ..deploy.shrink import STRUCTURED_SPARSE, deploy_profile, read_profile_file
from ..errors import SPDYError
from ..latency.backend import to_target_device, working_dtype
from ..modeling.loading import cast_weights, load_model_and_tokenizer

logger = logging.getLogger(__name__)


def saved_job(spdy) -> SPDYConfig:
    """The job config a saved model's config.json holds under "spdy", checked field by field like a recipe."""
    if not isinstance(spdy, dict) or not isinstance(spdy.get("config"), dict):
        raise SPDYError("config.json: 'spdy' must be an object holding the job's 'config' object, as spdy_hf saves "
                        "it; this one is not (a damaged or hand-edited file).")
    try:
        return SPDYConfig.from_dict(spdy["config"], strict=False)
    except SPDYError as e:
        raise SPDYError(f"config.json: spdy.config: {e}") from e


def load_pretrained(name_or_path: str, kernels: bool = True, trust_remote_code: bool = False):
    """Loads a saved SPDY model (safetensors only) and, with `kernels`, puts it in its fast form for the backend it
    was profiled for: removed heads and neurons cut out, CSR `FastLinear`s on cpu, 2:4 semi-structured weights on
    cuda (on the GPU, in the profile's dtype), the weights in the dtype the job held them in (float32, or a CPU
    regime's bfloat16). Where that backend is missing here, the sparse parts stay dense, with a warning.

    Returns (model, tokenizer, profile entries). The zeros are the masks: for further training keep them with
    `spdy_hf.integrations.trainer.SPDYPruningCallback(path)`.
    """
    model, tokenizer = load_model_and_tokenizer(name_or_path, trust_remote_code=trust_remote_code, dtype="auto")
    spdy = getattr(model.config, "spdy", None)
    profile_path = os.path.join(name_or_path, "spdy_profile.json") if os.path.isdir(name_or_path) else None
    if not spdy or profile_path is None or not os.path.isfile(profile_path):
        raise SPDYError(f"{name_or_path} is not a saved SPDY model (no 'spdy' key in config.json or no "
                        "spdy_profile.json); load it with from_pretrained instead.")
    profile, groups = read_profile_file(profile_path)
    job = saved_job(spdy)
    cast_weights(model, working_dtype(job.backend, job.regime.dtype))  # as the job held it
    if not kernels:
        return model, tokenizer, profile
    backend = job.backend
    if backend == "cuda" and not torch.cuda.is_available():
        if groups is None:
            logger.warning("%s was profiled for 2:4 kernels on an NVIDIA GPU; there is none here, so it runs dense "
                           "(same outputs, no speedup).", name_or_path)
            return model, tokenizer, profile
        logger.warning("%s was profiled for an NVIDIA GPU; there is none here, so its removed heads and neurons are "
                       "cut out, and what the profile made 2:4 runs as dense (zero-filled) on the CPU.", name_or_path)
        backend = "cpu"
        # a combination keeps its shrink; a sparse level has no kernel here, so its zeros stay in dense weights
        kind = {"structured": "structured", STRUCTURED_SPARSE: "structured"}
        groups = [{**g, "family": kind.get(g["family"], "dense")} for g in groups]
    else:
        to_target_device(model, backend, job.regime.dtype)  # cuda: on the GPU, in the regime's dtype
    deploy_profile(model, profile, groups, backend)
    return model, tokenizer, profile
