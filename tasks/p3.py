"""SeqIO sources, tasks and rank classification for P3-format data.

One `seqio.Task` per P3 task directory. Stored token ids are used as they are
when the configured vocabulary is the one P3 was tokenised with; otherwise the
pretokenized strings are tokenised again with the configured vocabulary.
Score-eval tasks (`*_score_eval`, one row per example and choice) carry a
rank-classification metric; tasks with `answer_choices` can be expanded into
such rows by `expand_answer_choices`.
"""

import dataclasses
import functools
import logging
from typing import Dict, List, Mapping, Optional, Sequence

import seqio
import tensorflow as tf

from mov_jax import analysis
from mov_jax.tasks import p3_format

# The vocabulary P3's token ids were made with (T5's SentencePiece model).
T5_VOCABULARY_PATH = 'gs://t5-data/vocabs/cc_all.32000/sentencepiece.model'
T5_EXTRA_IDS = 100
EOS_ID = 1


def t5_vocabulary(path: str = T5_VOCABULARY_PATH,
                  extra_ids: int = T5_EXTRA_IDS) -> seqio.Vocabulary:
  """The T5 SentencePiece vocabulary (loaded lazily: no read until used)."""
  return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def vocabulary_matches_p3(vocabulary: seqio.Vocabulary) -> bool:
  """Whether P3's stored token ids are valid for `vocabulary`."""
  path = getattr(vocabulary, 'sentencepiece_model_file', None)
  return path == T5_VOCABULARY_PATH


class P3DataSource(seqio.DataSource):
  """Reads one P3 task directory (TFRecord or Parquet layout).

  Splits and sizes are read lazily, so registering thousands of tasks on a
  remote P3 copy costs one directory listing, not one per task.
  """

  def __init__(self, task_dir: str, layout: Optional[str] = None):
    super().__init__(splits=(), caching_permitted=False)
    self._task_dir = task_dir
    self._layout = layout

  @property
  def task_dir(self) -> str:
    return self._task_dir

  @functools.cached_property
  def layout(self) -> str:
    return self._layout or p3_format.detect_layout(self._task_dir)

  @property
  def splits(self) -> Sequence[str]:
    return tuple(p3_format.list_splits(self._task_dir, self.layout))

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> Sequence[str]:
    return p3_format.shard_files(self._task_dir, split, self.layout)

  def num_input_examples(self, split: str) -> Optional[int]:
    return p3_format.num_examples(self._task_dir, split)

  def get_dataset(self, split: str = 'train', shuffle: bool = True,
                  seed: Optional[int] = None,
                  shard_info: Optional[seqio.ShardInfo] = None, *,
                  sequence_length=None, use_cached: bool = False,
                  num_epochs: Optional[int] = 1) -> tf.data.Dataset:
    del sequence_length, use_cached, num_epochs
    ds = p3_format.read_dataset(self._task_dir, split, shuffle_files=shuffle,
                                seed=seed, layout=self.layout)
    if shard_info and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds


# ---------------------------------------------------------------- preprocessors


def check_token_ids(dataset: tf.data.Dataset, vocabulary: seqio.Vocabulary,
                    source: str) -> tf.data.Dataset:
  """Fails with a clear message when stored ids exceed the vocabulary."""
  vocab_size = vocabulary.vocab_size  # Loads the vocabulary: only here.

  def check(ex):
    deps = []
    for name in ('inputs', 'targets'):
      deps.append(tf.debugging.assert_less(
          ex[name], tf.constant(vocab_size, ex[name].dtype),
          message=(f'{source}: token ids in {name!r} are outside the '
                   f'vocabulary (size {vocab_size}). The stored ids were made '
                   'with another vocabulary: configure that vocabulary, or '
                   'set P3_REUSE_TOKENS = False to re-tokenise the '
                   'pretokenized text with yours.')))
    with tf.control_dependencies(deps):
      return {k: tf.identity(v) for k, v in ex.items()}

  return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE)


