"""Benchmark: one MoV site, forward and backward, fused kernel vs JAX vs IA3.

    python bench/mov_site.py [--gin_file=models/t5_1_1_small.gin] \
        [--experts=10,30] [--batch_size=8] [--input_length=256] \
        [--target_length=64] [--repeats=30] [--out=mov_site.json]

Times each kind of MoV site of the model (attention keys/values of the
encoder and cross-attention, of decoder self-attention; the FFN hidden state
of encoder and decoder) alone, jitted: the site's output and the gradients
of a loss of it with respect to its parameters and its input, with the
router statistics a training step reports. Per site: IA3 (one vector), MoV-E
as JAX operations (`cpu_kernel = False`) and MoV-E with the fused kernel
where this backend has it (`mov_jax.kernels`), taking turns so that load on
the machine hits them alike; fastest and median of `--repeats` runs. Not a
test: speed depends on the machine.
"""

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from mov_jax import gin_utils
from mov_jax import kernels
from mov_jax.adapters import routing
from mov_jax.adapters import vectors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_GIN_FILE = 'models/t5_1_1_small.gin'
DEFAULT_BINDINGS = ("ACTIVATION_DTYPE = 'float32'",)

HEAD_AXES = ('batch', 'length', 'heads', 'kv')
MLP_AXES = ('batch', 'length', 'mlp')


def sites(config, batch: int, inputs: int, targets: int) -> Dict[str, tuple]:
  """Activation shape of each kind of site, by name."""
  heads, kv, mlp = config.num_heads, config.head_dim, config.mlp_dim
  return {
      'encoder/cross-attention key, value': (batch, inputs, heads, kv),
      'encoder FFN hidden': (batch, inputs, mlp),
      'decoder self-attention key, value': (batch, targets, heads, kv),
      'decoder FFN hidden': (batch, targets, mlp),
  }


def site_step(module: vectors.MixtureOfVectors, shape: tuple, seed: int):
  """(jitted step, its arguments, whether it runs the fused kernel)."""
  axes = HEAD_AXES if len(shape) == 4 else MLP_AXES
  rng = np.random.default_rng(seed)
  outputs = jnp.asarray(rng.normal(size=shape), jnp.float32)
  upstream = jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = jnp.ones(shape[:2], jnp.float32)
  kwargs = dict(deterministic=False, mask=mask, input_axes=axes,
                output_axes=axes)
  params = module.init(jax.random.PRNGKey(seed), outputs, outputs,
                       **kwargs)['params']

  def loss(params, outputs):
    y, sown = module.apply({'params': params}, outputs, outputs, **kwargs,
                           mutable=['intermediates'])
    return jnp.sum(y * upstream), sown

  step = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  fused = kernels.FORWARD_TARGET in str(jax.make_jaxpr(step)(params, outputs))
  return jax.jit(step), (params, outputs), fused


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument('--experts', default='10,30',
                      help='Comma-separated MoV expert counts.')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--input_length', type=int, default=256)
  parser.add_argument('--target_length', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=30,
                      help='Timed runs per variant (fastest and median).')
  parser.add_argument('--seed', type=int, default=0)
  common.add_out_flags(parser)
  args = gin_utils.parse_args(parser, argv)
  common.check_at_least(parser, args, 1, 'repeats', 'batch_size',
                        'input_length', 'target_length')
  common.check_out(parser, args)
  try:
    experts = [int(e) for e in args.experts.split(',')]
  except ValueError:
    parser.error(f'--experts={args.experts}: give expert counts, e.g. 10,30.')
  if not experts or min(experts) < 1:
    parser.error(f'--experts={args.experts}: counts must be at least 1.')
  network = common.network_from_gin_flags(parser, args, DEFAULT_GIN_FILE,
                                         DEFAULT_BINDINGS)

  variants = {'ia3': vectors.MixtureOfVectors(num_experts=1, router=None)}
  for e in experts:
    for fused in (False, True):
      variants[f'mov-{e} {"fused" if fused else "jax"}'] = (
          vectors.MixtureOfVectors(num_experts=e, router=routing.RouterConfig(),
                                   cpu_kernel=fused))
  config = {'gin_file': args.gin_file, 'batch_size': args.batch_size,
            'input_length': args.input_length,
            'target_length': args.target_length, 'repeats': args.repeats,
            **common.machine_info()}
  records: List[Dict[str, Any]] = []
  for site, shape in sites(network.config, args.batch_size,
                           args.input_length, args.target_length).items():
    runs = {}
    for name, module in variants.items():
      step, operands, fused = site_step(module, shape, args.seed)
      for _ in range(3):  # compile, warm up
        jax.block_until_ready(step(*operands))
      runs[name] = (step, operands, fused, [])
    for _ in range(args.repeats):
      for step, operands, _, times in runs.values():
        start = time.perf_counter()
        jax.block_until_ready(step(*operands))
        times.append(time.perf_counter() - start)
    ia3_ms = min(runs['ia3'][3]) * 1e3
    for name, (_, _, fused, times) in runs.items():
      records.append(dict(
          kind='mov_site', site=site, shape=list(shape), method=name,
          fused_kernel=fused, min_ms=min(times) * 1e3,
          median_ms=statistics.median(times) * 1e3,
          vs_ia3=min(times) * 1e3 / ia3_ms, **config))
  common.report(records, [('site', 'site', 's'), ('method', 'method', 's'),
                          ('fused', 'fused_kernel', ''),
                          ('min ms', 'min_ms', '.3f'),
                          ('median ms', 'median_ms', '.3f'),
                          ('x IA3 (min)', 'vs_ia3', '.2f')],
                f'{jax.default_backend()} backend; forward and backward of '
                'one site, jitted', args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
