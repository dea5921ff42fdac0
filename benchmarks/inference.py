"""Inference speed: eager PyTorch (the plain loop) vs ONNX Runtime fp32 and int8, and the HTTP server.

(1) Engines, for small_resnet at 28 px and resnet18 at 224 px (random weights: speed does not depend
    on them): per-image latency at batch 1 (p50, p99 over many calls) and throughput at batch 64, for
    eager PyTorch fp32 (`model(images)` under no_grad: the baseline), eager bf16 (autocast), ONNX
    Runtime fp32 (the graph `imgcls export` writes) and ONNX Runtime int8 (`imgcls export --int8`).
    Every engine gets the same threads (all usable cores). Ratios are against eager fp32.
(2) The server: `imgcls serve model.onnx` in its own process, loaded by an asyncio HTTP client
    (aiohttp; httpx's ran out of CPU before the server did) at concurrency 1, 8 and 32 with one real PNG/JPEG per request: requests/s, p50/p99
    latency, errors, and the ratio to the offline batch-64 throughput of the same engine (ORT fp32).
    The client runs on the same cores as the server, so on a 2-core machine it takes a share of them.

    .venv/bin/python benchmarks/inference.py                       # everything (~6 min on 2 cores)
    .venv/bin/python benchmarks/inference.py --models small_resnet --no-server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgcls.exporting import generated_images, onnx_program, quantize_int8
from imgcls.models import create_model
from imgcls.prediction import Classifier, OnnxClassifier
from imgcls.runtime import Runtime, usable_cores

CASES = {"small_resnet": 28, "resnet18": 224}


def classifier_for(name: str, size: int) -> Classifier:
    model = create_model(name, 10, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()
    metadata = {"model_name": name, "class_names": [f"class_{index}" for index in range(10)],
                "preprocessing": {"image_size": size, "resize": "crop", "mean": [0.5] * 3, "std": [0.5] * 3},
                "config": {"data": {"horizontal_flip": True}}}
    return Classifier(model=model, metadata=metadata, runtime=Runtime.create("cpu", "fp32"))


def eager(model: torch.nn.Module, bf16: bool):
    def run(images: np.ndarray) -> None:
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model(torch.from_numpy(images))
    return run


def latency_ms(run, image: np.ndarray, calls: int) -> tuple[float, float]:
    for _ in range(5):
        run(image)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(image)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def throughput(run, batch: np.ndarray, seconds: float) -> float:
    run(batch)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        run(batch)
        count += 1
    return count * len(batch) / (time.perf_counter() - start)


def engines(name: str, size: int, folder: Path) -> dict[str, object]:
    classifier = classifier_for(name, size)
    fp32_path, int8_path = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    onnx_program(classifier).save(str(fp32_path))
    quantize_int8(fp32_path, int8_path, generated_images(128, size, seed=1))
    threads = len(usable_cores())
    return {
        "eager fp32": eager(classifier.model, bf16=False),
        "eager bf16": eager(classifier.model, bf16=True),
        "onnxruntime fp32": OnnxClassifier(fp32_path, threads=threads).forward,
        "onnxruntime int8": OnnxClassifier(int8_path, threads=threads).forward,
    }


def bench_engines(names: list[str], folder: Path, seconds: float, only: list[str] | None) -> dict[str, float]:
    """Prints the engine table; returns the ORT fp32 batch-64 throughput per model."""
    offline = {}
    torch.set_num_threads(len(usable_cores()))
    for name in names:
        size = CASES[name]
        runs = engines(name, size, folder)
        single = generated_images(1, size, seed=2)
        batch = generated_images(64, size, seed=3)
        calls = 300 if size <= 64 else 40
        print(f"\n{name} at {size} px ({len(usable_cores())} threads each)")
        print(f"{'engine':18s} {'p50 ms':>8s} {'p99 ms':>8s} {'img/s @64':>10s}  {'latency vs eager':>16s} {'throughput vs eager':>19s}")
        base_latency = base_throughput = None
        for engine, run in runs.items():
            if only and engine not in only:
                continue
            p50, p99 = latency_ms(run, single, calls)
            rate = throughput(run, batch, seconds)
            base_latency, base_throughput = base_latency or p50, base_throughput or rate  # eager fp32 comes first
            print(f"{engine:18s} {p50:8.2f} {p99:8.2f} {rate:10.0f}  {p50 / base_latency:15.2f}x {rate / base_throughput:18.2f}x")
            if engine == "onnxruntime fp32":
                offline[name] = rate
    return offline


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sample_upload(size: int) -> tuple[str, bytes]:
    """A real photo (scikit-learn's sample) at about the model's size, as the file a client sends."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photo = Image.fromarray(load_sample_images().images[0]).resize((max(size, 32) * 4 // 3, max(size, 32)))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG" if size > 64 else "PNG", quality=90)
    return ("photo.jpg" if size > 64 else "photo.png"), buffer.getvalue()


