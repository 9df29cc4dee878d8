"""The model deployment of the Serve app: ``FluxGenerator``, one FLUX + "ref"/"sfo" LoRA model per replica.

Autoscaled for cold starts of minutes; each replica groups waiting requests by size, steps and adapters
(``serving.scheduler.GroupQueue``), stops a group between sampling steps once its requests are cancelled or
past their deadline, and multiplexes adapter sets other than "default" (``serve.multiplexed``, LRU per
replica). The ingress in front of it (FastAPI, validation, no model) is ``serving.app``.
"""

import asyncio
import threading
from typing import Any

from ray import serve

from serving.scheduler import GroupQueue
from serving.schema import DEFAULT_ADAPTER_SET, SECONDS_PER_UNIT, Job

# Autoscaling sized for a cold start of minutes. Measured here: a tiny-model replica is ready in ~17 s on 2
# CPU cores (imports ~11 s: torch 3 s, diffusers Flux 8 s); FLUX.1-dev adds reading ~34 GB of weights (~1-3 min
# from a local NVMe or PVC at 0.3-1 GB/s, longer from network storage) and its first CUDA call. So: scale up only
# on load that lasted UPSCALE_DELAY_S (a burst shorter than a cold start is over before a new replica could
# help), and keep a replica DOWNSCALE_DELAY_S after its load ends (several cold starts: a replica that costs
# minutes to start is not given back between two bursts). max_replicas comes from args / SFO_SERVE_MAX_REPLICAS
# (the cluster's GPUs), min_replicas from args / SFO_SERVE_MIN_REPLICAS (default 1: a request never waits for a
# cold start; more keep that many GPUs warm).
UPSCALE_DELAY_S = 30
DOWNSCALE_DELAY_S = 600
GENERATOR_AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "upscale_delay_s": UPSCALE_DELAY_S,
    "downscale_delay_s": DOWNSCALE_DELAY_S,
}
GENERATOR_MAX_ONGOING = 16  # requests queued per replica (GroupQueue groups them by batch key)
BATCH_WAIT_S = 0.02  # how long the oldest request of a group waits for company
# CPU share of a FluxGenerator replica. Set here, not in serve_config.yaml: a config's ray_actor_options
# replaces the code's wholesale (Serve 2.60), which would drop the num_gpus that build_app adds.
GENERATOR_ACTOR_OPTIONS = {"num_cpus": 0.5}


class AdapterSetUnavailable(Exception):
    """An adapter set this replica could not load (a missing or broken folder, storage unreachable): the
    ingress answers 503 naming the set, and later requests for it try again."""


@serve.deployment(
    ray_actor_options=GENERATOR_ACTOR_OPTIONS,
    autoscaling_config=GENERATOR_AUTOSCALING,
    max_ongoing_requests=GENERATOR_MAX_ONGOING,
    health_check_period_s=10,
)
class FluxGenerator:
    """One model per replica with its default adapter set, loaded once; other adapter sets are multiplexed
    (``serve.multiplexed``: an LRU of ``max_adapter_sets`` per replica, requests routed by the set's name
    as the multiplexed model id). Requests are grouped by ``GroupQueue``; a group stops between sampling
    steps once all its requests are cancelled or past their deadline."""

    def __init__(self, model: str, adapters: str, device: str | None, dtype: str | None, max_batch_images: int,
                 fuse_adapters: bool | None = None, adapter_sets: dict[str, str] | None = None,
                 max_adapter_sets: int = 2, seconds_per_unit: float = SECONDS_PER_UNIT):
        from serving.generator import Generator  # torch/diffusers load in the replica, not the ingress

        self.generator = Generator(model, adapters, device=device, dtype=dtype, max_batch_images=max_batch_images,
                                   fuse_adapters=fuse_adapters)
        self.adapter_sets = dict(adapter_sets or {})
        self.loads: dict[str, int] = {}  # adapter set -> times loaded on this replica (tests count them)
        self.evicted: set[str] = set()  # sets serve.multiplexed dropped, unloaded before the next group
        # Sampler threads and adapter loads both change the transformer's LoRA layers (and fused_adapters swaps
        # its weights): one at a time. Only worker threads take it, never the event loop (health checks).
        self.lock = threading.Lock()
        self.queue = GroupQueue(self._run, max_images=max_batch_images, wait_s=BATCH_WAIT_S,
                                expected_s=lambda work: seconds_per_unit * work)

        async def load_set(name: str) -> LoadedSet:  # a function, not a bound method: the wrapper sets
            await asyncio.to_thread(self._load, name)  # its cache as an attribute of what it wraps
            return LoadedSet(self, name)

        # serve.multiplexed takes its LRU size when it decorates; wrapping here lets the config set it
        # (an instance attribute is how Serve 2.60 detects multiplexing wired up at init).
        self._adapter_set = serve.multiplexed(max_num_models_per_replica=max_adapter_sets)(load_set)

    def info(self) -> dict[str, Any]:
        return self.generator.info

    def stats(self) -> dict[str, Any]:
        """This replica's id, adapter-set loads and groups run (for tests and debugging)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, "loads": dict(self.loads),
                "loaded": sorted(self.generator.adapter_sets), "groups_run": self.queue.groups_run}

    def _load(self, name: str, tracked: bool = True) -> None:
        """Loads set ``name`` if it is not loaded. ``tracked``: serve.multiplexed holds it (no longer evicted)."""
        with self.lock:
            if tracked:
                self.evicted.discard(name)
            if name not in self.generator.adapter_sets:
                self.generator.load_set(name, self.adapter_sets[name])  # the ingress checked the name
                self.loads[name] = self.loads.get(name, 0) + 1

    def _run(self, jobs: list[Job], should_stop) -> list[list[bytes]]:
        """``Generator.run`` under the lock, after unloading the evicted sets this group does not use. A set
        evicted while a job of it waited is loaded back for that job and stays marked evicted (unloaded before
        a later group that does not use it), so the LRU's bound holds once its last queued job is done."""
        needed = {job.adapter_set for job in jobs} - {DEFAULT_ADAPTER_SET}
        with self.lock:
            for name in sorted(self.evicted - needed):
                self.generator.unload_set(name)
            self.evicted &= needed
        for name in sorted(needed):
            self._load(name, tracked=False)
        with self.lock:
            return self.generator.run(jobs, should_stop)

    async def generate(self, job: Job, timeout_s: float) -> list[bytes]:
        """The job's PNGs. ``timeout_s``: what is left of its deadline. Cancelled (client gone, ingress timed
        out) -> the job leaves the queue or its group stops between steps."""
        if job.adapter_set != DEFAULT_ADAPTER_SET:
            try:
                await self._adapter_set(job.adapter_set)  # routed here by the multiplexed model id (the set's name)
            except Exception as exc:  # nothing cached: the next request for the set tries again
                raise AdapterSetUnavailable(f"adapter set {job.adapter_set!r} could not be loaded on this replica: "
                                            f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        return await self.queue.submit(job, timeout_s)


class LoadedSet:
    """What ``serve.multiplexed`` caches per adapter set; evicting it (LRU) unloads its LoRA layers."""

    def __init__(self, owner: FluxGenerator, name: str):
        self.owner, self.name = owner, name

    def __del__(self) -> None:
        """serve.multiplexed calls this on the evicted set, in an executor thread while its LRU lock is held:
        no waiting here for a running group (minutes on FLUX); the next group unloads it (``FluxGenerator._run``)."""
        owner, self.owner = getattr(self, "owner", None), None  # once: Python calls __del__ again at collection
        if owner is not None:
            owner.evicted.add(self.name)
