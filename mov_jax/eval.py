"""The evaluation binary: rank classification, decoding, T0 tables, routing.

    python -m mov_jax.eval \
      --gin_file=models/t5_1_1_xl.gin --gin_file=methods/mov.gin \
      --gin_file=runs/eval.gin \
      --gin.CHECKPOINT_PATH="'/tmp/mov'" --gin.EVAL_OUTPUT_DIR="'/tmp/mov/eval'"

t5x's macro names: CHECKPOINT_PATH, EVAL_OUTPUT_DIR, MIXTURE_OR_TASK_NAME
(default 't0_eval_score_eval'), TASK_FEATURE_LENGTHS, BATCH_SIZE, plus
LENGTH_NORMALIZE, EVAL_SPLIT, MAX_EXAMPLES_PER_TASK, ADAPTER_CHECKPOINT_PATH
and ROUTING_ANALYSIS (all settings live in `eval.EvalConfig`, bound by
gin/runs/eval.gin). CHECKPOINT_PATH is one of:
  * a training step directory `<MODEL_DIR>/checkpoints/<step>`;
  * a MODEL_DIR: every finished checkpoint under it, except steps whose
    results already exist in EVAL_OUTPUT_DIR (so rerunning it while
    training goes on evaluates only the new steps; results.json records the
    resolved checkpoint path and the network, and results of another
    checkpoint, model or settings under the same name are an error, never
    skipped or overwritten);
  * a base checkpoint (ours, T5X or Hugging Face; `checkpoints.load_any`),
    whose adapters, if it has none, start as at initialisation (so the
    adapted network is the base model).
Checkpoints are only read.

Tasks with score-eval rows (`idx = [example, choice]`, `is_correct`) are
rank-classified: each example's input is encoded once and every choice is
scored by its summed target log-likelihood (t5x `score_batch`;
LENGTH_NORMALIZE divides by the number of target tokens); the best choice is
the prediction. Other tasks are decoded (greedy unless gin says otherwise)
and scored by the task's own postprocessor and metrics. Results go to
`<EVAL_OUTPUT_DIR>/<step_N or checkpoint name>/`: results.json, results.csv,
results.md, scores.jsonl (every choice's score, from which every table entry
can be recomputed), predictions.jsonl, and TensorBoard summaries in
`<EVAL_OUTPUT_DIR>/tensorboard/`.
"""

import argparse
import csv
import dataclasses
import datetime
import functools
import io
import json
import os
import sys
from typing import (Any, Dict, Iterator, List, Mapping, Optional, Sequence,
                    Tuple, Union)

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from flax import linen as nn
from flax import traverse_util

from mov_jax import analysis
from mov_jax import decoding
from mov_jax import gin_utils
from mov_jax import models
from mov_jax import network as network_lib
from mov_jax import partitioning
from mov_jax import scoring
from mov_jax import train
from mov_jax import train_state as ts

# Macro -> how to provide it.
REQUIRED_MACROS = {
    'CHECKPOINT_PATH': '--gin.CHECKPOINT_PATH="\'/path/to/MODEL_DIR\'" (or a '
                       'step directory <MODEL_DIR>/checkpoints/<step>, or a '
                       'base checkpoint)',
    'EVAL_OUTPUT_DIR': '--gin.EVAL_OUTPUT_DIR="\'/path/to/eval_output\'"',
    'NETWORK': 'the model and method gin files the checkpoint was trained '
               'with (models/t5_1_1_small.gin, methods/mov.gin, ...)',
}
RESULTS_FILE = 'results.json'
SCORES_FILE = 'scores.jsonl'
PREDICTIONS_FILE = 'predictions.jsonl'
DECODE_METHODS = ('greedy', 'sample', 'beam')
# What `scores.jsonl` holds, written into results.json next to the numbers.
SCORE_DEFINITION = ('sum over target tokens of log p(token | input, previous '
                    'tokens) (t5x score_batch)')


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """One evaluation run (gin: `eval.EvalConfig`, see gin/runs/eval.gin).

  Attributes:
    checkpoint_path: a step dir, a MODEL_DIR or a base checkpoint
      (CHECKPOINT_PATH; see the module docstring).
    output_dir: where results go (EVAL_OUTPUT_DIR).
    network: the (adapted) network (NETWORK, from the model + method gins).
    mixture_or_task_name: seqio mixture or task (MIXTURE_OR_TASK_NAME).
    task_feature_lengths: maximum {'inputs': L, 'targets': L}; longer
      sequences are truncated (EOS kept), shorter batches are padded only to
      the task's longest sequence rounded up to a power of two.
    batch_size: examples per batch (a rank-classification example brings all
      its choices); a multiple of the mesh's data-parallel size.
    length_normalize: divide each choice's score by its target length.
    split: the dataset split (T0: 'validation').
    adapter_checkpoint_path: an adapter export (training's `adapter/`) to put
      onto the checkpoint's parameters.
    max_examples_per_task: evaluate only the first N examples of each task.
    decode_method: 'greedy', 'sample' or 'beam' (generation tasks).
    temperature, top_k: sampling settings.
    beam_size, alpha: beam search settings (alpha: length penalty).
    seed: seeds sampling and the initial adapters of a base checkpoint
      (as training's SEED, so a base evaluates as training started).
    mesh: device mesh and logical axis rules (as training).
    routing_analysis: also write router statistics and heatmaps.
    routing_tasks: tasks of the routing analysis (None: the evaluated ones).
    routing_sites: router sites drawn as heatmaps, e.g.
      'encoder/layers_0/attention/key' (None: encoder layer 0's key and the
      last decoder layer's mlp_hidden, or their nearest equivalents).
    routing_max_examples: examples per task in the routing analysis.
  """
  checkpoint_path: str
  output_dir: str
  network: network_lib.Transformer
  mixture_or_task_name: str = 't0_eval_score_eval'
  task_feature_lengths: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {'inputs': 1024, 'targets': 256})
  batch_size: int = 32
  length_normalize: bool = False
  split: str = 'validation'
  adapter_checkpoint_path: Optional[str] = None
  max_examples_per_task: Optional[int] = None
  decode_method: str = 'greedy'
  temperature: float = 1.0
  top_k: Optional[int] = None
  beam_size: int = 4
  alpha: float = 0.6
  seed: int = 0
  mesh: partitioning.MeshConfig = partitioning.MeshConfig()
  routing_analysis: bool = False
  routing_tasks: Optional[Sequence[str]] = None
  routing_sites: Optional[Sequence[str]] = None
  routing_max_examples: int = 256

  def __post_init__(self):
    problems = models.network_and_length_problems(self.network,
                                           self.task_feature_lengths)
    if self.decode_method not in DECODE_METHODS:
      problems.append(f'decode_method must be one of {DECODE_METHODS}, got '
                      f'{self.decode_method!r}')
    for name in ('batch_size', 'max_examples_per_task', 'routing_max_examples',
                 'beam_size'):
      value = getattr(self, name)
      if value is not None and int(value) < 1:
        problems.append(f'{name} must be >= 1, got {value}')
    if problems:
      raise ValueError('Invalid evaluation configuration: ' +
                       '; '.join(problems) + '.')

  def settings(self) -> Dict[str, Any]:
    """What makes two evaluations of one checkpoint comparable (JSON)."""
    return json.loads(json.dumps({
        'mixture_or_task_name': self.mixture_or_task_name,
        'split': self.split,
        'task_feature_lengths': dict(self.task_feature_lengths),
        'length_normalize': self.length_normalize,
        'max_examples_per_task': self.max_examples_per_task,
        'adapter_checkpoint_path': self.adapter_checkpoint_path,
        'decoding': {'method': self.decode_method,
                     'temperature': self.temperature, 'top_k': self.top_k,
                     'beam_size': self.beam_size, 'alpha': self.alpha,
                     'seed': self.seed},
    }))


