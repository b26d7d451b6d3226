"""``tgi-npu-benchmark``: latency and throughput of a running shard over gRPC (the counterpart of
TGI's ``text-generation-benchmark``).

It talks to the shard the way the v3 router does (ServiceDiscovery, ClearCache, Info, Warmup,
then Prefill/Decode with KV blocks from the router's block allocator), so run it against a shard
that no router is using: ``text-generation-server serve MODEL --uds-path /tmp/tgi`` then
``tgi-npu-benchmark --tokenizer-name MODEL --master-shard-uds-path /tmp/tgi-0``.

Every case is ``batch`` requests of ``input`` prompt tokens generating ``output`` tokens (EOS
ignored), run ``--warmups`` + ``--runs`` times. Cases are batch sizes x sequence lengths x decode
lengths, plus MindIE-style ``--cases '[[input, output], ...]'`` x batch sizes. Per case it reports
prefill latency and throughput (prompt tokens/s), per-token decode latency, decode throughput
(generated tokens/s) and end-to-end throughput, each latency as avg/min/max/p50/p90/p99, and
writes ``PREFIX.csv``, ``PREFIX.md`` and ``PREFIX.png`` (matplotlib, when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tgi_npu_backend.pb import generate_pb2 as pb

from .allocator import BlockAllocator
from .client import ShardedClient
from .protocol import chooser_pb, make_request
from .warmup import build_warmup_request

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. "
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Case:
    batch: int
    input_len: int
    output_len: int


@dataclass
class CaseResult:
    case: Case
    prefill_s: list[float] = field(default_factory=list)  # per run
    decode_step_s: list[float] = field(default_factory=list)  # every Decode of every run
    decode_total_s: list[float] = field(default_factory=list)  # per run

    def row(self) -> dict[str, float | int]:
        c = self.case
        out: dict[str, float | int] = {"batch": c.batch, "input": c.input_len, "output": c.output_len}
        out.update(_stats("prefill_ms", [s * 1e3 for s in self.prefill_s]))
        out["prefill_tok_s"] = c.batch * c.input_len / statistics.fmean(self.prefill_s)
        out.update(_stats("decode_token_ms", [s * 1e3 for s in self.decode_step_s]))
        out.update(_stats("decode_total_ms", [s * 1e3 for s in self.decode_total_s]))
        decode = statistics.fmean(self.decode_total_s)
        out["decode_tok_s"] = c.batch * (c.output_len - 1) / decode if decode > 0 else 0.0
        e2e = statistics.fmean(p + d for p, d in zip(self.prefill_s, self.decode_total_s))
        out["e2e_s"] = e2e
        out["e2e_tok_s"] = c.batch * c.output_len / e2e
        return out


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _stats(name: str, values: list[float]) -> dict[str, float]:
    if not values:
        return {f"{name}_{k}": float("nan") for k in ("avg", "min", "max", "p50", "p90", "p99")}
    out = {f"{name}_avg": statistics.fmean(values), f"{name}_min": min(values), f"{name}_max": max(values)}
    out.update({f"{name}_p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def cases_of(args: argparse.Namespace) -> list[Case]:
    shapes = list(itertools.product(args.sequence_length, args.decode_length))
    if args.cases:
        extra = json.loads(args.cases)
        if not all(isinstance(c, list) and len(c) == 2 for c in extra):
            raise SystemExit("--cases must be a JSON list of [input, output] pairs, e.g. '[[256, 64]]'")
        shapes += [(int(i), int(o)) for i, o in extra]
    shapes = list(dict.fromkeys(shapes))
    for i, o in shapes:
        if i < 1 or o < 1:
            raise SystemExit(f"input and output lengths must be >= 1, got [{i}, {o}]")
    return [Case(b, i, o) for i, o in shapes for b in args.batch_size]


class Runner:
    """The router's part: prompt building, block allocation, Prefill then Decode to the end."""

    def __init__(self, client: ShardedClient, tokenizer, capacity: int, block_size: int, params):
        self.client = client
        self.tokenizer = tokenizer
        self.allocator = BlockAllocator(capacity, block_size)
        self.params = params
        self.next_id = 0
        self._texts: dict[int, str] = {}

    def text(self, tokens: int) -> str:
        """A prompt of at least ``tokens`` tokens (the shard keeps the last ``tokens``)."""
        if tokens not in self._texts:
            text = SAMPLE_TEXT
            while len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
                text += SAMPLE_TEXT
            self._texts[tokens] = text
        return self._texts[tokens]

    def batch(self, case: Case) -> tuple[pb.Batch, list]:
        requests, allocations = [], []
        for _ in range(case.batch):
            alloc = self.allocator.allocate(case.input_len + case.output_len - 1)
            if alloc is None:
                raise SystemExit(
                    f"the shard's KV pool cannot hold batch {case.batch} x "
                    f"{case.input_len + case.output_len} tokens; use smaller cases"
                )
            allocations.append(alloc)
            text = self.text(case.input_len)
            requests.append(
                make_request(
                    id=self.next_id, text=text, truncate=case.input_len, add_special_tokens=False,
                    parameters=self.params, max_new_tokens=case.output_len, ignore_eos_token=True,
                    blocks=alloc.blocks, slots=alloc.slots,
                )
            )
            self.next_id += 1
        batch = pb.Batch(
            id=self.next_id, requests=requests, size=len(requests),
            max_tokens=sum(len(r.slots) for r in requests),
            max_blocks=max(len(r.blocks) for r in requests),
        )
        return batch, allocations

    async def run(self, case: Case, result: CaseResult | None) -> None:
        """One Prefill and the Decodes that follow; times recorded into ``result``."""
        batch, allocations = self.batch(case)
        try:
            start = time.perf_counter()
            step = await self.client.prefill(batch)
            prefill = time.perf_counter() - start
            cached, steps = step.batch, []
            while cached is not None:
                t = time.perf_counter()
                step = await self.client.decode([cached])
                steps.append(time.perf_counter() - t)
                cached = step.batch
        finally:
            await self.client.clear_cache(None)
            for alloc in allocations:
                self.allocator.free(alloc)
        if result is not None:
            result.prefill_s.append(prefill)
            result.decode_step_s.extend(steps)
            result.decode_total_s.append(sum(steps))