async def load_test(url: str, upload: tuple[str, bytes], concurrency: int, seconds: float) -> dict[str, float]:
    """`concurrency` clients, each posting the upload again as soon as it has its answer, for `seconds`."""
    import aiohttp

    latencies, errors, server_errors = [], 0, 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        async def client() -> None:
            nonlocal errors, server_errors
            while time.perf_counter() < deadline:
                form = aiohttp.FormData()
                form.add_field("file", upload[1], filename=upload[0])
                start = time.perf_counter()
                async with session.post(url, data=form) as response:
                    await response.read()
                latencies.append(1000 * (time.perf_counter() - start))
                if response.status != 200:
                    errors += 1
                    server_errors += response.status >= 500
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"requests_per_second": len(latencies) / elapsed, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "errors": errors, "server_errors": server_errors,
            "requests": len(latencies)}


def bench_server(names: list[str], folder: Path, offline: dict[str, float], seconds: float) -> None:
    import httpx

    for name in names:
        size = CASES[name]
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "imgcls", "serve", str(folder / f"{name}.onnx"),
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                time.sleep(0.1)
            upload = sample_upload(size)
            print(f"\nserver: {name} at {size} px, ONNX Runtime fp32, one {upload[0][-3:].upper()} per request "
                  f"(offline batch-64 throughput {offline.get(name, float('nan')):.0f} img/s)")
            print(f"{'concurrency':>11s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s} {'5xx':>4s}  vs offline")
            for concurrency in (1, 8, 32):
                result = asyncio.run(load_test(f"http://127.0.0.1:{port}/predict", upload, concurrency, seconds))
                ratio = result["requests_per_second"] / offline[name] if name in offline else float("nan")
                print(f"{concurrency:11d} {result['requests_per_second']:8.1f} {result['p50']:8.1f} {result['p99']:8.1f} "
                      f"{result['errors']:7d} {result['server_errors']:4d}  {ratio:8.2f}x")
            health = httpx.get(f"http://127.0.0.1:{port}/health").json()
            print(f"server batches: {health['images']} images in {health['batches']} forward passes "
                  f"({health['images'] / max(1, health['batches']):.1f} per pass)")
        finally:
            server.terminate()
            server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput / load measurement")
    parser.add_argument("--no-server", action="store_true")
    parser.add_argument("--engines", nargs="+", help="only these engines, e.g. 'onnxruntime fp32' (the server's "
                                                     "ratio needs it)")
    args = parser.parse_args()
    bf16 = "yes" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no"
    print(f"torch {torch.__version__}, {len(usable_cores())} usable cores, AVX-512 BF16: {bf16}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory() as folder:
        offline = bench_engines(args.models, Path(folder), args.seconds, args.engines)
        if not args.no_server:
            bench_server(args.models, Path(folder), offline, args.seconds)


if __name__ == "__main__":
    main()
