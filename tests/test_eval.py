"""The evaluation binary: T0 tables recomputed from the per-choice scores,
MODEL_DIR re-runs, decoding, routing analysis and errors, on mini-P3."""

import collections
import csv
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mov_jax import checkpoints
from mov_jax import eval as eval_lib
from mov_jax import gin_utils
from mov_jax import train
from mov_jax import train_state as ts
from test_train import _train_in_process  # pylint: disable=g-bad-import-order
from test_train import _tree_digest  # pylint: disable=g-bad-import-order

EVAL_GIN = ['models/t5_1_1_tiny.gin', 'methods/mov.gin', 'runs/eval.gin']
EVAL_BINDINGS = ['NUM_EMBEDDINGS = 384',
                 "TASK_FEATURE_LENGTHS = {'inputs': 48, 'targets': 8}",
                 'BATCH_SIZE = 16',
                 "MIXTURE_OR_TASK_NAME = 'mini_p3_eval_score_eval'"]
HELD_OUT = ['headline_topic_headline_about_score_eval',
            'number_truth_bigger_statement_score_eval',
            'product_sentiment_customer_happy_score_eval']
MODEL_DIR_BINDINGS = ('ROUTING_ANALYSIS = True', f'ROUTING_TASKS = {HELD_OUT}')


def _setup_tasks():
  import mov_jax.tasks  # pylint: disable=g-import-not-at-top
  mov_jax.tasks.setup_from_gin()


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """MoV-10 on the tiny T5 trained 20 steps on mini-P3 (checkpoints at steps
  10 and 20), and the parameters it started from saved as a base
  checkpoint (`base/`), i.e. the untrained model."""
  root = tmp_path_factory.mktemp('eval')
  gin.clear_config(clear_constants=True)
  _train_in_process(root / 'model', 'TRAIN_STEPS = 20',
                    'CHECKPOINT_PERIOD = 10',
                    'train.TrainConfig.export_adapter = False')
  cfg = train.config_from_gin()
  # train.train initialises from the first half of PRNGKey(seed).
  init_rng = jax.random.split(jax.random.PRNGKey(cfg.seed))[0]
  tokens = jnp.ones((1, 8), jnp.int32)
  params = cfg.network.init(init_rng, tokens, tokens, tokens,
                            enable_dropout=False)['params']
  checkpoints.save_params(root / 'base', params, cfg.network.config)
  gin.clear_config(clear_constants=True)
  return root


def _config(checkpoint_path, output_dir, *bindings):
  gin_utils.parse_gin(EVAL_GIN, EVAL_BINDINGS + [
      f"CHECKPOINT_PATH = '{checkpoint_path}'",
      f"EVAL_OUTPUT_DIR = '{output_dir}'", *bindings])
  _setup_tasks()
  cfg = eval_lib.config_from_gin()
  gin.clear_config(clear_constants=True)
  return cfg


def _evaluate(checkpoint_path, output_dir, *bindings):
  return eval_lib.evaluate(_config(checkpoint_path, output_dir, *bindings))


def _recompute(scores_path):
  """Every table number from scores.jsonl alone, without mov_jax code:
  the best-scoring choice (ties: lowest choice) is the prediction."""
  by_example = collections.defaultdict(list)
  dataset_of = {}
  for line in pathlib.Path(scores_path).read_text().splitlines():
    row = json.loads(line)
    by_example[row['task'], row['example']].append(
        (row['score'], -row['choice'], row['is_correct']))
    dataset_of[row['task']] = row['dataset']
  hits = collections.defaultdict(list)
  for (task, _), choices in by_example.items():
    hits[task].append(max(choices)[2])
  accuracy = {t: 100.0 * sum(h) / len(h) for t, h in hits.items()}
  per_dataset = collections.defaultdict(list)
  for task, value in accuracy.items():
    per_dataset[dataset_of[task]].append(value)
  medians = {d: statistics.median(v) for d, v in per_dataset.items()}
  means = {d: sum(v) / len(v) for d, v in per_dataset.items()}
  return ({t: len(h) for t, h in hits.items()}, accuracy, medians, means,
          sum(medians.values()) / len(medians))


