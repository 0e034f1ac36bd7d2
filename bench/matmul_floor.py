"""Benchmark: the training step's matmuls, each timed alone (the step's floor).

    python bench/matmul_floor.py [--sizes=small] [--methods=ia3,mov-10,...] \
        [--batch_size=8] [--input_length=256] [--target_length=64] \
        [--dtype=float32] [--out=matmul_floor.json]

Traces the training step that `bench/train_step.py` times (the same gin files
and shapes), collects every `dot_general` of its jaxpr (forward, activation
and weight gradients, recomputations of `remat_policy`) with how often it
runs, and times each distinct one alone: jitted, on random operands of its
shapes and dtypes, the fastest of `--repeats` rounds. Their sum, `floor_s`, is
how long the step would take if everything but its matmuls were free (norms,
softmax, elementwise products, layout changes, the optimizer update) and each
matmul ran as fast as it does alone on this backend.

`max_peak_fraction` is the model FLOPs of the step (counted as
`train_step.py` counts them) over `floor_s`, as a fraction of the same
matmul peak `train_step.py` measures (fastest 2048 x 2048 float32 on CPU):
the most `peak_fraction` the training step could report with this backend's
matmul kernels. A step's own `peak_fraction` against it says how much of
the gap to the peak is everything else, and how much the matmul shapes
themselves (small or batched matmuls run below the square matmul's rate).
Each record also names the matmuls that take the most time.
"""

import argparse
import collections
import math
import os
import sys
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position


class Dot(NamedTuple):
  """One distinct `dot_general`: operand shapes and dtypes, its dimension
  numbers and the parameters that change how XLA computes it."""
  lhs_shape: Tuple[int, ...]
  rhs_shape: Tuple[int, ...]
  lhs_dtype: str
  rhs_dtype: str
  dimension_numbers: Any
  precision: Any
  preferred_element_type: Any

  def flops(self) -> float:
    """2 x batch x free rows x free columns x contracted size."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = (
        self.dimension_numbers)
    free = lambda shape, used: math.prod(
        d for i, d in enumerate(shape) if i not in used)
    return (2.0 * math.prod(self.lhs_shape[i] for i in lhs_batch) *
            math.prod(self.lhs_shape[i] for i in lhs_contract) *
            free(self.lhs_shape, lhs_contract + lhs_batch) *
            free(self.rhs_shape, rhs_contract + rhs_batch))

  def describe(self) -> str:
    (lc, rc), (lb, rb) = self.dimension_numbers
    text = (f'{self.lhs_dtype}{list(self.lhs_shape)} x '
            f'{self.rhs_dtype}{list(self.rhs_shape)} contracting '
            f'{list(lc)}x{list(rc)}')
    return text + (f' batch {list(lb)}x{list(rb)}' if lb else '')


def step_dots(jaxpr, times: int = 1,
              counts: Optional[collections.Counter] = None
              ) -> collections.Counter:
  """How often each distinct `Dot` runs in `jaxpr` (a `Jaxpr`), sub-jaxprs
  included: jit, custom gradients, remat; a scan's body `length` times; a
  fused MoV kernel as the matmuls of the JAX path it replaces."""
  from jax.extend import core as jax_core  # pylint: disable=g-import-not-at-top
  from mov_jax import kernels  # pylint: disable=g-import-not-at-top
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    # A fused CPU kernel of a MoV site counts as the matmuls it replaces.
    fused = kernels.equivalent_matmuls(
        eqn.params.get('target_name'),
        [tuple(v.aval.shape) for v in eqn.invars],
        [tuple(v.aval.shape) for v in eqn.outvars]) if (
            eqn.primitive.name == 'ffi_call') else None
    for lhs, rhs, dimension_numbers in fused or ():
      counts[Dot(lhs, rhs, 'float32', 'float32', dimension_numbers, None,
                 None)] += times
    if eqn.primitive.name == 'dot_general':
      lhs, rhs = (v.aval for v in eqn.invars)
      counts[Dot(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype),
                 str(rhs.dtype), eqn.params['dimension_numbers'],
                 eqn.params.get('precision'),
                 eqn.params.get('preferred_element_type'))] += times
    repeat = times * eqn.params.get('length', 1) if (
        eqn.primitive.name == 'scan') else times
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax_core.ClosedJaxpr):
          step_dots(sub.jaxpr, repeat, counts)
        elif isinstance(sub, jax_core.Jaxpr):
          step_dots(sub, repeat, counts)
  return counts


def _seconds(fn, operands, repeats: int, min_round_s: float) -> float:
  """The fastest of `repeats` rounds of back-to-back calls of the jitted
  `fn` (enough calls to last `min_round_s`), per call."""
  fn(*operands).block_until_ready()  # compile
  once = common.time_calls(lambda: fn(*operands).block_until_ready(), 1)[0]
  calls = max(1, int(min_round_s / max(once, 1e-7)))
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*operands)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / calls)
  return best


def _layouts(dot: Dot):
  """(name, jitted fn, operands) of `dot` as traced, then as a plain
  (batched) matmul of the same sizes with each operand stored either way
  round and the operands in either order: XLA lays out a matmul's operands
  and output in the program around it, so a layout the traced shapes do
  not show may be the one the step runs."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  keys = jax.random.split(jax.random.PRNGKey(0))
  (lhs_contract, rhs_contract), (lhs_batch, _) = dot.dimension_numbers
  size = lambda dims: math.prod(dot.lhs_shape[i] for i in dims)
  b, k = size(lhs_batch), size(lhs_contract)
  m = math.prod(dot.lhs_shape) // (b * k)
  n = math.prod(dot.rhs_shape) // (b * k)
  dot_fn = lambda dims: jax.jit(lambda x, y: lax.dot_general(
      x, y, dims, precision=dot.precision,
      preferred_element_type=dot.preferred_element_type))
  yield 'traced', dot_fn(dot.dimension_numbers), (
      jax.random.normal(keys[0], dot.lhs_shape, dot.lhs_dtype),
      jax.random.normal(keys[1], dot.rhs_shape, dot.rhs_dtype))
  lead = (b,) if b > 1 else ()
  batch = ((0,), (0,)) if b > 1 else ((), ())
  at = len(lead)
  for rows, cols, x_dtype, y_dtype, order in (
      (m, n, dot.lhs_dtype, dot.rhs_dtype, 'lhs x rhs'),
      (n, m, dot.rhs_dtype, dot.lhs_dtype, 'rhs x lhs')):
    for x_name, x_shape, x_contract in (('[r,k]', (rows, k), at + 1),
                                        ('[k,r]', (k, rows), at)):
      for y_name, y_shape, y_contract in (('[k,c]', (k, cols), at),
                                          ('[c,k]', (cols, k), at + 1)):
        yield (f'{order}: {x_name} x {y_name}',
               dot_fn((((x_contract,), (y_contract,)), batch)),
               (jax.random.normal(keys[0], lead + x_shape, x_dtype),
                jax.random.normal(keys[1], lead + y_shape, y_dtype)))


