"""Per-rank peak memory while loading a checkpoint at tensor-parallel world sizes 1, 2, 4
(a measurement script, not a test).

Writes a random-weight BLOOM checkpoint of a few hundred MB into a temporary directory (or takes
``--model-dir``), then, for each world size, starts that many rank processes that join a gloo
group and load the model exactly as the shard does (``init_parallel`` + ``load_model``: every
rank reads only its slices through safetensors ``get_slice``). Each rank samples its own
``/proc/self/status`` every 2 ms while loading and reports:

* ``anon``: peak anonymous (private) memory above the rank's baseline after imports - what a rank
  really costs; it should shrink ~1/world_size;
* ``rss``: peak resident set (VmHWM) above the baseline, which also counts the file pages of the
  memory-mapped safetensors that the rank touched (page cache, shared between ranks, reclaimable);
* ``held``: bytes of the parameters the rank keeps.

    python benchmarks/tp_memory.py                    # ~440 MB float32 BLOOM, world sizes 1 2 4
    python benchmarks/tp_memory.py --world-sizes 1 2 --model-dir DIR
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 2**20


def _status() -> dict[str, int]:
    """Memory lines of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class PeakSampler(threading.Thread):
    def __init__(self, period_s: float = 0.002):
        super().__init__(daemon=True)
        self.period_s = period_s
        self.peak_anon = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak_anon = max(self.peak_anon, _status()["RssAnon"])
            time.sleep(self.period_s)

    def finish(self) -> int:
        self._done.set()
        self.join()
        self.peak_anon = max(self.peak_anon, _status()["RssAnon"])
        return self.peak_anon


def worker(model_dir: str, rank: int, world_size: int, port: int) -> None:
    import torch
    from tgi_npu_backend.kernels import get_backend
    from tgi_npu_backend.models.registry import load_model

    from tgi_npu_backend.distributed import init_parallel

    torch.set_num_threads(1)
    device = torch.device("cpu")
    parallel = init_parallel(rank, world_size, "127.0.0.1", port, "cpu", timeout_s=300)
    backend = get_backend(device)
    base = _status()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    model = load_model(
        Path(model_dir), dtype=torch.float32, device=device, backend=backend, parallel=parallel
    )
    seconds = time.perf_counter() - start
    peak_anon = sampler.finish()
    end = _status()
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    parallel.barrier()  # rank 0 hosts the store: nobody leaves before everyone is measured
    print(json.dumps({
        "rank": rank,
        "world_size": world_size,
        "baseline_rss": base["VmRSS"],
        "anon": peak_anon - base["RssAnon"],
        "rss": end["VmHWM"] - base["VmRSS"],
        "held": held,
        "seconds": seconds,
    }), flush=True)
    if parallel.is_parallel:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_dir: Path, world_size: int) -> list[dict]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(model_dir), str(r), str(world_size), str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    rows = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"a rank of world size {world_size} failed (exit {p.returncode})")
        rows.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(rows, key=lambda r: r["rank"])


def write_model(path: Path, hidden: int, layers: int, vocab: int) -> Path:
    from tgi_npu_backend.demo import write_checkpoint

    return write_checkpoint(
        path, "bloom", vocab_size=vocab, seed=0, n_head=16, hidden_size=hidden, n_layer=layers
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model_dir, rank, world_size, port = sys.argv[2:6]
        worker(model_dir, int(rank), int(world_size), int(port))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None, help="measure this checkpoint")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=32768)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tp-memory-") as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = write_model(Path(tmp) / "bloom", args.hidden, args.layers, args.vocab)
        size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
        print(f"checkpoint {model_dir}: {size / MiB:.0f} MiB of safetensors (float32)")
        results = {ws: measure(model_dir, ws) for ws in args.world_sizes}

    print(f"\n{'world':>5} {'rank':>4} {'baseline':>9} {'peak anon':>10} {'peak rss':>9} "
          f"{'held':>8} {'load s':>7}   (MiB above the rank's baseline after imports)")
    for ws, rows in results.items():
        for r in rows:
            print(f"{ws:>5} {r['rank']:>4} {r['baseline_rss'] / MiB:>9.0f} {r['anon'] / MiB:>10.0f} "
                  f"{r['rss'] / MiB:>9.0f} {r['held'] / MiB:>8.0f} {r['seconds']:>7.2f}")
    ref = results.get(1)
    if ref:
        print("\nper-rank maximum relative to world size 1:")
        for ws, rows in results.items():
            if ws == 1:
                continue
            ratio = {k: max(r[k] for r in rows) / ref[0][k] for k in ("anon", "rss", "held")}
            print(f"  world size {ws}: peak anon {ratio['anon']:.2f}x, peak rss {ratio['rss']:.2f}x, "
                  f"held {ratio['held']:.2f}x   (ideal {1 / ws:.2f}x)")


if __name__ == "__main__":
    main()
