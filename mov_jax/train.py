"""The training binary: gin-configured, partitioned, resumable.

    python -m mov_jax.train \
      --gin_file=models/t5_1_1_small.gin --gin_file=methods/mov.gin \
      --gin_file=runs/finetune.gin \
      --gin.MODEL_DIR="'/tmp/mov'" --gin.MIXTURE_OR_TASK_NAME="'t0_train'"

t5x's macro names: MODEL_DIR, MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS,
TRAIN_STEPS, BATCH_SIZE, INITIAL_CHECKPOINT_PATH, USE_CACHED_TASKS, PACKING,
LOSS_NORMALIZING_FACTOR, plus CHECKPOINT_PERIOD. All settings live in
`train.TrainConfig` (bound by gin/runs/*.gin). Starting again with the same
MODEL_DIR resumes exactly where the last checkpoint left off. MODEL_DIR/
config.gin holds the settings of the latest run that trained; one with other
settings before it is kept as config.step_<N>.gin (N: the step it resumed).
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import (Any, Callable, Dict, Mapping, Optional, Sequence,
                    Tuple)

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util

from mov_jax import gin_utils
from mov_jax import models
from mov_jax import network as network_lib
from mov_jax import optim
from mov_jax import partitioning
from mov_jax import train_state as ts
from mov_jax.adapters import routing

# Macro -> how to provide it.
REQUIRED_MACROS = {
    'MODEL_DIR': '--gin.MODEL_DIR="\'/path/to/run\'"',
    'MIXTURE_OR_TASK_NAME': '--gin.MIXTURE_OR_TASK_NAME="\'t0_train\'"',
    'TASK_FEATURE_LENGTHS': "a run gin file (runs/finetune.gin)",
    'TRAIN_STEPS': '--gin.TRAIN_STEPS=1000',
    'BATCH_SIZE': '--gin.BATCH_SIZE=32',
    'NETWORK': 'a model gin file (models/t5_1_1_small.gin, ...)',
    'TRAINABLE_REGEX': 'a method gin file (methods/mov.gin, methods/full.gin, '
                       '...)',
}


_NAMED_LOSS_FACTORS = (models.NUM_REAL_TARGET_TOKENS,
                       models.NUM_TOTAL_TARGET_TOKENS,
                       models.AVERAGE_PER_SEQUENCE)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One training run (gin: `train.TrainConfig`, see gin/runs/).

  Attributes:
    model_dir: where checkpoints, metrics and exports go (MODEL_DIR).
    network: the (adapted) network (NETWORK, from the model + method gins).
    mixture_or_task_name: seqio mixture or task (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: {'inputs': L, 'targets': L} (TASK_FEATURE_LENGTHS).
    train_steps: total steps of this model_dir (TRAIN_STEPS).
    batch_size: global batch size in sequences (BATCH_SIZE).
    trainable_regex: which parameters train (TRAINABLE_REGEX of the method).
    optimizer: optimizer and schedule of the trainable parameters.
    mesh: device mesh and logical axis rules.
    initial_checkpoint_path: base model to start from (ours, T5X or Hugging
      Face); adapter parameters absent from it start fresh.
    adapter_checkpoint_path: an exported adapter to put onto the base.
    packing: pack several examples per row (PACKING).
    use_cached_tasks: read seqio's offline cache (USE_CACHED_TASKS; P3 tasks
      read P3's own files and need no cache).
    loss_normalizing_factor: see `models.loss_weights_and_normalizer`.
    z_loss: output z-loss weight.
    checkpoint_period: save every N steps (CHECKPOINT_PERIOD); the last step
      is always saved.
    keep_checkpoints: keep only the newest N (None: keep all).
    log_period: print, and write metrics, every N steps (and after the first
      and the last). On one CPU device the router statistics among them
      are computed only on those steps (`logs_metrics`, `make_train_step`).
    seed: seeds parameter init, dropout and the input shuffle.
    shuffle: shuffle the training data.
    export_adapter: write the trainable parameters alone at the end.
  """
  model_dir: str
  network: network_lib.Transformer
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  train_steps: int
  batch_size: int
  trainable_regex: Sequence[str] = ('.*',)
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  mesh: partitioning.MeshConfig = partitioning.MeshConfig()
  initial_checkpoint_path: Optional[str] = None
  adapter_checkpoint_path: Optional[str] = None
  packing: bool = True
  use_cached_tasks: bool = False
  loss_normalizing_factor: Any = models.NUM_REAL_TARGET_TOKENS
  z_loss: float = 1e-4
  checkpoint_period: int = 1000
  keep_checkpoints: Optional[int] = None
  log_period: int = 10
  seed: int = 0
  shuffle: bool = True
  export_adapter: bool = True

  def __post_init__(self):
    problems = models.network_and_length_problems(self.network,
                                                  self.task_feature_lengths)
    for name in ('train_steps', 'batch_size', 'checkpoint_period',
                 'log_period'):
      if int(getattr(self, name)) < 1:
        problems.append(f'{name} must be >= 1, got {getattr(self, name)}')
    factor = self.loss_normalizing_factor
    if not (factor is None or factor in _NAMED_LOSS_FACTORS or (
        isinstance(factor, (int, float)) and not isinstance(factor, bool) and
        factor > 0)):
      # Checked here: the loss would reject it only inside the first step.
      problems.append(
          f'LOSS_NORMALIZING_FACTOR must be None, a positive number or one '
          f'of {list(_NAMED_LOSS_FACTORS)}, got {factor!r}')
    if problems:
      raise ValueError('Invalid training configuration: ' +
                       '; '.join(problems) + '.')


