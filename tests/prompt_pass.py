"""One prefill pass of a prompt through a loaded model on the CPU: its logits (shared by the
model and quantization tests)."""

from __future__ import annotations

import torch
from tgi_npu_backend.kernels import AttentionMetadata, Phase
from tgi_npu_backend.models.base import CausalLM
from torch import Tensor

CPU = torch.device("cpu")
BLOCK = 16


def prompt_logits(model: CausalLM, ids: list[int]) -> Tensor:
    """[len(ids), vocab] float32 logits of one prefill pass."""
    n = len(ids)
    blocks = list(range(1, 1 + (n + BLOCK - 1) // BLOCK))
    caches = [
        model.backend.allocate_kv_cache(len(blocks) + 1, BLOCK, model.num_kv_heads,
                                        model.head_dim, model.dtype, CPU)
        for _ in range(model.num_layers)
    ]
    meta = AttentionMetadata.build(
        phase=Phase.PREFILL, slot_mapping=[blocks[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)],
        block_tables=[blocks], context_lens=[0], query_lens=[n], block_size=BLOCK, device=CPU,
    )
    with torch.inference_mode():
        meta = model.backend.prepare(meta)
        hidden = model(torch.tensor(ids), torch.arange(n), caches, meta)
        return model.compute_logits(hidden).float()
