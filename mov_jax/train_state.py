"""Training state and its orbax checkpoints (with the input position).

A checkpoint `<MODEL_DIR>/checkpoints/<step>/` holds three orbax items:
  state     step, trainable and frozen parameters, optimizer state, RNG
            (sharded arrays, written asynchronously where orbax allows);
  dataset   each host's tf.data iterator state (t5x does the same), so a
            resumed run reads exactly the batches it would have read;
  metadata  JSON: batches consumed and the input-pipeline settings (mixture,
            lengths, batch size, packing, ...) that a resume must repeat.
Orbax writes each step to a temporary directory and renames it when
complete, so a crash never leaves a half-written checkpoint behind.
"""

import dataclasses
import json
import os
import re
from typing import Any, Dict, Optional

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def gfile():
  """`tf.io.gfile` (local and gs:// paths), imported on first use: the model
  and the training step need no TensorFlow, only file and data I/O do."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.io.gfile


@flax.struct.dataclass
class TrainState:
  """Everything that determines the next training step."""
  step: jax.Array
  trainable: Dict[str, Any]
  frozen: Dict[str, Any]
  opt_state: Any
  rng: jax.Array


# ---------------------------------------------------- dataset iterator item


@dataclasses.dataclass
class DatasetSave(ocp.args.CheckpointArgs):
  iterator: Any  # a tf.data iterator


@dataclasses.dataclass
class DatasetRestore(ocp.args.CheckpointArgs):
  iterator: Any  # a fresh iterator of the same pipeline, restored in place


def pipeline_mismatch_error(directory, error: Exception) -> ValueError:
  """A saved input-pipeline state that the configured pipeline cannot take
  (another mixture, lengths, batch size, packing, ...): TensorFlow's error
  says only what failed, this says what to do."""
  first_line = str(getattr(error, 'message', error)).strip().split('\n')[0]
  return ValueError(
      f'The input-pipeline state in {directory} does not fit the configured '
      f'data pipeline ({type(error).__name__}: {first_line[:300]}). Resume '
      'with the data settings the checkpoint was written with '
      '(MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, BATCH_SIZE, PACKING, '
      'USE_CACHED_TASKS; see config.gin in MODEL_DIR), or use a new '
      'MODEL_DIR (with INITIAL_CHECKPOINT_PATH or ADAPTER_CHECKPOINT_PATH to '
      'start from its weights). Nothing was changed.')


class DatasetCheckpointHandler(ocp.CheckpointHandler):
  """Saves every host's tf.data iterator with `tf.train.Checkpoint`."""

  def _prefix(self, directory: epath.Path) -> str:
    return os.fspath(directory / f'iterator-{jax.process_index()}')

  def save(self, directory: epath.Path, args: DatasetSave) -> None:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.train.Checkpoint(iterator=args.iterator).write(self._prefix(directory))

  def restore(self, directory: epath.Path, args: DatasetRestore) -> Any:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    prefix = self._prefix(directory)
    if not gfile().glob(prefix + '*'):
      raise FileNotFoundError(
          f'No input-pipeline state for process {jax.process_index()} in '
          f'{directory}: was the checkpoint written by a run with another '
          'number of hosts?')
    try:
      tf.train.Checkpoint(iterator=args.iterator).read(
          prefix).assert_consumed()
    except (tf.errors.OpError, AssertionError) as e:
      raise pipeline_mismatch_error(directory, e) from e
    return args.iterator

  def metadata(self, directory: epath.Path) -> Optional[Any]:
    return None


ocp.args.register_with_handler(DatasetCheckpointHandler, for_save=True)(
    DatasetSave)
ocp.args.register_with_handler(DatasetCheckpointHandler, for_restore=True)(
    DatasetRestore)


# ------------------------------------------------------------------ manager


