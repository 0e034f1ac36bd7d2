"""Reading and writing bigscience/P3 task directories, in both layouts.

TFRecord layout (P3's `data/<task>/`, written by seqio's offline caching):
  COMPLETED
  info.<split>.json    {"features": {name: {"dtype": ..., "shape": [...]}},
                        "num_shards": N, "seqio_version": ...}
  stats.<split>.json   {"examples": N, ...}
  <split>.tfrecord-00000-of-0000N   tf.train.Example records; int32 and bool
                                    features are stored as int64.
Parquet layout (the newer mirror): `<task>/<split>-00000-of-0000N.parquet`
with one column per feature.

Features: `inputs`, `targets` (int32 T5 token ids), `inputs_pretokenized`,
`targets_pretokenized` (strings; targets carry a leading space),
`answer_choices` (strings; only non-score tasks with choices) and, in
`*_score_eval` tasks (one row per example and choice), `idx` ([example,
choice]), `is_correct` (bool) and `weight` (float32).

The writers exist so that tests, the shipped mini-P3 and users' own data
(e.g. story_cloze, which P3 lacks) share exactly the reader's format.
"""

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

TFRECORD = 'tfrecord'
PARQUET = 'parquet'

# name -> (dtype, shape) exactly as seqio's cache info describes them.
TEXT_FEATURES = {
    'inputs': ('int32', [None]),
    'targets': ('int32', [None]),
    'inputs_pretokenized': ('string', []),
    'targets_pretokenized': ('string', []),
}
CHOICES_FEATURE = {'answer_choices': ('string', [None])}
SCORE_EVAL_FEATURES = {
    'idx': ('int32', [None]),
    'is_correct': ('bool', []),
    'weight': ('float32', []),
}
KNOWN_FEATURES = {**TEXT_FEATURES, **CHOICES_FEATURE, **SCORE_EVAL_FEATURES}

_SHARD_RE = re.compile(r'^(?P<split>.+?)[.-](?:tfrecord-)?(?P<i>\d{5})-of-'
                       r'(?P<n>\d{5})(?:\.parquet)?$')


class P3FormatError(ValueError):
  """A P3 task directory does not hold what the reader needs."""


def _gfile_glob(pattern: str) -> List[str]:
  return sorted(tf.io.gfile.glob(pattern))


def detect_layout(task_dir: str) -> str:
  """'tfrecord' or 'parquet', from the files present in `task_dir`."""
  if not tf.io.gfile.isdir(task_dir):
    raise FileNotFoundError(f'P3 task directory {task_dir} does not exist.')
  names = tf.io.gfile.listdir(task_dir)
  if any(n.startswith('info.') and n.endswith('.json') for n in names):
    return TFRECORD
  if any(n.endswith('.parquet') for n in names):
    return PARQUET
  raise P3FormatError(
      f'{task_dir} holds neither P3 TFRecords (info.<split>.json + '
      '<split>.tfrecord-*) nor Parquet files (<split>-*.parquet); found '
      f'{sorted(names)[:10]}.')


def list_splits(task_dir: str, layout: Optional[str] = None) -> List[str]:
  layout = layout or detect_layout(task_dir)
  names = tf.io.gfile.listdir(task_dir)
  if layout == TFRECORD:
    return sorted(n[len('info.'):-len('.json')] for n in names
                  if n.startswith('info.') and n.endswith('.json'))
  splits = set()
  for n in names:
    m = _SHARD_RE.match(n)
    if n.endswith('.parquet') and m:
      splits.add(m.group('split'))
  return sorted(splits)


