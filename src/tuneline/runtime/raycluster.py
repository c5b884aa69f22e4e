"""Joining a Ray cluster: the one the spec names, or a Ray instance started on this machine for this
process. The search's trials (Ray Tune) and the training (Ray Train) of one run join the same one.

A Ray instance started here listens on the machine's address (Ray resolves 127.0.0.1 to it, so that
other nodes could join), guarded by Ray's token authentication, which recent Ray versions (2.60
here) turn on for a local instance; tuneline leaves it on."""

from __future__ import annotations

import logging
import os

from tuneline.errors import Problem, TunelineError


def connect(address: str | None, field: str) -> None:
    """Join the Ray cluster at ``address`` (host:port, ray://host:10001 or auto), or, with None,
    start a Ray instance on this machine for this process (it stops when the process ends). Nothing
    happens when this process already joined one. ``field`` is the spec field that named
    ``address`` (for the error when it cannot be reached)."""
    try:
        import ray
    except ImportError as e:
        raise TunelineError(Problem(f"{field} needs Ray, which is not installed", field=field,
                                    hint="pip install 'tuneline[ray]'")) from e
    if ray.is_initialized():
        return
    try:
        # the workers' output stays in Ray's logs: the console shows the command's own progress
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 num_cpus=os.cpu_count() if address is None else None)
    except ConnectionError as e:
        raise TunelineError(Problem(f"cannot reach the Ray cluster at {address}: {e}", field=field,
                                    hint="start it (ray start --head) or fix the address; a cluster with token "
                                         "authentication needs RAY_AUTH_MODE=token here, and its token "
                                         "(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")) from e