# ------------------------------------------------------------- checkpoints


@dataclasses.dataclass(frozen=True)
class Checkpoint:
  """One set of parameters to evaluate.

  Attributes:
    path: the step directory or base checkpoint.
    name: its output subdirectory of EVAL_OUTPUT_DIR ('step_<N>' or the
      base checkpoint's directory name).
    step: the training step (None for a base checkpoint).
    is_train: a training checkpoint (else a base checkpoint for load_any).
  """
  path: str
  name: str
  step: Optional[int]
  is_train: bool


_CHECKPOINT_KINDS = (
    'Set CHECKPOINT_PATH to a training step directory '
    '(<MODEL_DIR>/checkpoints/<step>), a MODEL_DIR, or a base checkpoint '
    '(ours, T5X or Hugging Face).')


def _train_checkpoint(path: str, suffix: str) -> Checkpoint:
  name = os.path.basename(path.rstrip('/'))
  step = int(name) if name.isdigit() else None
  label = f'step_{step}' if step is not None else name
  return Checkpoint(path, label + suffix, step, True)


def find_checkpoints(path: str,
                     adapter_path: Optional[str] = None) -> List[Checkpoint]:
  """The checkpoints CHECKPOINT_PATH names (see the module docstring)."""
  if not path or not tf.io.gfile.exists(path):
    raise FileNotFoundError(
        f'CHECKPOINT_PATH {path!r} does not exist. {_CHECKPOINT_KINDS}')
  if adapter_path and not tf.io.gfile.exists(adapter_path):
    raise FileNotFoundError(
        f'ADAPTER_CHECKPOINT_PATH {adapter_path!r} does not exist: set it to '
        "an adapter export (<MODEL_DIR>/adapter) or to None.")
  suffix = ('+' + os.path.basename(adapter_path.rstrip('/'))
            if adapter_path else '')
  path = path.rstrip('/')
  if ts.is_train_checkpoint(path):
    return [_train_checkpoint(path, suffix)]
  found = ts.list_train_checkpoints(path)
  if found:
    return [_train_checkpoint(p, suffix) for p in found.values()]
  if tf.io.gfile.isdir(os.path.join(path, 'checkpoints')):
    raise FileNotFoundError(
        f'CHECKPOINT_PATH {path} is a MODEL_DIR without a finished checkpoint '
        f'under {path}/checkpoints yet. Wait for training to save one, or '
        'point CHECKPOINT_PATH at another checkpoint.')
  return [Checkpoint(path, os.path.basename(path) + suffix, None, False)]


def _init_variables(network, rng):
  tokens = jnp.ones((1, 8), jnp.int32)
  return network.init(rng, tokens, tokens, tokens, enable_dropout=False)


@functools.lru_cache(maxsize=8)
def _param_layout(network, mesh, rules) -> Tuple[Any, Any]:
  """(abstract params, their NamedShardings by logical axes), as training."""
  abstract = jax.eval_shape(functools.partial(_init_variables, network),
                            jax.random.PRNGKey(0))
  return abstract['params'], partitioning.param_shardings(abstract, mesh,
                                                          rules)


def _check_train_shapes(path: str, abstract_params) -> None:
  """Fails before reading any array when the checkpoint does not fit."""
  saved = ts.saved_shapes(path)
  found = {k.split('/', 1)[1]: v for k, v in saved.items()
           if k.split('/', 1)[0] in ('trainable', 'frozen')}
  expected = {k: tuple(v.shape) for k, v in
              traverse_util.flatten_dict(abstract_params, sep='/').items()}
  problems = ts.shape_problems(found, expected)
  if problems:
    raise ValueError(
        f'The checkpoint {path} does not match the configured model '
        f'({len(problems)} problems, e.g. {problems[:5]}). Use the model and '
        'method gin files it was trained with (see <MODEL_DIR>/config.gin). '
        'Nothing was changed.')