def shard_files(task_dir: str, split: str, layout: Optional[str] = None
                ) -> List[str]:
  """Data files of `split`, or a P3FormatError naming what exists."""
  layout = layout or detect_layout(task_dir)
  if layout == TFRECORD:
    files = _gfile_glob(os.path.join(task_dir, f'{split}.tfrecord-*'))
  else:
    files = _gfile_glob(os.path.join(task_dir, f'{split}-*.parquet'))
  if not files:
    raise P3FormatError(
        f'Split {split!r} not found in P3 task directory {task_dir} (splits '
        f'present: {list_splits(task_dir, layout)}). Held-out evaluation reads '
        "'validation'; pass an existing split or add the missing files.")
  return files


def read_feature_spec(task_dir: str, split: str,
                      layout: Optional[str] = None) -> Dict[str, tuple]:
  """name -> (dtype, shape) for one split, validated against P3's features."""
  layout = layout or detect_layout(task_dir)
  if layout == TFRECORD:
    info_path = os.path.join(task_dir, f'info.{split}.json')
    if not tf.io.gfile.exists(info_path):
      raise P3FormatError(
          f'Split {split!r} not found: {info_path} is missing (splits present: '
          f'{list_splits(task_dir, layout)}).')
    with tf.io.gfile.GFile(info_path) as f:
      try:
        info = json.load(f)
      except json.JSONDecodeError as e:
        raise P3FormatError(f'{info_path} is not valid JSON: {e}.') from e
    if 'features' not in info:
      raise P3FormatError(f'{info_path} has no "features" entry; it must be '
                          "seqio's cache info JSON.")
    spec = {}
    for name, desc in info['features'].items():
      dtype = desc.get('dtype')
      # seqio < 0.0.0 cached int32 features under dtype int64.
      if dtype == 'int64' and name in KNOWN_FEATURES:
        dtype = KNOWN_FEATURES[name][0]
      spec[name] = (dtype, list(desc.get('shape', [])))
    source = info_path
  else:
    path = shard_files(task_dir, split, layout)[0]
    schema = _parquet_file(path).schema_arrow
    spec = {field.name: _arrow_to_spec(field.type) for field in schema}
    source = path
  validate_feature_spec(spec, source, score_eval=task_dir.rstrip('/').endswith(
      '_score_eval'))
  return spec


def _parquet_file(path: str):
  """A pyarrow ParquetFile for a local or remote (tf.io.gfile) path."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  if '://' not in path:
    return pq.ParquetFile(path)
  return pq.ParquetFile(pa.PythonFile(tf.io.gfile.GFile(path, 'rb'), mode='r'))


def _arrow_to_spec(arrow_type) -> tuple:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
    inner = _arrow_to_spec(arrow_type.value_type)
    return (inner[0], [None] + inner[1])
  if pa.types.is_string(arrow_type) or pa.types.is_large_string(
      arrow_type) or pa.types.is_binary(arrow_type):
    return ('string', [])
  if pa.types.is_boolean(arrow_type):
    return ('bool', [])
  if pa.types.is_integer(arrow_type):
    return ('int32' if arrow_type.bit_width <= 32 else 'int64', [])
  if pa.types.is_floating(arrow_type):
    return ('float32', [])
  return (str(arrow_type), [])


def validate_feature_spec(spec: Mapping[str, tuple], source: str,
                          score_eval: bool) -> None:
  """Raises P3FormatError listing missing and mistyped features."""
  required = dict(TEXT_FEATURES)
  if score_eval:
    required.update(SCORE_EVAL_FEATURES)
  problems = []
  for name, (dtype, shape) in required.items():
    if name not in spec:
      problems.append(f'missing feature {name!r} ({dtype}, shape {shape})')
  for name, (dtype, shape) in spec.items():
    if name not in KNOWN_FEATURES:
      continue
    want_dtype, want_shape = KNOWN_FEATURES[name]
    ok_dtype = dtype == want_dtype or (want_dtype == 'int32' and
                                       dtype == 'int64')
    if not ok_dtype or len(shape) != len(want_shape):
      problems.append(f'feature {name!r} is {dtype} with shape {shape}, '
                      f'expected {want_dtype} with shape {want_shape}')
  if problems:
    raise P3FormatError(
        f'{source} does not describe a P3 task: ' + '; '.join(problems) +
        '. Re-export the data with the P3 features (see tasks/p3_format.py).')


def num_examples(task_dir: str, split: str) -> Optional[int]:
  path = os.path.join(task_dir, f'stats.{split}.json')
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f).get('examples')


def _tf_dtype(dtype: str):
  return {'string': tf.string, 'int32': tf.int32, 'int64': tf.int64,
          'bool': tf.bool, 'float32': tf.float32}[dtype]


def read_dataset(task_dir: str, split: str, shuffle_files: bool = False,
                 seed: Optional[int] = None,
                 layout: Optional[str] = None) -> tf.data.Dataset:
  """A tf.data.Dataset of one split with P3's dtypes (int32, bool, ...)."""
  layout = layout or detect_layout(task_dir)
  spec = read_feature_spec(task_dir, split, layout)
  files = shard_files(task_dir, split, layout)
  if shuffle_files and len(files) > 1:
    files = list(np.random.default_rng(seed).permutation(files))
  if layout == TFRECORD:
    return _read_tfrecords(files, spec)
  return _read_parquet(files, spec)


