"""The training binary: learning, sharding, resumption, export, errors."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import List

import jax
import numpy as np
import pytest
from flax import traverse_util

from mov_jax import checkpoints
from mov_jax import gin_utils
from mov_jax import train
from test_checkpoints import _random_params

# A tiny MoV run on mini-P3 (runs/demo.gin) with short sequences.
FAST = ['--gin_file=runs/demo.gin', '--gin.TASK_FEATURE_LENGTHS='
        "{'inputs': 48, 'targets': 8}", '--gin.BATCH_SIZE=8',
        '--gin.LOG_PERIOD=1', '--gin.CHECKPOINT_PERIOD=3']


def _run_cli(args, env_extra=None, timeout=600):
  """Runs `python -m mov_jax.train` in a fresh process."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  env.update(env_extra or {})
  return subprocess.run([sys.executable, '-m', 'mov_jax.train'] + list(args),
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


def _losses(model_dir):
  lines = pathlib.Path(model_dir, 'train_metrics.jsonl').read_text()
  rows = [json.loads(l) for l in lines.splitlines()]
  return {r['step']: r['loss'] for r in rows}


def _tree_digest(path):
  digest = hashlib.sha256()
  for p in sorted(pathlib.Path(path).rglob('*')):
    if p.is_file():
      digest.update(str(p.relative_to(path)).encode())
      digest.update(p.read_bytes())
  return digest.hexdigest()


def _train_in_process(model_dir, *bindings, stop_after=None):
  gin_utils.parse_gin(['runs/demo.gin'], [
      f"MODEL_DIR = '{model_dir}'",
      "TASK_FEATURE_LENGTHS = {'inputs': 48, 'targets': 8}",
      'BATCH_SIZE = 8', 'LOG_PERIOD = 1', 'CHECKPOINT_PERIOD = 3',
      *bindings])
  import mov_jax.tasks  # pylint: disable=g-import-not-at-top
  mov_jax.tasks.setup_from_gin()
  return train.train(train.config_from_gin(), stop_after=stop_after)


def test_mov_loss_falls_and_outputs_are_written(tmp_path):
  summary = _train_in_process(tmp_path / 'run', 'TRAIN_STEPS = 12')
  losses = _losses(tmp_path / 'run')
  assert sorted(losses) == list(range(1, 13))
  first = np.mean([losses[s] for s in (1, 2, 3)])
  last = np.mean([losses[s] for s in (10, 11, 12)])
  assert last < 0.8 * first, losses
  rows = [json.loads(l) for l in
          (tmp_path / 'run' / 'train_metrics.jsonl').read_text().splitlines()]
  # Router statistics per site, learning rate and throughput are logged.
  assert {'learning_rate', 'tokens_per_s', 'accuracy'} <= set(rows[-1])
  assert any(k.startswith('router/entropy/encoder/attention/key')
             for k in rows[-1])
  assert any(k.startswith('router/expert_probability/decoder/mlp/mlp_hidden')
             for k in rows[-1])
  assert list((tmp_path / 'run' / 'train').glob('events.out.tfevents.*'))
  assert summary['step'] == 12
  assert os.path.isdir(summary['adapter_export'])


def test_resumed_run_equals_uninterrupted_run(tmp_path):
  full = tmp_path / 'full'
  _train_in_process(full, 'TRAIN_STEPS = 6', 'DROPOUT_RATE = 0.1')
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  split = tmp_path / 'split'
  _train_in_process(split, 'TRAIN_STEPS = 6', 'DROPOUT_RATE = 0.1',
                    stop_after=4)  # "killed" after step 4 (saved at 3 and 4)
  assert sorted(_losses(split)) == [1, 2, 3, 4]
  gin.clear_config(clear_constants=True)
  summary = _train_in_process(split, 'TRAIN_STEPS = 6', 'DROPOUT_RATE = 0.1')
  assert summary['step'] == 6
  assert _losses(split) == _losses(full)  # exact, step for step


_COLLECTIVE = re.compile(r'\b(all-reduce|all-gather|reduce-scatter|all-to-all|'
                         r'collective-permute)(-start)?\(')


def _collectives_under_conditionals(hlo: str) -> List[str]:
  """The collectives of an HLO module's text that run inside a conditional's
  branch (directly or in a computation a branch calls)."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r'(?:ENTRY )?%([\w.-]+) .*\{$', line)
    if header:
      name = header.group(1)
      bodies[name] = []
    elif line == '}':
      name = None
    elif name is not None:
      bodies[name].append(line)

  def called(line):
    groups = re.findall(r'(?:calls|to_apply|body|condition|[a-z_]*'
                        r'computations?)=\{?((?:%[\w.-]+(?:, )?)+)', line)
    return [c for g in groups for c in re.findall(r'(?<=%)[\w.-]+', g)]

  found, seen = [], set()
  todo = [c for body in bodies.values() for line in body
          if ' conditional(' in line for c in called(line)]
  while todo:
    computation = todo.pop()
    if computation in seen:
      continue
    seen.add(computation)
    for line in bodies[computation]:
      if _COLLECTIVE.search(line):
        found.append(line.strip()[:120])
      todo += called(line)
  return found


def test_sharded_8_devices_equal_one_device(tmp_path):
  """Also: the partitioned step runs no collective inside a conditional.
  XLA:CPU does not order a conditional's collectives with the others, so
  two devices can wait in different all-reduces for good (a hang seen in
  CI with a 2x1 mesh: one device in a router statistics conditional's
  all-reduce, the other in the loss normalizer's)."""
  args = FAST + ['--gin.TRAIN_STEPS=4', '--gin.DROPOUT_RATE=0.1']
  one = _run_cli(args + [f"--gin.MODEL_DIR='{tmp_path / 'one'}'"])
  assert one.returncode == 0, one.stderr[-3000:]
  dump = tmp_path / 'hlo'
  eight = _run_cli(
      args + [f"--gin.MODEL_DIR='{tmp_path / 'eight'}'",
              '--gin.MODEL_PARALLEL=2'],
      env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=8 '
                 f'--xla_dump_to={dump} --xla_dump_hlo_as_text '
                 '--xla_dump_hlo_module_re=.*train_step.*'})
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert 'on 8 cpu device(s)' in eight.stdout
  a, b = _losses(tmp_path / 'one'), _losses(tmp_path / 'eight')
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a, b)
  [step_hlo] = dump.glob('*train_step*after_optimizations.txt')
  hlo = step_hlo.read_text()
  assert _COLLECTIVE.search(hlo)  # partitioned: the gradients' all-reduces
  assert _collectives_under_conditionals(hlo) == []


