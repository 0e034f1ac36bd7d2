"""The main job on the embedded default: train T5 end to end on a fixed batch.

    python -m mov_jax.demo [--gin_file=models/t5_1_1_tiny.gin] [--steps=30]

Builds the network from gin, initialises it, and runs Adafactor steps on one
fixed batch of synthetic token sequences (a copy task), printing the loss,
which must fall. It checks the whole stack (gin, network, loss, gradients,
optimizer) on any backend in well under a minute on two CPU cores.
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mov_jax import gin_utils
from mov_jax import models


def make_copy_batch(batch_size: int, input_length: int, target_length: int,
                    vocab_size: int, seed: int = 0):
  """Targets copy the first tokens of the inputs; some rows are padded."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, size=(batch_size, input_length))
  lengths = rng.integers(input_length // 2, input_length + 1, size=batch_size)
  inputs = np.where(np.arange(input_length) < lengths[:, None], inputs, 0)
  targets = np.zeros((batch_size, target_length), np.int32)
  copy_len = target_length - 1
  targets[:, :copy_len] = inputs[:, :copy_len]
  targets[:, copy_len] = 1  # EOS
  targets = np.where(targets == 0, 0, targets)
  return {
      'encoder_input_tokens': jnp.asarray(inputs, jnp.int32),
      'decoder_target_tokens': jnp.asarray(targets, jnp.int32),
      'decoder_input_tokens': models.shift_right(jnp.asarray(targets,
                                                             jnp.int32)),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--input_length', type=int, default=32)
  parser.add_argument('--target_length', type=int, default=8)
  parser.add_argument('--learning_rate', type=float, default=1e-2)
  args = gin_utils.parse_args(parser, argv)
  if not args.gin_file:
    args.gin_file = ['models/t5_1_1_tiny.gin']
  gin_utils.setup_from_args(args)
  network = gin_utils.macro_value(
      'NETWORK', 'Pass a model gin file, e.g. --gin_file=models/t5_1_1_tiny.gin.')
  cfg = network.config
  print(f'mov-jax demo on {jax.default_backend()} ({jax.device_count()} '
        f'device(s)): {args.gin_file}, emb {cfg.emb_dim}, '
        f'{cfg.num_encoder_layers}+{cfg.num_decoder_layers} layers', flush=True)

  batch = make_copy_batch(args.batch_size, args.input_length,
                          args.target_length, min(cfg.vocab_size, 1000))
  variables = network.init(jax.random.PRNGKey(0), **batch, enable_dropout=False)
  params = variables['params']
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  optimizer = optax.adafactor(args.learning_rate, decay_rate=0.8)
  opt_state = optimizer.init(params)

  def loss_fn(p, rng):
    logits = network.apply({'params': p}, **batch, enable_dropout=True,
                           rngs={'dropout': rng})
    total, _, weight = models.summed_target_loss(
        logits, batch['decoder_target_tokens'], z_loss=1e-4)
    return total / weight

  @jax.jit
  def train_step(p, state, rng):
    loss, grads = jax.value_and_grad(loss_fn)(p, rng)
    updates, state = optimizer.update(grads, state, p)
    return optax.apply_updates(p, updates), state, loss

  tokens = int(np.prod(batch['encoder_input_tokens'].shape) +
               np.prod(batch['decoder_target_tokens'].shape))
  rng = jax.random.PRNGKey(1)
  losses = []
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    rng, step_rng = jax.random.split(rng)
    t0 = time.perf_counter()
    params, opt_state, loss = train_step(params, opt_state, step_rng)
    loss = float(loss)
    dt = time.perf_counter() - t0
    losses.append(loss)
    if step == 1 or step % 5 == 0 or step == args.steps:
      eta = (time.perf_counter() - start) / step * (args.steps - step)
      print(f'step {step:4d}/{args.steps}  loss {loss:8.4f}  '
            f'{tokens / dt:9.0f} tokens/s  ETA {eta:5.1f}s', flush=True)
  print(f'{num_params:,} parameters; loss {losses[0]:.4f} -> {losses[-1]:.4f}')
  if not np.isfinite(losses[-1]) or losses[-1] >= losses[0]:
    print('ERROR: the loss did not fall.', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
