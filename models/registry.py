"""Which class serves which ``model_type``, and the one function that builds a loaded model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from loguru import logger

from tgi_npu_backend.distributed import ParallelContext
from tgi_npu_backend.kernels.base import AttentionBackend
from tgi_npu_backend.models.base import CausalLM
from tgi_npu_backend.models.bloom import BloomForCausalLM
from tgi_npu_backend.models.config import ModelConfig
from tgi_npu_backend.models.gemma import GemmaForCausalLM
from tgi_npu_backend.models.layers.packing import gemm_profile, pack_cpu_weights
from tgi_npu_backend.models.layers.quant import QuantConfig
from tgi_npu_backend.weights import Weights

MODELS: dict[str, type[CausalLM]] = {
    "bloom": BloomForCausalLM,
    "gemma": GemmaForCausalLM,
}


def read_model_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ValueError(f"{path} does not exist: is {model_dir} a Hugging Face model directory?")
    return ModelConfig.from_hf(json.loads(path.read_text()))


def load_model(
    model_dir: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    backend: AttentionBackend,
    parallel: ParallelContext = ParallelContext(),
    quant: QuantConfig | None = None,
    cpu_gemm: str = "auto",
) -> CausalLM:
    """Build the model ``config.json`` names and load its weights strictly (this rank's shard):
    every parameter read, shapes checked, and no tensor left unused. ``quant``: the int8 scheme
    of the decoder-block linears (``quant.detect``). ``cpu_gemm``: how float32 CPU linears run
    (``packing.gemm_profile``: "auto", "packed" or "plain")."""
    config = read_model_config(model_dir)
    cls = MODELS.get(config.model_type)
    if cls is None:  # ModelConfig and MODELS disagree: a programming error, still say it plainly
        raise ValueError(
            f"no model class for model_type {config.model_type!r}; have {sorted(MODELS)}"
        )
    weights = Weights(
        model_dir, dtype=dtype, device=device, parallel=parallel, resolver=cls.weight_names
    )
    model = cls(
        config, backend=backend, parallel=parallel, dtype=dtype, device=device, quant=quant
    )
    model.load_weights(weights)
    weights.check_all_used(model.allowed_unused())
    gemm = gemm_profile(model, cpu_gemm)
    if gemm.measured or cpu_gemm != "auto":
        logger.info(f"float32 CPU linears ({cpu_gemm}): {gemm.describe()}")
    packed, copy_bytes = pack_cpu_weights(model, gemm)
    if packed:
        logger.info(
            f"{packed} CPU weights reordered into oneDNN's layout"
            + (f"; the tied LM head runs from a packed bfloat16 copy (+{copy_bytes / 2**20:.0f} MiB)"
               if copy_bytes else "")
        )
    model.finish_load()
    return model.eval()