def test_a_mesh_that_cannot_shard_a_parameter_is_named_before_compiling():
  import gin  # pylint: disable=g-import-not-at-top
  from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  gin_utils.parse_gin(['runs/demo.gin'], [])
  cfg = train.config_from_gin()
  gin.clear_config(clear_constants=True)
  variables = jax.eval_shape(train.variables_initializer(cfg),
                             jax.random.PRNGKey(0))
  # Tiny: 4 heads x 16, mlp 128, vocab 32128: model-parallel 2 and 4
  # divide every sharded dimension (data-parallel shards no parameter).
  for data, model in ((1, 1), (3, 1), (8, 1), (1, 2), (2, 4)):
    partitioning.check_shardable(variables, {'data': data, 'model': model},
                                 cfg.mesh.rules)
  with pytest.raises(ValueError) as error:
    partitioning.check_shardable(variables, {'data': 1, 'model': 3},
                                 cfg.mesh.rules)
  message = str(error.value)
  with pytest.raises(ValueError, match=r'its dimension 0 \(heads, size 4\) '
                     'is split over mesh axis model=8'):
    partitioning.check_shardable(variables, {'data': 1, 'model': 8},
                                 cfg.mesh.rules)
  assert "(logical axes ('embed', 'joined_kv'))" in message
  assert ('is split over mesh axis model=3, which does not divide 64. Use a '
          'model_parallel that divides') in message
  # The same check guards the shardings training and evaluation build.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'model'))
  shardings = partitioning.param_shardings(variables, mesh, cfg.mesh.rules)
  assert (traverse_util.flatten_dict(shardings).keys() ==
          traverse_util.flatten_dict(variables['params']).keys())


