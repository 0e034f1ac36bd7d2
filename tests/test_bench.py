"""The benchmarks of bench/ run end to end, and count FLOPs correctly.

Tiny shapes only: these check what the benchmarks compute and write (fields,
model FLOPs, losses across meshes, packing's fill, scoring's agreement), not
how fast anything is.
"""

import json
import math
import os
import re
import subprocess
import sys
from unittest import mock

import jax
import pytest
from flax import traverse_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')
sys.path.insert(0, BENCH)
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import matmul_floor  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

SHAPES = ['--batch_size=4', '--input_length=32', '--target_length=8']


def _run(script, *flags, timeout=600):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, os.path.join(BENCH, script),
                         *flags], capture_output=True, text=True, env=env,
                        timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def _tiny_training(method, *, batch, inputs, targets):
  """The benchmarks' training of the tiny model, and a synthetic batch
  (NumPy) of these shapes."""
  cfg = common.train_config('tiny', method, batch_size=batch,
                            input_length=inputs, target_length=targets,
                            dtype='float32', dropout=0.0)
  training = common.Training(cfg)
  return training, common.synthetic_batch(batch, inputs, targets,
                                          cfg.network.config.vocab_size)


def _dot_flops(jaxpr) -> float:
  """2 * output size * contracted size of every dot_general, sub-jaxprs
  (jit, custom VJPs, scans) included."""
  return sum(count * dot.flops()
             for dot, count in matmul_floor.step_dots(jaxpr).items())


@pytest.mark.parametrize('method', ['full', 'ia3', 'lora', 'molora-10',
                                    'mov-10'])
def test_model_flops_equal_the_matmuls_of_the_traced_training_step(method):
  batch, inputs, targets = 2, 24, 8
  training, data = _tiny_training(method, batch=batch, inputs=inputs,
                                  targets=targets)
  cfg, data = training.cfg, training.place(data)
  with training.context():
    traced = jax.make_jaxpr(training.step_fn)(training.state, data)
  executed = _dot_flops(traced.jaxpr)
  base_trainable = any('_adapter/' not in path for path in
                       traverse_util.flatten_dict(training.state.trainable,
                                                  sep='/'))
  assert base_trainable == (method == 'full')
  model = train_step.train_step_flops(
      cfg.network.config, cfg.network.adapters, batch, inputs, targets,
      base_trainable)['total']
  # Not model FLOPs: AVERAGE_PER_SEQUENCE counts each target's segment
  # length with a [b, lt, lt] x [b, lt] einsum.
  model += 2.0 * batch * targets * targets
  assert executed == model