# -------------------------------------------------------------------- data


def make_dataset(cfg: TrainConfig, batch_per_host: int):
  """Batched, repeated, host-sharded encoder-decoder training data (a
  `tf.data.Dataset`)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from mov_jax import tasks  # pylint: disable=g-import-not-at-top
  tasks.get_mixture_or_task(cfg.mixture_or_task_name)  # clear error if absent
  ds = seqio.get_dataset(
      cfg.mixture_or_task_name, dict(cfg.task_feature_lengths),
      dataset_split='train', shuffle=cfg.shuffle, num_epochs=None,
      seed=cfg.seed, use_cached=cfg.use_cached_tasks,
      shard_info=seqio.ShardInfo(jax.process_index(), jax.process_count()),
      feature_converter=seqio.EncDecFeatureConverter(pack=cfg.packing))
  return ds.batch(batch_per_host, drop_remainder=True).prefetch(2)


def _next_batch(iterator, restored_from: Optional[str] = None
                ) -> Dict[str, np.ndarray]:
  """The next host batch. `restored_from`: the checkpoint step directory the
  iterator was just restored from (the first read shows whether the saved
  position fits this pipeline; older checkpoints do not record its
  settings)."""
  if restored_from is None:
    return {k: np.asarray(v) for k, v in next(iterator).items()}
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    return _next_batch(iterator)
  except tf.errors.OpError as e:
    raise ts.pipeline_mismatch_error(
        os.path.join(restored_from, 'dataset'), e) from e


# ------------------------------------------------------------------- model


_NETWORK_INPUTS = ('encoder_input_tokens', 'decoder_input_tokens',
                   'decoder_target_tokens', 'encoder_segment_ids',
                   'decoder_segment_ids', 'encoder_positions',
                   'decoder_positions')


def network_inputs(batch) -> Dict[str, Any]:
  return {k: batch[k] for k in _NETWORK_INPUTS if k in batch}


def _site_of(path: str) -> str:
  """'decoder/layers_3/self_attention/key_adapter/router/entropy' ->
  'decoder/self_attention/key'."""
  parts = [p for p in path.split('/') if not re.fullmatch(r'layers_\d+', p)]
  parts = [p[:-len('_adapter')] if p.endswith('_adapter') else p
           for p in parts]
  return '/'.join(parts[:-2])  # drop 'router' and the statistic name


def router_statistics(intermediates) -> Dict[str, jax.Array]:
  """Mean routing entropy and expert usage per site, averaged over layers."""
  flat = traverse_util.flatten_dict(intermediates, sep='/')
  grouped: Dict[str, list] = {}
  for path, values in flat.items():
    stat = path.rsplit('/', 1)[-1]
    if stat not in ('entropy', 'expert_probability'):
      continue
    for value in values:  # sow keeps a tuple per call
      grouped.setdefault(f'router/{stat}/{_site_of(path)}', []).append(value)
  return {k: jnp.mean(jnp.stack(v), axis=0) for k, v in grouped.items()}


def logs_metrics(cfg: TrainConfig, done):
  """Whether the training loop logs the metrics of the step after which
  `done` steps are done: every `log_period` steps, the first and the last.
  A Python int gives a bool; a traced step count a traced one."""
  return ((done % cfg.log_period == 0) | (done == 1) |
          (done == cfg.train_steps))


def make_train_step(cfg: TrainConfig, tx: optax.GradientTransformation,
                    schedule: optax.Schedule,
                    mesh: Optional[jax.sharding.Mesh] = None):
  """The training step `(state, batch) -> (state, metrics)`, to be
  partitioned over `mesh` (None: one device).

  On one CPU device the metrics' router statistics (`router/...`) are
  computed only on steps whose metrics get logged (`logs_metrics`) and are
  zeros on the others: there they cost a few percent of a small model's
  step. Elsewhere they are computed on every step. On accelerators they are
  cheap next to the step, while a conditional per router may not be
  (XLA:GPU can wait on the host for each conditional's predicate). On
  several devices each router's conditional would hold the all-reduce of
  its statistics' batch sums, and XLA:CPU does not order a conditional's
  collectives with the step's others: one device waiting in a router's
  all-reduce while the other waits in the loss's, their intra-op threads
  all taken, never return (seen in CI, a 2x1 mesh on 2 cores)."""
  network = cfg.network
  switch_statistics = (jax.default_backend() == 'cpu' and
                       (mesh is None or mesh.size == 1))

  def train_step(state: ts.TrainState, batch) -> Tuple[ts.TrainState, dict]:
    rng = jax.random.fold_in(state.rng, state.step)

    def loss_fn(trainable):
      params = optim.merge_params(trainable, state.frozen)
      variables = {'params': params}
      if switch_statistics:
        variables[routing.STATISTICS_SWITCH] = routing.statistics_switch(
            params, logs_metrics(cfg, state.step + 1))
      logits, sown = network.apply(
          variables, **network_inputs(batch), enable_dropout=True,
          rngs={'dropout': rng}, mutable=['aux_loss', 'intermediates'])
      loss, metrics = models.normalized_loss(
          logits, batch, cfg.loss_normalizing_factor, cfg.z_loss)
      aux = routing.total_aux_loss(sown.get('aux_loss', {}))
      metrics['router_aux_loss'] = aux
      metrics.update(router_statistics(sown.get('intermediates', {})))
      return loss + aux, metrics

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics['learning_rate'] = schedule(state.step)
    metrics['grad_norm'] = optax.tree.norm(grads)
    new_state = state.replace(step=state.step + 1, trainable=trainable,
                              opt_state=opt_state)
    return new_state, metrics

  return train_step


# ------------------------------------------------------- initial parameters


def _flat(tree) -> Dict[str, Any]:
  return traverse_util.flatten_dict(dict(tree), sep='/')


def load_base_params(path: str, config: network_lib.T5Config):
  """Base parameters from our, T5X or Hugging Face checkpoints (by layout)."""
  from mov_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.load_any(path, config)


def _check_fits(model: Dict[str, Any], incoming: Dict[str, Any], source: str,
                expect_all_base: bool) -> None:
  """Raises unless the flat `incoming` parameters fit the flat `model`'s
  (arrays or shapes): no unknown paths, the same shapes, and with
  `expect_all_base` every non-adapter parameter."""
  unexpected = sorted(set(incoming) - set(model))
  mismatched = [f'{k}: checkpoint {tuple(np.shape(v))}, model '
                f'{tuple(model[k].shape)}' for k, v in incoming.items()
                if k in model and tuple(np.shape(v)) != tuple(model[k].shape)]
  missing = []
  if expect_all_base:
    missing = sorted(k for k in model if k not in incoming and
                     '_adapter/' not in k)
  if unexpected or mismatched or missing:
    differing = unexpected + missing + [m.split(':')[0] for m in mismatched]
    if all('_adapter/' in k for k in differing):
      # The base fits: the adapters come from another method or setting.
      hint = ('Only adapter parameters differ: the checkpoint was most '
              'likely trained with another method gin file (gin/methods/) '
              'or other adapter settings (NUM_EXPERTS, LORA_RANK, ...), or '
              'on another model (gin/models/). Use the gin files and '
              'settings it was trained with.')
    else:
      hint = ('Use the model gin file the checkpoint was trained with '
              '(gin/models/).')
    raise ValueError(
        f'Checkpoint {source} does not fit the configured model.\n  '
        f'shape mismatches: {mismatched[:10]}\n  missing: {missing[:10]}\n  '
        f'unexpected: {unexpected[:10]}\n{hint}')


def overlay_params(params, loaded, source: str, expect_all_base: bool = True):
  """Replaces leaves of `params` by those of `loaded` (same paths/shapes).

  Parameters absent from `loaded` keep their values (e.g. adapters); with
  `expect_all_base`, every non-adapter parameter must be present.
  """
  flat, incoming = _flat(params), _flat(loaded)
  _check_fits(flat, incoming, source, expect_all_base)
  for k, v in incoming.items():
    flat[k] = jax.device_put(np.asarray(v, np.float32), flat[k].sharding)
  return traverse_util.unflatten_dict(flat, sep='/')


def init_params(init_fn: Callable[[jax.Array], Any], rng: jax.Array,
                shardings, base=None, source: str = ''):
  """Step-0 parameters in their `shardings`: `init_fn(rng)`, or, given a
  `base` checkpoint's parameters (read from `source`), those for every
  base weight and `init_fn`'s only for the rest (the adapters).

  With a base, the jitted initialiser returns only the rest, so XLA drops
  the base weights' random initialisers: a base model is never initialised
  at random only to be overwritten (for T5 v1.1 small, 25 s of compiling
  less; for XXL, 11B parameters less to compute and hold next to the
  checkpoint's). The rest's values are those a full `init_fn` gives.
  """
  if base is None:
    return jax.jit(init_fn, out_shardings=shardings)(rng)
  model = _flat(jax.eval_shape(init_fn, rng))
  incoming = _flat(base)
  _check_fits(model, incoming, source, expect_all_base=True)
  flat_shardings = _flat(shardings)
  rest = [k for k in model if k not in incoming]

  def init_rest(r):
    flat = _flat(init_fn(r))
    return {k: flat[k] for k in rest}

  params = jax.jit(init_rest, out_shardings={
      k: flat_shardings[k] for k in rest})(rng)
  for k, v in incoming.items():
    params[k] = jax.device_put(np.asarray(v, np.float32), flat_shardings[k])
  return traverse_util.unflatten_dict(params, sep='/')


# -------------------------------------------------------------- the trainer


class MetricsLog:
  """JSONL (`train_metrics.jsonl`) and TensorBoard (`train/`) metrics."""

  def __init__(self, model_dir: str, resume_step: int):
    self.path = os.path.join(model_dir, 'train_metrics.jsonl')
    self._primary = jax.process_index() == 0
    if self._primary and ts.gfile().exists(self.path):
      # Drop lines of steps that the resumed run will redo.
      with ts.gfile().GFile(self.path) as f:
        kept = [l for l in f.read().splitlines()
                if l and json.loads(l)['step'] <= resume_step]
      with ts.gfile().GFile(self.path, 'w') as f:
        f.write(''.join(l + '\n' for l in kept))
    self._tensorboard_dir = os.path.join(model_dir, 'train')
    self._writer = None  # opened at the first write: a run with nothing to
    # train leaves no empty events file behind.

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self._primary:
      return
    with ts.gfile().GFile(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **scalars}, sort_keys=True) + '\n')
    if self._writer is None:
      from clu import metric_writers  # pylint: disable=g-import-not-at-top
      self._writer = metric_writers.create_default_writer(
          self._tensorboard_dir, asynchronous=False)
    self._writer.write_scalars(step, scalars)

  def close(self):
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def _scalars(metrics) -> Dict[str, float]:
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.ndim == 0:
      out[k] = float(v)
    else:  # expert usage vectors: one scalar per expert
      for i, x in enumerate(v.reshape(-1)):
        out[f'{k}/expert_{i}'] = float(x)
  return out


def train(cfg: TrainConfig, stop_after: Optional[int] = None) -> Dict[str, Any]:
  """Runs (or resumes) training; returns a summary dict.

  `stop_after` ends this invocation after that many steps (checkpointing
  the last one), as if the job were killed there: used to test resumption.
  """
  primary = jax.process_index() == 0
  mesh = cfg.mesh.make_mesh()
  rules = cfg.mesh.rules
  partitioning.check_batch_size(cfg.batch_size, mesh)
  from mov_jax import tasks  # pylint: disable=g-import-not-at-top
  tasks.get_mixture_or_task(cfg.mixture_or_task_name)  # before any writing
  ts.make_writable_dir(cfg.model_dir, 'MODEL_DIR')
  network = cfg.network
  tx = cfg.optimizer.make()

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Abstract shapes, logical axes and shardings first: nothing is
    # allocated. Identical for a fresh and a resumed run (so both compile
    # the same step).
    layout = state_layout(cfg, tx, mesh)
    abstract_state, state_shardings = layout.abstract, layout.shardings

    manager = ts.checkpoint_manager(cfg.model_dir, cfg.checkpoint_period,
                                    cfg.keep_checkpoints)
    latest = manager.latest_step()

    def fresh_state():
      base = None
      if cfg.initial_checkpoint_path:
        base = load_base_params(cfg.initial_checkpoint_path, network.config)
      params = layout.initial_params(base, cfg.initial_checkpoint_path)
      if cfg.adapter_checkpoint_path:
        from mov_jax import checkpoints  # pylint: disable=g-import-not-at-top
        params = overlay_params(
            params, checkpoints.load_params(cfg.adapter_checkpoint_path)[0],
            cfg.adapter_checkpoint_path, expect_all_base=False)
      return layout.fresh_state(params)

    if latest is None:
      state = fresh_state()
    else:
      # Check the saved checkpoint first, so that a MODEL_DIR written with
      # another configuration fails before anything runs or is written.
      _check_resumable(cfg, manager, latest, abstract_state)
      abstract_state = jax.tree_util.tree_map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_state, state_shardings)
    batch_per_host = cfg.batch_size // jax.process_count()
    dataset = make_dataset(cfg, batch_per_host)
    iterator = iter(dataset)
    start_step = 0
    if latest is not None:
      try:
        state, meta = ts.restore(manager, latest, abstract_state, iterator)
      except Exception as e:  # pylint: disable=broad-except
        why = ts.unreadable_arrays(e)
        if why is None:
          raise
        raise _damaged_checkpoint_error(cfg, manager, latest, why) from e
      start_step = int(state.step)
      if primary:
        print(f'Resumed from {cfg.model_dir}/checkpoints/{latest} '
              f'(step {start_step}, {meta.get("batches_consumed")} batches '
              'consumed).', flush=True)
    end_step = cfg.train_steps
    if stop_after is not None:
      end_step = min(end_step, start_step + stop_after)
    if primary and start_step >= cfg.train_steps:
      print(f'{cfg.model_dir} is already at step {start_step} >= TRAIN_STEPS='
            f'{cfg.train_steps}: nothing was trained (an existing adapter '
            'export is kept). Raise TRAIN_STEPS to train further.', flush=True)
    elif primary and latest is None:
      _print_parameter_count(cfg, state)

    step_fn = jit_train_step(cfg, tx, layout)
    log = MetricsLog(cfg.model_dir, start_step)
    tokens_per_step = cfg.batch_size * sum(cfg.task_feature_lengths.values())
    losses = []
    t_start = time.perf_counter()
    t_window, window_steps = t_start, 0
    step = start_step
    for step in range(start_step, end_step):
      restored_from = None
      if step == start_step and latest is not None:
        restored_from = os.path.join(cfg.model_dir, 'checkpoints', str(latest))
      batch = partitioning.host_local_to_global(
          _next_batch(iterator, restored_from), mesh)
      if step == start_step:
        if primary:  # the data fit: this run trains with these settings
          _write_config(cfg, start_step)
        # Compiled ahead of the first step, to fail before it runs when
        # the step cannot fit in a device's memory.
        step_fn = step_fn.lower(state, batch).compile()
        partitioning.check_fits_in_memory(
            step_fn, 'The training step',
            'Use a smaller BATCH_SIZE or TASK_FEATURE_LENGTHS, or more '
            'devices (a larger mesh shards the batch and the model).')
      state, metrics = step_fn(state, batch)
      window_steps += 1
      done = step + 1
      if logs_metrics(cfg, done) or done == end_step:
        scalars = _scalars(jax.device_get(metrics))
        if not logs_metrics(cfg, done):
          # Stopped early (`stop_after`) on a step that may not have
          # computed the router statistics: log the rest.
          scalars = {k: v for k, v in scalars.items()
                     if not k.startswith('router/')}
        now = time.perf_counter()
        scalars['tokens_per_s'] = tokens_per_step * window_steps / max(
            now - t_window, 1e-9)
        t_window, window_steps = now, 0
        losses.append((done, scalars['loss']))
        log.write(done, scalars)
        if primary:
          eta = (now - t_start) / (done - start_step) * (cfg.train_steps - done)
          print(f'step {done:6d}/{cfg.train_steps}  loss {scalars["loss"]:.4f}'
                f'  lr {scalars["learning_rate"]:.2e}  '
                f'{scalars["tokens_per_s"]:8.0f} tokens/s  ETA '
                f'{_duration(eta)}', flush=True)
      if done % cfg.checkpoint_period == 0 or done == end_step:
        ts.save(manager, done, state, iterator,
                {'batches_consumed': done, 'step': done,
                 **_pipeline_settings(cfg)}, force=True)
    manager.wait_until_finished()
    manager.close()
    log.close()
    final_step = int(jax.device_get(state.step))
    summary = {'model_dir': cfg.model_dir, 'step': final_step,
               'losses': losses,
               'checkpoint': os.path.join(cfg.model_dir, 'checkpoints',
                                          str(final_step)),
               'metrics': os.path.join(cfg.model_dir, 'train_metrics.jsonl'),
               'tensorboard': os.path.join(cfg.model_dir, 'train')}
    exported = ts.gfile().exists(os.path.join(cfg.model_dir, 'adapter'))
    if cfg.export_adapter and final_step >= cfg.train_steps and (
        final_step > start_step or not exported):
      summary['adapter_export'] = export_trainable(cfg, state)
    return summary


@dataclasses.dataclass
class StateLayout:
  """A fresh run's TrainState before anything is allocated.

  `abstract` (shapes) and `shardings` (parameters by their logical axes,
  optimizer state like its parameter, or replicated when factored) are the
  same for a resumed run. Build it with `state_layout`, under the mesh and
  its logical axis rules.
  """
  init_variables: Callable[[jax.Array], Any]
  init_rng: jax.Array
  dropout_rng: jax.Array
  tx: optax.GradientTransformation
  trainable_regex: Sequence[str]
  mesh: jax.sharding.Mesh
  param_shardings: Any
  abstract: ts.TrainState
  shardings: ts.TrainState

  def initial_params(self, base=None, source: str = ''):
    """Freshly initialised parameters, created in their shardings; given a
    `base` checkpoint's parameters, those and fresh adapters
    (`init_params`)."""
    return init_params(lambda r: self.init_variables(r)['params'],
                       self.init_rng, self.param_shardings, base, source)

  def fresh_state(self, params) -> ts.TrainState:
    """Step 0 of a run from `params` (laid out as `initial_params`)."""
    trainable, frozen = optim.split_trainable(params, self.trainable_regex)
    opt_state = jax.jit(self.tx.init,
                        out_shardings=self.shardings.opt_state)(trainable)
    replicated = partitioning.replicated(self.mesh)
    return ts.TrainState(
        step=jax.device_put(jnp.asarray(0, jnp.int32), replicated),
        trainable=trainable, frozen=frozen, opt_state=opt_state,
        rng=jax.device_put(self.dropout_rng, replicated))


def variables_initializer(cfg: TrainConfig) -> Callable[[jax.Array], Any]:
  """rng -> the network's variables (`params`, `params_axes`) for `cfg`'s
  feature lengths; `jax.eval_shape` of it gives the shapes and axes alone."""
  lengths = cfg.task_feature_lengths
  enc = jnp.zeros((1, lengths['inputs']), jnp.int32)
  dec = jnp.zeros((1, lengths['targets']), jnp.int32)

  def init_variables(rng):
    return cfg.network.init(rng, encoder_input_tokens=enc,
                            decoder_input_tokens=dec,
                            decoder_target_tokens=dec, enable_dropout=False)

  return init_variables


def state_layout(cfg: TrainConfig, tx: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh) -> StateLayout:
  """The `StateLayout` of `cfg` (seed, network, TRAINABLE_REGEX) on `mesh`."""
  init_variables = variables_initializer(cfg)
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
  abstract_vars = jax.eval_shape(init_variables, init_rng)
  param_shardings = partitioning.param_shardings(abstract_vars, mesh,
                                                 cfg.mesh.rules)
  trainable_shard, frozen_shard = optim.split_trainable(
      param_shardings, cfg.trainable_regex)

  def fresh_abstract():
    trainable, frozen = optim.split_trainable(
        init_variables(init_rng)['params'], cfg.trainable_regex)
    return ts.TrainState(step=jnp.asarray(0, jnp.int32), trainable=trainable,
                         frozen=frozen, opt_state=tx.init(trainable),
                         rng=dropout_rng)

  abstract = jax.eval_shape(fresh_abstract)
  replicated = partitioning.replicated(mesh)
  flat_trainable_shard = _flat(trainable_shard)
  by_shape = {}
  for k, v in _flat(abstract.trainable).items():
    by_shape.setdefault(tuple(v.shape), flat_trainable_shard[k])

  def opt_sharding(x):
    return by_shape.get(tuple(x.shape), replicated) if x.ndim else replicated

  shardings = ts.TrainState(
      step=replicated, trainable=trainable_shard, frozen=frozen_shard,
      opt_state=jax.tree_util.tree_map(opt_sharding, abstract.opt_state),
      rng=replicated)
  return StateLayout(init_variables, init_rng, dropout_rng, tx,
                     cfg.trainable_regex, mesh, param_shardings, abstract,
                     shardings)


def jit_train_step(cfg: TrainConfig, tx: optax.GradientTransformation,
                   layout: StateLayout):
  """`make_train_step` jitted with the state's and the batch's shardings,
  the state donated."""
  return jax.jit(make_train_step(cfg, tx, cfg.optimizer.learning_rate_fn(),
                                 layout.mesh),
                 in_shardings=(layout.shardings,
                               partitioning.batch_sharding(layout.mesh)),
                 out_shardings=(layout.shardings,
                                partitioning.replicated(layout.mesh)),
                 donate_argnums=(0,))


_NEW_MODEL_DIR = ('or use a new MODEL_DIR (with INITIAL_CHECKPOINT_PATH or '
                  'ADAPTER_CHECKPOINT_PATH to start from its weights). '
                  'Nothing was changed.')

# Checkpoint metadata key -> the setting that sets it: what defines the input
# pipeline, whose saved state only the same pipeline can take. (SEED is not
# among them: a restored iterator takes the saved position with any seed.)
_PIPELINE_SETTINGS = {
    'mixture_or_task_name': 'MIXTURE_OR_TASK_NAME',
    'task_feature_lengths': 'TASK_FEATURE_LENGTHS',
    'batch_size': 'BATCH_SIZE',
    'packing': 'PACKING',
    'use_cached_tasks': 'USE_CACHED_TASKS',
    'shuffle': 'train.TrainConfig.shuffle',
    'process_count': 'the number of processes (hosts)',
}


def _pipeline_settings(cfg: TrainConfig) -> Dict[str, Any]:
  return {'mixture_or_task_name': cfg.mixture_or_task_name,
          'task_feature_lengths': dict(cfg.task_feature_lengths),
          'batch_size': cfg.batch_size, 'packing': cfg.packing,
          'use_cached_tasks': cfg.use_cached_tasks, 'shuffle': cfg.shuffle,
          'process_count': jax.process_count()}


def pipeline_problems(saved: Mapping[str, Any], cfg: TrainConfig) -> list:
  """The input-pipeline settings of `cfg` that differ from a checkpoint's
  metadata `saved` (keys it lacks, from older checkpoints, are not
  compared)."""
  new = json.loads(json.dumps(_pipeline_settings(cfg)))  # as saved
  return [f'{name}: saved {saved[key]!r}, now {new[key]!r}'
          for key, name in _PIPELINE_SETTINGS.items()
          if key in saved and saved[key] != new[key]]


def _damaged_checkpoint_error(cfg: TrainConfig, manager, step: int,
                              why: str) -> ValueError:
  """The latest checkpoint `step` cannot be resumed from: says `why` and how
  to go on without deleting anything."""
  step_dir = os.path.join(cfg.model_dir, 'checkpoints', str(step))
  earlier = [s for s in manager.all_steps() if s < step]
  then = (f'resume from step {max(earlier)}' if earlier else
          'start again from step 0 (no earlier checkpoint)')
  return ValueError(
      f'The latest checkpoint {step_dir} is incomplete or damaged ({why}). '
      f'Move it out of {cfg.model_dir}/checkpoints (e.g. mv {step_dir} '
      f'{cfg.model_dir}/broken_step_{step}) to {then}. Nothing was changed.')


def _check_resumable(cfg: TrainConfig, manager, step: int,
                     abstract_state: ts.TrainState) -> None:
  """Raises unless checkpoint `step` is complete and was written by this
  model, optimizer and input pipeline (read from metadata only)."""
  step_dir = os.path.join(cfg.model_dir, 'checkpoints', str(step))
  broken = ts.step_problems(step_dir)
  if broken:
    raise _damaged_checkpoint_error(cfg, manager, step, '; '.join(broken))
  saved = ts.saved_shapes(step_dir)
  expected = ts.tree_shapes(abstract_state)
  part = lambda shapes, *names: {k: v for k, v in shapes.items()
                                 if k.split('/')[0] in names}
  problems = ts.shape_problems(part(saved, 'trainable', 'frozen'),
                               part(expected, 'trainable', 'frozen'))
  if problems:
    raise ValueError(
        f'The checkpoint {step_dir} does not match the configured model '
        f'({len(problems)} problems, e.g. {problems[:5]}). MODEL_DIR was '
        f'written with another gin configuration (see {cfg.model_dir}/'
        f'config.gin): use that configuration, {_NEW_MODEL_DIR}')
  problems = ts.shape_problems(part(saved, 'opt_state'),
                               part(expected, 'opt_state'))
  if problems:
    raise ValueError(
        f'The optimizer state of the checkpoint {step_dir} was written by a '
        f'different optimizer configuration ({len(problems)} problems, e.g. '
        f'{problems[:3]}). Resume with the original OPTIMIZER and optimizer '
        f'settings (see {cfg.model_dir}/config.gin), {_NEW_MODEL_DIR}')
  problems = pipeline_problems(ts.saved_metadata(manager, step), cfg)
  if problems:
    raise ValueError(
        f'The checkpoint {step_dir} was written with another input pipeline, '
        f'whose position it holds: {"; ".join(problems)}. Resume with the '
        f'saved values, {_NEW_MODEL_DIR}')


def _write_config(cfg: TrainConfig, start_step: int) -> None:
  """Writes config.gin (the settings of the run now training), keeping a
  previous one with other settings as config.step_<start_step>.gin."""
  path = os.path.join(cfg.model_dir, 'config.gin')
  config = gin.config_str()
  if ts.gfile().exists(path):
    with ts.gfile().GFile(path) as f:
      old = f.read()
    if old != config:
      kept = _unused_path(os.path.join(cfg.model_dir,
                                       f'config.step_{start_step}.gin'))
      ts.gfile().rename(path, kept)
      lines = lambda text: [l for l in text.splitlines() if l.strip()]
      was = [l for l in lines(old) if l not in set(lines(config))]
      now = [l for l in lines(config) if l not in set(lines(old))]
      print(f'Note: the settings changed since the last run of this '
            f'MODEL_DIR (its config.gin is kept as {kept}): was {was[:10]}, '
            f'now {now[:10]}.', flush=True)
  with ts.gfile().GFile(path, 'w') as f:
    f.write(config)


def _print_parameter_count(cfg: TrainConfig, state: ts.TrainState) -> None:
  count = lambda t: int(sum(np.prod(x.shape) for x in
                            jax.tree_util.tree_leaves(t)))
  n_train, n_frozen = count(state.trainable), count(state.frozen)
  print(f'Training {n_train:,} of {n_train + n_frozen:,} parameters '
        f'({100.0 * n_train / (n_train + n_frozen):.3f}%) on '
        f'{jax.device_count()} {jax.default_backend()} device(s); '
        f'model dir {cfg.model_dir}', flush=True)


def _unused_path(path: str) -> str:
  """`path`, or `<stem>.<n><ext>` for the first n that does not exist."""
  stem, ext = os.path.splitext(path)
  n = 1
  while ts.gfile().exists(path):
    path, n = f'{stem}.{n}{ext}', n + 1
  return path


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}'


def export_trainable(cfg: TrainConfig, state: ts.TrainState) -> str:
  """Writes only the trainable parameters (the adapter) next to MODEL_DIR."""
  from mov_jax import checkpoints  # pylint: disable=g-import-not-at-top
  path = os.path.join(cfg.model_dir, 'adapter')
  checkpoints.save_params(path, jax.device_get(state.trainable),
                          cfg.network.config, overwrite=True)
  return path


# ----------------------------------------------------------------- the CLI


def config_from_gin() -> TrainConfig:
  """Builds the TrainConfig bound to the TRAINER macro, checking macros."""
  gin_utils.require_macros(REQUIRED_MACROS)
  return gin_utils.macro_value(
      'TRAINER', 'Include a run gin file such as runs/finetune.gin.')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument('--stop_after', type=int, default=None,
                      help=argparse.SUPPRESS)
  partitioning.add_distributed_flags(parser)
  args = gin_utils.parse_args(parser, argv)
  try:
    gin_utils.setup_binary(args)
    cfg = config_from_gin()
    summary = train(cfg, stop_after=args.stop_after)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(f'Done at step {summary["step"]}. Checkpoint: {summary["checkpoint"]}'
          f'\nMetrics: {summary["metrics"]} (TensorBoard: '
          f'{summary["tensorboard"]})')
    if 'adapter_export' in summary:
      print(f'Adapter (trainable parameters only): {summary["adapter_export"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
