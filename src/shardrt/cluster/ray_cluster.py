"""Joining a Ray cluster and naming its nodes: `connect` once per process, `resolve_host` from a
placement's host name to a Ray node id before any actor is made (an actor pinned to a node that
does not exist waits forever instead of failing)."""

from __future__ import annotations

import socket

from ..errors import ConfigError

HOST_LABEL = "shardrt-host"  # `ray start --labels shardrt-host=NAME` names a node for placements

PROBE_SECONDS = 5.0  # Ray itself retries an unreachable GCS address for minutes before it gives up

_connected_address: str | None = None  # kept for the life of the process, across serve restarts


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("--cluster: needs Ray; pip install 'shardrt[cluster]'") from None
    return ray


def _probe(address: str) -> None:
    """Fail in seconds, in one line, where nothing listens at HOST:PORT."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # `auto`, or a form Ray parses itself and names in its own error
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"--cluster: cannot join the Ray cluster at {address!r}: {reason}") from None


def connect(address: str) -> None:
    """Join the Ray cluster at `address` (ray://HOST:PORT, HOST:PORT or auto); once per process."""
    global _connected_address
    ray = _import_ray()
    if _connected_address is not None and ray.is_initialized():
        if address != _connected_address:
            raise ConfigError(f"--cluster: {address!r}: this process is already in the Ray cluster at "
                              f"{_connected_address!r}")
        return
    _probe(address)
    try:
        # log_to_driver=False: the actors' output must not break the CLI's one-line errors
        ray.init(address=address, namespace="shardrt", logging_level="ERROR", log_to_driver=False,
                 ignore_reinit_error=True)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError, by version and cause
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--cluster: cannot join the Ray cluster at {address!r}: {detail}") from None
    _connected_address = address


def disconnect() -> None:
    """Leave the Ray cluster (tests; a process that serves stays connected for its whole life)."""
    global _connected_address
    if _connected_address is not None:
        _import_ray().shutdown()
        _connected_address = None


def _live_nodes() -> list[dict]:
    ray = _import_ray()
    return [node for node in ray.nodes() if node.get("Alive")]


def _known_nodes(nodes: list[dict]) -> str:
    """`nodea, nodeb [label shardrt-host]; vm-3 [hostname]`: each node by the name a placement can use."""
    labelled = sorted(n["Labels"][HOST_LABEL] for n in nodes if n.get("Labels", {}).get(HOST_LABEL))
    unlabelled = sorted(n["NodeManagerHostname"] for n in nodes if not n.get("Labels", {}).get(HOST_LABEL))
    parts = []
    if labelled:
        parts.append(f"{', '.join(labelled)} [label {HOST_LABEL}]")
    if unlabelled:
        parts.append(f"{', '.join(unlabelled)} [hostname]")
    return "; ".join(parts) or "none alive"


def resolve_host(name: str) -> str:
    """The id (hex) of the one live Ray node that `name` means: its `shardrt-host` label, else its
    hostname (both compared without case), else its address. None or two matches: ConfigError."""
    nodes = _live_nodes()
    wanted = name.casefold()
    where = f"the Ray cluster at {_connected_address}" if _connected_address else "the Ray cluster"
    tiers = (
        ("label " + HOST_LABEL, lambda n: (n.get("Labels", {}).get(HOST_LABEL) or "").casefold() == wanted),
        ("hostname", lambda n: (n.get("NodeManagerHostname") or "").casefold() == wanted),
        ("address", lambda n: n.get("NodeManagerAddress") == name),
    )
    for by, matches in tiers:
        found = [n for n in nodes if matches(n)]
        if len(found) == 1:
            return found[0]["NodeID"]
        if found:
            ids = ", ".join(sorted(n["NodeID"][:8] for n in found))
            raise ConfigError(f"--target-gpus: host {name!r} is {len(found)} nodes of {where} by {by} "
                              f"(node ids {ids}); give each a label: ray start --labels {HOST_LABEL}=NAME")
    raise ConfigError(f"--target-gpus: host {name!r} is no node of {where} (nodes: {_known_nodes(nodes)})")


def node_address(node_id: str) -> str:
    """The address a daemon on node `node_id` binds its TCP sockets to: the node's own address."""
    for node in _live_nodes():
        if node["NodeID"] == node_id:
            return node["NodeManagerAddress"]
    raise ConfigError(f"--target-gpus: Ray node {node_id[:8]} is no longer alive")