def _load_base(path: str, config):
  """`load_any`, with what else CHECKPOINT_PATH could have meant."""
  try:
    return train.load_base_params(path, config)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(
        f'{e}\nCHECKPOINT_PATH {path} is neither a training step directory '
        f'nor a MODEL_DIR, so it was read as a base checkpoint. '
        f'{_CHECKPOINT_KINDS} An adapter export goes into '
        'ADAPTER_CHECKPOINT_PATH, with its base model as CHECKPOINT_PATH.'
    ) from e


def restore_params(cfg: EvalConfig, checkpoint, mesh=None):
  """Full parameters of `checkpoint` (a `Checkpoint` or a path; a MODEL_DIR
  gives its latest step), sharded by logical axes on `mesh`."""
  if not isinstance(checkpoint, Checkpoint):
    checkpoint = find_checkpoints(checkpoint)[-1]
  mesh = mesh or cfg.mesh.make_mesh()
  network = cfg.network
  abstract, shardings = _param_layout(network, mesh, cfg.mesh.rules)
  with jax.set_mesh(mesh):
    if checkpoint.is_train:
      _check_train_shapes(checkpoint.path, abstract)
      params = ts.restore_train_params(checkpoint.path, shardings)
    else:
      # As a fresh training run: the base's weights, fresh adapters.
      init_rng = jax.random.split(jax.random.PRNGKey(cfg.seed))[0]
      params = train.init_params(
          lambda r: _init_variables(network, r)['params'], init_rng,
          shardings, _load_base(checkpoint.path, network.config),
          checkpoint.path)
    if cfg.adapter_checkpoint_path:
      from mov_jax import checkpoints  # pylint: disable=g-import-not-at-top
      params = train.overlay_params(
          params, checkpoints.load_params(cfg.adapter_checkpoint_path)[0],
          cfg.adapter_checkpoint_path, expect_all_base=False)
  return params


# -------------------------------------------------------------------- data


@dataclasses.dataclass
class TaskData:
  """One task's evaluation examples, read once for every checkpoint.

  Attributes:
    name: the seqio task (one P3 template).
    dataset: the dataset it belongs to, for per-dataset aggregation.
    task: the seqio task (postprocessor, metrics, vocabulary).
    rows: the examples as read (numpy); score-eval tasks: one per choice.
    choices: `scoring.choices_from_rows` layout of score-eval rows (None for
      tasks to decode).
  """
  name: str
  dataset: str
  task: seqio.Task
  rows: List[Dict[str, Any]]
  choices: Optional[Dict[str, np.ndarray]] = None


def template_datasets() -> Dict[str, str]:
  """Task name -> dataset, from the T0 and mini-P3 task tables."""
  from mov_jax.tasks import mini_p3  # pylint: disable=g-import-not-at-top
  from mov_jax.tasks import t0  # pylint: disable=g-import-not-at-top
  mapping = t0.template_to_dataset(t0.read_table(t0.TABLE_PATH))
  mapping.update(t0.template_to_dataset(t0.read_table(mini_p3.TABLE_PATH)))
  return mapping


def padded_length(longest: int, limit: int) -> int:
  """The longest sequence rounded up to a power of two (>= 8), at most
  `limit`: few distinct shapes to compile, little padding to compute."""
  return min(max(8, 1 << max(int(longest) - 1, 0).bit_length()), int(limit))


def _pad(sequences: Sequence[np.ndarray], limit: int) -> np.ndarray:
  length = padded_length(max(len(s) for s in sequences), limit)
  out = np.zeros((len(sequences), length), np.int32)
  for i, s in enumerate(sequences):
    out[i, :len(s)] = s
  return out


def _first_examples(rows: List[Dict[str, Any]],
                    limit: Optional[int]) -> List[Dict[str, Any]]:
  """Rows of the first `limit` examples (score-eval rows: by `idx[0]`)."""
  if limit is None:
    return rows
  if 'idx' not in rows[0]:
    return rows[:limit]
  order = dict.fromkeys(int(r['idx'][0]) for r in rows)  # first appearance
  kept = set(list(order)[:limit])
  return [r for r in rows if int(r['idx'][0]) in kept]


def read_task(cfg: EvalConfig, name: str, dataset: str,
              max_examples: Optional[int] = None) -> TaskData:
  """Reads one task's `cfg.split` (truncated to the feature lengths)."""
  task = seqio.get_mixture_or_task(name)
  if cfg.split not in task.splits:
    raise ValueError(f'Task {name} has no split {cfg.split!r} (it has '
                     f'{list(task.splits)}); set EVAL_SPLIT.')
  ds = task.get_dataset(dict(cfg.task_feature_lengths), split=cfg.split,
                        shuffle=False, num_epochs=1, use_cached=False)
  rows = _first_examples(list(ds.as_numpy_iterator()), max_examples)
  if not rows:
    raise ValueError(f'Task {name} has no examples in split {cfg.split!r}.')
  data = TaskData(name, dataset, task, rows)
  if 'idx' in rows[0] and 'is_correct' in rows[0]:
    lengths = cfg.task_feature_lengths
    data.choices = scoring.choices_from_rows(
        [int(r['idx'][0]) for r in rows], [int(r['idx'][1]) for r in rows],
        _pad([r['inputs'] for r in rows], lengths['inputs']),
        _pad([r['targets'] for r in rows], lengths['targets']))
  return data


def load_tasks(cfg: EvalConfig, names: Optional[Sequence[str]] = None,
               max_examples: Optional[int] = None) -> List[TaskData]:
  """The tasks of `names` (default: the mixture or task of the config)."""
  from mov_jax import tasks  # pylint: disable=g-import-not-at-top
  if names is None:
    provider = tasks.get_mixture_or_task(cfg.mixture_or_task_name)
    names = [t.name for t in getattr(provider, 'tasks', [provider])]
  else:
    for name in names:
      tasks.get_mixture_or_task(name)  # a clear error if absent
  mapping = template_datasets()
  limit = max_examples or cfg.max_examples_per_task
  return [read_task(cfg, name, mapping.get(name, _template(name)), limit)
          for name in names]


