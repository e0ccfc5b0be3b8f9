"""The environment Tokenweir's Ray processes run with: set by ``tokenweir serve`` before Ray
starts and on every deployment's ``runtime_env`` (for clusters it joins), and the address a replica
binds for ``gateway.host: node`` (:func:`listen_host`). Below both :mod:`serving.app` and
:mod:`serving.cli.runtime`, which read it."""

# Keep a local Ray on loopback (without the second variable Ray still advertised eth0).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# A cheaper Serve request path, measured at concurrency 32 on two cores (README, "Speed"): user code
# and the handle router on the replica's own event loop (no thread hops per message), buffered
# request logs, GC frozen after start.
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

NODE_HOST = "node"
"""The `gateway.host` (and `internal_host`) value that binds each replica's own Ray node address."""


class NodeAddressError(RuntimeError):
    """A replica configured to bind its node's address cannot learn it from Ray."""


def listen_host(host: str) -> str:
    """The address to bind for a configured ``host``: as written, or for :data:`NODE_HOST` this
    process's Ray node address (:func:`node_address`): a gateway on a cluster must not quietly
    listen on 127.0.0.1, where no client reaches it."""
    if host != NODE_HOST:
        return host
    return node_address("gateway.host is `node`")


def node_address(what: str) -> str:
    """This process's Ray node address (``ray.util.get_node_ip_address()`` of the connected node:
    loopback on a local Ray, the node's own address on a cluster), for a listener other nodes reach
    (the gateways', a pool replica's token channel, the ledger socket). Raises
    :class:`NodeAddressError` (``what`` says who asked) when the process is not connected to Ray or
    Ray has no address for it, never falls back to 127.0.0.1: on a cluster a listener there is out of
    every other node's reach, and would fail later and far from the cause."""
    try:
        import ray

        if not ray.is_initialized():
            raise NodeAddressError(
                f"{what} but this process is not connected to Ray, so it has no node address"
            )
        address = str(ray.util.get_node_ip_address() or "")
    except NodeAddressError:
        raise
    except Exception as e:
        raise NodeAddressError(f"{what} but Ray gave no node address: {e!r}") from e
    if not address:
        raise NodeAddressError(f"{what} but Ray gave an empty node address")
    return address
