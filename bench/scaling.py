"""Benchmark: the training step on 1, 2, 4 and 8 simulated devices.

    python bench/scaling.py [--size=tiny] [--methods=mov-10,full] \
        [--meshes=1x1,2x1,1x2,4x1,2x2,8x1,4x2,2x4] [--steps=5] \
        [--out=scaling.json]

Each device count runs in its own process with
`--xla_force_host_platform_device_count=N` (CPU devices: the host's cores are
shared, so this measures the partitioning's overhead and checks its
numerics, not a speed-up). For every `DATAxMODEL` mesh of --meshes, the real
training step (`train.make_train_step` with the state's and the batch's
shardings, as `train.train` builds it: parameters by their logical axes,
batches split over `data`) runs --steps steps on the same synthetic batches
from the same initial parameters. Reported per mesh and method: compile
time, median and min step time (after one warm-up step), tokens/s, the
losses of every step and their largest difference from the 1x1 mesh's, which
should be float32 round-off. Not a test: speed depends on the machine.
"""

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

SCRIPT = os.path.abspath(__file__)


def parse_mesh(text: str):
  """'2x1' -> (2, 1); ValueError unless two positive integers."""
  data, model = (int(x) for x in text.lower().split('x'))
  if data < 1 or model < 1:
    raise ValueError(text)
  return data, model


