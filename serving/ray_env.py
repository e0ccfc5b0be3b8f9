"""The environment Tokenweir's Ray processes run with: set by ``tokenweir serve`` before Ray
starts and on every deployment's ``runtime_env`` (for clusters it joins). Below both
:mod:`serving.app` and :mod:`serving.cli.runtime`, which read it."""

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