def _read_tfrecords(files: Sequence[str], spec) -> tf.data.Dataset:
  description = {}
  for name, (dtype, shape) in spec.items():
    stored = 'int64' if dtype in ('int32', 'bool') else dtype
    if shape and shape[0] is None:
      description[name] = tf.io.FixedLenSequenceFeature(
          shape[1:], _tf_dtype(stored), allow_missing=True)
    else:
      description[name] = tf.io.FixedLenFeature(shape, _tf_dtype(stored))

  def parse(record):
    example = tf.io.parse_single_example(record, description)
    return {k: tf.cast(v, _tf_dtype(spec[k][0])) for k, v in example.items()}

  ds = tf.data.TFRecordDataset(list(files))
  return ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)


def _read_parquet(files: Sequence[str], spec) -> tf.data.Dataset:
  names = list(spec)

  def rows():
    for path in files:
      parquet = _parquet_file(path)
      for batch in parquet.iter_batches(batch_size=1024, columns=names):
        columns = {n: batch.column(n).to_pylist() for n in names}
        for i in range(batch.num_rows):
          yield {n: _to_numpy(columns[n][i], spec[n]) for n in names}

  signature = {
      n: tf.TensorSpec([None] * len(shape), _tf_dtype(dtype))
      for n, (dtype, shape) in spec.items()
  }
  return tf.data.Dataset.from_generator(rows, output_signature=signature)


def _to_numpy(value, spec):
  dtype, shape = spec
  if dtype == 'string':
    return np.array(value if shape else value, dtype=object)
  np_dtype = {'int32': np.int32, 'int64': np.int64, 'bool': np.bool_,
              'float32': np.float32}[dtype]
  if shape and value is None:
    value = []
  return np.asarray(value, dtype=np_dtype)


# ------------------------------------------------------------------ writing


def _feature_spec_of(rows: Sequence[Mapping[str, Any]]) -> Dict[str, tuple]:
  spec = {}
  for name in rows[0]:
    if name not in KNOWN_FEATURES:
      raise ValueError(f'Unknown P3 feature {name!r}; known: '
                       f'{sorted(KNOWN_FEATURES)}.')
    spec[name] = KNOWN_FEATURES[name]
  return spec


