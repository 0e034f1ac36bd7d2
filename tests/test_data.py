"""P3-format reading, seqio tasks and mixtures, rank classification."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import seqio
import tensorflow as tf

from mov_jax import analysis
from mov_jax.tasks import mini_p3
from mov_jax.tasks import p3
from mov_jax.tasks import p3_format
from mov_jax.tasks import t0

LENGTHS = {'inputs': 48, 'targets': 8}


def _examples(ds, n=None):
  ds = ds if n is None else ds.take(n)
  def plain(v):
    v = v.numpy()
    return v.tolist() if hasattr(v, 'tolist') else v
  return [{k: plain(v) for k, v in ex.items()} for ex in ds]


def _write_by_hand(task_dir, split, rows, seqio_version='0.0.6'):
  """A P3 TFRecord task written with plain tf.train.Example, as P3 stores it:
  int32 and bool as int64 lists, strings as bytes, float32 as floats."""
  os.makedirs(task_dir, exist_ok=True)
  features = {'inputs': {'dtype': 'int32', 'shape': [None]},
              'targets': {'dtype': 'int32', 'shape': [None]},
              'inputs_pretokenized': {'dtype': 'string', 'shape': []},
              'targets_pretokenized': {'dtype': 'string', 'shape': []}}
  if 'idx' in rows[0]:
    features.update({'idx': {'dtype': 'int32', 'shape': [None]},
                     'is_correct': {'dtype': 'bool', 'shape': []},
                     'weight': {'dtype': 'float32', 'shape': []}})
  path = os.path.join(task_dir, f'{split}.tfrecord-00000-of-00001')
  with tf.io.TFRecordWriter(path) as writer:
    for row in rows:
      f = {
          'inputs': tf.train.Feature(int64_list=tf.train.Int64List(
              value=row['inputs'])),
          'targets': tf.train.Feature(int64_list=tf.train.Int64List(
              value=row['targets'])),
          'inputs_pretokenized': tf.train.Feature(bytes_list=tf.train.BytesList(
              value=[row['inputs_pretokenized'].encode()])),
          'targets_pretokenized': tf.train.Feature(
              bytes_list=tf.train.BytesList(
                  value=[row['targets_pretokenized'].encode()])),
      }
      if 'idx' in row:
        f['idx'] = tf.train.Feature(int64_list=tf.train.Int64List(
            value=row['idx']))
        f['is_correct'] = tf.train.Feature(int64_list=tf.train.Int64List(
            value=[int(row['is_correct'])]))
        f['weight'] = tf.train.Feature(float_list=tf.train.FloatList(
            value=[row['weight']]))
      writer.write(tf.train.Example(features=tf.train.Features(
          feature=f)).SerializeToString())
  with open(os.path.join(task_dir, f'info.{split}.json'), 'w') as fh:
    json.dump({'features': features, 'seqio_version': seqio_version}, fh)
  with open(os.path.join(task_dir, f'stats.{split}.json'), 'w') as fh:
    json.dump({'examples': len(rows)}, fh)
  open(os.path.join(task_dir, 'COMPLETED'), 'w').close()


def test_hand_written_p3_records_read_with_p3_dtypes(tmp_path):
  vocab = mini_p3.vocabulary()
  rows = []
  for i, (q, a) in enumerate([('is it good?', 'yes'), ('is it bad?', 'no')]):
    for c, choice in enumerate(['no', 'yes']):
      rows.append({'inputs': vocab.encode(q) + [1], 'inputs_pretokenized': q,
                   'targets': vocab.encode(choice) + [1],
                   'targets_pretokenized': ' ' + choice, 'idx': [i, c],
                   'is_correct': choice == a, 'weight': 1.0})
  task_dir = str(tmp_path / 'data' / 'demo_task_score_eval')
  _write_by_hand(task_dir, 'validation', rows, seqio_version='0.pre')
  ds = p3_format.read_dataset(task_dir, 'validation')
  assert ds.element_spec['inputs'].dtype == tf.int32
  assert ds.element_spec['is_correct'].dtype == tf.bool
  assert ds.element_spec['idx'].dtype == tf.int32
  got = _examples(ds)
  assert [g['idx'] for g in got] == [r['idx'] for r in rows]
  assert [g['is_correct'] for g in got] == [r['is_correct'] for r in rows]
  assert got[0]['inputs_pretokenized'] == b'is it good?'
  # Through a registered seqio task: one EOS, the idx kept for scoring.
  spec = p3.TaskSpec('demo_task_score_eval', task_dir, score_eval=True)
  p3.register_tasks([spec], vocab, reuse_tokens=True)
  task = seqio.get_mixture_or_task('demo_task_score_eval')
  out = _examples(task.get_dataset(LENGTHS, split='validation',
                                   shuffle=False))
  assert out[0]['inputs'] == rows[0]['inputs']  # EOS not doubled
  assert out[3]['idx'] == [1, 1] and out[3]['is_correct'] is False


@pytest.mark.parametrize('pack', [False, True])
def test_mini_p3_layouts_agree_through_feature_converter(pack):
  results = {}
  for layout in (p3_format.TFRECORD, p3_format.PARQUET):
    reports = mini_p3.register_mini_p3(layout)
    assert reports['mini_p3_train'].num_tasks == 11
    assert reports['mini_p3_eval_score_eval'].num_tasks == 9
    ds = seqio.get_dataset(
        'mini_p3_train', LENGTHS, dataset_split='train', shuffle=False,
        feature_converter=seqio.EncDecFeatureConverter(pack=pack))
    results[layout] = _examples(ds, 20)
  mini_p3.register_mini_p3()
  assert results[p3_format.TFRECORD] == results[p3_format.PARQUET]
  ex = results[p3_format.TFRECORD][0]
  expected_keys = {'encoder_input_tokens', 'decoder_target_tokens',
                   'decoder_input_tokens', 'decoder_loss_weights'}
  if pack:
    expected_keys |= {'encoder_segment_ids', 'decoder_segment_ids',
                      'encoder_positions', 'decoder_positions'}
    assert max(ex['encoder_segment_ids']) > 1  # several examples per row
  assert set(ex) == expected_keys
  assert len(ex['encoder_input_tokens']) == LENGTHS['inputs']
  vocab = mini_p3.vocabulary()
  targets = [t for t in ex['decoder_target_tokens'] if t > 1]
  assert vocab.decode(targets).split()  # real words, not garbage


def test_mini_p3_score_eval_rows_and_expanded_choices():
  mini_p3.register_mini_p3()
  held_out = seqio.get_mixture_or_task('mini_p3_eval_score_eval')
  task = held_out.tasks[0]
  rows = _examples(task.get_dataset(LENGTHS, split='validation',
                                    shuffle=False))
  by_example = {}
  for r in rows:
    by_example.setdefault(r['idx'][0], []).append(r['is_correct'])
  assert all(sum(v) == 1 and len(v) >= 2 for v in by_example.values())
  # Training templates with answer choices get score-eval rows by expansion.
  expanded = seqio.get_mixture_or_task(
      'movie_sentiment_critic_liked_score_eval')
  rows = _examples(expanded.get_dataset(LENGTHS, split='validation',
                                        shuffle=False), 6)
  assert [r['idx'] for r in rows] == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0],
                                      [2, 1]]
  vocab = mini_p3.vocabulary()
  assert [vocab.decode(r['targets']) for r in rows[:2]] == ['no', 'yes']
  assert all(sum(r['is_correct'] for r in rows[i:i + 2]) == 1
             for i in (0, 2, 4))


def test_retokenizes_when_the_vocabulary_differs(tmp_path):
  vocab = mini_p3.vocabulary()
  text = 'the film was great'
  # Ids from "another vocabulary": out of range for ours.
  rows = [{'inputs': [5000, 6000, 1], 'inputs_pretokenized': text,
           'targets': [7000, 1], 'targets_pretokenized': ' positive'}]
  task_dir = str(tmp_path / 'other_vocab_task')
  p3_format.write_task(task_dir, 'train', rows, p3_format.PARQUET)
  spec = p3.TaskSpec('other_vocab_task', task_dir)
  p3.register_tasks([spec], vocab, reuse_tokens=False)
  out = _examples(seqio.get_mixture_or_task('other_vocab_task').get_dataset(
      LENGTHS, split='train', shuffle=False))
  assert out[0]['inputs'] == vocab.encode(text) + [1]
  assert out[0]['targets'] == vocab.encode('positive') + [1]
  # Reusing the stored ids instead fails loudly, naming the fix.
  p3.register_tasks([spec], vocab, reuse_tokens=True)
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match='outside the vocabulary.*P3_REUSE_TOKENS'):
    _examples(seqio.get_mixture_or_task('other_vocab_task').get_dataset(
        LENGTHS, split='train', shuffle=False))


def test_bad_input_errors_name_the_file_and_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match='P3_DATA_DIR'):
    p3_format.find_task_dirs(str(tmp_path / 'nowhere'))
  good = [{'inputs': [3, 1], 'inputs_pretokenized': 'a',
           'targets': [4, 1], 'targets_pretokenized': ' b'}]
  task_dir = str(tmp_path / 'task_a')
  p3_format.write_task(task_dir, 'train', good)
  with pytest.raises(p3_format.P3FormatError,
                     match=r"Split 'validation'.*task_a.*\['train'\]"):
    p3_format.read_dataset(task_dir, 'validation')
  # A missing feature and a mistyped one, named in one message.
  info_path = os.path.join(task_dir, 'info.train.json')
  info = json.load(open(info_path))
  del info['features']['targets_pretokenized']
  info['features']['inputs']['dtype'] = 'float32'
  json.dump(info, open(info_path, 'w'))
  with pytest.raises(p3_format.P3FormatError,
                     match=r"info.train.json.*missing feature "
                     r"'targets_pretokenized'.*'inputs' is float32"):
    p3_format.read_dataset(task_dir, 'train')
  # Score-eval tasks must carry idx / is_correct / weight.
  score_dir = str(tmp_path / 'task_b_score_eval')
  p3_format.write_task(score_dir, 'validation', good, p3_format.PARQUET)
  with pytest.raises(p3_format.P3FormatError, match="missing feature 'idx'"):
    p3_format.read_dataset(score_dir, 'validation')
  # An empty mixture explains itself.
  empty_root = tmp_path / 'empty_p3'
  (empty_root / 'data').mkdir(parents=True)
  t0.register_t0(str(empty_root), vocabulary=mini_p3.vocabulary(),
                 reuse_tokens=True)
  with pytest.raises(ValueError, match=r't0_train is empty.*313.*P3_DATA_DIR'):
    p3.get_mixture_or_task('t0_train')


def test_rank_classification_and_aggregation_by_hand():
  # Example 0: choice 1 wins (correct); example 1: choice 0 wins (wrong,
  # 2 is correct); example 2: tie between 0 and 2 -> lowest index 0 (correct).
  rows = [(0, 0, False), (0, 1, True), (1, 0, False), (1, 1, False),
          (1, 2, True), (2, 0, True), (2, 1, False), (2, 2, False)]
  scores = [-3.0, -1.0, -0.5, -2.0, -0.7, -1.0, -4.0, -1.0]
  metric = p3.rank_classification_metric(rows, scores, f1=True)
  assert metric['accuracy'] == pytest.approx(200 / 3)
  # Predicted [1, 0, 0], gold [1, 2, 0]: F1 class0 = 2/3, class1 = 1,
  # class2 = 0 -> macro 5/9.
  assert metric['f1_macro'] == pytest.approx(100 * 5 / 9)
  per_template = {'rte_a': {'accuracy': 50.0}, 'rte_b': {'accuracy': 70.0},
                  'rte_c': {'accuracy': 90.0}, 'cb_a': {'accuracy': 40.0},
                  'cb_b': {'accuracy': 60.0}}
  datasets = {'rte_a': 'rte', 'rte_b': 'rte', 'rte_c': 'rte', 'cb_a': 'cb',
              'cb_b': 'cb'}
  agg = analysis.aggregate(per_template, datasets)
  assert agg['per_dataset']['rte'] == {'median_accuracy': 70.0,
                                       'mean_accuracy': 70.0,
                                       'num_templates': 3}
  assert agg['per_dataset']['cb']['median_accuracy'] == 50.0
  assert agg['overall']['average_of_dataset_median_accuracy'] == 60.0
  assert agg['overall']['num_datasets'] == 2


def test_t0_mixtures_from_p3_named_fixtures(tmp_path):
  """P3_DATA_DIR + `import mov_jax.tasks` registers exactly T0's mixtures."""
  rows = t0.read_table(t0.TABLE_PATH)
  root = tmp_path / 'p3'
  row = {'inputs': [3, 1], 'inputs_pretokenized': 'q',
         'targets': [4, 1], 'targets_pretokenized': ' a',
         'answer_choices': ['a', 'b']}
  score_row = {'inputs': [3, 1], 'inputs_pretokenized': 'q',
               'targets': [4, 1], 'targets_pretokenized': ' a',
               'idx': [0, 0], 'is_correct': True, 'weight': 1.0}
  absent_in_p3 = {'winogrande_winogrande_xl_True_or_False'}
  for r in rows:
    if r.dataset == t0.STORY_CLOZE or r.p3_task in absent_in_p3:
      continue
    split = 'train' if r.role == 'train' else 'validation'
    p3_format.write_task(str(root / 'data' / r.p3_task), split, [row])
    if r.role == 'eval':
      p3_format.write_task(str(root / 'data' / f'{r.p3_task}_score_eval'),
                           split, [score_row])
  script = textwrap.dedent("""
      import json, seqio
      import mov_jax.tasks
      out = {}
      for name in ('t0_train', 't0_eval_score_eval', 't0_train_score_eval'):
        m = seqio.get_mixture_or_task(name)
        out[name] = {t.name: m.get_rate(t) for t in m.tasks}
      out['missing'] = {k: v.missing for k, v in mov_jax.tasks.REPORTS.items()}
      print('RESULT' + json.dumps(out))
  """)
  env = dict(os.environ, P3_DATA_DIR=str(root), TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run([sys.executable, '-c', script], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split('RESULT', 1)[1])
  train_rows = [r for r in rows if r.role == 'train']
  assert len({r.dataset for r in train_rows}) == 38
  templates_per_dataset = {}
  for r in train_rows:
    templates_per_dataset[r.dataset] = templates_per_dataset.get(
        r.dataset, 0) + 1
  expected = {r.p3_task: float(r.train_size if r.train_size <= 500_000 else
                               500_000 // templates_per_dataset[r.dataset])
              for r in train_rows}
  assert len(expected) == 313
  assert out['t0_train'] == expected
  held_out = out['t0_eval_score_eval']
  assert len(held_out) == 111
  assert all(name.endswith('_score_eval') for name in held_out)
  assert not any('story_cloze' in name for name in held_out)
  assert len([n for n in held_out if n.startswith('anli_')]) == 45
  assert len(out['t0_train_score_eval']) == sum(r.answer_choices
                                                for r in train_rows)
  # Absent from P3: reported, not fatal.
  missing = out['missing']['t0_eval_score_eval_with_story_cloze']
  assert len(missing) == 5 and all('story_cloze' in m for m in missing)
  assert out['missing']['t0_train'] == []


def test_gin_macros_choose_the_p3_copy(tmp_path):
  from mov_jax import gin_utils  # pylint: disable=g-import-not-at-top
  import mov_jax.tasks  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'my_p3'
  p3_format.write_task(
      str(root / 'glue_mrpc_equivalent'), 'train',
      [{'inputs': [3, 1], 'inputs_pretokenized': 'q', 'targets': [4, 1],
        'targets_pretokenized': ' a'}], p3_format.PARQUET)
  gin_utils.parse_gin(['data/p3.gin'], [f"P3_DATA_DIR = '{root}'",
                                        'P3_REUSE_TOKENS = True'])
  try:
    reports = mov_jax.tasks.setup_from_gin()
    assert reports['t0_train'].num_tasks == 1
    assert len(reports['t0_train'].missing) == 312
    task = seqio.get_mixture_or_task('glue_mrpc_equivalent')
    assert task.source.layout == p3_format.PARQUET
  finally:
    # seqio's registry is global: leave no T0 task or mixture of this tmp
    # copy to later tests in this process (they expect T0 unregistered).
    t0.unregister_t0()
  assert 't0_train' not in seqio.MixtureRegistry.names()
  assert 'glue_mrpc_equivalent' not in seqio.TaskRegistry.names()