def _template(task_name: str) -> str:
  """'x_score_eval' -> 'x': the template a score-eval task ranks."""
  return task_name.removesuffix('_score_eval')


def _batches(arrays: Mapping[str, np.ndarray], batch_size: int
             ) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
  """Fixed-size batches (the last one padded with zero rows) and how many
  of their rows are real."""
  total = len(next(iter(arrays.values())))
  for start in range(0, total, batch_size):
    batch = {}
    for k, v in arrays.items():
      chunk = v[start:start + batch_size]
      pad = [(0, batch_size - len(chunk))] + [(0, 0)] * (v.ndim - 1)
      batch[k] = np.pad(chunk, pad)
    yield batch, min(batch_size, total - start)


def _global(x: np.ndarray, sharding) -> jax.Array:
  """A global array from data every host holds in full (multi-host safe)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ---------------------------------------------------------- jitted programs


def _under_rules(fn, rules):
  """`fn` traced with the logical axis rules, so its constraints apply."""

  def wrapped(*args):
    with nn.logical_axis_rules(rules):
      return fn(*args)

  return wrapped


@functools.lru_cache(maxsize=8)
def _scorer(network, mesh, rules, length_normalize: bool):
  _, shardings = _param_layout(network, mesh, rules)
  batch = partitioning.batch_sharding(mesh)

  def score(params, inputs, targets, mask):
    return scoring.score_choices(network, params, inputs, targets, mask,
                                 length_normalize=length_normalize)

  return jax.jit(_under_rules(score, rules),
                 in_shardings=(shardings, batch, batch, batch),
                 out_shardings=partitioning.replicated(mesh))


@functools.lru_cache(maxsize=8)
def _predictor(network, mesh, rules, max_decode_length: int, method: str,
               temperature: float, top_k: Optional[int], beam_size: int,
               alpha: float):
  _, shardings = _param_layout(network, mesh, rules)
  replicated = partitioning.replicated(mesh)

  def predict(params, inputs, rng):
    return decoding.predict_batch(
        network, params, inputs, max_decode_length, method,
        rng=rng if method == 'sample' else None, temperature=temperature,
        top_k=top_k, beam_size=beam_size, alpha=alpha)[0]

  return jax.jit(_under_rules(predict, rules),
                 in_shardings=(shardings, partitioning.batch_sharding(mesh),
                               replicated),
                 out_shardings=replicated)


def score_task(cfg: EvalConfig, params, data: TaskData, mesh) -> np.ndarray:
  """Each score-eval row's score (its choice's summed log-likelihood)."""
  score = _scorer(cfg.network, mesh, cfg.mesh.rules, cfg.length_normalize)
  sharding = partitioning.batch_sharding(mesh)
  names = ('encoder_input_tokens', 'choice_targets', 'choice_mask')
  table = []
  for batch, real in _batches({k: data.choices[k] for k in names},
                              cfg.batch_size):
    out = score(params, *[_global(batch[k], sharding) for k in names])
    table.append(np.asarray(jax.device_get(out))[:real])
  table = np.concatenate(table)
  example = np.searchsorted(data.choices['example_ids'],
                            [int(r['idx'][0]) for r in data.rows])
  return table[example, [int(r['idx'][1]) for r in data.rows]]


def rank_metrics(data: TaskData, scores: np.ndarray) -> Dict[str, float]:
  """Accuracy from the scores, plus whatever the task's own score metrics
  report (macro F1 for tasks whose metric asks for it, e.g. CB)."""
  rows = data.rows
  metrics = analysis.rank_classification(
      [int(r['idx'][0]) for r in rows], [int(r['idx'][1]) for r in rows],
      [bool(r['is_correct']) for r in rows], [float(s) for s in scores])
  metrics['num_examples'] = int(metrics['num_examples'])
  targets = [data.task.postprocess_fn(r.get('targets_pretokenized'),
                                      example=r, is_target=True)
             for r in rows]
  for fn in data.task.score_metric_fns:
    metrics.update({k: float(v) for k, v in
                    fn(targets, [float(s) for s in scores]).items()})
  return metrics


def _target_text(row: Mapping[str, Any], vocabulary) -> Any:
  if 'targets_pretokenized' in row:
    return row['targets_pretokenized']
  return vocabulary.decode([int(t) for t in row['targets']])


def predict_task(cfg: EvalConfig, params, data: TaskData, mesh
                 ) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
  """Decodes a task; its prediction metrics and one record per example."""
  predict = _predictor(cfg.network, mesh, cfg.mesh.rules,
                       int(cfg.task_feature_lengths['targets']),
                       cfg.decode_method, cfg.temperature, cfg.top_k,
                       cfg.beam_size, cfg.alpha)
  sharding = partitioning.batch_sharding(mesh)
  inputs = _pad([r['inputs'] for r in data.rows],
                cfg.task_feature_lengths['inputs'])
  tokens = []
  rng = jax.random.PRNGKey(cfg.seed)
  for i, (batch, real) in enumerate(_batches({'inputs': inputs},
                                             cfg.batch_size)):
    out = predict(params, _global(batch['inputs'], sharding),
                  jax.random.fold_in(rng, i))
    tokens.extend(np.asarray(jax.device_get(out))[:real])
  task = data.task
  vocabulary = task.output_features['targets'].vocabulary
  predictions, targets, records = [], [], []
  for i, (row, ids) in enumerate(zip(data.rows, tokens)):
    text = vocabulary.decode([int(t) for t in ids])
    predictions.append(task.postprocess_fn(text, example=row,
                                           is_target=False))
    targets.append(task.postprocess_fn(_target_text(row, vocabulary),
                                       example=row, is_target=True))
    records.append({'task': data.name, 'example': i,
                    'prediction': predictions[-1], 'target': targets[-1]})
  metrics: Dict[str, float] = {'num_examples': len(data.rows)}
  for fn in task.predict_metric_fns:
    metrics.update({k: float(v) for k, v in
                    fn(targets, predictions).items()})
  return metrics, records


# ------------------------------------------------------------- evaluation


def evaluate_params(cfg: EvalConfig, params, data: Sequence[TaskData],
                    mesh=None) -> Tuple[Dict[str, Any], List[Dict[str, Any]],
                                        List[Dict[str, Any]]]:
  """Scores and decodes every task with `params`.

  Returns (results, score records, prediction records): results hold
  `rank_classification` (per template; per metric the `analysis.aggregate`
  tables) and `generation` (task -> prediction metrics).
  """
  mesh = mesh or cfg.mesh.make_mesh()
  per_template, generation = {}, {}
  score_records, prediction_records = [], []
  with jax.set_mesh(mesh):
    for task in data:
      if task.choices is None:
        generation[task.name], records = predict_task(cfg, params, task, mesh)
        prediction_records += records
        continue
      scores = score_task(cfg, params, task, mesh)
      per_template[task.name] = {'dataset': task.dataset,
                                 **rank_metrics(task, scores)}
      score_records += [
          {'task': task.name, 'dataset': task.dataset,
           'example': int(r['idx'][0]), 'choice': int(r['idx'][1]),
           'is_correct': bool(r['is_correct']), 'score': float(s)}
          for r, s in zip(task.rows, scores)]
  rank: Dict[str, Any] = {}
  if per_template:
    rank['per_template'] = per_template
    datasets = {t: v['dataset'] for t, v in per_template.items()}
    for metric in ('accuracy', 'f1_macro'):
      having = {t: v for t, v in per_template.items() if metric in v}
      if having:
        rank[metric] = analysis.aggregate(having, datasets, metric)
  return ({'rank_classification': rank, 'generation': generation},
          score_records, prediction_records)


def _write_text(path: str, text: str) -> None:
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(text)


def _jsonl(records: Sequence[Mapping[str, Any]]) -> str:
  return ''.join(json.dumps(r, sort_keys=True, default=str) + '\n'
                 for r in records)


def _tensorboard(cfg: EvalConfig, checkpoint: Checkpoint,
                 results: Mapping[str, Any], markdown: str) -> str:
  """Scalars (and the Markdown tables) for TensorBoard; training steps share
  one run so that curves form, other checkpoints get a run each."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  logdir = os.path.join(cfg.output_dir, 'tensorboard')
  if checkpoint.step is None:
    logdir = os.path.join(logdir, checkpoint.name)
  scalars = {}
  for row in analysis.csv_rows(results['rank_classification'],
                               results['generation'])[1:]:
    level, dataset, task, stat, value = row
    key = '/'.join(p for p in (level, dataset, task, stat) if p)
    scalars[key] = value
  writer = metric_writers.create_default_writer(logdir, asynchronous=False)
  step = checkpoint.step or 0
  writer.write_scalars(step, scalars)
  writer.write_texts(step, {'results': markdown})
  writer.flush()
  writer.close()
  return logdir