def time_dot(dot: Dot, repeats: int, min_round_s: float = 0.02
             ) -> Dict[str, Any]:
  """Seconds of one `dot` alone, jitted: as traced (`traced_s`) and the
  fastest over operand layouts and orders (`best_s`, `best_layout`). Each
  layout gets one round; the fastest then gets `repeats`."""
  # Keeps only the traced layout's and the fastest layout's operands alive
  # (a step's largest matmuls hold hundreds of MB per layout).
  traced = best = None
  for name, fn, operands in _layouts(dot):
    entry = (_seconds(fn, operands, 1, min_round_s), name, fn, operands)
    if name == 'traced':
      traced = entry
    if best is None or entry[0] < best[0]:
      best = entry
  best_s = min(best[0], _seconds(*best[2:], repeats, min_round_s))
  traced_s = (best_s if best is traced else
              min(traced[0], _seconds(*traced[2:], repeats, min_round_s)))
  best_layout = best[1]
  if traced_s < best_s:  # timing noise: the layouts were about as fast
    best_layout, best_s = 'traced', traced_s
  return {'traced_s': traced_s, 'best_s': best_s, 'best_layout': best_layout}


def measure(args, size: str, method: str, peak_flops: float,
            timings: Dict[Dot, Dict[str, Any]]) -> Dict[str, Any]:
  """The record of one configuration; `timings` caches each distinct
  matmul's (configurations share the base model's)."""
  import jax  # pylint: disable=g-import-not-at-top
  cfg = common.train_config(
      size, method, batch_size=args.batch_size,
      input_length=args.input_length, target_length=args.target_length,
      dtype=args.dtype, dropout=args.dropout,
      extra_bindings=args.gin_bindings)
  training = common.Training(cfg, seed=args.seed)
  batch = training.place(common.synthetic_batch(
      args.batch_size, args.input_length, args.target_length,
      cfg.network.config.vocab_size, args.seed))
  with training.context():
    traced = jax.make_jaxpr(training.step_fn)(training.state, batch)
  dots = step_dots(traced.jaxpr)
  model_flops = train_step.step_model_flops(
      training, args.batch_size, args.input_length,
      args.target_length)['total']
  del training, batch, traced
  new = [dot for dot in dots if dot not in timings]
  common.progress(f'[{size} {method}] {sum(dots.values())} matmuls, '
                  f'{len(dots)} distinct, {len(new)} not timed before')
  for i, dot in enumerate(new):
    timings[dot] = time_dot(dot, args.repeats)
    if (i + 1) % 10 == 0:
      common.progress(f'[{size} {method}] timed {i + 1}/{len(new)}')
  rows = sorted(((count * timings[dot]['best_s'], count, dot)
                 for dot, count in dots.items()),
                key=lambda row: -row[0])
  floor_s = sum(row[0] for row in rows)
  traced_s = sum(count * timings[dot]['traced_s']
                 for dot, count in dots.items())
  dot_flops = sum(count * dot.flops() for dot, count in dots.items())
  return {
      'kind': 'matmul_floor', 'size': size, 'method': method,
      'dtype': args.dtype, 'batch_size': args.batch_size,
      'input_length': args.input_length,
      'target_length': args.target_length,
      'gin_bindings': list(args.gin_bindings),
      'matmuls': sum(dots.values()), 'distinct_matmuls': len(dots),
      'matmul_flops_per_step': dot_flops, 'flops_per_step': model_flops,
      'floor_s': floor_s, 'traced_layouts_s': traced_s,
      'floor_flops_per_s': dot_flops / floor_s,
      'matmul_peak_flops': peak_flops,
      'matmul_peak_fraction': dot_flops / floor_s / peak_flops,
      'max_peak_fraction': model_flops / floor_s / peak_flops,
      'slowest': [{'matmul': dot.describe(), 'count': count,
                   'seconds': total, 'flops_per_s': dot.flops() * count /
                   total, 'layout': timings[dot]['best_layout'],
                   'traced_layout_s': count * timings[dot]['traced_s']}
                  for total, count, dot in rows[:args.slowest]],
      **common.machine_info()}