def make_writable_dir(path: str, name: str, check_write: bool = False,
                      consequence: str = '') -> None:
  """Creates directory `path` (the `name` setting, e.g. MODEL_DIR) with its
  parents, and with `check_write` writes and removes a probe file in it, or
  raises ValueError saying why it cannot: before long work, not after."""
  if gfile().exists(path) and not gfile().isdir(path):
    raise ValueError(f'{name} {path} cannot be created or written to: it '
                     f'exists and is not a directory. Choose another {name}. '
                     f'{consequence}'.rstrip())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  probe = os.path.join(path, f'.write_check_{jax.process_index()}')
  try:
    gfile().makedirs(path)
    if check_write:
      with gfile().GFile(probe, 'w') as f:
        f.write('')
      gfile().remove(probe)
  except (OSError, tf.errors.OpError) as e:
    raise ValueError(
        f'{name} {path} cannot be created or written to '
        f'({type(e).__name__}: {getattr(e, "message", e)}). Set {name} to a '
        'directory you can write to (its parents must be directories; it is '
        f'created if missing). {consequence}'.rstrip()) from None


def checkpoint_manager(model_dir: str, period: int,
                       keep: Optional[int]) -> ocp.CheckpointManager:
  # create=False: `checkpoints/` appears with the first save, so a run that
  # fails before it leaves no empty checkpoint directory behind (which eval
  # would take for a run still waiting for its first checkpoint).
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=period, max_to_keep=keep,
      enable_async_checkpointing=True, create=False)
  return ocp.CheckpointManager(
      epath.Path(model_dir) / 'checkpoints', options=options,
      item_names=('state', 'dataset', 'metadata'))


def save(manager: ocp.CheckpointManager, step: int, state: TrainState,
         iterator, metadata: Dict[str, Any], force: bool = False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      dataset=DatasetSave(iterator),
      metadata=ocp.args.JsonSave(metadata)), force=force)


def _state_metadata_tree(step_dir: str):
  """The saved state's tree of array metadata, or None when unreadable."""
  state_dir = epath.Path(step_dir) / 'state'
  try:
    metadata = ocp.PyTreeCheckpointer().metadata(state_dir)
  except Exception:  # pylint: disable=broad-except
    return None  # orbax raises several types for damaged metadata
  item = getattr(metadata, 'item_metadata', None)
  return getattr(item, 'tree', None)


def step_problems(step_dir: str) -> list:
  """What is missing or unreadable in a training checkpoint step directory
  (empty when it looks complete)."""
  problems = [f'{item}/ is missing' for item in ('state', 'dataset', 'metadata')
              if not gfile().isdir(os.path.join(step_dir, item))]
  if not problems and _state_metadata_tree(step_dir) is None:
    problems.append('state/ has no readable orbax metadata')
  return problems


def saved_shapes(step_dir: str) -> Dict[str, Any]:
  """'/'-joined state paths -> shapes of a checkpoint step directory, read
  from its metadata only (no array is loaded)."""
  tree = _state_metadata_tree(step_dir)
  if tree is None:
    raise ValueError(f'The checkpoint {step_dir} has no readable state '
                     'metadata (state/ missing or damaged).')
  return tree_shapes(tree)


def tree_shapes(tree) -> Dict[str, Any]:
  """'/'-joined paths -> shapes of the arrays (or abstract arrays) of `tree`,
  named as orbax names them on disk (NamedTuple fields by name)."""
  flat = flax.traverse_util.flatten_dict(_as_dict(tree), sep='/')
  return {k: tuple(v.shape) for k, v in flat.items() if _is_array_leaf(v)}


def saved_metadata(manager: ocp.CheckpointManager, step: int) -> Dict:
  """The JSON metadata item of a step (nothing else is read)."""
  return manager.restore(step, args=ocp.args.Composite(
      metadata=ocp.args.JsonRestore()))['metadata']


def shape_problems(found: Dict[str, Any], expected: Dict[str, Any]) -> list:
  """Missing, mis-shaped and unexpected entries of `found` vs `expected`."""
  problems = [f'{k} missing from the checkpoint' for k in expected
              if k not in found]
  problems += [f'{k}: checkpoint {found[k]}, model {shape}'
               for k, shape in expected.items()
               if k in found and found[k] != shape]
  problems += [f'{k} in the checkpoint but not in the model'
               for k in sorted(set(found) - set(expected))]
  return problems


