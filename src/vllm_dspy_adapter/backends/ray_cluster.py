"""The driver's connection to Ray, shared by every Ray backend of the process.

``ray.init()`` is process-wide: the backends that share a connection we opened
close it when the last one is done, and at interpreter exit the engines are
stopped in order while Ray is still connected.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref

from ..errors import ConfigurationError
from .placement import RayNode

__all__ = ["ray_connect", "ray_release", "ray_if_up", "ray_kill", "alive_nodes", "node_id", "register"]

logger = logging.getLogger(__name__)


def ray_if_up():
    """Ray, if this process is still connected. Every call made after a shutdown
    goes through here: most Ray calls would otherwise start a new local instance
    (at interpreter exit, Ray's own atexit handler may already have disconnected)."""
    import ray

    return ray if ray.is_initialized() else None


def ray_kill(actor) -> None:
    ray = ray_if_up()
    if actor is None or ray is None:
        return
    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead
        pass


# ray.init() is process-wide: the backends that share a connection we opened
# close it when the last one is done.
_RAY_LOCK = threading.Lock()
_RAY_STATE = {"users": 0, "owned": False, "atexit": False}
_BACKENDS: weakref.WeakSet = weakref.WeakSet()


def _shutdown_backends() -> None:
    """At interpreter exit, stop the engines in order while Ray is still connected.

    Registered after ``ray.init``, so it runs before Ray's own exit handlers
    (atexit runs the last registered first), which would otherwise disconnect
    (or stop a local instance) first and leave Ray to kill the actors, their
    engines with them."""
    for backend in list(_BACKENDS):
        try:
            backend.shutdown_replicas(timeout=10)
        except Exception:
            pass


def ray_connect(address: str | None):
    import ray

    with _RAY_LOCK:
        if not ray.is_initialized():
            try:
                ray.init(address=address or None, logging_level=logging.WARNING)
            except (ConnectionError, ValueError) as exc:
                why = str(exc).rstrip(".")
                raise ConfigurationError(
                    f"Could not connect to a Ray cluster at ray_address={address!r}: {why}. Start one with "
                    "`ray start --head` (and `ray start --address=HEAD_IP:6379` on the other nodes), or pass "
                    "ray_address=None for a Ray instance on this machine only."
                ) from exc
            _RAY_STATE["owned"] = True
        elif address not in (None, "auto"):
            logger.warning("Ray is already initialised in this process; ray_address=%r is ignored.", address)
        if not _RAY_STATE["atexit"]:  # after ray.init, which registers exit handlers of its own
            atexit.register(_shutdown_backends)
            _RAY_STATE["atexit"] = True
        _RAY_STATE["users"] += 1
    return ray


def ray_release() -> None:
    import ray

    with _RAY_LOCK:
        _RAY_STATE["users"] -= 1
        if _RAY_STATE["users"] <= 0 and _RAY_STATE["owned"]:
            _RAY_STATE["owned"] = False
            try:
                ray.shutdown()
            except Exception:
                pass


def alive_nodes(ray) -> list[RayNode]:
    nodes = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        nodes.append(RayNode(node_id=node["NodeID"], ip=node.get("NodeManagerAddress", "?"),
                             cpus=int(resources.get("CPU", 0)), gpus=int(resources.get("GPU", 0))))
    return nodes


def register(backend) -> None:
    """Shut ``backend``'s replicas down at interpreter exit (``shutdown_replicas``)."""
    _BACKENDS.add(backend)


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()
