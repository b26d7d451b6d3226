"""``text-generation-server selftest MODEL``: the first thing to run on a new Ascend host.

Every NPU operator the backend uses runs on random inputs of the served model's shapes, dtype and
block size, and is compared with the reference backend on the same device (max abs / rel error
against a per-dtype tolerance) and timed; then a few greedy decode steps of the real model run on
both paths. One table is printed; the exit status is non-zero when anything fails, and the
failing row names the torch_npu operator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from tgi_npu_backend.kernels.base import AttentionMetadata, Phase
from tgi_npu_backend.kernels.reference import ReferenceBackend
from tgi_npu_backend.models.layers.alibi import alibi_slopes as _alibi_slopes

# Max |npu - reference| allowed, relative to max |reference| (+ an absolute floor): fp16 keeps
# ~3 decimal digits and bf16 ~2; attention and norms accumulate in float32 on both paths.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float32: 1e-4}


@dataclass
class Row:
    check: str
    op: str
    max_abs: float
    max_rel: float
    tol: float
    npu_ms: float
    ref_ms: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tol


@dataclass(frozen=True)
class Shapes:
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    block_size: int
    alibi: bool
    rms_norm: bool
    rotary: bool


def _time(fn: Callable[[], object], sync: Callable[[], None], reps: int = 3) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def _compare(name: str, op: str, got: Tensor, want: Tensor, dtype, t_npu: float, t_ref: float) -> Row:
    got, want = got.float().cpu(), want.float().cpu()
    if not torch.isfinite(got).all():
        return Row(name, op, float("nan"), float("inf"), TOLERANCE[dtype], t_npu, t_ref)
    err = float((got - want).abs().max())
    scale = max(float(want.abs().max()), 1e-3)
    return Row(name, op, err, err / scale, TOLERANCE[dtype], t_npu, t_ref)


def operator_checks(
    backend, shapes: Shapes, dtype: torch.dtype, device: torch.device, sync: Callable[[], None],
    seed: int = 0,
) -> list[Row]:
    """Each backend kernel vs ``ReferenceBackend`` on the same random inputs."""
    ref = ReferenceBackend()
    g = torch.Generator().manual_seed(seed)
    s = shapes

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    # Three sequences: a fresh prompt, a prompt over a 2-block cached prefix, and decodes.
    bs = s.block_size
    num_blocks = 16
    lens = [bs + 5, 2 * bs + 7, 3]
    blocks = [[1, 2], [3, 4, 5], [6]]
    slopes = _alibi_slopes(s.heads).to(device) if s.alibi else None
    scale = s.head_dim**-0.5
    rows: list[Row] = []

    def caches() -> tuple[Tensor, Tensor]:
        kc, vc = ref.allocate_kv_cache(num_blocks, bs, s.kv_heads, s.head_dim, dtype, device)
        kc.copy_(rand(*kc.shape))
        vc.copy_(rand(*vc.shape))
        return kc, vc

    def meta(ctx: list[int], qlen: list[int], is_prefill: bool) -> AttentionMetadata:
        slots = [
            blocks[i][p // bs] * bs + p % bs
            for i in range(len(ctx))
            for p in range(ctx[i], ctx[i] + qlen[i])
        ]
        return AttentionMetadata.build(
            phase=Phase.PREFILL if is_prefill else Phase.DECODE, slot_mapping=slots, block_tables=blocks[: len(ctx)],
            context_lens=ctx, query_lens=qlen, block_size=bs, device=device,
        )

    alibi_tag = "_v2 (ALiBi)" if s.alibi else ""
    cases = [
        ("prefill", f"_npu_flash_attention{'_v2 (ALiBi)' if s.alibi else ''}", [0, 0], [lens[0], lens[1]], True),
        ("prefill over a cached prefix", f"_npu_paged_attention{alibi_tag}", [0, 2 * bs], [lens[0], 7], True),
        ("decode", f"_npu_paged_attention{alibi_tag}", [bs + 4, 2 * bs + 6, 2], [1, 1, 1], False),
    ]
    for name, op, ctx, qlen, is_prefill in cases:
        m = meta(ctx, qlen, is_prefill)
        t = sum(qlen)
        q, k, v = rand(t, s.heads, s.head_dim), rand(t, s.kv_heads, s.head_dim), rand(t, s.kv_heads, s.head_dim)
        kc, vc = caches()
        kc2, vc2 = kc.clone(), vc.clone()

        def run(b, kc=kc, vc=vc, q=q, k=k, v=v, m=m, is_prefill=is_prefill):
            m = b.prepare(m)
            b.store_kv(k, v, kc, vc, m)
            if is_prefill:
                return b.prefill(q, k, v, kc, vc, m, scale, slopes)
            return b.decode(q, kc, vc, m, scale, slopes)

        got = run(backend)
        want = run(ref, kc=kc2, vc=vc2)
        if name == "prefill":
            rows.append(_compare(
                "store_kv", "_npu_reshape_and_cache", torch.cat([kc, vc]), torch.cat([kc2, vc2]),
                dtype, _time(partial(backend.store_kv, k, v, kc, vc, backend.prepare(m)), sync),
                _time(partial(ref.store_kv, k, v, kc2, vc2, ref.prepare(m)), sync),
            ))
        rows.append(_compare(
            name, op, got, want, dtype, _time(partial(run, backend), sync),
            _time(partial(run, ref, kc=kc2, vc=vc2), sync),
        ))

    t = 37
    x, res = rand(t, s.hidden), rand(t, s.hidden)
    gamma = (1.0 + 0.1 * torch.randn(s.hidden, generator=g)).to(device)
    if s.rms_norm:
        rows.append(_compare(
            "rms_norm", "npu_rms_norm", backend.rms_norm(x, gamma, 1e-6), ref.rms_norm(x, gamma, 1e-6), dtype,
            _time(lambda: backend.rms_norm(x, gamma, 1e-6), sync), _time(lambda: ref.rms_norm(x, gamma, 1e-6), sync),
        ))
        got_y, got_s = backend.add_rms_norm(x, res, gamma, 1e-6)
        want_y, want_s = ref.add_rms_norm(x, res, gamma, 1e-6)
        rows.append(_compare(
            "add_rms_norm", "npu_add_rms_norm", torch.cat([got_y, got_s]), torch.cat([want_y, want_s]), dtype,
            _time(lambda: backend.add_rms_norm(x, res, gamma, 1e-6), sync),
            _time(lambda: ref.add_rms_norm(x, res, gamma, 1e-6), sync),
        ))
    if s.rotary:
        q, k = rand(t, s.heads, s.head_dim), rand(t, s.kv_heads, s.head_dim)
        pos = torch.arange(t, dtype=torch.float32)[:, None] * torch.rand(s.head_dim // 2, generator=g)[None]
        emb = torch.cat([pos, pos], -1)[:, None, :]
        cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
        gq, gk = backend.rotary(q, k, cos, sin)
        wq, wk = ref.rotary(q, k, cos, sin)
        rows.append(_compare(
            "rotary", "npu_rotary_mul", torch.cat([gq.flatten(), gk.flatten()]), torch.cat([wq.flatten(), wk.flatten()]),
            dtype, _time(lambda: backend.rotary(q, k, cos, sin), sync), _time(lambda: ref.rotary(q, k, cos, sin), sync),
        ))
    return rows


@dataclass
class ModelCheck:
    steps: int
    agreed: int
    first_diff_margin: float | None  # reference top-2 logit gap where the tokens first differ
    ok: bool


def greedy_tokens(model, prompt: list[int], steps: int, block_size: int, device) -> tuple[list[int], list[Tensor]]:
    """Prefill ``prompt`` then ``steps - 1`` greedy decode steps on ``model``'s own backend."""
    backend = model.backend
    n_blocks = -(-(len(prompt) + steps) // block_size) + 1
    caches = [
        backend.allocate_kv_cache(n_blocks, block_size, model.num_kv_heads, model.head_dim, model.dtype, device)
        for _ in range(model.num_layers)
    ]
    blocks = list(range(1, n_blocks))
    tokens, logits_seen = list(prompt), []
    ctx, q = 0, len(prompt)
    with torch.inference_mode():
        for step in range(steps):
            pos = list(range(ctx, ctx + q))
            meta = AttentionMetadata.build(
                phase=Phase.PREFILL if step == 0 else Phase.DECODE,
                slot_mapping=[blocks[p // block_size] * block_size + p % block_size for p in pos],
                block_tables=[blocks], context_lens=[ctx], query_lens=[q], block_size=block_size,
                device=device,
            )
            ids = torch.tensor(tokens[ctx : ctx + q], device=device)
            hidden = model(ids, torch.tensor(pos, device=device), caches, backend.prepare(meta))
            logits = model.compute_logits(hidden[-1:])[0].float().cpu()
            logits_seen.append(logits)
            tokens.append(int(logits.argmax()))
            ctx, q = ctx + q, 1
    return tokens[len(prompt) :], logits_seen


def format_table(rows: list[Row], model: ModelCheck | None) -> str:
    lines = [
        (
            f"{'check':<30} {'torch_npu operator':<32} {'max abs':>10} {'max rel':>10} "
            f"{'tol':>7} {'npu ms':>8} {'ref ms':>8}  result"
        ),
    ]
    for r in rows:
        lines.append(
            f"{r.check:<30} {r.op:<32} {r.max_abs:>10.3g} {r.max_rel:>10.3g} {r.tol:>7.0e} "
            f"{r.npu_ms:>8.3f} {r.ref_ms:>8.3f}  {'PASS' if r.ok else 'FAIL'}"
        )
    if model is not None:
        detail = f"{model.agreed}/{model.steps} greedy tokens equal"
        if model.first_diff_margin is not None:
            detail += f", first difference where the reference's top-2 gap is {model.first_diff_margin:.3g}"
        lines.append(f"{'model greedy decode':<30} {'(all of the above)':<32} {detail}  {'PASS' if model.ok else 'FAIL'}")
    return "\n".join(lines)


def _use_backend(model, backend) -> None:
    """Point every layer of ``model`` at ``backend`` (one copy of the weights, two kernel paths)."""
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend


def run(config, steps: int = 4, check_model: bool = True) -> bool:
    """The whole self-test for ``config`` (a ServerConfig); prints the table, returns pass/fail."""
    from tgi_npu_backend import device as devices
    from tgi_npu_backend.hub import resolve_model_dir
    from tgi_npu_backend.load import backend_for
    from tgi_npu_backend.models.registry import load_model, read_model_config

    platform = devices.select_platform(config.device, 0, config.emulation)
    if platform.kind != "npu":
        raise ValueError(
            "selftest checks the NPU kernels: run it on an Ascend host (--device npu) or in the "
            "verification mode (--device npu-emulated)"
        )
    model_dir = resolve_model_dir(config.model_id, config.revision, config.hub_cache)
    cfg = read_model_config(model_dir)
    dtype = devices.select_dtype(config.dtype, platform, cfg.torch_dtype)
    platform.set_device()
    devices.check_npu_startup(platform, dtype)
    backend = backend_for(platform)
    block_size = config.block_size or backend.block_size_for(cfg.head_dim)
    shapes = Shapes(
        heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden=cfg.hidden_size,
        block_size=block_size,
        alibi=cfg.model_type == "bloom",
        rms_norm=cfg.model_type == "gemma",
        rotary=cfg.model_type == "gemma",
    )
    print(
        f"selftest: {cfg.model_type} on {platform.name} ({platform.device}), {dtype}, block size "
        f"{block_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads x {cfg.head_dim}",
        flush=True,
    )
    rows = operator_checks(backend, shapes, dtype, platform.device, platform.synchronize)
    model_result = None
    if check_model:
        model = load_model(model_dir, dtype=dtype, device=platform.device, backend=backend)
        model_result = model_check(
            model, backend, ReferenceBackend(), cfg.vocab_size, block_size, platform.device, steps
        )
    print(format_table(rows, model_result), flush=True)
    return all(r.ok for r in rows) and (model_result is None or model_result.ok)


def model_check(
    model, npu_backend, ref_backend, vocab: int, block_size: int, device, steps: int = 4
) -> ModelCheck:
    """Greedy tokens of the NPU path vs the reference path on the same weights. A difference
    counts as a failure only where the reference's top-2 logit gap is clear (> 0.5): ties in
    half precision may flip."""
    prompt = torch.randint(0, vocab, (2 * block_size + 3,), generator=torch.Generator().manual_seed(1)).tolist()
    _use_backend(model, npu_backend)
    got, _ = greedy_tokens(model, prompt, steps, block_size, device)
    _use_backend(model, ref_backend)
    want, ref_logits = greedy_tokens(model, prompt, steps, block_size, device)
    _use_backend(model, npu_backend)
    return _judge(got, want, ref_logits, steps)


def _judge(got: list[int], want: list[int], ref_logits: list[Tensor], steps: int) -> ModelCheck:
    agreed = 0
    for a, b in zip(got, want):
        if a != b:
            break
        agreed += 1
    if agreed == steps:
        return ModelCheck(steps, agreed, None, True)
    top2 = ref_logits[agreed].topk(2).values
    margin = float(top2[0] - top2[1])
    return ModelCheck(steps, agreed, margin, margin <= 0.5)