def test_train_step_benchmark_writes_the_records_the_issue_names(tmp_path):
  out = tmp_path / 'train_step.json'
  flags = ['--sizes=tiny', '--steps=2', '--matmuls=1', '--matmul_size=256',
           '--torch_reference=no', *SHAPES, f'--out={out}']
  _run('train_step.py', '--methods=full,ia3', *flags)
  # A second run adds its configuration to the first's (--append).
  log = _run('train_step.py', '--methods=mov-10', '--append', *flags)
  assert '[tiny mov-10] warm-up step 1/1:' in log  # progress, as it happens
  records = json.loads(out.read_text())
  steps = {r['method']: r for r in records if r['kind'] == 'train_step'}
  assert set(steps) == {'full', 'ia3', 'mov-10'}
  for r in steps.values():
    for field in ('size', 'method', 'step_time_median_s', 'tokens_per_s',
                  'flops_per_step', 'peak_fraction', 'peak_memory_mb',
                  'trainable_params', 'compile_s', 'step_time_min_s'):
      assert r[field] is not None and r[field] == r[field], field
    assert r['steps'] == 2 and r['step_time_min_s'] <= r['step_time_median_s']
    assert r['tokens_per_s'] == pytest.approx(
        4 * (32 + 8) / r['step_time_median_s'])
    assert 0 < r['peak_fraction'] and math.isfinite(r['loss_last'])
  # Full fine-tuning trains everything and does the weight gradients too.
  assert steps['full']['trainable_params'] == steps['full']['total_params']
  assert (steps['ia3']['trainable_params'] < steps['mov-10'][
      'trainable_params'] < steps['full']['trainable_params'])
  assert steps['full']['flops_per_step'] > steps['mov-10']['flops_per_step']
  goals = [r for r in records if r['kind'] == 'target']
  assert {g['method'] for g in goals} == {'mov-10 / ia3', 'mov-10 / full'}
  ratio = next(g for g in goals if g['method'] == 'mov-10 / ia3' and
               g['field'] == 'step_time_median_s')['value']
  assert ratio == pytest.approx(steps['mov-10']['step_time_median_s'] /
                                steps['ia3']['step_time_median_s'])
  # The README's tables come from bench/report.py, which also shows further
  # runs of a benchmark kept beside its file, under their names.
  report = _run('report.py', str(tmp_path))
  assert '| tiny | mov-10 | ' in report and '| tiny | mov-10 / ia3 |' in report
  assert report.count('| tiny | mov-10 | ') == 1
  (tmp_path / 'train_step_again.json').write_text(json.dumps(records))
  report = _run('report.py', str(tmp_path))
  assert report.count('| tiny | mov-10 | ') == 2
  assert report.index('`train_step_again.json`:') > report.index(
      '| tiny | mov-10 | ')


def test_train_step_benchmark_pools_several_processes_per_method(tmp_path):
  out = tmp_path / 'train_step.json'
  log = _run('train_step.py', '--sizes=tiny', '--methods=ia3,mov-10',
             '--processes=2', '--steps=2', '--matmuls=1',
             '--matmul_size=256', '--torch_reference=no', *SHAPES,
             f'--out={out}')
  # All four processes take turns, round the methods before a method's
  # second process.
  turns = [line for line in log.splitlines() if line.startswith('  step ')]
  assert len(turns) == 2
  for line in turns:
    names = re.findall(r'(\S+) [0-9.]+s', line.split(':', 1)[1])
    assert names == ['ia3#1', 'mov-10#1', 'ia3#2', 'mov-10#2']
  records = json.loads(out.read_text())
  steps = {r['method']: r for r in records if r['kind'] == 'train_step'}
  for r in steps.values():
    per_process = r['step_time_median_by_process_s']
    assert r['processes'] == 2 and r['steps'] == 4 and len(per_process) == 2
    # The pooled median lies between the processes' own.
    assert min(per_process) <= r['step_time_median_s'] <= max(per_process)
  goal = next(g for g in records if g['kind'] == 'target' and
              g['field'] == 'step_time_median_s')
  mov, ia3 = (steps[m]['step_time_median_by_process_s']
              for m in ('mov-10', 'ia3'))
  assert goal['value_by_process'] == pytest.approx(
      [mov[0] / ia3[0], mov[1] / ia3[1]])
  report = _run('report.py', str(tmp_path))
  assert 'in each of 2 processes' in report and 'process pairs' in report
  # Processes that ran one after another form no pairs.
  apart = [{**r, 'interleaved': False} for r in steps.values()]
  assert not any('value_by_process' in g for g in train_step.targets(apart))
  # Runs joined with --append can differ in processes per configuration.
  mixed = tmp_path / 'mixed'
  mixed.mkdir()
  one_process = {**steps['ia3'], 'size': 'small', 'processes': 1, 'steps': 2,
                 'step_time_median_by_process_s': [
                     steps['ia3']['step_time_median_s']]}
  (mixed / 'train_step.json').write_text(
      json.dumps([*steps.values(), one_process]))
  report = _run('report.py', str(mixed))
  assert ('processes per configuration: tiny ia3 2, tiny mov-10 2, '
          'small ia3 1') in report


@pytest.mark.parametrize('method', ['full', 'ia3', 'mov-10', 'lora',
                                    'molora-10'])