def _check_tables_recompute(output_dir):
  results = json.loads((output_dir / 'results.json').read_text())
  counts, accuracy, medians, means, overall = _recompute(
      output_dir / 'scores.jsonl')
  rank = results['rank_classification']
  assert set(rank['per_template']) == set(accuracy)
  for task, values in rank['per_template'].items():
    assert values['num_examples'] == counts[task]
    assert values['accuracy'] == pytest.approx(accuracy[task], abs=1e-9)
    assert rank['accuracy']['per_template'][task] == pytest.approx(
        accuracy[task], abs=1e-9)
  per_dataset = rank['accuracy']['per_dataset']
  assert set(per_dataset) == set(medians)
  for dataset, values in per_dataset.items():
    assert values['median_accuracy'] == pytest.approx(medians[dataset])
    assert values['mean_accuracy'] == pytest.approx(means[dataset])
  headline = rank['accuracy']['overall']
  assert headline['average_of_dataset_median_accuracy'] == pytest.approx(
      overall)
  assert headline['num_datasets'] == len(medians)
  # The CSV and the Markdown table carry the same numbers, named.
  with open(output_dir / 'results.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  [csv_overall] = [r for r in rows if r['statistic'] ==
                   'average_of_dataset_median_accuracy']
  assert float(csv_overall['value']) == pytest.approx(overall)
  markdown = (output_dir / 'results.md').read_text()
  assert 'median over templates of accuracy (%)' in markdown
  assert f'{overall:.2f}' in markdown
  return results


@pytest.fixture(scope='module')
def model_dir_eval(run):
  """Every checkpoint of the MODEL_DIR evaluated on the held-out mixture
  (data read once for both steps), with the routing analysis."""
  before = _tree_digest(run / 'model' / 'checkpoints')
  out = run / 'eval_model_dir'
  summaries = _evaluate(run / 'model', out, *MODEL_DIR_BINDINGS)
  return {'summaries': summaries, 'out': out, 'digest': before}


def test_trained_and_untrained_tables_recompute_from_scores(
    run, model_dir_eval):
  trained = model_dir_eval['summaries'][-1]
  [untrained] = _evaluate(run / 'base', run / 'eval_base')
  assert (trained['name'], trained['step']) == ('step_20', 20)
  assert (untrained['name'], untrained['step']) == ('base', None)
  tables = {}
  for summary in (trained, untrained):
    results = _check_tables_recompute(pathlib.Path(summary['output_dir']))
    assert results['settings']['length_normalize'] is False
    assert 'log p(token' in results['score']
    tables[summary['name']] = results['rank_classification']['accuracy']
  # 9 held-out templates of 3 datasets, 48 examples each.
  assert len(tables['base']['per_template']) == 9
  assert tables['base']['overall']['num_datasets'] == 3
  assert tables['step_20']['per_template'] != tables['base']['per_template']
  # The base checkpoint is what training started from: same frozen weights.
  base, _ = checkpoints.load_params(run / 'base')
  trained_params = ts.restore_train_params(
      str(run / 'model' / 'checkpoints' / '20'))
  flat_base = traverse_util.flatten_dict(base, sep='/')
  flat_trained = traverse_util.flatten_dict(trained_params, sep='/')
  for path, value in flat_base.items():
    if '_adapter/' not in path:
      np.testing.assert_array_equal(value, flat_trained[path])
  assert list((run / 'eval_base' / 'tensorboard' / 'base').glob(
      'events.out.tfevents.*'))


def test_model_dir_evaluates_each_step_once(run, model_dir_eval, capsys):
  out = model_dir_eval['out']
  first = model_dir_eval['summaries']
  assert [s['name'] for s in first] == ['step_10', 'step_20']
  _check_tables_recompute(out / 'step_10')
  for summary in first:
    assert any(f.endswith('.png') for f in summary['files']['routing'])
  assert list((out / 'tensorboard').glob('events.out.tfevents.*'))
  stamps = {p: p.stat().st_mtime_ns for p in out.rglob('*') if p.is_file()}
  capsys.readouterr()
  # The same checkpoints, also when reached through a link.
  (run / 'model_link').symlink_to(run / 'model')
  assert _evaluate(run / 'model_link', out, *MODEL_DIR_BINDINGS) == []
  printed = capsys.readouterr().out
  assert 'Skipping step_10' in printed and 'Skipping step_20' in printed
  # Other settings never mix with earlier results in one EVAL_OUTPUT_DIR.
  with pytest.raises(ValueError, match='other settings'):
    _evaluate(run / 'model', out, 'LENGTH_NORMALIZE = True')
  # A moved (here: copied) MODEL_DIR holds the same saves: still evaluated.
  moved = run / 'moved_model'
  shutil.copytree(run / 'model', moved)
  assert _evaluate(moved, out, *MODEL_DIR_BINDINGS) == []
  assert 'Skipping step_20' in capsys.readouterr().out
  # Another checkpoint under the same name (step_20) is refused: a step
  # saved at another time, here step 10's save in a step-20 directory (as a
  # run retrained into the same MODEL_DIR would leave).
  other = run / 'other_model' / 'checkpoints' / '20'
  shutil.copytree(run / 'model' / 'checkpoints' / '10', other)
  with pytest.raises(ValueError, match='differ in: checkpoint') as error:
    _evaluate(other, out)
  assert str(run / 'model' / 'checkpoints' / '20') in str(error.value)
  assert str(other) in str(error.value)
  assert 'UTC)' in str(error.value)  # says when each was saved
  assert 'another EVAL_OUTPUT_DIR' in str(error.value)
  with pytest.raises(ValueError, match=r'differ in: adapters\)'):
    _evaluate(run / 'model', out, 'ROUTER_TOP_K = 2')  # same shapes
  # Results without the identity (older mov-jax) are not taken on trust.
  legacy = json.loads((out / 'step_20' / 'results.json').read_text())
  del legacy['identity']
  (run / 'legacy' / 'step_20').mkdir(parents=True)
  (run / 'legacy' / 'step_20' / 'results.json').write_text(json.dumps(legacy))
  with pytest.raises(ValueError, match='cannot be verified'):
    _evaluate(run / 'model' / 'checkpoints' / '20', run / 'legacy')
  assert {p: p.stat().st_mtime_ns for p in out.rglob('*')
          if p.is_file()} == stamps
  assert _tree_digest(run / 'model' / 'checkpoints') == model_dir_eval['digest']