# ------------------------------------------------------------------------------ reports
COLUMNS = [
    ("batch", "batch", "{:d}"), ("input", "input", "{:d}"), ("output", "output", "{:d}"),
    ("prefill_ms_avg", "prefill ms avg", "{:.1f}"), ("prefill_ms_p50", "p50", "{:.1f}"),
    ("prefill_ms_p90", "p90", "{:.1f}"), ("prefill_ms_p99", "p99", "{:.1f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.1f}"),
    ("decode_token_ms_avg", "decode ms/token avg", "{:.2f}"), ("decode_token_ms_p50", "p50", "{:.2f}"),
    ("decode_token_ms_p90", "p90", "{:.2f}"), ("decode_token_ms_p99", "p99", "{:.2f}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"), ("e2e_tok_s", "e2e tok/s", "{:.1f}"),
]
MINDIE = [
    ("batch", "Batch", "{:d}"), ("input", "InputLen", "{:d}"), ("output", "OutputLen", "{:d}"),
    ("prefill_ms_avg", "FirstTokenTime avg (ms)", "{:.1f}"),
    ("prefill_ms_p99", "FirstTokenTime p99 (ms)", "{:.1f}"),
    ("decode_token_ms_avg", "DecodeTime avg (ms)", "{:.2f}"),
    ("decode_token_ms_p99", "DecodeTime p99 (ms)", "{:.2f}"),
    ("e2e_s", "E2E time (s)", "{:.3f}"), ("e2e_tok_s", "GenerateSpeed (tok/s)", "{:.1f}"),
]


def _fmt(fmt: str, value) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else fmt.format(value)