def test_adapter_export_is_small_and_restores_the_trained_model(tmp_path):
  """MoV-10 on T5 v1.1 small: adapter export < 1% of the full checkpoint."""
  import gin  # pylint: disable=g-import-not-at-top
  base_dir = tmp_path / 'base'
  gin_utils.parse_gin(['models/t5_1_1_small.gin'],
                      ["ACTIVATION_DTYPE = 'float32'"])
  base_net = gin_utils.macro_value('NETWORK')
  # Drawn in NumPy: initialising T5-small in JAX takes 10-20 s more.
  base_params = _random_params(base_net.config, seed=3)
  checkpoints.save_params(base_dir, base_params, base_net.config)
  gin.clear_config(clear_constants=True)
  gin_utils.parse_gin(['models/t5_1_1_small.gin', 'methods/mov.gin',
                       'runs/finetune.gin'], [
      f"MODEL_DIR = '{tmp_path / 'run'}'", "MIXTURE_OR_TASK_NAME = "
      "'mini_p3_train'", "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 4}",
      'BATCH_SIZE = 2', 'TRAIN_STEPS = 2', 'CHECKPOINT_PERIOD = 2',
      "ACTIVATION_DTYPE = 'float32'", 'DROPOUT_RATE = 0.0',
      f"INITIAL_CHECKPOINT_PATH = '{base_dir}'", 'LEARNING_RATE = 0.1'])
  import mov_jax.tasks  # pylint: disable=g-import-not-at-top
  mov_jax.tasks.setup_from_gin()
  cfg = train.config_from_gin()
  summary = train.train(cfg)
  size = lambda p: sum(f.stat().st_size for f in pathlib.Path(p).rglob('*')
                       if f.is_file())
  adapter_bytes, full_bytes = size(summary['adapter_export']), size(
      summary['checkpoint'])
  assert adapter_bytes < 0.01 * full_bytes, (adapter_bytes, full_bytes)
  # Base + adapter = the trained model, exactly.
  base, _ = checkpoints.load_params(base_dir)
  adapter, _ = checkpoints.load_params(summary['adapter_export'])
  flat_adapter = traverse_util.flatten_dict(adapter, sep='/')
  assert flat_adapter and all('_adapter/' in k for k in flat_adapter)
  assert any(not np.allclose(v, 1.0) for k, v in flat_adapter.items()
             if k.endswith('mov_scaling'))  # training moved the experts
  merged = traverse_util.unflatten_dict(
      {**traverse_util.flatten_dict(base, sep='/'), **flat_adapter}, sep='/')
  trained_params = _trained_params(summary)
  assert (set(traverse_util.flatten_dict(merged, sep='/')) ==
          set(traverse_util.flatten_dict(trained_params, sep='/')))
  batch = {'encoder_input_tokens': np.arange(2, 34, dtype=np.int32)[None],
           'decoder_input_tokens': np.array([[0, 5, 6, 7]], np.int32),
           'decoder_target_tokens': np.array([[5, 6, 7, 1]], np.int32)}
  logits = jax.jit(lambda p: cfg.network.apply({'params': p}, **batch,
                                               enable_dropout=False))
  np.testing.assert_array_equal(np.asarray(logits(trained_params)),
                                np.asarray(logits(merged)))


