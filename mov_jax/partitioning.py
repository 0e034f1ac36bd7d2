"""Meshes, logical axis rules and shardings: the only place naming mesh axes.

Every parameter and activation of the network carries logical axis names
(`embed`, `mlp`, `heads`, `joined_kv`, `expert`, ...). The rules below map
them onto a 2-D `jax.sharding.Mesh` with axes `data` and `model`, as t5x's
`standard_logical_axis_rules` do, plus our adapter axes. The same jitted train
step then runs on one CPU, on 8 simulated devices, or on a pod slice.
"""

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import flax
import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util
from flax.linen import partitioning as nn_partitioning
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = 'data'
MODEL = 'model'

# t5x's standard rules (batch over data; vocab, mlp, heads, joined_kv over
# model) plus the adapter axes, which stay replicated: adapter tensors are
# tiny, and sharding `expert` would split one token's mixture across devices.
STANDARD_RULES: Tuple[Tuple[str, Optional[str]], ...] = (
    ('batch', DATA),
    ('vocab', MODEL),
    ('embed', None),
    ('mlp', MODEL),
    ('heads', MODEL),
    ('kv', None),
    ('joined_kv', MODEL),
    ('relpos_buckets', None),
    ('abspos_buckets', None),
    ('length', None),
    ('layers', None),
    ('stack', None),
    ('mlp_activations', None),
    ('expert', None),
    ('rank', None),
    ('unmodeled', None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """A `data x model` device mesh (gin: `partitioning.MeshConfig`).

  Attributes:
    model_parallel: devices per model replica (the `model` axis size).
    data_parallel: size of the `data` axis; -1 uses all remaining devices.
    extra_rules: logical axis rules that take precedence over the standard
      ones, e.g. (('expert', 'model'),).
  """
  model_parallel: int = 1
  data_parallel: int = -1
  extra_rules: Tuple[Tuple[str, Optional[str]], ...] = ()

  def make_mesh(self, devices: Optional[Sequence[Any]] = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if self.model_parallel < 1 or n % self.model_parallel:
      raise ValueError(
          f'model_parallel={self.model_parallel} must divide the {n} '
          'available devices; pick a mesh preset that fits this machine '
          '(gin/meshes/).')
    data = self.data_parallel
    if data == -1:
      data = n // self.model_parallel
    if data * self.model_parallel != n:
      raise ValueError(
          f'Mesh {data} (data) x {self.model_parallel} (model) does not use '
          f'the {n} available devices; set data_parallel=-1 or a product '
          f'equal to {n}.')
    grid = np.asarray(devices, dtype=object).reshape(data, self.model_parallel)
    return Mesh(grid, (DATA, MODEL))

  @property
  def rules(self) -> Tuple[Tuple[str, Optional[str]], ...]:
    overridden = {name for name, _ in self.extra_rules}
    return tuple(self.extra_rules) + tuple(
        r for r in STANDARD_RULES if r[0] not in overridden)


def param_shardings(variables, mesh: Mesh, rules) -> Any:
  """NamedShardings (plain nested dicts) of the parameters of `variables`
  (abstract or real, with their `params_axes`) by their logical axes, after
  `check_shardable` on the mesh's axis sizes."""
  check_shardable(variables, dict(mesh.shape), rules)
  logical = nn_partitioning.get_axis_names(variables['params_axes'])
  return flax.core.unfreeze(nn.logical_to_mesh_sharding(logical, mesh, rules))


def check_shardable(variables, mesh_shape: Dict[str, int], rules) -> None:
  """Raises a ValueError naming the first parameter of `variables` whose
  sharded dimension a mesh of `mesh_shape` (e.g. {'data': 1, 'model': 3})
  does not divide, where jax would fail later inside the jitted initialiser.
  Needs no devices, so a launcher can check a mesh before starting it."""
  logical = flax.core.unfreeze(
      nn_partitioning.get_axis_names(variables['params_axes']))
  flat_logical = traverse_util.flatten_dict(logical, sep='/')
  flat_params = traverse_util.flatten_dict(
      flax.core.unfreeze(variables['params']), sep='/')
  for name, param in flat_params.items():
    axes = tuple(flat_logical[name])
    spec = nn.logical_to_mesh_axes(axes, rules)
    for dim, (size, mesh_axes) in enumerate(zip(param.shape, spec)):
      if mesh_axes is None:
        continue
      names = mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)
      ways = int(np.prod([mesh_shape[a] for a in names]))
      if size % ways:
        split = ' x '.join(f'{a}={mesh_shape[a]}' for a in names)
        raise ValueError(
            f'Parameter {name} {tuple(param.shape)} (logical axes {axes}) '
            f'cannot be sharded on a {mesh_shape} mesh: its dimension {dim} '
            f'({axes[dim]}, size {size}) is split over mesh axis {split}, '
            f'which does not divide {size}. Use a model_parallel that '
            'divides the sharded sizes of the model (heads, mlp, vocab), or '
            'map that logical axis to None in MeshConfig.extra_rules.')


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a global batch split over the data axis."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  data = mesh.shape[DATA]
  if batch_size % data:
    raise ValueError(
        f'BATCH_SIZE={batch_size} is not divisible by the {data} data-parallel '
        'replicas of the mesh; use a multiple of it.')


def compiled_memory_bytes(compiled) -> Optional[Dict[str, int]]:
  """XLA's buffers for one device of a compiled computation, in bytes:
  `temp`, `arguments` and `total` (temporaries, arguments and outputs, less
  the outputs that reuse donated arguments); None where XLA does not say."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  return {'temp': analysis.temp_size_in_bytes,
          'arguments': analysis.argument_size_in_bytes,
          'total': (analysis.temp_size_in_bytes +
                    analysis.argument_size_in_bytes +
                    analysis.output_size_in_bytes -
                    analysis.alias_size_in_bytes)}


def device_memory_bytes() -> Optional[int]:
  """What one local device can hold: the accelerator's memory limit, or on
  CPU the host's RAM shared by its (possibly simulated) devices."""
  device = jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    return ram // jax.local_device_count()
  return None


def check_fits_in_memory(compiled, what: str, fix: str) -> None:
  """Raises a clear error, before anything runs, when `compiled` needs more
  memory per device than a device has (instead of an out-of-memory error,
  or on CPU the kernel killing the process, in the middle of a run)."""
  need, limit = compiled_memory_bytes(compiled), device_memory_bytes()
  if need is None or limit is None or need['total'] <= limit:
    return
  gib = 2.0 ** 30
  raise ValueError(
      f'{what} needs {need["total"] / gib:.1f} GiB per device '
      f'({need["temp"] / gib:.1f} GiB of working memory, '
      f'{need["arguments"] / gib:.1f} GiB of state and batch), but a device '
      f'({jax.local_devices()[0].device_kind}) has {limit / gib:.1f} GiB. '
      f'{fix}')


def host_local_to_global(batch, mesh: Mesh):
  """Assembles each host's rows into one global, data-sharded batch."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def add_distributed_flags(parser) -> None:
  """Multi-host flags shared by the binaries (see launch/)."""
  parser.add_argument('--coordinator_address', default=None,
                      help='host:port of process 0 for jax.distributed '
                      '(multi-host GPU/CPU); TPU pods need only --distributed.')
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--distributed', action='store_true',
                      help='jax.distributed.initialize() with auto-detected '
                      'settings (Cloud TPU pods, SLURM).')


def initialize_distributed(args) -> None:
  """Joins the processes of a multi-host job before any device is used."""
  if args.coordinator_address:
    if args.num_processes is None or args.process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and '
                       '--process_id.')
    if jax.config.jax_platforms in (None, '', 'cpu') or 'cpu' in str(
        jax.config.jax_platforms):
      # CPU devices of several processes talk through gloo.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(args.coordinator_address, args.num_processes,
                               args.process_id)
  elif args.distributed:
    jax.distributed.initialize()


def hide_accelerators_from_tensorflow() -> None:
  """tf.data runs on the host; keep TensorFlow off GPUs JAX needs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices: nothing to do.
    pass