def test_generation_task_is_decoded_and_scored(run):
  out = run / 'eval_generation'
  [summary] = _evaluate(run / 'model' / 'checkpoints' / '20', out,
                        "MIXTURE_OR_TASK_NAME = 'word_copy_repeat_words'",
                        'MAX_EXAMPLES_PER_TASK = 12')
  metrics = summary['results']['generation']['word_copy_repeat_words']
  assert metrics['num_examples'] == 12
  records = [json.loads(l) for l in
             (out / 'step_20' / 'predictions.jsonl').read_text().splitlines()]
  assert len(records) == 12
  assert all(isinstance(r['prediction'], str) for r in records)
  assert records[0]['target'].strip() == 'cloud wind'  # the task's text
  hits = [r['prediction'].strip() == r['target'].strip() for r in records]
  assert metrics['exact_match'] == pytest.approx(100.0 * sum(hits) / 12)
  results = json.loads((out / 'step_20' / 'results.json').read_text())
  assert results['generation'] == summary['results']['generation']
  assert results['rank_classification'] == {}
  assert 'exact_match' in (out / 'step_20' / 'results.md').read_text()


def test_routing_analysis_heatmaps_and_statistics(run):
  cfg = _config(run / 'model', run / 'unused')
  params = eval_lib.restore_params(cfg, str(run / 'model'))  # latest step
  out = run / 'routing'
  files = eval_lib.routing_analysis(cfg, params, HELD_OUT, str(out),
                                    max_examples=16)
  pngs = [f for f in files if f.endswith('.png')]
  assert len(pngs) == 2
  for png in pngs:
    assert pathlib.Path(png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  stats = json.loads((out / 'routing.json').read_text())
  assert stats['num_examples'] == {t: 16 for t in HELD_OUT}
  assert set(stats['figures']) == {'encoder/layers_0/attention/key',
                                   'decoder/layers_1/mlp/mlp_hidden'}
  # 2+2 layers: 3 MoV sites per encoder layer, 5 per decoder layer.
  assert len(stats['sites']) == 16
  for site, per_task in stats['sites'].items():
    assert set(per_task) == set(HELD_OUT), site
    for values in per_task.values():
      p = np.asarray(values['expert_probability'])
      assert p.shape == (10,) and (p >= 0).all()
      assert p.sum() == pytest.approx(1.0, abs=1e-5)
      assert sum(values['expert_top1_fraction']) == pytest.approx(
          1.0, abs=1e-5)
      assert 0.0 <= values['mean_token_entropy'] <= math.log(10) + 1e-5
      assert (values['mean_token_entropy'] <=
              values['entropy_of_mean_probability'] + 1e-5)  # concavity


def _run_cli(args):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'mov_jax.eval'] + list(args),
                        env=env, capture_output=True, text=True, timeout=300)