def write_results(cfg: EvalConfig, checkpoint: Checkpoint,
                  results: Dict[str, Any], score_records, prediction_records,
                  extra_files: Optional[Dict[str, Any]] = None
                  ) -> Dict[str, str]:
  """Writes every output of one checkpoint; results.json last, since its
  presence marks the checkpoint as evaluated."""
  out_dir = os.path.join(cfg.output_dir, checkpoint.name)
  tf.io.gfile.makedirs(out_dir)
  files = {'markdown': os.path.join(out_dir, 'results.md'),
           'csv': os.path.join(out_dir, 'results.csv')}
  for key, name, records in (('scores', SCORES_FILE, score_records),
                             ('predictions', PREDICTIONS_FILE,
                              prediction_records)):
    if records:
      files[key] = os.path.join(out_dir, name)
      _write_text(files[key], _jsonl(records))
  rank, generation = results['rank_classification'], results['generation']
  markdown = (describe(cfg, checkpoint, results) + '\n\n' +
              analysis.markdown_tables(rank, generation))
  _write_text(files['markdown'], markdown)
  buffer = io.StringIO()
  csv.writer(buffer).writerows(analysis.csv_rows(rank, generation))
  _write_text(files['csv'], buffer.getvalue())
  files['tensorboard'] = _tensorboard(cfg, checkpoint, results, markdown)
  files.update(extra_files or {})
  files['results'] = os.path.join(out_dir, RESULTS_FILE)
  ts.write_json(files['results'], {
      'checkpoint': checkpoint.path, 'name': checkpoint.name,
      'step': checkpoint.step, 'settings': cfg.settings(),
      'identity': evaluated_identity(cfg, checkpoint),
      'score': ('length-normalised ' if cfg.length_normalize else '') +
               SCORE_DEFINITION,
      **results, 'files': files})
  return files


def describe(cfg: EvalConfig, checkpoint: Checkpoint,
             results: Mapping[str, Any]) -> str:
  """The heading of results.md: what was evaluated and how."""
  adapter = cfg.adapter_checkpoint_path
  lines = [f'## {checkpoint.name}: {cfg.mixture_or_task_name} '
           f'({cfg.split} split)', '',
           f'Checkpoint {checkpoint.path}' +
           (f' with the adapter {adapter}.' if adapter else '.')]
  if results['rank_classification']:
    norm = ', divided by its length' if cfg.length_normalize else ''
    lines.append(
        'Rank classification: the prediction is the choice with the highest '
        f'summed target log-likelihood{norm}; accuracy per template, then per '
        'dataset the median and mean over its templates, then their average '
        'over datasets.')
  if results['generation']:
    lines.append(f'Generation: {cfg.decode_method} decoding, scored by each '
                 "task's postprocessor and metrics.")
  return '\n'.join(lines)


