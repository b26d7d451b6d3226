"""BLOOM (bigscience/bloom*): ALiBi attention, embedding LayerNorm, biases everywhere, tied head.

Checkpoint quirks handled here:
* the fused ``query_key_value`` is laid out ``(heads, 3, head_dim)`` (q, k, v interleaved per
  head), un-interleaved at load time into ``[q | k | v]``;
* keys come with ``transformer.`` (``BloomForCausalLM`` exports) or without it (bigscience's own
  ``bloom-560m`` naming); an explicit ``lm_head.weight`` may be present and is the tied copy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from loguru import logger
from tgi_npu_backend.kernels.base import AttentionBackend, AttentionMetadata
from tgi_npu_backend.models.base import CausalLM
from tgi_npu_backend.models.bloom_one_token import BloomOneToken
from tgi_npu_backend.models.config import ModelConfig
from tgi_npu_backend.models.layers.activation import BloomGelu
from tgi_npu_backend.models.layers.alibi import alibi_slopes_for_rank
from tgi_npu_backend.models.layers.attention import PagedAttention
from tgi_npu_backend.models.layers.embedding import VocabParallelEmbedding
from tgi_npu_backend.models.layers.linear import ColumnParallelLinear, RowParallelLinear
from tgi_npu_backend.models.layers.norm import LayerNorm
from tgi_npu_backend.models.layers.quant import QuantConfig
from torch import Tensor, nn

from tgi_npu_backend.distributed import ParallelContext
from tgi_npu_backend.weights import Weights

PREFIX = "transformer."


class BloomAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        *,
        backend: AttentionBackend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        hidden, d = cfg.hidden_size, cfg.head_dim
        self.local_heads = cfg.heads_per_rank(parallel.world_size)
        self.head_dim = d
        self.rows_device = device
        # Each rank's heads are a contiguous block of rows of the (heads, 3, head_dim) layout,
        # so a plain row shard reads exactly this rank's q, k and v.
        kw = {"bias": True, "parallel": parallel, "dtype": dtype, "device": device, "quant": quant}
        self.query_key_value = ColumnParallelLinear(hidden, 3 * hidden, **kw)
        self.dense = RowParallelLinear(hidden, hidden, **kw)
        self.attn = PagedAttention(
            layer_idx=layer_idx,
            num_heads=self.local_heads,
            num_kv_heads=self.local_heads,
            head_dim=d,
            scale=1.0 / math.sqrt(d),
            backend=backend,
            device=device,
            alibi_slopes=alibi_slopes_for_rank(cfg.num_heads, parallel.rank, parallel.world_size),
        )

    def load(self, weights: Weights, prefix: str) -> None:
        self.query_key_value.load(weights, f"{prefix}.query_key_value")
        # Un-interleave: rows (heads, 3, head_dim) -> (3, heads, head_dim) = [q | k | v]
        # (weights, biases and any per-row quantization scales alike).
        h, d = self.local_heads, self.head_dim
        rows = torch.arange(3 * h * d, device=self.rows_device)
        self.query_key_value.permute_out_rows(rows.view(h, 3, d).transpose(0, 1).reshape(-1))
        self.dense.load(weights, f"{prefix}.dense")

    def forward(
        self, hidden: Tensor, kv_cache: tuple[Tensor, Tensor], meta: AttentionMetadata
    ) -> Tensor:  # [T, hidden] -> [T, hidden]
        t = hidden.shape[0]
        q, k, v = self.query_key_value(hidden).chunk(3, dim=-1)  # 3 x [T, H_local * D]
        shape = (t, self.local_heads, self.head_dim)
        out = self.attn(q.view(shape), k.view(shape), v.view(shape), kv_cache, meta)
        return self.dense(out)


class BloomMLP(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        kw = {"bias": True, "parallel": parallel, "dtype": dtype, "device": device, "quant": quant}
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.gelu = BloomGelu(inplace=True)  # over dense_h_to_4h's output, a temporary
        self.dense_4h_to_h = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def load(self, weights: Weights, prefix: str) -> None:
        self.dense_h_to_4h.load(weights, f"{prefix}.dense_h_to_4h")
        self.dense_4h_to_h.load(weights, f"{prefix}.dense_4h_to_h")

    def forward(self, x: Tensor) -> Tensor:  # [T, hidden]
        return self.dense_4h_to_h(self.gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        *,
        backend: AttentionBackend,
        parallel: ParallelContext,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantConfig | None = None,
    ) -> None:
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.self_attention = BloomAttention(
            cfg, layer_idx, backend=backend, parallel=parallel, quant=quant, **kw
        )
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.mlp = BloomMLP(cfg, parallel=parallel, quant=quant, **kw)
        # NOTE: some BLOOM variants take the residual after the LayerNorm instead of before it.
        self.residual_after_norm = cfg.apply_residual_connection_post_layernorm

    def load(self, weights: Weights, prefix: str) -> None:
        self.input_layernorm.load(weights, f"{prefix}.input_layernorm")
        self.self_attention.load(weights, f"{prefix}.self_attention")
        self.post_attention_layernorm.load(weights, f"{prefix}.post_attention_layernorm")
        self.mlp.load(weights, f"{prefix}.mlp")

    def forward(
        self, hidden: Tensor, kv_cache: tuple[Tensor, Tensor], meta: AttentionMetadata
    ) -> Tensor:  # [T, hidden]
        # the residual adds go into the sublayers' fresh outputs (see BloomGelu's inplace)
        normed = self.input_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        hidden = self.self_attention(normed, kv_cache, meta).add_(residual)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        return self.mlp(normed).add_(residual)


class BloomForCausalLM(CausalLM):
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
        super().__init__(
            config, backend=backend, parallel=parallel, dtype=dtype, device=device, quant=quant
        )
        kw = {"dtype": dtype, "device": self.device}
        cfg = config
        self.word_embeddings = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, parallel=parallel, **kw
        )
        self.word_embeddings_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.h = nn.ModuleList(
            BloomBlock(cfg, i, backend=backend, parallel=parallel, quant=quant, **kw)
            for i in range(cfg.num_layers)
        )
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.lm_head = self.make_lm_head(self.word_embeddings)
        self.one_token: BloomOneToken | None = None  # set by finish_load where it qualifies

    @staticmethod
    def weight_names(name: str) -> Iterable[str]:
        # The model asks for "transformer.*"; bloom-560m-style checkpoints have no prefix.
        return (name, name.removeprefix(PREFIX))

    def load_weights(self, weights: Weights) -> None:
        self.word_embeddings.load(weights, f"{PREFIX}word_embeddings")
        self.word_embeddings_layernorm.load(weights, f"{PREFIX}word_embeddings_layernorm")
        for i, block in enumerate(self.h):
            block.load(weights, f"{PREFIX}h.{i}")
        self.ln_f.load(weights, f"{PREFIX}ln_f")
        self.load_lm_head(self.lm_head, weights)

    def finish_load(self) -> None:
        """A decode step of one sequence runs the blocks natively where that is the same
        computation on the same kernels (``bloom_one_token.py``)."""
        self.one_token, why = BloomOneToken.for_model(self)
        if self.one_token is not None:
            logger.info(f"BLOOM decode steps of one sequence: native blocks (device_kernels/cpu_bloom.c; {why})")
        elif why.startswith("measured"):
            logger.info(f"BLOOM decode steps of one sequence: PyTorch blocks ({why})")
        else:
            logger.debug(f"BLOOM decode steps of one sequence: PyTorch blocks ({why})")

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        meta: AttentionMetadata,
    ) -> Tensor:
        # ALiBi: positions enter through the attention bias, which the backend derives from meta.
        if self.one_token is not None and self.one_token.takes(input_ids, kv_caches, meta):
            return self.one_token(input_ids, kv_caches, meta)  # embedding to ln_f, in one call
        hidden = self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # [T, hidden]
        for block, kv_cache in zip(self.h, kv_caches, strict=True):
            hidden = block(hidden, kv_cache, meta)
        return self.ln_f(hidden)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)
