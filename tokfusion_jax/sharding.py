"""Device mesh, shardings and multi-host set-up.

The mesh has two axes: ``data`` (the batch is split over it) and ``fsdp`` (the frozen tokenizer's
parameters may be split over it to save memory; the batch is split over both axes). Trainable
parameters and optimiser state are small (about 1.3 M parameters) and stay replicated.

Multi-host runs call :func:`initialize_distributed` before anything touches the devices; each
process then feeds only its own slice of every global batch (:func:`process_batch_slice`) and
:func:`global_batch` assembles the global array from the per-process pieces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tokfusion_jax.errors import ConfigError

PyTree = Any
DATA_AXES = ("data", "fsdp")  # the batch dimension is split over every device

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"
_ENV_AUTO = "TOKFUSION_DISTRIBUTED"


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment asks for a multi-process run.

    * ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``: explicit set-up
      (e.g. several processes on one machine, or a hand-rolled cluster).
    * ``TOKFUSION_DISTRIBUTED=1``: let JAX detect the cluster (Cloud TPU pods, SLURM, ...).

    On CPU the gloo collectives are selected so that cross-process reductions work. Returns
    True when a distributed runtime was initialised (or already was).
    """
    env = os.environ if environ is None else environ
    explicit = env.get(_ENV_COORDINATOR)
    auto = env.get(_ENV_AUTO, "").lower() in ("1", "true", "yes")
    if not explicit and not auto:
        return False
    if jax.distributed.is_initialized():
        return True
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        try:
            num = int(env[_ENV_NUM_PROCESSES])
            pid = int(env[_ENV_PROCESS_ID])
        except (KeyError, ValueError) as e:
            raise ConfigError(
                f"{_ENV_COORDINATOR}={explicit} is set, so {_ENV_NUM_PROCESSES} and "
                f"{_ENV_PROCESS_ID} must be integers too ({e})"
            ) from None
        jax.distributed.initialize(coordinator_address=explicit, num_processes=num, process_id=pid)
    else:
        jax.distributed.initialize()
    host_barrier("initialized")
    logging.info(
        "distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


def host_barrier(name: str, timeout_s: int = 900) -> None:
    """Waits until every process reaches ``name`` (coordination service; no-op single-process).

    Unlike a device collective, this barrier tolerates processes arriving minutes apart (slow
    start-up or compilation on a loaded host), which the CPU collectives' 30 s set-up does not.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _distributed  # the coordination-service client

    client = _distributed.global_state.client
    if client is None:
        return
    client.wait_at_barrier(f"tokfusion_{name}", timeout_in_ms=timeout_s * 1000)


def make_mesh(data: int = -1, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over all (global) devices; ``-1`` means "whatever is left"."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1:
        raise ConfigError(f"config.mesh.fsdp must be >= 1, got {fsdp}")
    if data == -1:
        if n % fsdp:
            raise ConfigError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data < 1 or data * fsdp != n:
        raise ConfigError(
            f"config.mesh data={data} x fsdp={fsdp} must equal the number of devices ({n})"
        )
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, ("data", "fsdp"))


def mesh_from_config(mesh_cfg: Any, global_batch: int, devices: list | None = None) -> Mesh:
    """The ``(data, fsdp)`` mesh of a ``config.mesh`` section, checked against the global batch."""
    mesh = make_mesh(int(mesh_cfg.data), int(mesh_cfg.fsdp), devices)
    check_batch_size(global_batch, mesh)
    return mesh


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over all devices, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXES))


def fsdp_sharding(mesh: Mesh, tree: PyTree, min_size: int = 2**14) -> PyTree:
    """Shardings that split each large leaf's largest divisible axis over ``fsdp``.

    Small leaves (fewer than ``min_size`` elements) and leaves with no axis divisible by the
    ``fsdp`` size stay replicated. With ``fsdp == 1`` everything is replicated.
    """
    size = mesh.shape["fsdp"]

    def spec(x: Any) -> NamedSharding:
        shape = np.shape(x)
        if size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
            return replicated(mesh)
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % size == 0:
                parts = [None] * len(shape)
                parts[axis] = "fsdp"
                return NamedSharding(mesh, P(*parts))
        return replicated(mesh)

    return jax.tree_util.tree_map(spec, tree)


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
    """Validates the global batch against devices and processes; returns the per-process size."""
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    if global_batch % n_dev:
        raise ConfigError(
            f"config.data.batch_size={global_batch} must be divisible by the {n_dev} devices"
        )
    return global_batch // n_proc


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles device arrays from this process's numeric batch entries (strings are skipped)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "USO":  # names stay on the host
            continue
        out[key] = jax.make_array_from_process_local_data(sharding, arr)
    return out
