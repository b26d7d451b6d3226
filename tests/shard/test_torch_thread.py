"""Every torch op of a serving shard runs on one thread: the one that loaded the model, which
stays in torch.inference_mode.

torch's OpenMP runtime (libgomp) keeps a team of worker threads per thread that runs a parallel
op; a second team (the model loaded on the main thread, steps run on the generator thread) puts
more of its threads than cores on a small host, and libgomp then stops spin-waiting between ops.
That made a bloom-560m decode step ~1.45x slower on 2 cores (the README's Performance section).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import uuid

import grpc
import torch

from tgi_npu_backend import load, server
from tgi_npu_backend.config import ServerConfig
from tgi_npu_backend.pb import generate_pb2 as pb
from tgi_npu_backend.pb import generate_pb2_grpc as pb_grpc


class RecordingGenerator:
    """Records the thread of every Generator call the RPCs make."""

    def __init__(self):
        self.threads: dict[str, int] = {"load": threading.get_ident()}
        self.inference_mode = {"load": torch.is_inference_mode_enabled()}

    def clear(self, batch_id):
        self.threads["clear"] = threading.get_ident()
        self.inference_mode["clear"] = torch.is_inference_mode_enabled()

    def health(self):
        self.threads["health"] = threading.get_ident()
        self.inference_mode["health"] = torch.is_inference_mode_enabled()


def test_the_model_loads_on_the_thread_that_runs_the_steps(monkeypatch):
    built: list[RecordingGenerator] = []
    monkeypatch.setattr(load, "build_generator", lambda config: built.append(RecordingGenerator()) or built[0])
    path = f"{tempfile.gettempdir()}/tgi-thread-{uuid.uuid4().hex[:8]}"

    async def drive(config, generator, worker):
        service = grpc.aio.server()
        pb_grpc.add_TextGenerationServiceServicer_to_server(
            server.TextGenerationService(generator, [f"unix://{path}"], worker), service)
        service.add_insecure_port(f"unix://{path}")
        await service.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
                stub = pb_grpc.TextGenerationServiceStub(channel)
                await stub.ClearCache(pb.ClearCacheRequest(id=1))
                await stub.Health(pb.HealthRequest())
        finally:
            await service.stop(0)
        return False  # no fatal error

    monkeypatch.setattr(server, "serve_async", drive)
    server.serve(ServerConfig(model_id="unused", device="cpu"))
    [gen] = built
    assert set(gen.threads) == {"load", "clear", "health"}
    assert len(set(gen.threads.values())) == 1, gen.threads
    assert gen.threads["load"] != threading.get_ident(), "not the main thread: it runs the event loop"
    # the thread stays in inference mode (entered once: ModelRunner.forward then skips it)
    assert gen.inference_mode == {"load": True, "clear": True, "health": True}
    assert not torch.is_inference_mode_enabled()


def test_the_stepping_thread_flushes_denormals_on_a_cpu_platform():
    """``Platform.set_device`` (run by the thread that loads and then steps) turns on
    flush-to-zero for a model on the CPU: a float32 denormal reads as zero there afterwards. In a
    fresh interpreter, since the flag is per thread and this test process may have it set."""
    probe = (
        "import torch\n"
        "from tgi_npu_backend.device import CPU\n"
        "x = torch.tensor([1e-39])\n"
        "before = float(x * 1.0)\n"
        "CPU.set_device()\n"
        "print(before > 0.0, float(x * 1.0) == 0.0)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr
