"""Benchmark: real tokens per second of the training step, packed vs padded.

    python bench/packing.py [--size=small] [--method=mov-10] [--batch_size=8] \
        [--input_length=256] [--target_length=64] [--steps=10] \
        [--out=packing.json]

P3 examples have long inputs and short targets: most templates ask for a
class name or a few words about a passage. This draws random examples from
such a mix (inputs log-normal around --input_median tokens; targets: a
--long_target_fraction of them log-normal around --long_target_median tokens,
the rest 1 to --short_target_max; each trimmed to the feature lengths and
ending in EOS, as seqio's tasks leave them), runs them through the
training input pipeline's own `seqio.EncDecFeatureConverter`, once with
packing (several examples per row, segment ids and positions; the
`PACKING = True` of runs/finetune.gin) and once padded (one example per row),
and times the real training step (`train.make_train_step`, as in
bench/train_step.py) on the batches each gives. The two configurations take
turns step by step in one process.

Reported per mode: step time (median, min), examples per step and per
second, real (non-padding) input + target tokens per second, the fraction of
the batch's token slots that hold real tokens, and the packed / padded
speed-up in real tokens per second; also how fast the converter itself
produces batches on this machine (it runs in tf.data, beside the step).
Not a test: speed depends on the machine.
"""

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def p3_like_examples(count: int, args, vocab_size: int, seed: int):
  """Random token examples with a P3-like length mix (EOS = 1 at the end)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)

  def draw(median, sigma, low, high):
    n = int(round(rng.lognormal(np.log(median), sigma)))
    return int(min(max(n, low), high))

  examples = []
  for _ in range(count):
    # Trimmed to the feature lengths with EOS kept, as seqio's
    # append_eos_after_trim does.
    n_in = draw(args.input_median, args.input_sigma, 2, args.input_length)
    if rng.random() < args.long_target_fraction:
      n_tgt = draw(args.long_target_median, 0.6, 2, args.target_length)
    else:
      n_tgt = int(rng.integers(1, args.short_target_max + 1))
    examples.append({
        'inputs': np.append(rng.integers(2, vocab_size, n_in - 1), 1),
        'targets': np.append(rng.integers(2, vocab_size, n_tgt - 1), 1)})
  return examples


def convert(examples, pack: bool, args) -> List[Dict[str, Any]]:
  """Batches from seqio's encoder-decoder feature converter."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ds = tf.data.Dataset.from_generator(
      lambda: ({k: v.astype(np.int32) for k, v in ex.items()}
               for ex in examples),
      output_signature={'inputs': tf.TensorSpec([None], tf.int32),
                        'targets': tf.TensorSpec([None], tf.int32)})
  ds = seqio.EncDecFeatureConverter(pack=pack)(
      ds, {'inputs': args.input_length, 'targets': args.target_length})
  ds = ds.batch(args.batch_size, drop_remainder=True)
  return [dict(b) for b in ds.as_numpy_iterator()]