def _is_array_leaf(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _as_dict(tree):
  if _is_array_leaf(tree):
    return tree
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):  # NamedTuple
    return {f: _as_dict(getattr(tree, f)) for f in tree._fields}
  if dataclasses.is_dataclass(tree):
    return {f.name: _as_dict(getattr(tree, f.name))
            for f in dataclasses.fields(tree)}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, 'shape'):
    return {str(i): _as_dict(v) for i, v in enumerate(tree)}
  return tree


def restore(manager: ocp.CheckpointManager, step: int,
            abstract_state: TrainState, iterator):
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      dataset=DatasetRestore(iterator),
      metadata=ocp.args.JsonRestore()))
  return restored['state'], restored['metadata']


def write_json(path: str, value) -> None:
  with gfile().GFile(path, 'w') as f:
    f.write(json.dumps(value, indent=2, sort_keys=True, default=str))


def is_train_checkpoint(path: str) -> bool:
  """Whether `path` is one step directory written by the training binary."""
  return gfile().isdir(os.path.join(path, 'state')) and (
      gfile().isdir(os.path.join(path, 'metadata')) or
      gfile().exists(os.path.join(path, 'metadata')))


def list_train_checkpoints(model_dir: str) -> Dict[int, str]:
  """step -> directory of every finished checkpoint under MODEL_DIR."""
  root = os.path.join(model_dir, 'checkpoints')
  if not gfile().isdir(root):
    return {}
  found = {}
  for name in gfile().listdir(root):
    name = name.rstrip('/')
    path = os.path.join(root, name)
    if name.isdigit() and is_train_checkpoint(path):
      found[int(name)] = path
  return dict(sorted(found.items()))


def restore_train_params(path: str, shardings=None) -> Dict[str, Any]:
  """Full parameters (trainable + frozen) of a training checkpoint step dir.

  Only the parameters are read (not the optimizer state); with `shardings`
  (a pytree of Shardings like the params) each device reads its shard.
  """
  from mov_jax import optim  # pylint: disable=g-import-not-at-top
  if not is_train_checkpoint(path):
    raise FileNotFoundError(
        f'{path} is not a mov-jax training checkpoint (expected '
        f'{path}/state and {path}/metadata, as in '
        '<MODEL_DIR>/checkpoints/<step>/).')
  state_dir = epath.Path(path) / 'state'
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  wanted = {k: tree[k] for k in ('trainable', 'frozen')}
  flat = flax.traverse_util.flatten_dict(wanted, sep='/')
  flat_shardings = {}
  if shardings is not None:
    by_param = flax.traverse_util.flatten_dict(dict(shardings), sep='/')
    flat_shardings = {k: by_param[k.split('/', 1)[1]] for k in flat}
  template = {k: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                      sharding=flat_shardings.get(k))
              for k, m in flat.items()}
  restore_args = {
      k: (ocp.ArrayRestoreArgs(sharding=flat_shardings[k]) if flat_shardings
          else ocp.RestoreArgs(restore_type=np.ndarray)) for k in flat}
  unflat = lambda d: flax.traverse_util.unflatten_dict(d, sep='/')
  try:
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=unflat(template), restore_args=unflat(restore_args),
            partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    why = unreadable_arrays(e)
    if why is None:
      raise
    raise ValueError(
        f'The checkpoint {path} is damaged ({why}). Evaluate another step, '
        'or copy this one again from where it was written. Nothing was '
        'changed.') from e
  return optim.merge_params(restored['trainable'], restored['frozen'])


def unreadable_arrays(error: Exception) -> Optional[str]:
  """Why orbax could not read a checkpoint's arrays, when `error` is such a
  failure (else None: e.g. out of memory, or an input-pipeline mismatch).
  Orbax raises a bare Exception for an array it cannot read (e.g. a data
  file cut short or missing in a step that looks complete); the TensorStore
  error under it ('OUT_OF_RANGE: Error reading "<array>" in OCDBT database
  at ...') names the array and the file."""
  cause = error
  while cause.__cause__ is not None:
    cause = cause.__cause__
  first_line = (str(cause).strip().splitlines() or [''])[0]
  if not re.match(r'[A-Z_]+: Error (reading|decoding) ', first_line):
    return None
  return (f'its arrays could not be read: {type(cause).__name__}: '
          f'{first_line[:400]}')
