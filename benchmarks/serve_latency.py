"""Serving latency and throughput over HTTP vs a direct call of the same model, and autoscaling under a burst.

    python benchmarks/serve_latency.py                      # tiny model, 64x64, 4 steps, random adapters
    python benchmarks/serve_latency.py --adapters runs/train/sfo/adapters --clients 1 4 8 --requests 32

Starts a local Ray + Serve on 127.0.0.1 (the app from ``serving.app.build_app``), then prints:
  * direct: ``serving.generator.Generator.run`` on one job at a time, in this process;
  * http: N concurrent clients, ``--requests`` requests in all, p50/p95 latency, requests/s, and the
    p50 ratio to direct (the cost of HTTP + Serve routing + batching wait);
  * burst: ``--burst-clients`` clients for ``--burst-s`` seconds, FluxGenerator's replica count every
    second from ``serve.status()``, then while it settles (``--settle-s``).
Prints numbers; asserts nothing. Request counts and durations are bounded by the flags.
"""

import argparse
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from pipelines.common import start_local_ray
from serving.generator import Generator
from serving.schema import Job

HOST = "127.0.0.1"
MAX_REQUESTS = 1000  # hard cap on any phase, whatever the flags say


def _random_adapters(folder: Path) -> Path:
    """Ref + randomised sfo adapters on the tiny model (what the tests use), when none are given."""
    from sfo.adapters import REF, REF_RANK, SFO, SFO_RANK, add_lora, save_adapter
    from sfo.models import load_flux

    model = load_flux("tiny", device="cpu")
    add_lora(model.transformer, REF, REF_RANK)
    add_lora(model.transformer, SFO, SFO_RANK)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.transformer.named_parameters():
            if f"lora_B.{SFO}." in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    save_adapter(model.transformer, REF, folder / REF)
    save_adapter(model.transformer, SFO, folder / SFO)
    return folder