def write_task(task_dir: str, split: str, rows: Sequence[Mapping[str, Any]],
               layout: str = TFRECORD, num_shards: int = 1) -> None:
  """Writes one split of a P3 task directory in the given layout.

  `rows` are dicts of P3 features (token lists, strings, bools, floats).
  """
  if not rows:
    raise ValueError(f'No rows to write for {task_dir} split {split}.')
  spec = _feature_spec_of(rows)
  tf.io.gfile.makedirs(task_dir)
  shards = [rows[i::num_shards] for i in range(num_shards)]
  if layout == TFRECORD:
    for i, shard in enumerate(shards):
      path = os.path.join(task_dir,
                          f'{split}.tfrecord-{i:05d}-of-{num_shards:05d}')
      with tf.io.TFRecordWriter(path) as writer:
        for row in shard:
          writer.write(_to_example(row, spec).SerializeToString(deterministic=True))
    info = {'features': {n: {'dtype': d, 'shape': s}
                         for n, (d, s) in spec.items()},
            'num_shards': num_shards, 'seqio_version': '0.0.6'}
    stats = {'examples': len(rows)}
    for feature in ('inputs', 'targets'):
      if feature in spec:
        lengths = [len(r[feature]) for r in rows]
        stats[f'{feature}_tokens'] = int(sum(lengths))
        stats[f'{feature}_max_tokens'] = int(max(lengths))
    _write_json(os.path.join(task_dir, f'info.{split}.json'), info)
    _write_json(os.path.join(task_dir, f'stats.{split}.json'), stats)
    with tf.io.gfile.GFile(os.path.join(task_dir, 'COMPLETED'), 'w') as f:
      f.write('')
  elif layout == PARQUET:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    arrow_types = {
        ('int32', 1): pa.list_(pa.int32()), ('string', 1): pa.list_(pa.string()),
        ('int32', 0): pa.int32(), ('string', 0): pa.string(),
        ('bool', 0): pa.bool_(), ('float32', 0): pa.float32(),
    }
    schema = pa.schema([(n, arrow_types[(d, len(s))])
                        for n, (d, s) in spec.items()])
    for i, shard in enumerate(shards):
      table = pa.Table.from_pylist([dict(r) for r in shard], schema=schema)
      path = os.path.join(task_dir, f'{split}-{i:05d}-of-{num_shards:05d}.parquet')
      sink = pa.BufferOutputStream()
      pq.write_table(table, sink, compression='zstd')
      with tf.io.gfile.GFile(path, 'wb') as f:
        f.write(sink.getvalue().to_pybytes())
  else:
    raise ValueError(f'Unknown layout {layout!r}: use {TFRECORD!r} or '
                     f'{PARQUET!r}.')


def _write_json(path: str, value) -> None:
  with tf.io.gfile.GFile(path, 'w') as f:
    f.write(json.dumps(value, sort_keys=True))


def _to_example(row: Mapping[str, Any], spec) -> tf.train.Example:
  feature = {}
  for name, (dtype, shape) in spec.items():
    value = row[name]
    values = list(value) if shape else [value]
    if dtype == 'string':
      feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(
          value=[v.encode('utf-8') for v in values]))
    elif dtype in ('int32', 'bool'):
      feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(
          value=[int(v) for v in values]))
    else:
      feature[name] = tf.train.Feature(float_list=tf.train.FloatList(
          value=[float(v) for v in values]))
  return tf.train.Example(features=tf.train.Features(feature=feature))


def find_task_dirs(root: str) -> Dict[str, str]:
  """task name -> directory, for every P3 task directory under `root`.

  Accepts the root of a P3 copy (`<root>/data/<task>/`) or the directory that
  holds the task directories itself (`<root>/<task>/`).
  """
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(
        f'P3 data directory {root} does not exist. Point P3_DATA_DIR (gin '
        'macro or environment variable) at a copy of bigscience/P3 (the '
        'directory holding data/<task>/ or <task>/ directories).')
  base = root
  if tf.io.gfile.isdir(os.path.join(root, 'data')):
    base = os.path.join(root, 'data')
  found = {}
  for entry in tf.io.gfile.listdir(base):
    name = entry.rstrip('/')
    path = os.path.join(base, name)
    # Object stores list directories with a trailing '/': no extra request
    # per task (P3 has thousands); local listings need the isdir check.
    if entry.endswith('/') or tf.io.gfile.isdir(path):
      found[name] = path
  return found
