"""Device mesh, logical-axis rules and helpers that shard state and batches.

One code path for one CPU, a GPU cluster and a TPU pod: `jax.jit` with explicit
shardings over a `Mesh` with axes ('data', 'fsdp', 'tensor').

  data    batch split (data parallelism)
  fsdp    batch split AND parameters/optimizer state split along 'embed' (ZeRO-3)
  tensor  Megatron-style: attention heads, FFN hidden units and the vocabulary split
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transformer.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axis (or axes). Parameters use the short names,
# activations the 'activation_' names, so that a parameter's 'embed' (split over
# fsdp) never collides with an activation batch that is also split over fsdp.
LOGICAL_RULES = (
    ("layers", None),  # the stacked axis of --scan_layers parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def parse_mesh(spec: str, num_devices: int) -> dict[str, int]:
  """'data:-1,fsdp:2,tensor:1' -> {'data': n/2, 'fsdp': 2, 'tensor': 1}."""
  sizes = {axis: 1 for axis in MESH_AXES}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, value = part.partition(":")
    if not sep or name not in MESH_AXES:
      raise ConfigError(f"--mesh: bad entry {part!r}; expected e.g. data:-1,fsdp:1,tensor:1")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ConfigError(f"--mesh: size of {name!r} must be an integer, got {value!r}") from None
  rest = [a for a, n in sizes.items() if n == -1]
  if len(rest) > 1:
    raise ConfigError("--mesh: at most one axis may be -1")
  known = int(np.prod([n for n in sizes.values() if n != -1]))
  if any(n == 0 or n < -1 for n in sizes.values()) or num_devices % known:
    raise ConfigError(f"--mesh={spec} does not fit {num_devices} devices")
  if rest:
    sizes[rest[0]] = num_devices // known
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ConfigError(f"--mesh={spec} uses {np.prod(list(sizes.values()))} devices,"
                      f" but {num_devices} are available")
  return sizes


def make_mesh(mesh_cfg: MeshConfig | str, devices: Optional[list] = None) -> Mesh:
  """A Mesh over all (or the given) devices, shaped by --mesh."""
  spec = mesh_cfg if isinstance(mesh_cfg, str) else mesh_cfg.mesh
  devices = jax.devices() if devices is None else devices
  sizes = parse_mesh(spec, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:  # topology-aware on TPU/GPU; plain reshape on CPU
    from jax.experimental import mesh_utils
    device_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


@contextlib.contextmanager
def mesh_context(mesh: Mesh):
  """Mesh + logical rules in scope, so activation constraints take effect when tracing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield


def logical_to_shardings(logical_specs: Any, mesh: Mesh) -> Any:
  """Pytree of logical PartitionSpecs -> pytree of NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_RULES)


def boxed_shardings(abstract_boxed_tree: Any, mesh: Mesh) -> Any:
  """Shardings for a tree whose leaves may be nn.LogicallyPartitioned boxes."""
  return logical_to_shardings(nn.get_partition_spec(abstract_boxed_tree), mesh)


def batch_size_multiple(mesh: Mesh) -> int:
  """Global batch rows must divide evenly over the batch-parallel axes."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """[batch, ...] arrays split over ('data', 'fsdp'), replicated over 'tensor'."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global jax.Arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def _cluster_detected() -> bool:
  """True where jax.distributed.initialize() can find its parameters by itself.

  Mirrors jax's own detectors (jax/_src/clusters): a SLURM step with several tasks
  (srun), Open MPI, an explicit JAX_COORDINATOR_ADDRESS, or a Cloud TPU VM (GKE sets
  worker host names; GCE answers through the metadata server).
  """
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env or "OMPI_MCA_orte_hnp_uri" in env:
    return True
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(k in env for k in slurm):
    return int(env["SLURM_NTASKS"]) > 1  # one task inside an allocation: single process
  try:
    from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm  # set when libtpu loads
  except ImportError:
    running_in_cloud_tpu_vm = False
  return bool(running_in_cloud_tpu_vm) and "TPU_SKIP_MDS_QUERY" not in env


def maybe_initialize_distributed(mesh_cfg: MeshConfig) -> None:
  """jax.distributed.initialize() for multi-process runs.

  Explicit flags (--coordinator_address, --num_processes, --process_id) win; otherwise
  JAX detects SLURM (srun), Open MPI and Cloud TPU VM pods by itself. A single process
  elsewhere is left alone.
  """
  if mesh_cfg.coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=mesh_cfg.coordinator_address,
                               num_processes=mesh_cfg.num_processes,
                               process_id=mesh_cfg.process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