def retokenize(dataset: tf.data.Dataset,
               vocabulary: seqio.Vocabulary) -> tf.data.Dataset:
  """Replaces stored ids by the tokenised `*_pretokenized` strings."""

  def tokenize(ex):
    ex = dict(ex)
    for name in ('inputs', 'targets'):
      text = tf.strings.strip(ex[f'{name}_pretokenized'])
      ex[name] = tf.cast(vocabulary.encode_tf(text), tf.int32)
    return ex

  return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)


def strip_trailing_eos(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Drops one trailing EOS so `append_eos_after_trim` adds exactly one."""

  def strip(ex):
    ex = dict(ex)
    for name in ('inputs', 'targets'):
      ids = ex[name]
      ends_with_eos = tf.logical_and(tf.size(ids) > 0,
                                     tf.equal(ids[-1], EOS_ID))
      ex[name] = tf.cond(ends_with_eos, lambda ids=ids: ids[:-1],
                         lambda ids=ids: ids)
    return ex

  return dataset.map(strip, num_parallel_calls=tf.data.AUTOTUNE)


def expand_answer_choices(dataset: tf.data.Dataset,
                          vocabulary: seqio.Vocabulary) -> tf.data.Dataset:
  """One row per (example, answer choice), in P3's score-eval format.

  Targets become the tokenised choice; `idx = [example, choice]`,
  `is_correct` marks the choice equal to the example's target text, and
  `weight` is 1.
  """

  def expand(index, ex):
    choices = tf.strings.strip(ex['answer_choices'])

    def row(choice_index):
      choice = choices[choice_index]
      return {
          'inputs': ex['inputs'],
          'inputs_pretokenized': ex['inputs_pretokenized'],
          'targets': tf.cast(vocabulary.encode_tf(choice), tf.int32),
          'targets_pretokenized': tf.strings.join([' ', choice]),
          'idx': tf.stack([tf.cast(index, tf.int32),
                           tf.cast(choice_index, tf.int32)]),
          'is_correct': tf.equal(choice, target),
          'weight': tf.constant(1.0, tf.float32),
      }

    target = tf.strings.strip(ex['targets_pretokenized'])
    return tf.data.Dataset.range(tf.size(choices, out_type=tf.int64)).map(row)

  def check(ex):
    if 'answer_choices' not in ex:
      raise p3_format.P3FormatError(
          'expand_answer_choices needs an answer_choices feature; this task '
          'has none (only templates with answer choices can be rank-scored).')
    return ex

  dataset = dataset.map(check)
  return dataset.enumerate().flat_map(expand)


# ------------------------------------------------------- rank classification


def rank_classification_postprocessor(output_or_target, example=None,
                                      is_target=False):
  """Targets of score-eval rows become (example, choice, is_correct)."""
  if is_target:
    return (int(example['idx'][0]), int(example['idx'][1]),
            bool(example['is_correct']))
  return output_or_target


def rank_classification_metric(targets, scores, f1: bool = False):
  """seqio score metric: accuracy (and macro F1) from (ex, choice, ok) rows."""
  examples, choices, correct = analysis.group_rows(targets)
  result = analysis.rank_classification(examples, choices, correct, scores,
                                        f1=f1)
  result.pop('num_examples')
  return result


def exact_match_metric(targets, predictions):
  """seqio prediction metric: percent of stripped exact string matches."""
  hits = sum(str(t).strip() == str(p).strip()
             for t, p in zip(targets, predictions))
  return {'exact_match': 100.0 * hits / max(len(targets), 1)}


def _decode_text(output_or_target, example=None, is_target=False):
  del example, is_target
  if isinstance(output_or_target, bytes):
    return output_or_target.decode('utf-8')
  return output_or_target


# ----------------------------------------------------------------- registry


@dataclasses.dataclass
class TaskSpec:
  """What to register for one P3 task directory."""
  name: str
  task_dir: str
  score_eval: bool = False
  expand_choices: bool = False  # build score-eval rows from answer_choices
  f1: bool = False


def make_task(spec: TaskSpec, vocabulary: seqio.Vocabulary,
              reuse_tokens: bool) -> seqio.Task:
  """A seqio.Task reading `spec.task_dir` with our preprocessing."""
  preprocessors = []
  if reuse_tokens:
    preprocessors.append(functools.partial(
        check_token_ids, vocabulary=vocabulary, source=spec.task_dir))
  else:
    preprocessors.append(functools.partial(retokenize, vocabulary=vocabulary))
  if spec.expand_choices:
    preprocessors.append(functools.partial(expand_answer_choices,
                                           vocabulary=vocabulary))
  preprocessors += [strip_trailing_eos,
                    seqio.preprocessors.append_eos_after_trim]
  if spec.score_eval or spec.expand_choices:
    postprocess_fn = rank_classification_postprocessor
    metric_fns = [functools.partial(rank_classification_metric, f1=spec.f1)]
  else:
    postprocess_fn = _decode_text
    metric_fns = [exact_match_metric]
  output_features = {
      'inputs': seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
      'targets': seqio.Feature(vocabulary, add_eos=True, dtype=tf.int32),
  }
  return seqio.Task(spec.name, source=P3DataSource(spec.task_dir),
                    output_features=output_features,
                    preprocessors=preprocessors,
                    postprocess_fn=postprocess_fn, metric_fns=metric_fns)


def register_tasks(specs: Sequence[TaskSpec], vocabulary: seqio.Vocabulary,
                   reuse_tokens: bool) -> List[str]:
  """Registers (or re-registers) every spec; returns the names."""
  names = []
  for spec in specs:
    if spec.name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(spec.name)
    seqio.TaskRegistry.add_provider(spec.name,
                                    make_task(spec, vocabulary, reuse_tokens))
    names.append(spec.name)
  return names


@dataclasses.dataclass
class MixtureReport:
  """What a mixture holds and which of its expected tasks were absent."""
  name: str
  registered: bool
  num_tasks: int
  missing: List[str]
  root: str

  def describe(self) -> str:
    head = (f'mixture {self.name}: {self.num_tasks} tasks'
            if self.registered else f'mixture {self.name}: NOT registered')
    if self.missing:
      head += (f'; {len(self.missing)} expected tasks missing under '
               f'{self.root} (e.g. {self.missing[:3]})')
    return head


def register_mixture(name: str, rates: Mapping[str, float],
                     available: Sequence[str], root: str) -> MixtureReport:
  """Registers `name` over the available tasks of `rates`.

  A mixture whose tasks are all absent is not registered; asking for it
  through `get_mixture_or_task` then explains what is missing.
  """
  present = {t: r for t, r in rates.items() if t in set(available)}
  missing = sorted(set(rates) - set(present))
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  if present:
    seqio.MixtureRegistry.add(name, sorted(present.items()))
  if missing:
    logging.warning('%s: %d of %d expected tasks missing under %s, e.g. %s',
                    name, len(missing), len(rates), root, missing[:5])
  report = MixtureReport(name, bool(present), len(present), missing, root)
  MIXTURE_REPORTS[name] = report
  return report


# name -> report of the last registration (so errors can explain absences).
MIXTURE_REPORTS: Dict[str, MixtureReport] = {}


def get_mixture_or_task(name: str):
  """seqio.get_mixture_or_task with an explanation when it is absent."""
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    report = MIXTURE_REPORTS.get(name)
    if report is not None and not report.registered:
      raise ValueError(
          f'Mixture {name} is empty: none of its {len(report.missing)} '
          f'expected P3 task directories exist under {report.root} (e.g. '
          f'{report.missing[:3]}). Point P3_DATA_DIR at a complete P3 copy '
          '(its data/ directory holds one directory per task).') from None
    raise ValueError(
        f'No seqio task or mixture named {name!r}. Registered mixtures: '
        f'{sorted(seqio.MixtureRegistry.names())[:20]}. Import '
        'mov_jax.tasks and set P3_DATA_DIR for the T0 tasks.') from None