def _resolved(path: Optional[str]) -> Optional[str]:
  """A local path with its links resolved (remote paths as they are)."""
  return path if not path or '://' in path else os.path.realpath(path)


def _describe(value) -> Any:
  """An adapter template as JSON: its class and fields; functions (e.g.
  initialisers) by name, since their repr holds a memory address."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    fields = {f.name: _describe(getattr(value, f.name))
              for f in dataclasses.fields(value)
              if f.name not in ('parent', 'name')}
    return {'class': type(value).__name__, **fields}
  if callable(value):
    return getattr(value, '__qualname__', type(value).__name__)
  if isinstance(value, (list, tuple)):
    return [_describe(v) for v in value]
  return value


def evaluated_identity(cfg: EvalConfig, checkpoint: Checkpoint
                       ) -> Dict[str, Any]:
  """What was evaluated (JSON): the resolved checkpoint (and adapter export)
  and the network it was run as. Results of another identity under the same
  name are never taken for this checkpoint's."""
  from mov_jax import checkpoints  # pylint: disable=g-import-not-at-top
  adapters = cfg.network.adapters
  network = checkpoints.config_to_json(cfg.network.config)
  # Not part of what was computed: evaluation runs without dropout, and
  # rematerialisation changes only memory.
  for field in ('dropout_rate', 'remat_policy'):
    network.pop(field, None)
  adapter = cfg.adapter_checkpoint_path
  return json.loads(json.dumps({
      'checkpoint': _resolved(checkpoint.path),
      'checkpoint_saved_ns': _orbax_commit_ns(checkpoint.path),
      'adapter_checkpoint': _resolved(adapter),
      'adapter_checkpoint_saved_ns': _orbax_commit_ns(adapter),
      'network': network,
      'adapters': None if adapters is None else _describe(adapters),
  }, default=str))


def _orbax_commit_ns(path: Optional[str]) -> Optional[int]:
  """When orbax committed the save at `path` (a training step, or a
  `checkpoints.save_params` directory), from its _CHECKPOINT_METADATA; None
  for other formats. It names one save wherever the directory is moved or
  copied to, and tells a retrained step at the same path from the old one."""
  if not path:
    return None
  for directory in (path, os.path.join(path, 'params')):
    metadata = os.path.join(directory, '_CHECKPOINT_METADATA')
    try:
      with tf.io.gfile.GFile(metadata) as f:
        return json.load(f).get('commit_timestamp_nsecs')
    except (tf.errors.NotFoundError, json.JSONDecodeError, AttributeError):
      continue
  return None


# Each location in an identity, and the save time that identifies it.
_SAVED = {'checkpoint': 'checkpoint_saved_ns',
          'adapter_checkpoint': 'adapter_checkpoint_saved_ns'}


def _identity_differences(recorded: Mapping[str, Any],
                          identity: Mapping[str, Any]) -> List[str]:
  """The fields in which two identities differ. A checkpoint (or adapter
  export) is the same when both record its save time and the times agree,
  wherever it lies now (a moved MODEL_DIR); else when its path is the
  same (other formats, and results recorded before save times were)."""
  differ = []
  for key, value in identity.items():
    if key in _SAVED.values():
      continue
    if key in _SAVED:
      then, now = recorded.get(_SAVED[key]), identity[_SAVED[key]]
      same = then == now if (then and now) else recorded.get(key) == value
    else:
      same = recorded.get(key) == value
    if not same:
      differ.append(key)
  return differ


def _evaluated(identity: Mapping[str, Any]) -> str:
  def located(key):
    saved = identity.get(_SAVED[key])
    if not saved:
      return str(identity.get(key))
    when = datetime.datetime.fromtimestamp(saved / 1e9, datetime.timezone.utc)
    return f'{identity.get(key)} (saved {when:%Y-%m-%d %H:%M:%S.%f} UTC)'
  return located('checkpoint') + (
      f' with the adapter export {located("adapter_checkpoint")}'
      if identity.get('adapter_checkpoint') else '')


def _previously_evaluated(cfg: EvalConfig, checkpoint: Checkpoint) -> bool:
  """Whether EVAL_OUTPUT_DIR holds this checkpoint's results with these
  settings; results of anything else under its name are an error (never
  skipped, never overwritten)."""
  path = os.path.join(cfg.output_dir, checkpoint.name, RESULTS_FILE)
  if not tf.io.gfile.exists(path):
    return False
  with tf.io.gfile.GFile(path) as f:
    previous = json.load(f)
  other_dir = ('Use another EVAL_OUTPUT_DIR for this evaluation (the '
               'results there are kept).')
  identity = evaluated_identity(cfg, checkpoint)
  recorded = previous.get('identity')
  if recorded is None:
    # Written before the identity was recorded: the checkpoint path alone
    # does not tell which model and method were evaluated, so skipping
    # could pass another model's results off as these.
    raise ValueError(
        f'{path} holds results of {checkpoint.name} (checkpoint '
        f"{previous.get('checkpoint')}) that do not record which checkpoint "
        f'and model they are of (written by an older mov-jax), so they '
        f'cannot be verified to be of {checkpoint.path} with the configured '
        f'model. {other_dir}')
  differ = ', '.join(_identity_differences(recorded, identity))
  if differ:
    raise ValueError(
        f'{path} holds results of {checkpoint.name} of {_evaluated(recorded)}, '
        f'not of {_evaluated(identity)} as configured now (they differ in: '
        f'{differ}). {other_dir}')
  if previous.get('settings') != cfg.settings():
    raise ValueError(
        f'{path} holds results of {checkpoint.name} made with other settings '
        f"({previous.get('settings')}, now {cfg.settings()}). Use another "
        'EVAL_OUTPUT_DIR for other settings, or delete that directory to '
        'redo it.')
  return True