def test_missing_macros_and_bad_paths_exit_2(run, capsys):
  flags = [f'--gin_file={f}' for f in EVAL_GIN]
  missing = _run_cli(flags)
  assert missing.returncode == 2, missing.stderr[-2000:]
  assert 'CHECKPOINT_PATH (set it with --gin.CHECKPOINT_PATH' in missing.stderr
  flags += [f'--gin_bindings={b}' for b in EVAL_BINDINGS]

  def main(*extra):
    gin.clear_config(clear_constants=True)
    code = eval_lib.main(flags + list(extra))
    return code, capsys.readouterr().err

  code, err = main(f"--gin.CHECKPOINT_PATH='{run / 'model'}'")
  assert code == 2
  assert 'EVAL_OUTPUT_DIR (set it with --gin.EVAL_OUTPUT_DIR' in err

  def evaluate(checkpoint, output_dir, *extra):
    return main(f"--gin.CHECKPOINT_PATH='{checkpoint}'",
                f"--gin.EVAL_OUTPUT_DIR='{output_dir}'", *extra)

  code, err = evaluate(run / 'nowhere', run / 'out')
  assert code == 2 and 'CHECKPOINT_PATH' in err and 'does not exist' in err
  step = run / 'model' / 'checkpoints' / '10'
  before = _tree_digest(run / 'model' / 'checkpoints')
  code, err = evaluate(step, step / 'eval')
  assert code == 2 and 'lies inside the checkpoint' in err
  code, err = evaluate(step, run / 'out', '--gin.NUM_EXPERTS=4')
  assert code == 2 and 'does not match the configured model' in err
  assert 'mov_scaling' in err and 'Nothing was changed' in err
  # An EVAL_OUTPUT_DIR that cannot be written to fails before any scoring.
  not_a_dir = run / 'not_a_dir'
  not_a_dir.write_text('kept')
  code, err = evaluate(step, not_a_dir)
  assert code == 2 and f'EVAL_OUTPUT_DIR {not_a_dir} cannot be created' in err
  assert 'not a directory' in err and not_a_dir.read_text() == 'kept'
  # A step whose array data was cut short (a partial copy) is named.
  damaged = run / 'damaged' / 'checkpoints' / '10'
  shutil.copytree(step, damaged)
  data_files = list((damaged / 'state').glob('ocdbt.process_*/d/*'))
  assert data_files
  for p in data_files:
    os.truncate(p, 10)
  kept = _tree_digest(damaged)
  code, err = evaluate(damaged, run / 'out')
  assert code == 2 and f'The checkpoint {damaged} is damaged (its arrays ' \
      'could not be read: ValueError: OUT_OF_RANGE: Error reading' in err, err
  assert _tree_digest(damaged) == kept
  assert _tree_digest(run / 'model' / 'checkpoints') == before
  assert not (run / 'out').exists()


def _macro_f1(predicted, gold):
  scores = []
  for cls in set(gold):
    tp = sum(p == g == cls for p, g in zip(predicted, gold))
    wrong = sum((p == cls) != (g == cls) for p, g in zip(predicted, gold))
    scores.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
  return 100.0 * sum(scores) / len(scores)


def test_f1_where_the_task_metric_asks_for_it(run):
  """A score-eval task registered with f1=True (as super_glue CB) gets macro
  F1 per template and per dataset, recomputable from scores.jsonl."""
  from mov_jax.tasks import mini_p3  # pylint: disable=g-import-not-at-top
  from mov_jax.tasks import p3  # pylint: disable=g-import-not-at-top
  from mov_jax.tasks import p3_format  # pylint: disable=g-import-not-at-top
  cfg = _config(run / 'model' / 'checkpoints' / '20', run / 'eval_f1',
                "MIXTURE_OR_TASK_NAME = 'cb_like_score_eval'",
                'MAX_EXAMPLES_PER_TASK = 24')
  source = 'product_sentiment_customer_happy_score_eval'
  task_dir = p3_format.find_task_dirs(
      str(mini_p3.LAYOUT_ROOTS[p3_format.TFRECORD]))[source]
  p3.register_tasks([p3.TaskSpec('cb_like_score_eval', task_dir,
                                 score_eval=True, f1=True)],
                    mini_p3.vocabulary(), reuse_tokens=True)
  [summary] = eval_lib.evaluate(cfg)
  rank = summary['results']['rank_classification']
  by_example = collections.defaultdict(list)
  for line in (run / 'eval_f1' / 'step_20' /
               'scores.jsonl').read_text().splitlines():
    row = json.loads(line)
    by_example[row['example']].append(
        (row['score'], -row['choice'], row['is_correct']))
  predicted = [-max(c)[1] for c in by_example.values()]
  gold = [-next(c for c in choices if c[2])[1]
          for choices in by_example.values()]
  f1 = rank['per_template']['cb_like_score_eval']['f1_macro']
  assert f1 == pytest.approx(_macro_f1(predicted, gold))
  assert rank['f1_macro']['per_dataset']['cb_like'][
      'median_f1_macro'] == pytest.approx(f1)
  markdown = (run / 'eval_f1' / 'step_20' / 'results.md').read_text()
  assert 'median over templates of macro F1 (%)' in markdown