def check_meshes_fit(parser, args, methods, meshes) -> None:
  """A usage error for a mesh the model's parameters cannot be sharded on
  (e.g. 1x3: 64 columns of a tiny kernel over 3 devices), before any worker
  starts; only shapes are computed."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mov_jax import partitioning, train  # pylint: disable=g-import-not-at-top
  for method in methods:
    cfg = common.train_config(
        args.size, method, batch_size=args.batch_size,
        input_length=args.input_length, target_length=args.target_length,
        dtype=args.dtype, dropout=args.dropout)
    variables = jax.eval_shape(train.variables_initializer(cfg),
                               jax.ShapeDtypeStruct((2,), jnp.uint32))
    for data, model in meshes:
      try:
        partitioning.check_shardable(
            variables, {partitioning.DATA: data, partitioning.MODEL: model},
            cfg.mesh.rules)
      except ValueError as e:
        parser.error(f'--meshes: {data}x{model} does not fit --size='
                     f'{args.size} {method}: {e}')


def run_mesh(args, method: str, data: int, model: int) -> Dict[str, Any]:
  """Trains --steps steps on a data x model mesh (inside a worker)."""
  from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
  cfg = common.train_config(
      args.size, method, batch_size=args.batch_size,
      input_length=args.input_length, target_length=args.target_length,
      dtype=args.dtype, dropout=args.dropout)
  mesh = partitioning.MeshConfig(model_parallel=model,
                                 data_parallel=data).make_mesh()
  training = common.Training(cfg, mesh=mesh, seed=args.seed)
  vocab = cfg.network.config.vocab_size
  batches = [training.place(common.synthetic_batch(
      args.batch_size, args.input_length, args.target_length, vocab,
      args.seed + i)) for i in range(args.steps + 1)]
  compile_s = training.compile(batches[0])['compile_s']
  losses, times = [], []
  for batch in batches:
    start = time.perf_counter()
    metrics = training.step(batch)
    times.append(time.perf_counter() - start)
    losses.append(float(metrics['loss']))
  t = common.stats(times[1:])  # the first step is the warm-up
  return {'kind': 'scaling', 'size': args.size, 'method': method,
          'devices': data * model, 'mesh': f'{data}x{model}',
          'data_parallel': data, 'model_parallel': model,
          'batch_size': args.batch_size, 'input_length': args.input_length,
          'target_length': args.target_length, 'dtype': args.dtype,
          'compile_s': compile_s, 'step_time_median_s': t['median'],
          'step_time_min_s': t['min'], 'steps': t['count'],
          'tokens_per_s': args.batch_size * (
              args.input_length + args.target_length) / t['median'],
          'losses': losses, 'trainable_params': training.trainable_params,
          **common.machine_info()}


def worker_main(args) -> int:
  def handle(message):
    return run_mesh(args, message['method'], *message['mesh'])

  import jax  # pylint: disable=g-import-not-at-top
  common.serve(handle, {'devices': jax.device_count()})
  return 0


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--size', default='tiny')
  parser.add_argument('--methods', default='mov-10,full')
  parser.add_argument('--meshes', default='1x1,2x1,1x2,4x1,2x2,8x1,4x2,2x4',
                      help='DATAxMODEL meshes; 1x1 is the reference.')
  common.add_shape_flags(parser)
  parser.add_argument('--steps', type=int, default=5,
                      help='Timed steps per mesh (after one warm-up step).')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker_main(args)
  common.check_at_least(parser, args, 1, 'steps')
  methods = [m for m in args.methods.split(',') if m]
  common.check_training_flags(parser, args, '--size', [args.size],
                              '--methods', methods)
  meshes = []
  for text in (m for m in args.meshes.split(',') if m):
    try:
      data, model = parse_mesh(text)
    except ValueError:
      parser.error(f'--meshes: {text!r} is not a DATAxMODEL mesh of '
                   'positive integers, e.g. 2x1.')
    if args.batch_size % data:
      parser.error(f'--meshes: {text} splits the batch over {data} '
                   f'data-parallel devices, but --batch_size='
                   f'{args.batch_size} is not divisible by {data}; use a '
                   'multiple of it or drop the mesh.')
    meshes.append((data, model))
  if (1, 1) not in meshes:
    meshes.insert(0, (1, 1))
  check_meshes_fit(parser, args, methods, meshes)

  passed = [a for a in (argv if argv is not None else sys.argv[1:])
            if not a.startswith(('--out', '--meshes'))]
  records = []
  for devices in sorted({d * m for d, m in meshes}):
    flags = os.environ.get('XLA_FLAGS', '')
    env = {'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count='
                        f'{devices}'.strip(),
           'JAX_PLATFORMS': 'cpu'}
    worker, _ = common.start_worker(SCRIPT, passed, env=env,
                                    label=f'{devices} devices')
    try:
      for data, model in meshes:
        if data * model != devices:
          continue
        for method in methods:
          r = worker.request({'method': method, 'mesh': [data, model]})
          records.append(r)
          print(f'{r["mesh"]:>4} {method:<10} step {r["step_time_median_s"]:.3f}s'
                f'  losses {" ".join(f"{x:.5f}" for x in r["losses"])}',
                flush=True)
    finally:
      worker.close()

  reference = {r['method']: r['losses'] for r in records if r['mesh'] == '1x1'}
  for r in records:
    ref = reference[r['method']]
    r['max_abs_loss_diff_vs_1x1'] = max(
        abs(a - b) for a, b in zip(r['losses'], ref))
    r['step_time_vs_1x1'] = r['step_time_median_s'] / next(
        x['step_time_median_s'] for x in records
        if x['mesh'] == '1x1' and x['method'] == r['method'])
  records.sort(key=lambda r: (r['method'], r['devices'], -r['data_parallel']))
  common.report(records, (
      ('method', 'method', 's'), ('devices', 'devices', 'd'),
      ('mesh', 'mesh', 's'), ('compile s', 'compile_s', '.1f'),
      ('median s', 'step_time_median_s', '.3f'),
      ('vs 1x1', 'step_time_vs_1x1', '.2f'),
      ('tokens/s', 'tokens_per_s', '.0f'),
      ('max |loss - 1x1|', 'max_abs_loss_diff_vs_1x1', '.2e')),
                f'{args.size}, simulated CPU devices on '
                f'{records[0]["cpu_model"]} ({records[0]["cpu_cores"]} cores)',
                args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
