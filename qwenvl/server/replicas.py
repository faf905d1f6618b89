"""`qwenvl serve --replicas N [--ray-address ADDR]`: N engine replicas on Ray Serve behind one HTTP front.

Design. Each replica is a Ray Serve deployment (one replica each, `replica-0` .. `replica-{N-1}`) of
`EngineReplica`, which holds a full LLMEngine behind an AsyncEngine. The HTTP front is our own uvicorn process
serving the same FastAPI app as a single-process `qwenvl serve`, over `ReplicaEngine`
(replica_proxy.py), which forwards prepare / generate / abort to the replicas through Serve deployment
handles, generate as a stream. Chosen over Ray Serve's own HTTP ingress wrapping the app because:
- routing is ours: a prompt's first image goes to the replica whose encoder and prefix caches already hold
  it, the rest to the least loaded; Serve's router balances load but knows nothing of those caches, and
  one deployment per engine lets the front name the replica it wants;
- what the front does once per request (auth, limits, media fetching with its private-address checks, the
  SIGTERM drain, /metrics, the web UI) stays one code path with the single-process server; the
  `X-Qwenvl-Replica` header and per-replica metrics come from the one place that routes.
Cost: the front is one process (HTTP, media fetching, routing; no model work), and a prompt's pixel values
travel from the replica that prepared it to the one that generates (two object transfers per request).
Ray Serve keeps each deployment at one healthy replica: a replica that dies or fails `check_health` is
replaced, while the front routes around it (replica_proxy marks it down when it stops answering).

Security: a local cluster started here binds to 127.0.0.1, has no dashboard unless --ray-dashboard, runs no
Serve HTTP proxy (the front calls handles), and has usage stats off. --ray-address joins a cluster the user
runs (their choice, their network); on exit only our applications are deleted from it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .replica_proxy import ReplicaEngine, ReplicaHeader
from .replica_worker import EngineReplica
from .settings import ServerSettings

log = logging.getLogger("qwenvl.server")

MISSING_RAY = "qwenvl serve --replicas needs Ray Serve, which is not installed: pip install 'qwenvl[cluster]'"
APP_PREFIX = "qwenvl-"


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int
    address: str | None = None            # None: start a local cluster on 127.0.0.1
    dashboard: bool = False               # local cluster: the Ray dashboard on 127.0.0.1
    cpus_per_replica: float | None = None  # default: 1 with a GPU, else the cores shared out
    object_store_mb: int | None = None    # local cluster: Ray's shared-memory object store (default: Ray's)


def replica_names(n: int) -> list[str]:
    return [f"replica-{i}" for i in range(n)]


def serve_replicas(settings: ServerSettings, engine_options: dict, cluster: ClusterOptions, serve_http,
                   ready: threading.Event | None = None) -> int:
    """Start (or join) Ray, deploy the replicas, serve HTTP until SIGTERM, then remove what was started.
    `serve_http(settings, async_engine=, ready=, extend_app=)` is the caller's HTTP server (server/cli.py's
    `serve`), passed in so that this module and the command line do not import each other."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"     # before Ray starts: no usage reports leave the machine
    if cluster.address is None or _is_loopback(cluster.address):
        # Ray >= 2.4x resolves a node IP of 127.0.0.1 to the machine's external address unless it runs as a
        # single-machine cluster; this switch (read when ray is imported) keeps every server on loopback
        # (and lets us join a cluster that itself listens on loopback only).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
        from ray import serve
    except ImportError:
        print(MISSING_RAY, file=sys.stderr)
        return 2
    if cluster.replicas < 1:
        print(f"--replicas must be at least 1, got {cluster.replicas}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _start_ray(ray, cluster)
    try:
        gpus = _gpus_per_replica(ray, settings.device, cluster)
        cpus = cluster.cpus_per_replica or (1 if gpus else max(1, (os.cpu_count() or 1) // cluster.replicas))
        shortfall = _shortfall(ray, cluster.replicas, cpus, gpus)
        if shortfall and cluster.address is None:      # a local cluster will not grow: the deploy would hang
            print(f"qwenvl serve --replicas: {shortfall}", file=sys.stderr)
            return 2
        if shortfall:
            log.warning("%s; waiting for the cluster to provide them", shortfall)
        serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1"})
        handles = _deploy(serve, settings, engine_options, cluster.replicas, {"num_cpus": cpus, "num_gpus": gpus})
        info = handles["replica-0"].info.remote().result()
        engine = ReplicaEngine(handles, info, max_queue=settings.max_queue)
        log.info("%d replica(s) ready (%s CPU, %s GPU each)", cluster.replicas, cpus, gpus)
        return serve_http(settings, async_engine=engine, ready=ready,
                          extend_app=lambda app: app.add_middleware(ReplicaHeader))
    except Exception as e:  # noqa: BLE001 - a replica that cannot load: one line, the trace is in the log
        log.exception("replicas failed")
        print(f"qwenvl serve --replicas: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return 1
    finally:
        _stop(ray, serve, cluster)


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _start_ray(ray, cluster: ClusterOptions) -> None:
    # The replicas run the same qwenvl as this process: a local cluster shares its file system; to a joined
    # cluster the package is shipped (py_modules; its nodes need qwenvl's dependencies installed).
    here = str(Path(__file__).resolve().parents[2])
    if cluster.address is not None:
        ray.init(address=cluster.address, logging_level=logging.WARNING,
                 runtime_env={"py_modules": [str(Path(__file__).resolve().parents[1])]})
        return
    cores = os.cpu_count() or 1
    wanted = math.ceil((cluster.cpus_per_replica or 1) * cluster.replicas)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    # address="local": always a new cluster of our own, never one found in RAY_ADDRESS or /tmp/ray (which
    # the shutdown below would take down).
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=max(cores, wanted), include_dashboard=cluster.dashboard,
             dashboard_host="127.0.0.1",
             object_store_memory=cluster.object_store_mb * 2**20 if cluster.object_store_mb else None,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, logging_level=logging.WARNING)


def _gpus_per_replica(ray, device: str, cluster: ClusterOptions) -> int:
    if device.startswith("cuda"):
        return 1
    if device != "auto":
        return 0
    if cluster.address is not None:
        return 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    import torch

    return 1 if torch.cuda.is_available() else 0


def _shortfall(ray, n: int, cpus: float, gpus: int) -> str | None:
    have = ray.cluster_resources()
    kind, each = ("GPU", gpus) if gpus else ("CPU", cpus)
    if n * each > have.get(kind, 0):
        return (f"{n} replicas need {n * each:g} {kind}s ({each:g} each) but the cluster has {have.get(kind, 0):g}; "
                "lower --replicas" + (" or --cpus-per-replica" if kind == "CPU" else ""))
    return None


def _deploy(serve, settings: ServerSettings, engine_options: dict, n: int, actor_options: dict) -> dict:
    """One Serve application per replica, deployed together (the models load in parallel)."""
    deployment = serve.deployment(
        EngineReplica, name="engine", num_replicas=1, ray_actor_options=actor_options,
        max_ongoing_requests=settings.max_queue + 16,    # streams + prepare/stats calls; the engine queues
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
        logging_config={"enable_access_log": False, "log_level": "WARNING"})
    names = replica_names(n)
    if not hasattr(serve, "run_many"):             # Ray Serve before run_many: one application at a time
        return {name: serve.run(deployment.bind(settings, engine_options), name=APP_PREFIX + name,
                                route_prefix=None) for name in names}
    targets = [serve.RunTarget(target=deployment.bind(settings, engine_options), name=APP_PREFIX + name,
                               route_prefix=None) for name in names]
    return dict(zip(names, serve.run_many(targets, wait_for_applications_running=True)))


def _stop(ray, serve, cluster: ClusterOptions) -> None:
    try:
        if cluster.address is None:
            serve.shutdown()
        else:
            for name in replica_names(cluster.replicas):
                serve.delete(APP_PREFIX + name)
    except Exception:  # noqa: BLE001 - still disconnect (and stop a local cluster) below
        log.exception("stopping the replicas failed")
    finally:
        ray.shutdown()
