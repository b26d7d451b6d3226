"""BLOOM's decoder for a decode step of one sequence, in one native call per step
(``device_kernels/cpu_bloom.c``: the token's embedding and its LayerNorm, every block, the final
LayerNorm) instead of a dozen PyTorch ops and module calls per block.

Only where that is the same computation as the blocks': a float32 CPU model on one rank, every
decoder linear float and plain, its attention backend the CPU one with its native decode kernel,
and a float32 KV cache; and only where it measures faster. The float32 kernels must have been
measured at load (``TGI_NPU_CPU_GEMM=auto``, ``cpu_gemm.calibrate``; a model small enough to stay
packed, or ``packed``/``plain`` named by the operator, keeps its blocks), and then one step of
the PyTorch decoder and one native step are timed, alternated (``time_steps``): the native blocks run the
native one-row GEMV, which the calibration's single-weight probe may put a few percent either
side of MKL's, and save each block's dispatch, which it does not see. ``BloomOneToken.for_model``
says what it found; ``BloomForCausalLM.forward`` calls it for a DECODE pass of one token and
runs its modules otherwise. ``tests/models/test_bloom_one_token.py`` checks it against those
blocks and HF.
"""

from __future__ import annotations

import ctypes
import statistics
import time

import torch
from tgi_npu_backend.kernels import cpu_native
from tgi_npu_backend.kernels.base import MIN_BLOCK_SIZE, AttentionMetadata, Phase
from tgi_npu_backend.kernels.cpu import CpuBackend
from torch import Tensor


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


class BloomOneToken:
    """The native blocks of one model: the weights' addresses gathered once, at load."""

    def __init__(self, model, kernel) -> None:
        cfg = model.config
        first = model.h[0]
        self.kernel = kernel
        self.count = len(model.h)
        self.blocks = (cpu_native.BloomBlock * self.count)()
        self._kept: list[Tensor] = []  # every tensor whose address the blocks hold
        for block, b in zip(model.h, self.blocks, strict=True):
            attn, mlp = block.self_attention, block.mlp
            parts = {
                "ln1": block.input_layernorm, "qkv": attn.query_key_value, "dense": attn.dense,
                "ln2": block.post_attention_layernorm, "up": mlp.dense_h_to_4h, "down": mlp.dense_4h_to_h,
            }
            for name, module in parts.items():
                w, bias = module.weight.data, module.bias.data
                self._kept += [w, bias]
                setattr(b, f"{name}_w", _ptr(w))
                setattr(b, f"{name}_b", _ptr(bias))
                if not name.startswith("ln"):
                    setattr(b, f"{name}_ld", w.stride(0))
        slopes = first.self_attention.attn.alibi_slopes
        self._kept.append(slopes)
        embed, embed_ln, final_ln = model.word_embeddings.weight.data, model.word_embeddings_layernorm, model.ln_f
        self._kept += [embed, embed_ln.weight.data, embed_ln.bias.data, final_ln.weight.data, final_ln.bias.data]
        self.scratch = torch.empty(7 * cfg.hidden_size + cfg.intermediate_size, dtype=torch.float32)
        self.step = cpu_native.BloomStep(
            hidden=cfg.hidden_size, inter=cfg.intermediate_size, heads=first.self_attention.local_heads,
            head_dim=cfg.head_dim, eps=cfg.norm_eps, scale=first.self_attention.attn.scale,
            residual_after_norm=int(first.residual_after_norm), slopes=_ptr(slopes),
            scratch=_ptr(self.scratch), nthreads=1,
            embed=_ptr(embed), embed_ln_w=_ptr(embed_ln.weight.data), embed_ln_b=_ptr(embed_ln.bias.data),
            final_ln_w=_ptr(final_ln.weight.data), final_ln_b=_ptr(final_ln.bias.data),
            vocab=embed.shape[0],
        )

    @classmethod
    def for_model(cls, model) -> tuple[BloomOneToken | None, str]:
        """The native blocks for ``model`` (a loaded, packed ``BloomForCausalLM``), or None with
        the reason it does not qualify."""
        why = _not_eligible(model)
        if why:
            return None, why
        kernel = cpu_native.bloom_kernel()
        if kernel is None:
            return None, "the native kernel is not available here (needs AVX-512 and a C compiler)"
        native = cls(model, kernel)
        blocks, fused = time_steps(model, native)
        measured = f"measured: the modules {blocks * 1e3:.2f} ms a step, native {fused * 1e3:.2f} ms"
        return (native, measured) if fused < blocks else (None, measured)

    def takes(self, input_ids: Tensor, kv_caches: list[tuple[Tensor, Tensor]], meta: AttentionMetadata) -> bool:
        """A DECODE pass of one token over float32 caches in the CPU backend's layout."""
        if meta.phase is not Phase.DECODE or input_ids.shape[0] != 1:
            return False
        k, v = kv_caches[0]
        return k.dtype == v.dtype == torch.float32

    def _bind(self, kv_caches: list[tuple[Tensor, Tensor]]) -> None:
        """Every call (about 10 us): holding on to a pool between calls would keep a freed one
        (warmup's, the load-time timing's) alive, and its addresses could be reused."""
        shape = kv_caches[0][0].shape
        s = self.step
        if len(shape) != 4 or (shape[1], shape[3]) != (s.heads, s.head_dim):
            raise ValueError(f"KV caches shaped {list(shape)}: the native BLOOM blocks take "
                             f"[blocks, {s.heads} heads, block size, {s.head_dim}] (the CPU backend's)")
        for b, (k, v) in zip(self.blocks, kv_caches, strict=True):
            if not (k.is_contiguous() and v.is_contiguous() and k.dtype == v.dtype == torch.float32
                    and k.shape == v.shape == shape):
                raise ValueError("the native BLOOM blocks need contiguous float32 KV caches of one shape")
            b.key_cache, b.value_cache = _ptr(k), _ptr(v)
        s.num_blocks, s.block_size = shape[0], shape[2]

    def __call__(self, input_ids: Tensor, kv_caches: list[tuple[Tensor, Tensor]], meta: AttentionMetadata) -> Tensor:
        """The token ``input_ids`` [1] through the decoder: [1, hidden] after the final LayerNorm."""
        self._bind(kv_caches)
        out = torch.empty(1, self.step.hidden, dtype=torch.float32)
        table = meta.block_tables
        if table.dtype != torch.int32 or not table.is_contiguous():
            table = table.to(torch.int32).contiguous()
        s = self.step
        s.table, s.max_blocks = _ptr(table), table.shape[1]
        s.len, s.slot = meta.seq_lens_list[0], int(meta.slot_mapping[0])
        s.nthreads = torch.get_num_threads()
        s.token = int(input_ids[0])
        rc = self.kernel(_ptr(out), self.blocks, self.count, ctypes.byref(s))
        if rc != cpu_native.BLOOM_OK:
            raise _error(rc, s, table)
        return out