def batch_content(batch) -> Dict[str, float]:
  """Examples and real tokens in a batch (packed or not)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  inputs = int(np.sum(batch['encoder_input_tokens'] > 0))
  targets = int(np.sum(batch['decoder_target_tokens'] > 0))
  if 'decoder_segment_ids' in batch:
    examples = int(np.sum(np.max(batch['decoder_segment_ids'], axis=1)))
  else:
    examples = int(np.sum(np.any(batch['decoder_target_tokens'] > 0, axis=1)))
  slots = (batch['encoder_input_tokens'].size +
           batch['decoder_target_tokens'].size)
  return {'examples': examples, 'input_tokens': inputs,
          'target_tokens': targets, 'fill': (inputs + targets) / slots}


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--size', default='small')
  parser.add_argument('--method', default='mov-10')
  common.add_shape_flags(parser)
  parser.add_argument('--steps', type=int, default=10,
                      help='Timed steps per mode.')
  parser.add_argument('--batches', type=int, default=4,
                      help='Distinct batches per mode, used in turn.')
  parser.add_argument('--input_median', type=float, default=120.0)
  parser.add_argument('--input_sigma', type=float, default=0.75)
  parser.add_argument('--short_target_max', type=int, default=5)
  parser.add_argument('--long_target_fraction', type=float, default=0.25)
  parser.add_argument('--long_target_median', type=float, default=20.0)
  args = parser.parse_args(argv)
  common.check_at_least(parser, args, 1, 'steps', 'batches',
                        'short_target_max')
  common.check_training_flags(parser, args, '--size', [args.size],
                              '--method', [args.method])
  from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
  partitioning.hide_accelerators_from_tensorflow()

  cfg = common.train_config(
      args.size, args.method, batch_size=args.batch_size,
      input_length=args.input_length, target_length=args.target_length,
      dtype=args.dtype, dropout=args.dropout)
  vocab = cfg.network.config.vocab_size
  # Enough examples for --batches packed batches (padded ones need fewer).
  examples = p3_like_examples(args.batch_size * args.batches * 4, args, vocab,
                              args.seed)
  modes = {}
  for mode, pack in (('packed', True), ('padded', False)):
    start = time.perf_counter()
    batches = convert(examples, pack, args)[:args.batches]
    convert_s = time.perf_counter() - start
    training = common.Training(cfg, seed=args.seed)
    placed = [training.place(b) for b in batches]
    compile_s = training.compile(placed[0])['compile_s']
    training.step(placed[0])  # warm-up
    modes[mode] = {'training': training, 'batches': placed,
                   'content': [batch_content(b) for b in batches],
                   'convert_examples_per_s': len(examples) / convert_s,
                   'compile_s': compile_s, 'times': [], 'done': []}
    print(f'[{mode}] {len(batches)} batches, compiled in {compile_s:.1f}s',
          flush=True)

  for i in range(args.steps):
    for mode, m in modes.items():
      k = i % len(m['batches'])
      start = time.perf_counter()
      m['training'].step(m['batches'][k])
      m['times'].append(time.perf_counter() - start)
      m['done'].append(m['content'][k])
    print(f'  step {i + 1}/{args.steps}: ' + '  '.join(
        f'{mode} {m["times"][-1]:.3f}s' for mode, m in modes.items()),
          flush=True)

  info = common.machine_info()
  records = []
  for mode, m in modes.items():
    t = common.stats(m['times'])
    seconds = sum(m['times'])
    done = m['done']
    real = sum(c['input_tokens'] + c['target_tokens'] for c in done)
    records.append({
        'kind': 'packing', 'mode': mode, 'size': args.size,
        'method': args.method, 'dtype': args.dtype,
        'batch_size': args.batch_size, 'input_length': args.input_length,
        'target_length': args.target_length, 'steps': t['count'],
        'compile_s': m['compile_s'], 'step_time_median_s': t['median'],
        'step_time_min_s': t['min'],
        'examples_per_step': sum(c['examples'] for c in done) / len(done),
        'examples_per_s': sum(c['examples'] for c in done) / seconds,
        'real_tokens_per_s': real / seconds,
        'real_target_tokens_per_s': sum(
            c['target_tokens'] for c in done) / seconds,
        'fill_fraction': sum(c['fill'] for c in done) / len(done),
        'converter_examples_per_s': m['convert_examples_per_s'],
        'length_mix': {k: getattr(args, k) for k in (
            'input_median', 'input_sigma', 'short_target_max',
            'long_target_fraction', 'long_target_median')},
        **info})
  packed, padded = records
  for r in records:
    r['speedup_real_tokens'] = r['real_tokens_per_s'] / padded[
        'real_tokens_per_s']
  common.report(records, (
      ('mode', 'mode', 's'), ('median s', 'step_time_median_s', '.3f'),
      ('examples/step', 'examples_per_step', '.1f'),
      ('fill', 'fill_fraction', '.2f'),
      ('real tokens/s', 'real_tokens_per_s', '.0f'),
      ('examples/s', 'examples_per_s', '.2f'),
      ('speed-up', 'speedup_real_tokens', '.2f'),
      ('converter ex/s', 'converter_examples_per_s', '.0f')),
                f'{args.size} {args.method} on {info["device_kind"]} '
                f'({info["cpu_model"]}); load average '
                f'{info["load_average"][0]:.1f}', args.out)
  return 0 if packed['real_tokens_per_s'] > 0 else 1


if __name__ == '__main__':
  sys.exit(main())
