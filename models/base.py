"""``CausalLM``: the interface every model offers the rest of the server.

A model consumes a flat, ragged batch: the tokens of all sequences of one pass concatenated
(``T`` tokens), each with its absolute position, plus the paged KV caches and the
``AttentionMetadata`` that says which tokens belong to which sequence and where their K/V live.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from tgi_npu_backend.distributed import ParallelContext
from tgi_npu_backend.kernels.base import AttentionBackend, AttentionMetadata
from tgi_npu_backend.models.config import ModelConfig
from tgi_npu_backend.models.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tgi_npu_backend.models.layers.quant import QuantConfig
from tgi_npu_backend.weights import Weights

LM_HEAD = "lm_head.weight"


class CausalLM(nn.Module, ABC):
    config: ModelConfig

    def __init__(
        self,
        config: ModelConfig,
        *,
        backend: AttentionBackend,
        parallel: ParallelContext = ParallelContext(),
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        quant: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        # Decoder-block linears run the checkpoint's (or --quantize eetq's) int8 scheme;
        # embeddings and the LM head stay float, as in TGI.
        self.quant = quant
        self.backend = backend
        self.parallel = parallel
        self.dtype = dtype
        self.device = torch.device(device)
        # What the KV cache needs, per layer, on this rank.
        self.num_layers = config.num_layers
        self.num_kv_heads = config.kv_heads_per_rank(parallel.world_size)
        self.head_dim = config.head_dim

    # ---- loading -----------------------------------------------------------------------------
    @staticmethod
    def weight_names(name: str) -> Iterable[str]:
        """On-disk names to try for ``name`` (override for checkpoints with several namings)."""
        return (name,)

    @abstractmethod
    def load_weights(self, weights: Weights) -> None:
        """Fill every parameter from ``weights`` (each rank reads only its shard)."""

    def allowed_unused(self) -> set[str]:
        """On-disk names (or fnmatch patterns) a checkpoint may carry that the model ignores."""
        return set()

    def make_lm_head(self, embedding: VocabParallelEmbedding) -> ParallelLMHead:
        cfg = self.config
        return ParallelLMHead(
            cfg.vocab_size,
            cfg.hidden_size,
            parallel=self.parallel,
            tied=embedding if cfg.tie_word_embeddings else None,
            dtype=self.dtype,
            device=self.device,
        )

    def load_lm_head(self, lm_head: ParallelLMHead, weights: Weights) -> None:
        """Untied: read ``lm_head.weight``. Tied: an explicit ``lm_head.weight`` may be present
        (some exports save the tied copy); its shape is checked and it is consumed unread, as
        HF does when it ties the head to the embedding."""
        if lm_head.tied is None:
            lm_head.load(weights, LM_HEAD.removesuffix(".weight"))
            return
        if weights.has(LM_HEAD):
            expected = (self.config.vocab_size, self.config.hidden_size)
            found = weights.shape(LM_HEAD)
            if found != expected:
                raise ValueError(
                    f"tensor {LM_HEAD!r} has shape {list(found)} in the checkpoint but the model "
                    f"expects {list(expected)} (tied to the word embeddings)"
                )
            weights.mark_used(LM_HEAD)

    def finish_load(self) -> None:
        """Called once the weights are loaded and in their final layout (``registry.load_model``,
        after packing): set up what depends on them. Nothing by default."""

    # ---- running -----------------------------------------------------------------------------
    @abstractmethod
    def forward(
        self,
        input_ids: Tensor,  # [T] int64, all tokens of this pass (ragged sequences concatenated)
        positions: Tensor,  # [T] int64, absolute position of each token in its sequence
        kv_caches: list[tuple[Tensor, Tensor]],  # per layer (key_cache, value_cache)
        meta: AttentionMetadata,
    ) -> Tensor:  # [T, hidden] final hidden states (after the final norm)
        ...

    @abstractmethod
    def compute_logits(self, hidden: Tensor) -> Tensor:
        """``[N, hidden]`` -> ``[N, vocab_size]`` float32, the full vocabulary on every rank."""