def _error(rc: int, s: cpu_native.BloomStep, table: Tensor) -> Exception:
    if rc == cpu_native.BLOOM_BAD_SLOT:
        return IndexError(f"slot {s.slot} is outside the KV cache ({s.num_blocks} blocks of {s.block_size})")
    if rc == cpu_native.BLOOM_BAD_TABLE:
        return IndexError(
            f"{s.len} tokens do not fit the block table row {table[0].tolist()} in a cache of "
            f"{s.num_blocks} blocks of {s.block_size}"
        )
    if rc == cpu_native.BLOOM_BAD_TOKEN:
        return IndexError(f"token id {s.token} is outside the vocabulary (ids 0 to {s.vocab - 1})")
    if rc == cpu_native.BLOOM_NO_MEMORY:
        return MemoryError("the native BLOOM blocks could not allocate their attention buffers")
    return RuntimeError(f"the native BLOOM blocks failed ({rc})")


def _not_eligible(model) -> str:
    """Why ``model``'s blocks cannot run natively ("" when they can)."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        return f"runs in {model.dtype} on {model.device.type}, not float32 on the CPU"
    if model.parallel.is_parallel:
        return "tensor parallel"
    embed = model.word_embeddings.weight
    if embed.is_mkldnn or embed.dtype != torch.float32 or not embed.is_contiguous():
        return "the embedding table is not a plain float32 one"
    backend = model.backend
    if not isinstance(backend, CpuBackend) or backend.native is None:
        return "the attention backend is not the CPU one with its native decode kernel"
    for block in model.h:
        attn, mlp = block.self_attention, block.mlp
        for linear in (attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h):
            w = linear.weight
            if linear.method is not None or w is None:
                return "quantized linears"
            if w.is_mkldnn or w.dtype != torch.float32 or w.stride(-1) != 1 or linear.bias is None:
                return "decoder weights packed or not plain float32"
            if not linear.gemm.measured:
                return "the float32 CPU kernels were not measured at load (a small model, or named)"
        if attn.attn.alibi_slopes is None:
            return "no ALiBi slopes"
    return ""


TIMING_REPEATS = 3


def time_steps(model, native: BloomOneToken, repeats: int = TIMING_REPEATS) -> tuple[float, float]:
    """Seconds for one token through ``model``'s decoder modules (embedding to final LayerNorm),
    and through ``native``, alternated ``repeats`` times (medians), over a scratch KV cache of two
    blocks holding a few tokens."""
    backend, bs = model.backend, MIN_BLOCK_SIZE
    caches = [
        backend.allocate_kv_cache(2, bs, model.num_kv_heads, model.head_dim, torch.float32, model.device)
        for _ in model.h
    ]
    meta = AttentionMetadata.build(
        phase=Phase.DECODE, slot_mapping=[bs + 4], block_tables=[[1]], context_lens=[4],
        query_lens=[1], block_size=bs, device=model.device,
    )
    token = torch.tensor([model.config.vocab_size // 2])

    def blocks() -> None:
        h = model.word_embeddings_layernorm(model.word_embeddings(token))
        for block, kv in zip(model.h, caches, strict=True):
            h = block(h, kv, meta)
        model.ln_f(h)

    times: dict[str, list[float]] = {"blocks": [], "native": []}
    with torch.inference_mode():
        meta = backend.prepare(meta)
        runs = {"blocks": blocks, "native": lambda: native(token, caches, meta)}
        for run in runs.values():  # untimed first calls
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["blocks"]), statistics.median(times["native"])
