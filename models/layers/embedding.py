"""Vocabulary-parallel embedding and LM head.

Each rank holds rows ``[rank * V/world, (rank + 1) * V/world)`` of the ``[V, hidden]`` table.
The embedding zeroes the rows of ids outside its shard and sums over ranks; the LM head computes
logits for its shard and gathers them, so every rank ends with the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tgi_npu_backend.distributed import ParallelContext
from tgi_npu_backend.models.layers.cpu_gemm import PACKED, GemmProfile
from tgi_npu_backend.models.layers.linear import linear
from tgi_npu_backend.weights import Weights


class VocabParallelEmbedding(nn.Module):
    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        parallel: ParallelContext,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.local_vocab = parallel.split(num_embeddings, "vocab_size")
        self.vocab_start = parallel.rank * self.local_vocab
        self.weight = nn.Parameter(
            torch.empty(self.local_vocab, embedding_dim, dtype=dtype, device=device),
            requires_grad=False,
        )  # [V_local, hidden]

    def load(self, weights: Weights, prefix: str) -> None:
        shape = (self.num_embeddings, self.embedding_dim)
        self.weight.data.copy_(weights.get_sharded(f"{prefix}.weight", 0, shape))

    def forward(self, input_ids: Tensor) -> Tensor:  # [T] -> [T, hidden]
        if not self.parallel.is_parallel:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return self.parallel.all_reduce(out)


class ParallelLMHead(nn.Module):
    """``[N, hidden] -> [N, vocab]`` float32 logits, the full vocabulary on every rank.

    ``tied`` reuses an embedding's table (no own parameter, nothing to load). ``gemm``: how a
    plain float32 table runs on the CPU (``GemmProfile.head_profile``; ``packing`` sets it).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        parallel: ParallelContext,
        tied: VocabParallelEmbedding | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tied = tied
        # a oneDNN-packed copy of the tied table, made by ``packing.pack_cpu_weights`` (CPU,
        # bfloat16); a buffer, so that the weights' bytes count it
        self.register_buffer("packed", None, persistent=False)
        self.gemm: GemmProfile = PACKED.head_profile()
        if tied is None:
            local = parallel.split(num_embeddings, "vocab_size")
            self.weight = nn.Parameter(
                torch.empty(local, embedding_dim, dtype=dtype, device=device), requires_grad=False
            )  # [V_local, hidden]

    def load(self, weights: Weights, prefix: str) -> None:
        assert self.tied is None, "a tied LM head has no weights of its own"
        shape = (self.num_embeddings, self.embedding_dim)
        self.weight.data.copy_(weights.get_sharded(f"{prefix}.weight", 0, shape))

    @property
    def table(self) -> Tensor:
        """The plain ``[V_local, hidden]`` table: the tied embedding's, else this head's own."""
        return self.tied.weight if self.tied is not None else self.weight

    def forward(self, hidden: Tensor) -> Tensor:  # [N, hidden] -> [N, vocab] float32
        weight = self.packed if self.packed is not None else self.table
        # NOTE: matmul in the model dtype and upcast after, as HF does (logits.float()).
        logits = linear(hidden, weight, None, self.gemm).float()  # [N, V_local]
        return self.parallel.all_gather_last_dim(logits)