def _check_output_dir(cfg: EvalConfig, found: Sequence[Checkpoint]) -> None:
  """EVAL_OUTPUT_DIR must not lie inside what is evaluated."""
  out = os.path.realpath(cfg.output_dir)
  protected = {os.path.realpath(c.path) for c in found}
  protected |= {os.path.dirname(os.path.realpath(c.path)) for c in found
                if c.is_train}
  for path in protected:
    if out == path or out.startswith(path + os.sep):
      raise ValueError(
          f'EVAL_OUTPUT_DIR {cfg.output_dir} lies inside the checkpoint '
          f'{path}, which evaluation never writes to. Choose a directory '
          'outside it, e.g. <MODEL_DIR>/eval.')


def evaluate(cfg: EvalConfig) -> List[Dict[str, Any]]:
  """Evaluates every checkpoint of CHECKPOINT_PATH not yet evaluated.

  Returns one summary per evaluated checkpoint: name, step, output
  directory, files and results.
  """
  primary = jax.process_index() == 0
  mesh = cfg.mesh.make_mesh()
  partitioning.check_batch_size(cfg.batch_size, mesh)
  found = find_checkpoints(cfg.checkpoint_path, cfg.adapter_checkpoint_path)
  _check_output_dir(cfg, found)
  todo = []
  for checkpoint in found:
    if _previously_evaluated(cfg, checkpoint):
      if primary:
        print(f'Skipping {checkpoint.name}: already evaluated in '
              f'{os.path.join(cfg.output_dir, checkpoint.name)}.', flush=True)
    else:
      todo.append(checkpoint)
  if not todo:
    return []
  data = None
  summaries = []
  for checkpoint in todo:
    params = restore_params(cfg, checkpoint, mesh)
    if data is None:  # once, after the first restore worked
      # Before hours of scoring rather than after.
      ts.make_writable_dir(cfg.output_dir, 'EVAL_OUTPUT_DIR', check_write=True,
                           consequence='Nothing was evaluated.')
      data = load_tasks(cfg)
    results, score_records, prediction_records = evaluate_params(
        cfg, params, data, mesh)
    extra = {}
    if cfg.routing_analysis:
      by_name = {t.name: t for t in data}
      extra['routing'] = routing_analysis(
          cfg, params, [by_name.get(n, n) for n in cfg.routing_tasks or
                        by_name],
          os.path.join(cfg.output_dir, checkpoint.name, 'routing'), mesh=mesh)
    files = {}
    if primary:
      files = write_results(cfg, checkpoint, results, score_records,
                            prediction_records, extra)
      with tf.io.gfile.GFile(files['markdown']) as f:
        print(f.read(), flush=True)
      print(f'Wrote {files["results"]} (tables: {files["markdown"]}, '
            f'{files["csv"]}; ' + ''.join(
                f'{k}: {files[k]}; ' for k in ('scores', 'predictions')
                if k in files) + f'TensorBoard: {files["tensorboard"]}).',
            flush=True)
    summaries.append({'name': checkpoint.name, 'step': checkpoint.step,
                      'output_dir': os.path.join(cfg.output_dir,
                                                 checkpoint.name),
                      'files': files, 'results': results})
  return summaries


# --------------------------------------------------------- routing analysis

ROUTER_STATISTICS = ('expert_probability', 'expert_top1_fraction', 'entropy')
ROUTING_STATISTICS_DOC = (
    'Per site and task, the mean over the task\'s examples of: each '
    'example\'s token-averaged router probability per expert '
    '(expert_probability), the fraction of its tokens whose top expert is '
    'each expert (expert_top1_fraction), and its token-averaged routing '
    'entropy in nats (mean_token_entropy); entropy_of_mean_probability is '
    'the entropy of the task\'s mean distribution (low: the task uses few '
    'experts). Rank-classification examples are run with their correct '
    'choice as the target.')


def router_site(path: str) -> str:
  """'encoder/layers_0/attention/key_adapter/router/entropy' ->
  'encoder/layers_0/attention/key'."""
  site = path.split('/router/')[0]
  return site[:-len('_adapter')] if site.endswith('_adapter') else site


@functools.lru_cache(maxsize=8)
def _router_statistics_fn(network, mesh, rules):
  """Per-example router statistics: the network runs on each example alone
  (vmapped), so each sown token mean is one example's. No axis rules: the
  per-example batch of one is not split over devices."""
  _, shardings = _param_layout(network, mesh, rules)
  batch = partitioning.batch_sharding(mesh)

  def one(params, inputs, targets):
    targets = targets[None]
    _, sown = network.apply(
        {'params': params}, inputs[None], models.shift_right(targets),
        targets, enable_dropout=False, mutable=['intermediates'])
    flat = traverse_util.flatten_dict(sown.get('intermediates', {}), sep='/')
    return {f'{router_site(path)}|{path.rsplit("/", 1)[-1]}': values[0]
            for path, values in flat.items()
            if '/router/' in path and
            path.rsplit('/', 1)[-1] in ROUTER_STATISTICS}

  return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)),
                 in_shardings=(shardings, batch, batch),
                 out_shardings=partitioning.replicated(mesh))


def _routing_inputs(data: TaskData, cfg: EvalConfig,
                    max_examples: int) -> Tuple[np.ndarray, np.ndarray]:
  """Inputs and one target per example: a score-eval example's (first)
  correct choice, a generation example's target."""
  if data.choices is None:
    rows = data.rows[:max_examples]
    lengths = cfg.task_feature_lengths
    return (_pad([r['inputs'] for r in rows], lengths['inputs']),
            _pad([r['targets'] for r in rows], lengths['targets']))
  grouped = data.choices
  correct = {}
  for row in data.rows:
    if row['is_correct']:
      correct.setdefault(int(row['idx'][0]), int(row['idx'][1]))
  ids = grouped['example_ids'][:max_examples]
  choice = [correct.get(int(e), 0) for e in ids]
  return (grouped['encoder_input_tokens'][:len(ids)],
          grouped['choice_targets'][np.arange(len(ids)), choice])