def _reference_png(side: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (180, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _stats(latencies: list[float], wall: float) -> str:
    ms = np.array(latencies) * 1000
    return (f"p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  "
            f"{len(latencies) / wall:6.2f} req/s  (n={len(latencies)})")


def _http_phase(url: str, body: dict, clients: int, requests: int) -> tuple[list[float], float, int]:
    """``requests`` POSTs spread over ``clients`` threads; returns latencies, wall seconds, failures."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def worker(count: int) -> None:
        nonlocal failures
        with httpx.Client(base_url=url, timeout=120) as client:
            for i in range(count):
                start = time.perf_counter()
                r = client.post("/v1/generate", json={**body, "seed": i})
                with lock:
                    latencies.append(time.perf_counter() - start)
                    failures += r.status_code != 200

    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, shares))
    return latencies, time.perf_counter() - start, failures


def _replicas(serve, app: str = "sfo", deployment: str = "FluxGenerator") -> dict[str, int]:
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(k): v for k, v in status.deployments[deployment].replica_states.items()}


def _start_app(adapters: Path, size: int, steps: int) -> str:
    """Serve's HTTP proxy on a free local port and the app on ``adapters`` (tiny model), accepting requests of
    ``steps`` sampling steps; returns its URL."""
    from ray import serve

    from serving.app import AppArgs, build_app

    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": HOST, "port": port})
    serve.run(build_app({"model": "tiny", "adapters": str(adapters), "max_side": max(size, 64), "default_side": size,
                         "max_steps": max(steps, AppArgs.model_fields["max_steps"].default)}),
              name="sfo", route_prefix="/")
    return f"http://{HOST}:{port}"


def p50_ratio(size: int = 64, steps: int = 80, requests: int = 12) -> dict[str, float]:
    """p50 latency of one client over HTTP (Serve) and of a direct ``Generator.run`` in this process, on the
    same job; at the default size and steps the model work is about half a second on a 2-core CPU (the tiny
    model's time grows with steps, hardly with size: 24 steps took 0.15 s at 64 px, 0.16 s at 128 px)."""
    import base64

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        adapters = _random_adapters(Path(tmp))
        reference = _reference_png(size)
        job = Job(prompt="a photo of a red cube", image=reference, steps=steps, guidance=3.5, seeds=(0,),
                  width=size, height=size, adapter="sfo")
        direct = Generator("tiny", str(adapters), device="cpu")
        direct.run([job])  # warm-up
        latencies = []
        for _ in range(requests):
            t = time.perf_counter()
            direct.run([job])
            latencies.append(time.perf_counter() - t)
        del direct
        body = {"prompt": "a photo of a red cube", "image": base64.b64encode(reference).decode(), "steps": steps,
                "width": size, "height": size}
        started_ray = not ray.is_initialized()
        if started_ray:
            start_local_ray(num_cpus=4)
        try:
            url = _start_app(adapters, size, steps)
            _http_phase(url, body, 1, 2)  # warm-up
            http, _, failures = _http_phase(url, body, 1, requests)
        finally:
            serve.shutdown()
            if started_ray:
                ray.shutdown()
    if failures:
        raise RuntimeError(f"{failures} of {requests} HTTP requests failed")
    return {"direct_p50_s": float(np.percentile(latencies, 50)), "http_p50_s": float(np.percentile(http, 50))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default=None, help="folder with ref/ and sfo/ (default: random tiny ones)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=24, help="requests per http phase")
    parser.add_argument("--burst-clients", type=int, default=8)
    parser.add_argument("--burst-s", type=float, default=25.0)
    parser.add_argument("--settle-s", type=float, default=60.0, help="seconds to watch after the burst (downscale_delay_s is 30)")
    args = parser.parse_args()
    requests = min(args.requests, MAX_REQUESTS)

    import ray
    from ray import serve

    with tempfile.TemporaryDirectory() as tmp:
        adapters = Path(args.adapters) if args.adapters else _random_adapters(Path(tmp))
        reference = _reference_png(args.size)
        job = Job(prompt="a photo of a red cube", image=reference, steps=args.steps, guidance=3.5, seeds=(0,),
                  width=args.size, height=args.size, adapter="sfo")

        direct = Generator("tiny", str(adapters), device="cpu")
        direct.run([job])  # warm-up
        latencies = []
        start = time.perf_counter()
        for _ in range(min(requests, 16)):
            t = time.perf_counter()
            direct.run([job])
            latencies.append(time.perf_counter() - t)
        direct_wall = time.perf_counter() - start
        direct_p50 = float(np.percentile(latencies, 50))
        print(f"{args.size}x{args.size}, {args.steps} steps, tiny model, CPU")
        print(f"direct      1 client : {_stats(latencies, direct_wall)}")
        del direct

        import base64

        body = {"prompt": "a photo of a red cube", "image": base64.b64encode(reference).decode(),
                "steps": args.steps, "width": args.size, "height": args.size}
        start_local_ray(num_cpus=4)
        try:
            url = _start_app(adapters, args.size, args.steps)
            _http_phase(url, body, 1, 2)  # warm-up
            for clients in args.clients:
                lat, wall, failures = _http_phase(url, body, clients, requests)
                ratio = float(np.percentile(lat, 50)) / direct_p50
                print(f"http   {clients:4d} clients: {_stats(lat, wall)}  p50 vs direct {ratio:5.2f}x"
                      + (f"  FAILED {failures}" if failures else ""))

            print(f"burst: {args.burst_clients} clients for {args.burst_s:.0f} s, FluxGenerator replicas by state")
            stop = time.monotonic() + args.burst_s
            sent = [0]

            def burst_worker() -> None:
                with httpx.Client(base_url=url, timeout=120) as client:
                    while time.monotonic() < stop and sent[0] < MAX_REQUESTS:
                        sent[0] += 1
                        client.post("/v1/generate", json={**body, "seed": sent[0]})

            threads = [threading.Thread(target=burst_worker) for _ in range(args.burst_clients)]
            for thread in threads:
                thread.start()
            t0 = time.monotonic()
            while time.monotonic() < stop:
                print(f"  t={time.monotonic() - t0:5.1f}s  {_replicas(serve)}")
                time.sleep(1.0)
            for thread in threads:
                thread.join()
            print(f"  burst sent {sent[0]} requests; settling")
            settle = time.monotonic() + args.settle_s
            while time.monotonic() < settle:
                print(f"  t={time.monotonic() - t0:5.1f}s  {_replicas(serve)}")
                time.sleep(3.0)
        finally:
            serve.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
