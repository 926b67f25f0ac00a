"""Matching spread over a Ray cluster (`flowdb match --ray ADDRESS|auto`).

Each missing layer is one Ray task running flowdb.flow.build.match_layer, which loads
its own SAEs (so their paths must be readable on every node: shared storage, or
hub references) and picks its backend for `device` on the node that runs it. A
task takes a GPU where the cluster has GPUs and the device allows one, else every
CPU of the smallest node (one exact search already uses all of a node's cores).
The driver writes the atlas as results arrive, so it is the same atlas as one
process writes.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

from flowdb.errors import FlowdbError
from flowdb.flow.build import match_layer
from flowdb.flow.layer import LayerBuild
from flowdb.flow.matching import Matcher
from flowdb.packs.plan import BuildPlan


def _ray():
    try:
        import ray
    except ImportError:
        raise FlowdbError("--ray needs Ray, an optional extra: pip install 'flowdb[ray]'") from None
    return ray


def _match_task(plan_json: dict, layer: int, device: str) -> LayerBuild:
    plan = BuildPlan.from_json(plan_json)
    return match_layer(plan, layer, Matcher.for_device(device, plan.matching_gflop([layer])))


def match_layers_on_ray(plan: BuildPlan, layers: list[int], device: str, address: str) -> Iterator[LayerBuild]:
    """Yield each layer's (unclassified) build as its task finishes."""
    if not layers:
        return
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        _check_answers(address)
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            raise FlowdbError(f"cannot join the Ray cluster at {address!r}: {first}") from None
    try:
        resources = _task_resources(ray, device)
        task = ray.remote(**resources)(_match_task)
        plan_json = plan.to_json()
        pending = [task.remote(plan_json, layer, device) for layer in layers]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, FlowdbError) else None
                if cause is not None:
                    raise cause from None
                raise FlowdbError(f"a Ray matching task failed: {type(exc.cause).__name__}: {exc.cause}") from None
    finally:
        if started_here:
            ray.shutdown()


def _check_answers(address: str) -> None:
    """Ray retries an address that does not answer for minutes: ask once, quickly."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return  # "auto" or "local": Ray finds (or starts) the cluster itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise FlowdbError(f"cannot join the Ray cluster at {address!r}: nothing answers there "
                          f"({exc.strerror or exc}); start one with 'ray start --head'") from None


def _task_resources(ray, device: str) -> dict:
    gpus = ray.cluster_resources().get("GPU", 0)
    if device != "cpu" and gpus >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    if device == "cuda":
        raise FlowdbError("--device cuda: the Ray cluster has no GPU")
    node_cpus = [node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")]
    return {"num_cpus": max(1, int(min(node_cpus or [1])))}
