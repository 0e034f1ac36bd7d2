"""Benchmark: encode-once vs tiled rank-classification scoring.

    python bench/scoring.py [--gin_file=models/t5_1_1_small.gin] \
        [--gin.ACTIVATION_DTYPE="'float32'"] [--batch_size=4] [--repeats=10] \
        [--out=scoring.json]

P3 score-eval rows repeat an example's long input once per answer choice;
tiled scoring (`scoring.score_batch`, as t5x) encodes it once per choice,
encode-once scoring (`scoring.score_choices`) once per example. This times
both, jitted and warmed up, on random weights and tokens shaped like P3
rank classification (default: 3 choices, 256-token inputs, targets of fewer
than 8 tokens), reports the median over `--repeats` runs, and checks that
the two give the same scores. Not a test: speed depends on the machine.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from mov_jax import gin_utils
from mov_jax import models
from mov_jax import scoring

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_GIN_FILE = 'models/t5_1_1_small.gin'
# float32 activations by default: this runs on CPUs, where bfloat16 is slow.
DEFAULT_BINDINGS = ("ACTIVATION_DTYPE = 'float32'",)


def make_data(batch_size: int, num_choices: int, input_length: int,
              target_length: int, vocab_size: int, seed: int) -> Dict:
  """Random P3-like examples: inputs 3/4 to fully used, short EOS targets."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, size=(batch_size, input_length))
  lengths = rng.integers(input_length * 3 // 4, input_length + 1, batch_size)
  inputs = np.where(np.arange(input_length) < lengths[:, None], inputs, 0)
  inputs[np.arange(batch_size), lengths - 1] = 1
  targets = np.zeros((batch_size, num_choices, target_length), np.int32)
  for ex in range(batch_size):
    for choice in range(num_choices):
      n = rng.integers(1, target_length)  # tokens before EOS: < 8 in all
      targets[ex, choice, :n] = rng.integers(2, vocab_size, n)
      targets[ex, choice, n] = 1
  flat = targets.reshape(batch_size * num_choices, target_length)
  tiled = {
      'encoder_input_tokens': np.repeat(inputs, num_choices, axis=0),
      'decoder_input_tokens': np.asarray(models.shift_right(flat)),
      'decoder_target_tokens': flat,
  }
  return {'inputs': inputs.astype(np.int32), 'targets': targets,
          'tiled': {k: v.astype(np.int32) for k, v in tiled.items()}}


def run_times(runs: Dict[str, Callable[[], jax.Array]],
              repeats: int) -> Dict[str, List[float]]:
  """Wall times per method, alternating methods so load drift hits both."""
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument('--batch_size', type=int, default=4,
                      help='Examples per batch (tiled: x num_choices rows).')
  parser.add_argument('--num_choices', type=int, default=3)
  parser.add_argument('--input_length', type=int, default=256)
  parser.add_argument('--target_length', type=int, default=8,
                      help='Padded target length (targets are shorter).')
  parser.add_argument('--repeats', type=int, default=10,
                      help='Timed runs per method (median reported).')
  parser.add_argument('--warmup', type=int, default=2,
                      help='Untimed runs per method after compiling.')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tolerance', type=float, default=1e-3,
                      help='Largest allowed |encode-once - tiled| score.')
  common.add_out_flags(parser)
  args = gin_utils.parse_args(parser, argv)
  common.check_at_least(parser, args, 1, 'repeats', 'batch_size',
                        'num_choices', 'input_length')
  # Each choice has at least one token before its EOS.
  common.check_at_least(parser, args, 2, 'target_length')
  common.check_at_least(parser, args, 0, 'warmup')
  common.check_out(parser, args)
  network = common.network_from_gin_flags(parser, args, DEFAULT_GIN_FILE,
                                         DEFAULT_BINDINGS)

  data = make_data(args.batch_size, args.num_choices, args.input_length,
                   args.target_length, network.config.vocab_size, args.seed)
  tokens = jnp.ones((1, 8), jnp.int32)
  params = jax.jit(lambda key: network.init(
      key, tokens, tokens, tokens, enable_dropout=False)['params'])(
          jax.random.PRNGKey(args.seed))

  tiled_fn = jax.jit(lambda p, b: scoring.score_batch(network, p, b))
  once_fn = jax.jit(lambda p, x, t: scoring.score_choices(network, p, x, t))
  runs = {
      'tiled': lambda: tiled_fn(params, data['tiled']),
      'encode_once': lambda: once_fn(params, data['inputs'], data['targets']),
  }
  for fn in runs.values():
    for _ in range(1 + args.warmup):  # the first call compiles
      jax.block_until_ready(fn())

  rows = np.asarray(runs['tiled']())
  once = np.asarray(runs['encode_once']()).reshape(-1)
  max_abs_diff = float(np.max(np.abs(once - rows)))

  medians = {name: statistics.median(times)
             for name, times in run_times(runs, args.repeats).items()}
  config = {'gin_file': args.gin_file, 'gin_bindings': list(DEFAULT_BINDINGS)
            + args.gin_bindings, 'batch_size': args.batch_size,
            'num_choices': args.num_choices,
            'input_length': args.input_length,
            'target_length': args.target_length, 'repeats': args.repeats,
            'device': jax.devices()[0].device_kind, **common.machine_info(),
            'max_abs_diff': max_abs_diff}
  records = [dict(kind='scoring', method=name,
                  examples_per_s=args.batch_size / seconds,
                  median_s=seconds, speedup=medians['tiled'] / seconds,
                  **config)
             for name, seconds in medians.items()]
  for r in records:
    print(f'{r["method"]:<12} median {r["median_s"] * 1e3:9.1f} ms  '
          f'{r["examples_per_s"]:8.2f} examples/s  speedup '
          f'{r["speedup"]:.2f}x')
  print(f'max |encode_once - tiled| = {max_abs_diff:.2e} '
        f'(tolerance {args.tolerance:g}; scores span {rows.min():.1f} to '
        f'{rows.max():.1f}) on {config["device"]}')
  common.write_json(args.out, records)
  if not max_abs_diff <= args.tolerance:
    print('encode-once and tiled scores disagree', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