def markdown(rows: list[dict], header: str) -> str:
    def table(columns) -> list[str]:
        lines = ["| " + " | ".join(title for _, title, _ in columns) + " |"]
        lines.append("|" + "---|" * len(columns))
        lines += ["| " + " | ".join(_fmt(f, r[k]) for k, _, f in columns) + " |" for r in rows]
        return lines

    parts = [f"# tgi-npu-benchmark\n\n{header}\n", "## Latency and throughput\n", *table(COLUMNS)]
    parts += ["", "## MindIE-style summary ([input, output] x batch)\n", *table(MINDIE), ""]
    return "\n".join(parts)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_plot(rows: list[dict], path: Path) -> bool:
    """Throughput vs batch and latency vs batch, one line per [input, output]; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (i, o), group in itertools.groupby(
        sorted(rows, key=lambda r: (r["input"], r["output"], r["batch"])),
        key=lambda r: (r["input"], r["output"]),
    ):
        group = list(group)
        batches = [r["batch"] for r in group]
        left.plot(batches, [r["decode_tok_s"] for r in group], marker="o", label=f"[{i}, {o}] decode")
        left.plot(batches, [r["e2e_tok_s"] for r in group], marker="x", linestyle="--", label=f"[{i}, {o}] e2e")
        right.plot(batches, [r["decode_token_ms_p50"] for r in group], marker="o", label=f"[{i}, {o}] decode/token p50")
        right.plot(batches, [r["prefill_ms_p50"] for r in group], marker="x", linestyle="--", label=f"[{i}, {o}] prefill p50")
    left.set(xlabel="batch size", ylabel="tokens/s", title="Throughput vs batch")
    right.set(xlabel="batch size", ylabel="ms", title="Latency vs batch", yscale="log")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ main
async def benchmark(args: argparse.Namespace, cases: list[Case], tokenizer) -> tuple[list[dict], str]:
    client = await ShardedClient.connect(args.master_shard_uds_path)
    try:
        await client.clear_cache(None)
        info = await client.info()
        max_input = max(c.input_len for c in cases)
        max_total = max(c.input_len + c.output_len for c in cases)
        max_prefill = max(max(c.batch * c.input_len for c in cases), max_input)
        warm = build_warmup_request(max_input, max_prefill, max_total, max(c.batch for c in cases))
        supported, _, _ = await client.warmup(warm)
        capacity = supported if supported is not None else max_total * max(c.batch for c in cases)
        params = chooser_pb(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, typical_p=args.typical_p,
            do_sample=args.do_sample, seed=args.seed, repetition_penalty=args.repetition_penalty,
            frequency_penalty=args.frequency_penalty, watermark=args.watermark,
        )
        runner = Runner(client, tokenizer, capacity, info.block_size, params)
        from tqdm import tqdm

        total = len(cases) * (args.warmups + args.runs)
        rows = []
        with tqdm(total=total, desc="tgi-npu-benchmark", file=sys.stderr, disable=args.no_progress) as bar:
            for case in cases:
                bar.set_postfix_str(f"batch {case.batch} [{case.input_len}, {case.output_len}]")
                result = CaseResult(case)
                for run in range(args.warmups + args.runs):
                    await runner.run(case, result if run >= args.warmups else None)
                    bar.update(1)
                rows.append(result.row())
        header = (
            f"shard: {info.device_type}, {info.dtype}, attention {info.attention_impl}, "
            f"block size {info.block_size}, {len(client.clients)} shard(s); "
            f"{args.runs} runs after {args.warmups} warmup(s) per case; latencies measured by "
            "the client around each Prefill/Decode RPC."
        )
        return rows, header
    finally:
        await client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tgi-npu-benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer-name", required=True, help="model directory or hub id of the tokenizer")
    p.add_argument("--revision", default=None)
    p.add_argument("--master-shard-uds-path", default="/tmp/text-generation-server-0")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--sequence-length", type=int, nargs="+", default=[10])
    p.add_argument("--decode-length", type=int, nargs="+", default=[8])
    p.add_argument("--cases", default=None, help="MindIE-style JSON '[[input, output], ...]'")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmups", type=int, default=1)
    p.add_argument("--output", type=Path, default=Path("tgi-npu-benchmark"),
                   help="writes OUTPUT.csv, OUTPUT.md, OUTPUT.png")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--typical-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--watermark", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmups < 0:
        p.error("--runs must be >= 1 and --warmups >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cases = cases_of(args)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, revision=args.revision)
    rows, header = asyncio.run(benchmark(args, cases, tokenizer))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (Path(f"{args.output}{s}") for s in (".csv", ".md", ".png"))
    write_csv(rows, csv_path)
    report = markdown(rows, header)
    md_path.write_text(report)
    plotted = write_plot(rows, png_path)
    print(report)
    print(f"wrote {csv_path}, {md_path}" + (f", {png_path}" if plotted else " (no plot: pip install matplotlib)"))


if __name__ == "__main__":
    main()