COLUMNS = (('size', 'size', 's'), ('method', 'method', 's'),
           ('matmuls', 'matmuls', 'd'),
           ('GFLOP', 'matmul_flops_per_step', '.4g'),
           ('floor s', 'floor_s', '.3f'),
           ('as traced s', 'traced_layouts_s', '.3f'),
           ('GFLOP/s', 'floor_flops_per_s', '.4g'),
           ('of peak', 'matmul_peak_fraction', '.2f'),
           ('max peak_fraction', 'max_peak_fraction', '.2f'))


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--sizes', default='small',
                      help='Model gins models/t5_1_1_<size>.gin (or paths).')
  parser.add_argument('--methods', default=','.join(common.METHODS),
                      help='full, ia3, lora, mov-E, molora-E.')
  common.add_shape_flags(parser)
  parser.add_argument('--repeats', type=int, default=5,
                      help='Timed rounds per distinct matmul (the fastest '
                      'counts).')
  parser.add_argument('--matmuls', type=int, default=10,
                      help='Timed peak matmuls.')
  parser.add_argument('--matmul_size', type=int, default=0,
                      help='Side of the peak matmul (0: 2048 on CPU, 8192 '
                      'on accelerators).')
  parser.add_argument('--slowest', type=int, default=8,
                      help='How many of the slowest matmuls each record '
                      'names.')
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='A gin binding for every configuration.')
  args = parser.parse_args(argv)
  sizes = [s for s in args.sizes.split(',') if s]
  methods = [m for m in args.methods.split(',') if m]
  common.check_at_least(parser, args, 1, 'repeats', 'matmuls')
  common.check_at_least(parser, args, 0, 'matmul_size', 'slowest')
  common.check_training_flags(parser, args, '--sizes', sizes, '--methods',
                              methods, args.gin_bindings)

  start = time.time()
  matmul = common.Matmul(args.dtype, args.matmul_size)
  peak_flops = matmul.flops / min(matmul.seconds(args.matmuls))
  records, timings = [], {}
  for size in sizes:
    for method in methods:
      records.append(measure(args, size, method, peak_flops, timings))
      r = records[-1]
      print(f'[{size} {method}] floor {r["floor_s"]:.3f}s: matmuls at '
            f'{r["matmul_peak_fraction"]:.2f} of the peak, at most '
            f'{r["max_peak_fraction"]:.2f} for the step', flush=True)
  print(f'\n{records[0]["device_kind"]}, matmul peak {matmul.n}^2 '
        f'{peak_flops / 1e9:.0f} GFLOP/s; {time.time() - start:.0f}s in all')
  common.print_table(records, COLUMNS)
  for r in records:
    print(f'\n[{r["size"]} {r["method"]}] slowest matmuls:')
    for s in r['slowest']:
      print(f'  {s["seconds"] * 1e3:8.1f} ms  x{s["count"]:<3d} '
            f'{s["flops_per_s"] / 1e9:6.0f} GFLOP/s  {s["matmul"]}  '
            f'(best as {s["layout"]}; as traced '
            f'{s["traced_layout_s"] * 1e3:.1f} ms)')
  common.write_json(args.out, records)
  return 0


if __name__ == '__main__':
  sys.exit(main())
