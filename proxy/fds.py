"""The process's file descriptors against its file limit (issue 13, item 2).

Every app connection, upstream connection and open file holds a descriptor; at the soft
`RLIMIT_NOFILE` limit the kernel refuses the next one, so egressd stops accepting
connections and a policy reload fails with "Too many open files". `raise_fd_limit` lifts
the soft limit to the hard one at start-up (as nginx's `worker_rlimit_nofile` does); the
server checks `fd_pressure` every few seconds and the gauges `egressd_open_fds` and
`egressd_max_fds` (proxy/observe/metrics.py) read `open_fds` and `fd_limit`.
"""

from __future__ import annotations

import os
import resource

# The share of the file limit in use from which egressd warns.
WARN_AT = 0.8


def open_fds() -> int:
    """File descriptors open in this process now; -1 when the system does not say."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(directory))
        except OSError:
            continue
    return -1


def fd_limit() -> int:
    """The soft file limit (RLIMIT_NOFILE); -1 when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the soft file limit to the hard one when it is lower: (old, new), or None
    when it already is (or the system refuses)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft >= hard:
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return None  # e.g. a hard limit of "unlimited" above the kernel's nr_open
    return int(soft), fd_limit()


def fd_pressure(open_now: int, limit: int) -> str | None:
    """The warning to log when `open_now` descriptors are `WARN_AT` or more of `limit`;
    None below that, or when either number is unknown (-1) or there is no limit."""
    if limit <= 0 or open_now < 0 or open_now < WARN_AT * limit:
        return None
    return (
        f"egressd is near its file limit: {open_now} of {limit} file descriptors open "
        f"({100 * open_now // limit}%); at the limit new connections are refused and a policy reload fails "
        "with 'Too many open files'. Raise the limit (`ulimit -n`, the container's nofile limit) or lower "
        "--keepalive-timeout so that idle app connections are closed sooner"
    )