def test_torch_reference_computes_our_networks_logits(method):
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  from mov_jax import optim  # pylint: disable=g-import-not-at-top
  from mov_jax import train  # pylint: disable=g-import-not-at-top
  training, data = _tiny_training(method, batch=2, inputs=16, targets=8)
  cfg = training.cfg
  params = traverse_util.flatten_dict(optim.merge_params(
      training.state.trainable, training.state.frozen), sep='/')

  def our_logits(params):
    return np.asarray(cfg.network.apply(
        {'params': traverse_util.unflatten_dict(params, sep='/')},
        **train.network_inputs(data), enable_dropout=False))

  base = our_logits(params)
  # Every parameter (the base's of full fine-tuning too) away from its
  # initial value, where MoV and LoRA are the identity, so that each shows
  # in the logits. Small steps: large ones make attention so peaked that
  # float32 rounding alone moves MoLoRA's logits by 0.1.
  rng = np.random.default_rng(0)
  params = {k: np.asarray(v) + 0.05 * rng.standard_normal(v.shape).astype(
      np.float32) for k, v in params.items()}
  ours = our_logits(params)
  assert np.max(np.abs(ours - base)) > 0.05

  spec = torch_reference.spec_from_config(cfg)
  model, installed = torch_reference.build_model(spec)
  assert len(installed) == sum('_adapter/' in k and k.endswith(
      ('mov_scaling', 'lora_a')) for k in params)
  torch_reference.load_params(model, installed, params, cfg.network.config)
  assert torch_reference.count_trainable(model) == training.trainable_params
  with torch.no_grad():
    theirs = model.eval()(
        input_ids=torch.from_numpy(data['encoder_input_tokens']).long(),
        decoder_input_ids=torch.from_numpy(
            data['decoder_input_tokens']).long()).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=5e-5, rtol=1e-5)