def _trained_params(summary):
  """Full parameters (trainable + frozen) of the final checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mov_jax import optim  # pylint: disable=g-import-not-at-top
  state = ocp.StandardCheckpointer().restore(
      os.path.join(summary['checkpoint'], 'state'))
  return optim.merge_params(state['trainable'], state['frozen'])


def _main(capsys, *args):
  """`train.main(args)` in this process: the binary, less a process start."""
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  code = train.main(list(args))
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_bad_configurations_fail_clearly_and_leave_checkpoints_alone(
    tmp_path, capsys):
  model_dir = tmp_path / 'run'
  ok = _run_cli(FAST + [f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=3'])
  assert ok.returncode == 0, ok.stderr[-3000:]
  before = _tree_digest(model_dir / 'checkpoints')
  run = FAST + [f"--gin.MODEL_DIR='{model_dir}'"]
  # A typo in a binding.
  code, _, err = _main(capsys, *run,
                       '--gin_bindings=train.TrainConfig.batch_sizee = 4')
  assert code == 2 and 'batch_sizee' in err
  # A missing required macro.
  code, _, err = _main(capsys, '--gin_file=models/t5_1_1_tiny.gin',
                       '--gin_file=methods/mov.gin',
                       '--gin_file=runs/finetune.gin')
  assert code == 2
  assert 'MODEL_DIR (set it with --gin.MODEL_DIR' in err, err[-2000:]
  # Bad lengths and loss normaliser fail before MODEL_DIR is created.
  fresh = tmp_path / 'fresh'
  code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{fresh}'",
                       "--gin.TASK_FEATURE_LENGTHS={'inputs': -4, "
                       "'targets': 8}", "--gin.LOSS_NORMALIZING_FACTOR='x'")
  assert code == 2 and 'values must be positive integers' in err, err
  assert 'LOSS_NORMALIZING_FACTOR must be' in err and not fresh.exists()
  # An unknown mixture, too.
  code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{fresh}'",
                       "--gin.MIXTURE_OR_TASK_NAME='mini_p3_trian'")
  assert code == 2 and 'mini_p3_trian' in err and not fresh.exists()
  # An adapter trained with other adapter settings: the method is named, and
  # no (empty) checkpoints/ is left behind.
  code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{fresh}'",
                       f"--gin.ADAPTER_CHECKPOINT_PATH='{model_dir}/adapter'",
                       '--gin.NUM_EXPERTS=30')
  assert code == 2 and 'Only adapter parameters differ' in err, err
  assert 'NUM_EXPERTS' in err and not (fresh / 'checkpoints').exists()
  # A MODEL_DIR that cannot be created.
  code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{model_dir}/"
                       "train_metrics.jsonl/x'")
  assert code == 2 and 'cannot be created or written to' in err, err
  # Resuming a MODEL_DIR with a model of other shapes (30 experts, not 10).
  code, _, err = _main(capsys, *run, '--gin.TRAIN_STEPS=6',
                       '--gin.NUM_EXPERTS=30')
  assert code == 2
  assert 'does not match the configured model' in err
  assert 'mov_scaling' in err and 'Nothing was changed' in err
  # ... with another optimizer (orbax would suggest a partial restore).
  code, _, err = _main(capsys, *run, '--gin.TRAIN_STEPS=6',
                       "--gin.OPTIMIZER='adamw'")
  assert code == 2 and 'different optimizer configuration' in err, err
  # ... with another input pipeline (TensorFlow would fail in the restore or
  # at the first batch).
  code, _, err = _main(capsys, *run, '--gin.TRAIN_STEPS=6',
                       '--gin.BATCH_SIZE=4', '--gin.PACKING=False')
  assert code == 2, err
  assert 'BATCH_SIZE: saved 8, now 4; PACKING: saved True, now False' in err
  # TRAIN_STEPS already reached: said, and nothing trained or exported (nor
  # an empty TensorBoard events file written).
  events = sorted((model_dir / 'train').iterdir())
  code, out, _ = _main(capsys, *run, '--gin.TRAIN_STEPS=2')
  assert code == 0 and 'already at step 3 >= TRAIN_STEPS=2' in out, out
  assert 'nothing was trained' in out and 'Adapter (' not in out
  assert _tree_digest(model_dir / 'checkpoints') == before
  assert sorted((model_dir / 'train').iterdir()) == events

  # A damaged latest checkpoint is named, and left where it is.
  broken = tmp_path / 'broken'
  shutil.copytree(model_dir, broken)
  shutil.rmtree(broken / 'checkpoints' / '3' / 'dataset')
  code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{broken}'",
                       '--gin.TRAIN_STEPS=6')
  assert code == 2 and f'{broken}/checkpoints/3 is incomplete' in err, err
  assert 'dataset/ is missing' in err and 'Move it out of' in err
  shutil.rmtree(broken / 'checkpoints' / '3' / 'state')
  code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{broken}'",
                       '--gin.TRAIN_STEPS=6')
  assert code == 2 and 'state/ is missing' in err, err
  assert (broken / 'checkpoints' / '3' / 'metadata').exists()

  # A step that looks complete but whose array data is cut short (a disk
  # that filled up, a partial copy): the array and the file are named.
  truncated = tmp_path / 'truncated'
  shutil.copytree(model_dir, truncated)
  data_files = [p for p in (truncated / 'checkpoints' / '3' / 'state').rglob(
      'ocdbt.process_*/d/*') if p.is_file()]
  assert data_files
  for p in data_files:
    os.truncate(p, 10)
  kept = _tree_digest(truncated)
  code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{truncated}'",
                       '--gin.TRAIN_STEPS=6')
  assert code == 2, err
  assert (f'{truncated}/checkpoints/3 is incomplete or damaged (its arrays '
          'could not be read: ValueError: OUT_OF_RANGE: Error reading') in err
  assert 'Move it out of' in err and _tree_digest(truncated) == kept

  # A checkpoint of before the pipeline settings were saved still resumes;
  # another pipeline fails clearly, in the restore or at the first batch.
  old = tmp_path / 'old'
  shutil.copytree(model_dir, old)
  (old / 'checkpoints' / '3' / 'metadata' / 'metadata').write_text(json.dumps(
      {'batches_consumed': 3, 'step': 3,
       'mixture_or_task_name': 'mini_p3_train'}))
  for change in ('--gin.PACKING=False', '--gin.BATCH_SIZE=4'):
    code, _, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{old}'",
                         '--gin.TRAIN_STEPS=6', change)
    assert code == 2, (change, err)
    assert 'does not fit the configured data pipeline' in err, (change, err)
  # A resume with other settings keeps the previous config.gin.
  code, out, err = _main(capsys, *FAST, f"--gin.MODEL_DIR='{old}'",
                         '--gin.TRAIN_STEPS=4', '--gin.LOG_PERIOD=2')
  assert code == 0, err
  assert 'settings changed' in out and 'Resumed from' in out
  assert 'LOG_PERIOD = 1' in (old / 'config.step_3.gin').read_text()
  assert 'LOG_PERIOD = 2' in (old / 'config.gin').read_text()
  assert sorted(_losses(old)) == [1, 2, 3, 4]


def test_two_processes_train_and_resume_with_jax_distributed(tmp_path):
  """Multi-host code paths: 2 local processes x 4 CPU devices, 4 x 2 mesh."""
  launcher = pathlib.Path(__file__).parents[1] / 'launch' / 'local.py'
  model_dir = tmp_path / 'mh'

  def run(steps):
    return subprocess.run(
        [sys.executable, str(launcher), '--num_processes=2',
         '--devices_per_process=4', '--timeout=500', '--', sys.executable,
         '-m', 'mov_jax.train'] + FAST + [
             f"--gin.MODEL_DIR='{model_dir}'", f'--gin.TRAIN_STEPS={steps}',
             '--gin.MODEL_PARALLEL=2',
             '--gin_bindings=train.TrainConfig.export_adapter = False'],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))

  first = run(3)
  assert first.returncode == 0, first.stdout[-3000:]
  assert 'on 8 cpu device(s)' in first.stdout
  # Each host saved its own input-pipeline position.
  dataset_dir = model_dir / 'checkpoints' / '3' / 'dataset'
  assert {p.name.split('.')[0] for p in dataset_dir.iterdir()} >= {
      'iterator-0', 'iterator-1'}
  second = run(5)
  assert second.returncode == 0, second.stdout[-3000:]
  assert 'Resumed from' in second.stdout and '(step 3,' in second.stdout
  losses = _losses(model_dir)
  assert sorted(losses) == [1, 2, 3, 4, 5]
  assert all(np.isfinite(v) for v in losses.values())


def test_local_launcher_refuses_what_it_cannot_run():
  launcher = pathlib.Path(__file__).parents[1] / 'launch' / 'local.py'

  def launch(*argv):
    return subprocess.run([sys.executable, str(launcher), *argv],
                          capture_output=True, text=True, timeout=60)

  none = launch('--num_processes=0', '--', sys.executable, '-c', 'print(1)')
  assert none.returncode == 2 and not none.stdout
  assert 'error: --num_processes=0: must be positive.' in none.stderr
  missing = launch('--num_processes=1', '--', 'nonexistent_binary_xyz')
  assert missing.returncode == 2 and 'Traceback' not in missing.stderr
  assert ("error: cannot start 'nonexistent_binary_xyz': No such file or "
          'directory' in missing.stderr)


def test_a_computation_too_big_for_a_device_fails_before_it_runs():
  from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
  limit = partitioning.device_memory_bytes()
  side = int((2 * limit / 4) ** 0.5) + 1  # a float32 output of twice that
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  too_big = jax.jit(lambda x: jnp.broadcast_to(x, (side, side)) * 2).lower(
      jnp.float32(1)).compile()  # compiled only: nothing is allocated
  with pytest.raises(ValueError, match=r'GiB per device .* has .* GiB\. '
                     'Use a smaller BATCH_SIZE'):
    partitioning.check_fits_in_memory(too_big, 'This step',
                                      'Use a smaller BATCH_SIZE.')
  fits = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
  partitioning.check_fits_in_memory(fits, 'This step', '')


def test_router_statistics_are_computed_only_on_logged_steps(tmp_path,
                                                            monkeypatch):
  """The training step computes the router statistics on the steps whose
  metrics the loop logs (the first, every LOG_PERIOD, the last), equal to
  what the routers report on their own, and zeros on the others; the loss
  and the update are the same either way."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import gin  # pylint: disable=g-import-not-at-top
  from mov_jax import models  # pylint: disable=g-import-not-at-top
  from mov_jax import optim  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  gin_utils.parse_gin(
      ['models/t5_1_1_tiny.gin', 'methods/mov.gin', 'runs/finetune.gin'],
      [f"MODEL_DIR = '{tmp_path}'", 'BATCH_SIZE = 2', 'LOG_PERIOD = 3',
       'TRAIN_STEPS = 8', 'NUM_EMBEDDINGS = 101',
       "TASK_FEATURE_LENGTHS = {'inputs': 12, 'targets': 6}"])
  cfg = train.config_from_gin()
  assert [d for d in range(1, 9) if train.logs_metrics(cfg, d)] == [1, 3, 6,
                                                                    8]
  rng = np.random.default_rng(0)
  targets = rng.integers(2, 101, (2, 6)).astype(np.int32)
  batch = {'encoder_input_tokens': rng.integers(2, 101, (2, 12)).astype(
               np.int32),
           'decoder_target_tokens': targets,
           'decoder_input_tokens': np.asarray(models.shift_right(targets)),
           'decoder_loss_weights': np.ones_like(targets)}
  tx = cfg.optimizer.make()
  mesh = cfg.mesh.make_mesh()

  def run(steps):
    with jax.set_mesh(mesh), nn.logical_axis_rules(cfg.mesh.rules):
      layout = train.state_layout(cfg, tx, mesh)
      state = layout.fresh_state(layout.initial_params())
      step_fn = jax.jit(train.make_train_step(
          cfg, tx, cfg.optimizer.learning_rate_fn()))
      history = []
      for _ in range(steps):
        before = state
        state, metrics = step_fn(state, batch)
        history.append((before, jax.device_get(metrics)))
    return state, history

  state, history = run(3)
  router_keys = [k for k in history[0][1] if k.startswith('router/')]
  assert any(k.startswith('router/entropy/') for k in router_keys)
  for done, (before, metrics) in enumerate(history, start=1):
    if done == 2:  # not logged: not computed
      assert all(np.all(metrics[k] == 0) for k in router_keys)
      continue
    # Logged: what the routers report when applied on their own.
    params = optim.merge_params(before.trainable, before.frozen)
    _, sown = cfg.network.apply(
        {'params': params}, **train.network_inputs(batch),
        enable_dropout=True, mutable=['intermediates'],
        rngs={'dropout': jax.random.fold_in(before.rng, before.step)})
    expected = train.router_statistics(sown['intermediates'])
    assert sorted(expected) == sorted(router_keys)
    for k in router_keys:
      np.testing.assert_allclose(metrics[k], expected[k], rtol=1e-5,
                                 atol=1e-6)
      assert np.all(np.isfinite(metrics[k])) and np.any(metrics[k] != 0)

  # The same three steps computing the statistics every time.
  monkeypatch.setattr(train, 'logs_metrics', lambda cfg, done: done >= 0)
  always, always_history = run(3)
  for (_, a), (_, b) in zip(history, always_history):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(state.trainable),
                  jax.tree_util.tree_leaves(always.trainable)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  gin.clear_config(clear_constants=True)
