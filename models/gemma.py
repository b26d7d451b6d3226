"""Gemma (Gemma 1: google/gemma-2b, gemma-7b and their -it variants).

Quirks named where they happen: ``sqrt(hidden)`` embedding scale in the model dtype, ``(1 + w)``
float32 RMSNorm, tanh GeLU whatever the config says, explicit ``head_dim`` (256 for Gemma-7B,
not hidden / heads), a single KV head (Gemma-2B) replicated across tensor-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tgi_npu_backend.distributed import ParallelContext
from tgi_npu_backend.kernels.base import AttentionBackend, AttentionMetadata
from tgi_npu_backend.models.base import CausalLM
from tgi_npu_backend.models.config import ModelConfig
from tgi_npu_backend.models.layers.activation import GeluAndMul
from tgi_npu_backend.models.layers.attention import PagedAttention
from tgi_npu_backend.models.layers.embedding import VocabParallelEmbedding
from tgi_npu_backend.models.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from tgi_npu_backend.models.layers.norm import GemmaRMSNorm
from tgi_npu_backend.models.layers.quant import QuantConfig
from tgi_npu_backend.models.layers.rotary import RotaryEmbedding
from tgi_npu_backend.weights import Weights


class GemmaAttention(nn.Module):
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
        d = cfg.head_dim
        ws = parallel.world_size
        self.num_heads = cfg.heads_per_rank(ws)
        self.num_kv_heads = cfg.kv_heads_per_rank(ws)
        self.head_dim = d
        q_shard = (parallel.rank, ws)
        kv_shard = cfg.kv_shard(parallel.rank, ws)  # replicated when num_kv_heads < world size
        self.qkv_proj = MergedColumnParallelLinear(
            cfg.hidden_size,
            [cfg.num_heads * d, cfg.num_kv_heads * d, cfg.num_kv_heads * d],
            shards=[q_shard, kv_shard, kv_shard],
            bias=cfg.attention_bias,
            parallel=parallel,
            dtype=dtype,
            device=device,
            quant=quant,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_heads * d,
            cfg.hidden_size,
            bias=cfg.attention_bias,
            parallel=parallel,
            dtype=dtype,
            device=device,
            quant=quant,
        )
        self.attn = PagedAttention(
            layer_idx=layer_idx,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=d,
            scale=d**-0.5,
            backend=backend,
            device=device,
        )

    def load(self, weights: Weights, prefix: str) -> None:
        self.qkv_proj.load(weights, [f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"])
        self.o_proj.load(weights, f"{prefix}.o_proj")

    def forward(
        self,
        rope: tuple[Tensor, Tensor],  # (cos, sin) [T, 1, D] of this pass's positions
        hidden: Tensor,
        kv_cache: tuple[Tensor, Tensor],
        meta: AttentionMetadata,
    ) -> Tensor:  # [T, hidden] -> [T, hidden]
        t = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.local_out, dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.attn.backend.rotary(q, k, *rope)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))


class GemmaMLP(nn.Module):
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
        inter = cfg.intermediate_size
        kw = {"parallel": parallel, "dtype": dtype, "device": device, "quant": quant}
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], **kw)
        # NOTE: Gemma always uses tanh GeLU; early Gemma configs said "gelu" (exact) although the
        # model was trained with the tanh approximation (transformers PR 29402 / the Gemma fix).
        self.act = GeluAndMul(approximate="tanh")
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, **kw)

    def load(self, weights: Weights, prefix: str) -> None:
        self.gate_up_proj.load(weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"])
        self.down_proj.load(weights, f"{prefix}.down_proj")

    def forward(self, x: Tensor) -> Tensor:  # [T, hidden]
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
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
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps, backend=backend, **kw)
        self.self_attn = GemmaAttention(
            cfg, layer_idx, backend=backend, parallel=parallel, quant=quant, **kw
        )
        self.post_attention_layernorm = GemmaRMSNorm(
            cfg.hidden_size, cfg.norm_eps, backend=backend, **kw
        )
        self.mlp = GemmaMLP(cfg, parallel=parallel, quant=quant, **kw)

    def load(self, weights: Weights, prefix: str) -> None:
        self.input_layernorm.load(weights, f"{prefix}.input_layernorm")
        self.self_attn.load(weights, f"{prefix}.self_attn")
        self.post_attention_layernorm.load(weights, f"{prefix}.post_attention_layernorm")
        self.mlp.load(weights, f"{prefix}.mlp")

    def forward(
        self,
        rope: tuple[Tensor, Tensor],
        hidden: Tensor,
        kv_cache: tuple[Tensor, Tensor],
        meta: AttentionMetadata,
    ) -> Tensor:  # [T, hidden]
        attn = self.self_attn(rope, self.input_layernorm(hidden), kv_cache, meta)
        normed, hidden = self.post_attention_layernorm.add_forward(attn, hidden)
        return self.mlp(normed).add_(hidden)  # into the MLP's fresh output


class GemmaForCausalLM(CausalLM):
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
        cfg = config
        kw = {"dtype": dtype, "device": self.device}
        self.embed_tokens = VocabParallelEmbedding(
            cfg.vocab_size, cfg.hidden_size, parallel=parallel, **kw
        )
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(cfg, i, backend=backend, parallel=parallel, quant=quant, **kw)
            for i in range(cfg.num_layers)
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps, backend=backend, **kw)
        # One rotary table for the whole model: cos/sin depend only on positions, so they are
        # computed once per forward pass, not once per layer.
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, device=self.device)
        self.lm_head = self.make_lm_head(self.embed_tokens)
        # NOTE: the sqrt(hidden) embedding scale is rounded to the model dtype before the multiply
        # (HF: a float32 tensor cast to the weight dtype): sqrt(3072) = 55.4256 becomes 55.5 in
        # bfloat16, and the model was trained that way.
        normalizer = torch.tensor(cfg.hidden_size**0.5, dtype=torch.float32).to(dtype)
        self.register_buffer("normalizer", normalizer.to(self.device), persistent=False)

    def load_weights(self, weights: Weights) -> None:
        self.embed_tokens.load(weights, "model.embed_tokens")
        for i, layer in enumerate(self.layers):
            layer.load(weights, f"model.layers.{i}")
        self.norm.load(weights, "model.norm")
        self.load_lm_head(self.lm_head, weights)

    def allowed_unused(self) -> set[str]:
        # Older conversions saved the rotary inverse frequencies; they are recomputed here.
        return {"model.layers.*.self_attn.rotary_emb.inv_freq"}

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        meta: AttentionMetadata,
    ) -> Tensor:
        hidden = self.embed_tokens(input_ids) * self.normalizer  # [T, hidden]
        rope = self.rotary.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(rope, hidden, kv_cache, meta)
        return self.norm(hidden)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden)