def routing_statistics(cfg: EvalConfig, params, data: Sequence[TaskData],
                       max_examples: Optional[int] = None, mesh=None
                       ) -> Dict[str, Any]:
  """Router statistics per site and task (see ROUTING_STATISTICS_DOC):
  {'sites': {site: {task: {statistic: value}}}, 'num_examples': {task: n}}.
  """
  mesh = mesh or cfg.mesh.make_mesh()
  fn = _router_statistics_fn(cfg.network, mesh, cfg.mesh.rules)
  sharding = partitioning.batch_sharding(mesh)
  limit = max_examples or cfg.routing_max_examples
  sites: Dict[str, Dict[str, Any]] = {}
  counts = {}
  with jax.set_mesh(mesh):
    for task in data:
      inputs, targets = _routing_inputs(task, cfg, limit)
      collected: Dict[str, list] = {}
      for batch, real in _batches({'inputs': inputs, 'targets': targets},
                                  cfg.batch_size):
        out = jax.device_get(fn(params, _global(batch['inputs'], sharding),
                                _global(batch['targets'], sharding)))
        for key, value in out.items():
          collected.setdefault(key, []).append(np.asarray(value)[:real])
      if not collected:
        raise ValueError(
            'The network has no routers, so there is nothing to analyse: '
            'routing analysis needs a mixture method (methods/mov.gin, '
            'methods/molora.gin).')
      counts[task.name] = len(inputs)
      for key, values in collected.items():
        site, stat = key.split('|')
        mean = np.concatenate(values).mean(axis=0)
        entry = sites.setdefault(site, {}).setdefault(task.name, {})
        entry['mean_token_entropy' if stat == 'entropy' else stat] = (
            mean.tolist())
      for site in sites:
        p = np.asarray(sites[site][task.name]['expert_probability'])
        sites[site][task.name]['entropy_of_mean_probability'] = float(
            -np.sum(p * np.log(p + 1e-9)))
  return {'num_examples': counts, 'sites': sites,
          'statistics': ROUTING_STATISTICS_DOC}


def default_routing_sites(sites: Sequence[str]) -> List[str]:
  """Encoder layer 0's key router and the last decoder layer's FFN router
  (MoV: mlp_hidden, MoLoRA: wo), or those layers' first / last router."""
  chosen = []
  first = [s for s in sites if s.startswith('encoder/layers_0/')]
  if first:
    chosen.append(next((s for s in first if s.endswith('/key')), first[0]))
  decoder = [s for s in sites if s.startswith('decoder/layers_')]
  if decoder:
    layer = max(int(s.split('/')[1][len('layers_'):]) for s in decoder)
    last = [s for s in decoder if s.startswith(f'decoder/layers_{layer}/')]
    mlp = [s for s in last if s.endswith(('/mlp_hidden', '/wo'))]
    chosen.append((mlp or last)[-1])
  return chosen or list(sites)[:1]


def routing_analysis(cfg: EvalConfig, params,
                     tasks: Sequence[Union[str, TaskData]], out_dir: str, *,
                     sites: Optional[Sequence[str]] = None,
                     max_examples: Optional[int] = None,
                     mesh=None) -> List[str]:
  """Router usage per task: `routing.json` (every site) and a task x expert
  heatmap PNG per chosen site. Returns the written files.

  `tasks` are task names (read here, `cfg.split`) or already-read TaskData.
  """
  limit = max_examples or cfg.routing_max_examples
  names = [t for t in tasks if isinstance(t, str)]
  read = iter(load_tasks(cfg, names, limit) if names else [])
  data = [next(read) if isinstance(t, str) else t for t in tasks]
  stats = routing_statistics(cfg, params, data, limit, mesh)
  available = sorted(stats['sites'])
  sites = list(sites or cfg.routing_sites or default_routing_sites(available))
  unknown = [s for s in sites if s not in stats['sites']]
  if unknown:
    raise ValueError(f'No router at sites {unknown}; the network has routers '
                     f'at {available}.')
  primary = jax.process_index() == 0
  if primary:
    tf.io.gfile.makedirs(out_dir)
  written = []
  stats['figures'] = {}
  for site in sites:
    path = os.path.join(out_dir, f'routing_{site.replace("/", ".")}.png')
    stats['figures'][site] = path
    written.append(path)
    if primary:
      usage = {_template(task): v['expert_probability']
               for task, v in stats['sites'][site].items()}
      figure = analysis.routing_figure(
          usage, f'{site}: mean router probability per task')
      with tf.io.gfile.GFile(path, 'wb') as f:
        figure.savefig(f, format='png', dpi=120)
  json_path = os.path.join(out_dir, 'routing.json')
  if primary:
    ts.write_json(json_path, stats)
  return [json_path] + written


# ----------------------------------------------------------------- the CLI


def config_from_gin() -> EvalConfig:
  """The EvalConfig bound to the EVALUATOR macro (required macros checked)."""
  gin_utils.require_macros(REQUIRED_MACROS)
  return gin_utils.macro_value(
      'EVALUATOR', 'Include the run gin file runs/eval.gin.')


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  gin_utils.add_gin_flags(parser)
  partitioning.add_distributed_flags(parser)
  args = gin_utils.parse_args(parser, argv)
  try:
    gin_utils.setup_binary(args)
    summaries = evaluate(config_from_gin())
  except (ValueError, OSError, tf.errors.OpError) as e:
    # OSError / OpError: e.g. a file that cannot be read or written.
    print(f'error: {e}', file=sys.stderr)
    return 2
  if jax.process_index() == 0:
    print(f'Evaluated {len(summaries)} checkpoint(s).')
  return 0


if __name__ == '__main__':
  sys.exit(main())