def test_train_step_benchmark_runs_the_torch_reference_alongside(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  out = tmp_path / 'train_step.json'
  # torch:mov-10 as listed, torch:ia3 added (--torch_reference=auto).
  log = _run('train_step.py', '--sizes=tiny',
             '--methods=mov-10,ia3,torch:mov-10', '--steps=2',
             '--matmuls=1', '--matmul_size=256', *SHAPES, f'--out={out}')
  assert 'mov-10 / ia3' in log and 'the speed of torch:mov-10' in log
  records = json.loads(out.read_text())
  steps = {r['method']: r for r in records if r['kind'] == 'train_step'}
  for method in ('mov-10', 'ia3'):
    ours, ref = steps[method], steps['torch:' + method]
    # The same model: FLOPs, trainable parameters; the same peak matmul.
    for field in ('flops_per_step', 'trainable_params', 'matmul_peak_flops'):
      assert ref[field] == ours[field], field
    assert ref['reference_matmul_flops'] > 0 and ref['steps'] == 2
    assert math.isfinite(ref['loss_last']) and ref['peak_memory_mb'] > 0
  reference = {r['method']: r for r in records if r['kind'] == 'reference'}
  assert set(reference) == {'mov-10', 'ia3'}
  assert reference['ia3']['speedup'] == pytest.approx(
      steps['torch:ia3']['step_time_median_s'] /
      steps['ia3']['step_time_median_s'])
  ratio, = [r for r in records if r['kind'] == 'reference_ratio']
  assert ratio['method'] == 'torch:mov-10 / torch:ia3'
  report = _run('report.py', str(tmp_path))
  assert '| tiny | torch:mov-10 | ' in report
  assert 'Against the PyTorch reference' in report


def _usage_error(capsys, script, *argv):
  """What `script`'s main(argv) says as it stops with a usage error (exit
  2), in this process: flags are checked before anything is measured."""
  module = __import__(script)
  with pytest.raises(SystemExit) as stop:
    module.main(list(argv))
  assert stop.value.code == 2
  err = capsys.readouterr().err
  assert 'usage:' in err and 'Traceback' not in err
  return err


TINY = ['--sizes=tiny', '--torch_reference=no']


@pytest.mark.parametrize('script, argv, message', [
    ('train_step', [*TINY, '--methods=mov'],
     "--methods: 'mov': give mov and molora a positive expert count"),
    ('train_step', [*TINY, '--methods=ia3,adapter'],
     "--methods: Unknown method 'adapter': use full, ia3"),
    ('train_step', ['--sizes=huge', '--methods=ia3'],
     "--sizes: no model gin for 'huge'; give one of base, large, small, "
     'tiny'),
    ('train_step', [*TINY, '--methods=ia3', '--batch_size=0'],
     '--batch_size=0: must be at least 1.'),
    ('train_step', [*TINY, '--methods=ia3',
                    '--gin_bindings=network.T5Config.remat_polcy = 1'],
     "tiny ia3: Could not parse gin binding 'network.T5Config.remat_polcy"),
    # A binding applies to every configuration; ROUTER_TOP_K is MoV's only,
    # but a macro that none of them uses is a typo.
    ('train_step', [*TINY, '--methods=mov-10,ia3',
                    '--gin_bindings=ROUTER_TOP_KK = 2'],
     'no configuration of this run uses the macro(s) ROUTER_TOP_KK'),
    ('packing', ['--size=tiny', '--method=foo'],
     "--method: Unknown method 'foo'"),
    ('matmul_floor', ['--sizes=tiny', '--methods=foo'],
     "--methods: Unknown method 'foo'"),
    ('scaling', ['--meshes=1x1,foo'],
     "--meshes: 'foo' is not a DATAxMODEL mesh of positive integers"),
    ('scaling', ['--meshes=3x1', '--batch_size=8'],
     '--meshes: 3x1 splits the batch over 3 data-parallel devices, but '
     '--batch_size=8 is not divisible by 3'),
    # Caught from the shapes alone, before a 3-device worker starts.
    ('scaling', ['--meshes=1x3', '--methods=mov-10'],
     '--meshes: 1x3 does not fit --size=tiny mov-10: Parameter '),
])
def test_bad_flags_are_usage_errors_naming_them(capsys, script, argv,
                                                message):
  assert message in _usage_error(capsys, script, *argv)


def test_out_keeps_earlier_results_unless_told_and_needs_its_directory(
    capsys, tmp_path):
  out = tmp_path / 'train_step.json'
  recorded = '[{"kind": "train_step", "size": "tiny", "method": "ia3"}]\n'
  out.write_text(recorded)
  err = _usage_error(capsys, 'train_step', *TINY, '--methods=ia3',
                     f'--out={out}')
  assert (f'--out={out} already holds results: pass --overwrite to replace '
          'them, --append to add to its records' in err)
  for script, argv in (('matmul_floor', ['--sizes=tiny']),
                       ('packing', ['--size=tiny']), ('scaling', []),
                       ('scoring', [])):
    err = _usage_error(capsys, script, *argv, f'--out={out}')
    assert 'already holds results: pass --overwrite' in err, script
  # With --overwrite (as make bench passes) or --append, --out is fine and
  # the next check speaks.
  for flag in ('--overwrite', '--append'):
    err = _usage_error(capsys, 'train_step', *TINY, '--methods=foo', flag,
                       f'--out={out}')
    assert "Unknown method 'foo'" in err
  assert out.read_text() == recorded
  out.write_text('[{"kind": ')  # a run stopped while writing by hand
  err = _usage_error(capsys, 'train_step', *TINY, '--methods=ia3',
                     '--append', f'--out={out}')
  assert f'--append: {out} is not a JSON file of benchmark records' in err
  assert out.read_text() == '[{"kind": '
  missing = tmp_path / 'nodir' / 'x.json'
  err = _usage_error(capsys, 'train_step', *TINY, '--methods=ia3',
                     f'--out={missing}')
  assert f'the directory {missing.parent} does not exist' in err
  # report.py names the file it cannot read.
  out.rename(tmp_path / 'scaling.json')
  err = _usage_error(capsys, 'report', str(tmp_path))
  assert f'{tmp_path / "scaling.json"} is not valid JSON' in err


def test_torch_reference_needs_turns_with_jax_on_cpu():
  with pytest.raises(ValueError, match='list it after a JAX method'):
    train_step.main(['--sizes=tiny', '--methods=torch:ia3,ia3',
                     '--interleave=no', '--steps=1'])


def test_step_dots_counts_jit_scan_and_batched_matmuls():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def fn(x, w, a, b, s):
    y = jax.jit(jnp.matmul)(x, w)  # [4, 8] x [8, 16]
    z = jnp.einsum('bmk,bkn->bmn', a, b)  # batch 2 of [3, 5] x [5, 7]
    s, _ = jax.lax.scan(lambda c, _: (c @ c, None), s, length=3)  # [4, 4]
    return y, z, s

  args = (jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((2, 3, 5)),
          jnp.ones((2, 5, 7)), jnp.ones((4, 4)))
  dots = matmul_floor.step_dots(jax.make_jaxpr(fn)(*args).jaxpr)
  by_flops = {dot.flops(): count for dot, count in dots.items()}
  assert by_flops == {2 * 4 * 8 * 16: 1, 2 * 2 * 3 * 5 * 7: 1,
                      2 * 4 * 4 * 4: 3}
  batched = next(d for d in dots if d.lhs_shape == (2, 3, 5))
  assert 'batch [0]x[0]' in batched.describe()
  timing = matmul_floor.time_dot(batched, repeats=2)
  assert 0 < timing['best_s'] <= timing['traced_s']


def test_matmul_floor_benchmark_bounds_the_peak_fraction(tmp_path):
  out = tmp_path / 'matmul_floor.json'
  _run('matmul_floor.py', '--sizes=tiny', '--methods=ia3,mov-10',
       '--repeats=1', '--matmuls=1', '--matmul_size=256', '--slowest=3',
       *SHAPES, f'--out={out}')
  records = {r['method']: r for r in json.loads(out.read_text())}
  assert set(records) == {'ia3', 'mov-10'}
  for r in records.values():
    assert r['kind'] == 'matmul_floor'
    assert 0 < r['floor_s'] <= r['traced_layouts_s']
    assert r['distinct_matmuls'] <= r['matmuls']
    # Every matmul FLOP the model counts is in the traced step's matmuls.
    assert r['matmul_flops_per_step'] >= r['flops_per_step']
    assert r['max_peak_fraction'] == pytest.approx(
        r['flops_per_step'] / r['floor_s'] / r['matmul_peak_flops'])
    slowest = [s['seconds'] for s in r['slowest']]
    assert len(slowest) == 3 and slowest == sorted(slowest, reverse=True)
    assert sum(slowest) <= r['floor_s']
  # MoV adds its routers' and mixes' matmuls to IA3's.
  assert records['mov-10']['matmuls'] > records['ia3']['matmuls']
  assert (records['mov-10']['matmul_flops_per_step'] >
          records['ia3']['matmul_flops_per_step'])
  report = _run('report.py', str(tmp_path))
  assert '| tiny | mov-10 | ' in report and 'max peak_fraction' in report


_MALLOC_PROBE = """
import ctypes, sys
sys.path.insert(0, sys.argv[1])
import common
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 * 2 ** 20

def kept_after_free():
  # MB of a touched and freed 256 MB block that the process still holds.
  block = libc.malloc(SIZE)
  ctypes.memset(block, 1, SIZE)
  touched = common.rss_mb()
  libc.free(block)
  return round(common.rss_mb() - touched + SIZE / 2 ** 20)

before = kept_after_free()
with common.unpooled_malloc():
  inside = kept_after_free()
after = kept_after_free()
print(before, inside, after)
"""


def test_unpooled_malloc_hands_memory_back_only_inside():
  from mov_jax import host_memory  # pylint: disable=g-import-not-at-top
  env = host_memory.with_tunables({**os.environ})
  proc = subprocess.run([sys.executable, '-c', _MALLOC_PROBE, BENCH],
                        capture_output=True, text=True, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr
  before, inside, after = map(int, proc.stdout.split())
  # Tuned: the freed block stays in the heap; inside: it goes back to the
  # kernel at once; after: the tuned settings apply again.
  assert before > 200 and after > 200 and inside < 20, (before, inside,
                                                         after)


def test_append_replaces_only_the_configurations_measured_again(tmp_path):
  out = tmp_path / 'train_step.json'
  step = lambda size, method, t: {'kind': 'train_step', 'size': size,
                                  'method': method, 'step_time_median_s': t}
  out.write_text(json.dumps([step('tiny', 'ia3', 1.0),
                             step('tiny', 'mov-10', 9.0),
                             {'kind': 'target', 'size': 'tiny'}]))
  merged = train_step.merge_records(train_step.previous_records(str(out)),
                                    [step('tiny', 'mov-10', 1.2)])
  assert merged == [step('tiny', 'ia3', 1.0), step('tiny', 'mov-10', 1.2)]
  out.write_text('{}')
  with pytest.raises(ValueError, match='does not hold a list'):
    train_step.previous_records(str(out))


@pytest.mark.parametrize('processes', [1, 3])
def test_no_configuration_starts_past_the_deadline(capsys, processes):
  import argparse  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(interleave='auto', methods=['ia3', 'mov-10'],
                            processes=processes, torch_reference='auto')
  got = []
  train_step.measure_size(args, 'tiny', got.append, lambda: True)
  assert not got
  # Checked per configuration, not per process: all of them or none.
  out = capsys.readouterr().out
  assert out.count('not started: past --deadline_s') == 2
  assert '[tiny mov-10] not started' in out


def test_auto_torch_reference_skips_what_it_does_not_implement(capsys):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  common.add_shape_flags(parser)
  args = parser.parse_args(SHAPES)
  args.__dict__.update(interleave='yes', torch_reference='auto', warmup=1,
                       processes=1,
                       matmul_size=256, methods=['mov-10', 'ia3'])

  def planned(gin_bindings):
    args.gin_bindings = gin_bindings
    train_step.measure_size(args, 'tiny', pytest.fail, lambda: True)
    return capsys.readouterr().out

  # Past the deadline nothing starts, but each planned reference is named.
  out = planned([])
  for method in ('mov-10', 'ia3', 'torch:mov-10', 'torch:ia3'):
    assert f'[tiny {method}] not started: past --deadline_s' in out
  # Top-k routing has no PyTorch version: the reference is skipped, saying
  # why; IA3 has no router, so its reference still runs.
  out = planned(['ROUTER_TOP_K = 2'])
  assert ('[tiny torch:mov-10] skipped: PyTorch reference: site' in out
          and 'only soft token-level routing' in out)
  assert '[tiny torch:ia3] not started' in out
  args.dtype = 'bfloat16'
  out = planned([])
  assert out.count('skipped: PyTorch reference: float32 only') == 2
  # Without PyTorch (installed without the test extra) the run goes on
  # without its references, saying how to install them.
  args.dtype = 'float32'
  with mock.patch.dict(sys.modules, {'torch_reference': None}):
    out = planned([])
  assert out.count("needs torch and transformers") == 2
  assert "pip install -e '.[test]'" in out
  assert '[tiny mov-10] not started' in out


def test_peak_goal_is_the_small_model_on_cpu_and_large_on_accelerators():
  def record(size, backend):
    return {'kind': 'train_step', 'size': size, 'method': 'mov-10',
            'backend': backend, 'peak_fraction': 0.6,
            'step_time_median_s': 1.0}
  goals = train_step.targets([record('small', 'cpu'), record('large', 'cpu')])
  assert [(g['size'], g['goal'], g['met']) for g in goals] == [
      ('small', '>= 0.75', False)]
  goals = train_step.targets([record('small', 'gpu'), record('large', 'gpu')])
  assert [(g['size'], g['goal'], g['met']) for g in goals] == [
      ('large', '>= 0.5', True)]


def test_the_training_step_needs_no_tensorflow():
  # Accelerator images rarely have TensorFlow: only data and file I/O use it.
  code = ('import sys, mov_jax.train, mov_jax.network; '
          'print(sorted(m for m in ("tensorflow", "seqio", "clu") '
          'if m in sys.modules))')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, cwd=ROOT, timeout=300, check=True)
  assert proc.stdout.strip() == '[]'


def test_scaling_benchmark_gives_the_single_device_losses(tmp_path):
  out = tmp_path / 'scaling.json'
  _run('scaling.py', '--size=tiny', '--methods=mov-10',
       '--meshes=1x1,2x1,1x2', '--steps=2', *SHAPES, f'--out={out}')
  records = json.loads(out.read_text())
  assert {r['mesh'] for r in records} == {'1x1', '2x1', '1x2'}
  for r in records:
    assert r['device_count'] == r['devices'] == (r['data_parallel'] *
                                                 r['model_parallel'])
    assert len(r['losses']) == 3  # the warm-up step and two timed ones
    assert r['max_abs_loss_diff_vs_1x1'] < 1e-4


def test_packing_benchmark_fills_more_of_the_batch(tmp_path):
  out = tmp_path / 'packing.json'
  _run('packing.py', '--size=tiny', '--method=mov-10', '--steps=2',
       '--batches=2', '--batch_size=4', '--input_length=64',
       '--target_length=16', '--input_median=20', f'--out={out}')
  modes = {r['mode']: r for r in json.loads(out.read_text())}
  packed, padded = modes['packed'], modes['padded']
  assert packed['examples_per_step'] > padded['examples_per_step'] == 4
  assert packed['fill_fraction'] > padded['fill_fraction']
  assert packed['speedup_real_tokens'] == pytest.approx(
      packed['real_tokens_per_s'] / padded['real_tokens_per_s'])


def test_scoring_benchmark_agrees_with_tiled_scoring(tmp_path):
  out = tmp_path / 'scoring.json'
  _run('scoring.py', '--gin_file=models/t5_1_1_tiny.gin', '--batch_size=2',
       '--input_length=32', '--repeats=1', '--warmup=0', f'--out={out}')
  records = {r['method']: r for r in json.loads(out.read_text())}
  assert set(records) == {'tiled', 'encode_once'}
  assert records['encode_once']['max_abs_diff'] < 1e-3
  assert records['tiled']['speedup'] == pytest.approx(1.0)


def test_mov_site_benchmark_times_every_site_three_ways(tmp_path):
  from mov_jax import kernels  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'mov_site.json'
  _run('mov_site.py', '--gin_file=models/t5_1_1_tiny.gin', '--experts=4',
       '--batch_size=2', '--input_length=16', '--target_length=8',
       '--repeats=1', f'--out={out}')
  records = json.loads(out.read_text())
  assert {r['method'] for r in records} == {'ia3', 'mov-4 jax', 'mov-4 fused'}
  assert len({r['site'] for r in records}) == 4
  shapes = {r['site']: r['shape'] for r in records}
  assert shapes['encoder/cross-attention key, value'] == [2, 16, 4, 16]
  assert shapes['decoder FFN hidden'] == [2, 8, 128]
  for r in records:
    assert r['kind'] == 'mov_site' and 0 < r['min_ms'] <= r['median_ms']
    # Only the fused variant runs the kernel, where it can be built.
    assert r['fused_kernel'] == (r['method'] == 'mov-4 fused' and
                                 kernels.cpu_kernels_available())
  report = _run('report.py', str(tmp_path))
  assert 'One MoV site, forward and backward' in report
  assert '| decoder FFN hidden | mov-4 fused |' in report
