"""Benchmark: the real training step of each method, its speed and memory.

    python bench/train_step.py [--sizes=tiny,small] \
        [--methods=full,ia3,lora,mov-10,mov-30,molora-10] \
        [--torch_reference=auto|no] [--batch_size=8] \
        [--input_length=256] [--target_length=64] [--steps=10] \
        [--dtype=float32] [--processes=1] [--out=train_step.json]

Each (size, method) runs in its own Python process (so peak memory is its
own): `models/t5_1_1_<size>.gin` + the method gin + `runs/finetune.gin`
(Adafactor, z-loss, AVERAGE_PER_SEQUENCE), state built as `train.train`
builds a fresh run, and `jax.jit(train.make_train_step(...),
donate_argnums=(0,))`, compiled ahead of time on random tokens without
padding. Its steps after the first log no metrics (LOG_PERIOD is 100 in
`runs/finetune.gin`), so on CPU the timed ones skip the router statistics,
as 99 of a run's 100 steps do (`train.logs_metrics`). On CPU the processes
of one size stay alive and take turns, one step each, so that a busy
machine slows every method alike. Between turns each
hands its freed heap back to the kernel (so that they all fit in memory) and
re-warms with an untimed step at its next turn; it also times a square
matmul, the peak to compare to (2048 x 2048 float32 on CPU, 8192 x 8192 in
the benchmark's dtype on accelerators). On accelerators
(or with --interleave=no) the configurations run one after another.

--processes=N runs each configuration in N processes (on CPU all alive at
once, turns going round the methods before a method's next process), and
its record pools their timed steps (`steps` counts them all; each process's
median in `step_time_median_by_process_s`). A process keeps what slows or
speeds it (where its memory landed, its threads' placement) for its whole
life: on a 2-core VM the median steps of three processes of the same code,
taking turns, differed by up to 6%, so with one process per configuration
a ratio of two configurations can land on either side of its goal. When
the processes take turns, the step-time goals also list the ratio of each
pair of processes (`value_by_process`: the i-th of each, which ran side by
side in the same run). The pooled minimum (`step_time_min_s`, and so
`peak_fraction`) is the fastest of more steps as N grows; each process's
is in `step_time_min_by_process_s`.

Per configuration: compile time (the median of its processes'); median and
min step time over --steps steps of each of its processes after --warmup;
tokens/s (batch x (input + target length) / median step); model FLOPs of
a step; FLOP/s as a fraction of the matmul peak (`peak_fraction`: the
fastest step against the fastest matmul of the run, `matmul_peak_flops`,
the two samples least disturbed by other processes;
`peak_fraction_median`: medians against medians, which a busy machine skews
because it delays a short matmul more than a long step); peak memory
(`peak_memory_mb`: on CPU the host RSS peak over two untimed steps of its
own, after the compiler's scratch memory is handed back and with malloc
handing freed memory back too, so it follows what the step holds and
includes the process's libraries, see `rss_at_start_mb`; the timed steps'
peak, under the malloc settings of `mov_jax.host_memory` a high-water mark
of a heap that never shrinks, is `peak_memory_timed_mb`; on GPU the
device's `peak_bytes_in_use`)
and XLA's own buffer sizes for the step (`xla_total_mb`: temporaries,
`xla_temp_mb`, plus the state and batch; exact and independent of load);
trainable parameters; first and last loss. Records also hold the load
average, the machine and XLA's own flop count (`xla_flops_per_step`).

Model FLOPs (`flops_per_step`) are counted from the T5 shapes, 2*m*n*k per
matmul of an m x k by a k x n matrix, b = batch, Li / Lt = input / target
length, Te = b*Li and Td = b*Lt tokens, d = emb_dim, H heads of size kv,
I = H*kv, f = mlp_dim, V = vocab:
  encoder layer: q, k, v, o 4 * 2*Te*d*I; FFN (n branches + wo)
    (n+1) * 2*Te*d*f; attention scores and values 2 * 2*b*H*Li*Li*kv;
    relative position bias (a one-hot contraction) 2*H*Li*Li*buckets;
  decoder layer: self-attention as above on Td / Lt; cross-attention q, o
    2 * 2*Td*d*I, k, v 2 * 2*Te*d*I, scores and values 2 * 2*b*H*Lt*Li*kv;
    FFN on Td;
  logits 2*Td*d*V; the embedding is a lookup (0);
  adapters (E experts): MoV router 2*T*F*E (F = the features it routes on:
    I per head, or f) and merge 2*T*E*F; IA3's scaling is elementwise (0);
    (Mo)LoRA of rank r on a d_in -> d_out projection 2*T*d_in*E*r +
    2*T*E*r*d_out, plus a router 2*T*d_in*E.
The step is forward + backward: every matmul of an activation by a weight
costs its forward FLOPs again for the activation gradient, and once more
for the weight gradient only if that weight trains (all weights in full
fine-tuning; adapter and router weights otherwise); a matmul of two
activations (attention scores and values) costs twice its forward FLOPs in
the backward pass; the relative-position contraction (a constant one-hot
operand) only its weight gradient. Gradients nothing needs are not counted
(JAX does not compute them): when the base model is frozen, those of the
first self-attention layers' inputs (the embeddings), and there the query's
in the attention scores unless the query has an adapter. So full
fine-tuning is ~3x forward and the adapter methods ~2x.
tests/test_bench.py checks this count against the matmuls of the traced
training step: equal for every method. Elementwise work (norms, softmax,
GELU, the optimizer) is not counted. XLA's count (`xla_flops_per_step`)
also includes that, and whatever else the compiled step does.

PyTorch reference (--torch_reference=auto, the default): when JAX runs on
CPU, each method also runs as `torch:<method>`, the same model, adapters and
loss in eager PyTorch on Hugging Face's T5 (bench/torch_reference.py),
taking turns with ours; `kind: "reference"` records compare the two
(`speedup`: PyTorch's median step / ours; `memory_ratio`: our peak / its).

Not a test: speed depends on the machine and its load. --out FILE.json
writes a list of records: `kind: "train_step"` per configuration, and
`kind: "target"` for the issue's ratio goals (measured in this run); a FILE
that already holds results is replaced only with --overwrite, or added to
with --append.
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

SCRIPT = os.path.abspath(__file__)


# ------------------------------------------------------------------- FLOPs


def train_step_flops(config, adapters, batch_size: int, input_length: int,
                     target_length: int, base_trainable: bool,
                     adapters_trainable: bool = True) -> Dict[str, float]:
  """Model FLOPs of one training step (see the module docstring)."""
  from mov_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  from mov_jax.adapters import vectors  # pylint: disable=g-import-not-at-top
  c = config
  d, heads, kv, f = c.emb_dim, c.num_heads, c.head_dim, c.mlp_dim
  inner = heads * kv
  b, li, lt = batch_size, input_length, target_length
  te, td = b * li, b * lt
  weight = []  # (forward flops, weight trains, input gradient needed)
  pairs = []  # (forward flops, operand gradients needed: 2 or 1)
  const = []  # (forward flops, weight trains) of constant x weight

  def dense(tokens, n_in, n_out, trains=base_trainable, input_grad=True):
    weight.append((2.0 * tokens * n_in * n_out, trains, input_grad))

  def has_adapter(site, block):
    template = adapters.template(site) if adapters is not None else None
    return template is not None and not (
        block and block not in adapters.attention_blocks)

  def adapter(site, block, tokens, n_in, n_out, input_grad=True):
    if not has_adapter(site, block):
      return
    template = adapters.template(site)
    if isinstance(template, vectors.MixtureOfVectors):
      if template.router is not None:
        e = template.num_experts
        routed = n_out if template.router_input == vectors.ADAPTED else n_in
        # The router's input is the adapted output or the site's input:
        # either needs its gradient only when the site's input does (the
        # projection between them is frozen).
        dense(tokens, routed, e, adapters_trainable, input_grad)
        dense(tokens, e, n_out, adapters_trainable)  # merge of the vectors
    elif isinstance(template, lora.MixtureOfLoRA):
      e, r = template.num_experts, template.rank
      dense(tokens, n_in, e * r, adapters_trainable, input_grad)
      dense(tokens, e * r, n_out, adapters_trainable)
      if template.router is not None:
        dense(tokens, n_in, e, adapters_trainable, input_grad)
    else:
      raise ValueError(f'No FLOP formula for adapter {type(template)}.')

  def attention(block, q_tokens, kv_tokens, q_len, kv_len, first=False):
    # The first self-attention's inputs are the (frozen) embeddings: their
    # gradient is needed only when the embedding trains.
    input_grad = base_trainable or not first
    for site, tokens in (('query', q_tokens), ('key', kv_tokens),
                         ('value', kv_tokens)):
      dense(tokens, d, inner, input_grad=input_grad)
      adapter(site, block, tokens, d, inner, input_grad)
    # Scores q.k: q's gradient only if something below q trains.
    query_grad = input_grad or has_adapter('query', block)
    pairs.append((2.0 * b * heads * q_len * kv_len * kv, 2 if query_grad
                  else 1))
    pairs.append((2.0 * b * heads * q_len * kv_len * kv, 2))  # probs . v
    dense(q_tokens, inner, d)
    adapter('out', block, q_tokens, inner, d)

  def relpos(length):
    const.append((2.0 * heads * length * length *
                  c.relative_attention_num_buckets, base_trainable))

  def mlp(tokens):
    n = len(c.mlp_activations)
    for i in range(n):
      name = 'wi' if n == 1 else f'wi_{i}'
      dense(tokens, d, f)
      adapter(name, None, tokens, d, f)
      if i == 0:
        adapter('mlp_hidden', None, tokens, f, f)
    dense(tokens, f, d)
    adapter('wo', None, tokens, f, d)

  for layer in range(c.num_encoder_layers):
    relpos(li)
    attention('encoder_self', te, te, li, li, first=layer == 0)
    mlp(te)
  for layer in range(c.num_decoder_layers):
    relpos(lt)
    attention('decoder_self', td, td, lt, lt, first=layer == 0)
    attention('decoder_cross', td, te, lt, li)
    mlp(td)
  dense(td, d, c.vocab_size)  # logits (tied or not: the same FLOPs)

  forward = (sum(x for x, _, _ in weight) + sum(x for x, _ in pairs) +
             sum(x for x, _ in const))
  backward = (sum(x for x, _, g in weight if g) +
              sum(x for x, t, _ in weight if t) +
              sum(x * n for x, n in pairs) + sum(x for x, t in const if t))
  return {'forward': forward, 'backward': backward,
          'total': forward + backward}


def step_model_flops(training: common.Training, batch_size: int,
                     input_length: int, target_length: int
                     ) -> Dict[str, float]:
  """`train_step_flops` of a `common.Training`: the base model's weight
  gradients count when anything outside the adapters trains."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  base_trainable = any('_adapter/' not in path for path in
                       traverse_util.flatten_dict(training.state.trainable,
                                                  sep='/'))
  return train_step_flops(training.cfg.network.config,
                          training.cfg.network.adapters, batch_size,
                          input_length, target_length, base_trainable)


# ------------------------------------------------------------------ worker


class StepWorker(common.TimedStepWorker):
  """The child process of one configuration."""

  def __init__(self, args):
    super().__init__(jax_devices=True)
    rss_at_start = common.rss_mb()
    cfg = common.train_config(
        args.size, args.method, batch_size=args.batch_size,
        input_length=args.input_length, target_length=args.target_length,
        dtype=args.dtype, dropout=args.dropout,
        extra_bindings=args.gin_bindings)
    start = time.perf_counter()
    self.training = common.Training(cfg, seed=args.seed)
    net_cfg = cfg.network.config
    self.batch = self.training.place(common.synthetic_batch(
        args.batch_size, args.input_length, args.target_length,
        net_cfg.vocab_size, args.seed))
    common.progress(f'state built in {time.perf_counter() - start:.1f}s; '
                    'compiling the step')
    compiled = self.training.compile(self.batch)
    common.progress(f'compiled in {compiled["compile_s"]:.1f}s')
    flops = step_model_flops(self.training, args.batch_size,
                             args.input_length, args.target_length)
    for i in range(args.warmup):
      common.progress(f'warm-up step {i + 1}/{args.warmup}: '
                      f'{self._step():.3f}s')
    self.matmul = common.Matmul(args.dtype, args.matmul_size)
    memory = self.measure_memory()
    self.ready = {
        **compiled, 'memory': memory, 'flops_per_step': flops['total'],
        'flops_forward': flops['forward'], 'rss_at_start_mb': rss_at_start,
        'trainable_params': self.training.trainable_params,
        'total_params': self.training.total_params,
        'matmul_size': self.matmul.n, 'machine': common.machine_info(),
        'rss_before_steps_mb': common.rss_mb()}

  def _run_step(self):
    return self.training.step(self.batch)['loss']

  def _matmul_times(self, count: int) -> Dict[str, List[float]]:
    return {'matmul_s': self.matmul.seconds(count)}


def worker_main(args) -> int:
  worker = StepWorker(args)
  common.serve(worker.handle, worker.ready)
  return 0


# ------------------------------------------------------------------ parent

# `torch:<method>`: the method in eager PyTorch (bench/torch_reference.py).
TORCH_PREFIX = 'torch:'


def torch_reference_method(method: str) -> Optional[str]:
  """'torch:mov-10' -> 'mov-10'; None for our (JAX) methods."""
  return method[len(TORCH_PREFIX):] if method.startswith(TORCH_PREFIX) \
      else None


def reference_worker(args, size: str, method: str) -> Tuple[str, List[str]]:
  """The script and flags of a `torch:` method's worker. The gins are read
  here, so that the worker imports neither JAX nor gin. Raises ValueError
  for what the reference cannot run, PyTorch missing included."""
  try:
    import torch_reference  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec('transformers') is None:
      raise ImportError('No module named transformers')
  except ImportError as e:
    raise ValueError(
        f'the PyTorch reference needs torch and transformers ({e}); install '
        "them with pip install -e '.[test]', or pass --torch_reference=no."
    ) from e
  torch_reference.check_dtype(args.dtype)
  cfg = common.train_config(
      size, torch_reference_method(method), batch_size=args.batch_size,
      input_length=args.input_length, target_length=args.target_length,
      dtype=args.dtype, dropout=args.dropout,
      extra_bindings=args.gin_bindings)
  spec = torch_reference.spec_from_config(cfg)
  spec['flops'] = train_step_flops(
      cfg.network.config, cfg.network.adapters, args.batch_size,
      args.input_length, args.target_length, spec['base_trainable'])
  return torch_reference.SCRIPT, torch_reference.worker_args(
      args, size, method, spec)


def worker_args(args, size: str, method: str) -> List[str]:
  return [*common.step_worker_flags(args, size, method),
          f'--dropout={args.dropout}',
          *(f'--gin_bindings={b}' for b in args.gin_bindings)]


def run_turns(running: Dict[str, Any], steps: int, matmuls: int,
              times: Dict[str, Dict[str, list]]) -> None:
  """Each worker in turn runs one step (and times `matmuls` matmuls)."""
  for i in range(steps):
    for method, worker in running.items():
      answer = worker.request({'cmd': 'steps', 'steps': 1,
                               'matmuls': matmuls})
      for key in ('step_s', 'matmul_s', 'reference_matmul_s'):
        times[method][key] += answer.get(key, [])
    print(f'  step {i + 1}/{steps}: ' + '  '.join(
        f'{m} {times[m]["step_s"][-1]:.3f}s' for m in running), flush=True)


def process_names(method: str, processes: int) -> List[str]:
  """The names of one configuration's processes (its method alone when it
  has one)."""
  if processes == 1:
    return [method]
  return [f'{method}#{i + 1}' for i in range(processes)]


def measure_size(args, size: str, on_record: Callable[[Dict[str, Any]], None],
                 past_deadline: Callable[[], bool]) -> None:
  """Measures every method of one size, handing each record to
  `on_record` as soon as it is complete (at once after each configuration
  when they run one after another). Each configuration runs in
  `args.processes` processes, whose steps its record pools. Starts no
  configuration once `past_deadline()`."""
  ready, finish, times = {}, {}, {}
  interleave = args.interleave
  running = {}
  measured = {}  # method -> the names of its processes that started

  def start(method, name, launch=None):
    print(f'[{size} {name}] starting ...', flush=True)
    if launch is not None:
      script, flags = launch
    elif torch_reference_method(method):
      if interleave != 'yes':
        raise ValueError(
            f'{method}: the PyTorch reference runs on CPU, taking turns with '
            'JAX methods on CPU; list it after a JAX method, with JAX on CPU '
            '(JAX_PLATFORMS=cpu), or pass --interleave=yes.')
      script, flags = reference_worker(args, size, method)
    else:
      script, flags = SCRIPT, worker_args(args, size, method)
    worker, ready[name] = common.start_worker(script, flags,
                                              label=f'{size} {name}')
    times[name] = {'step_s': [], 'matmul_s': [], 'reference_matmul_s': []}
    print(f'[{size} {name}] ready on '
          f'{ready[name]["machine"]["device_kind"]}', flush=True)
    return worker

  def stop(name, worker):
    finish[name] = worker.request({'cmd': 'finish'})
    worker.close()

  def method_record(method):
    # Processes that took turns share one peak: the fastest matmul of all.
    interleaved = interleave == 'yes'
    names = measured[method]
    peak_names = ([n for ns in measured.values() for n in ns] if interleaved
                  else names)
    return make_record(args, size, method, [ready[n] for n in names],
                       [finish[n] for n in names], [times[n] for n in names],
                       [t for n in peak_names for t in times[n]['matmul_s']],
                       interleaved=interleaved)

  try:
    def methods():
      # (method, launch): the listed methods, then (--torch_reference=auto,
      # once the JAX methods run on CPU) each JAX method's PyTorch reference
      # not listed, unless the reference lacks what the run asks for.
      for method in args.methods:
        yield method, None
      if args.torch_reference == 'auto' and interleave == 'yes':
        for method in list(args.methods):
          reference = TORCH_PREFIX + method
          if torch_reference_method(method) or reference in args.methods:
            continue
          try:
            launch = reference_worker(args, size, reference)
          except ValueError as e:
            print(f'[{size} {reference}] skipped: {e}', flush=True)
            continue
          yield reference, launch
      elif args.torch_reference == 'auto' and interleave == 'no':
        print(f'[{size}] no PyTorch reference: it takes turns with JAX '
              'methods on CPU', flush=True)

    for method, launch in methods():
      # A configuration gets all its processes or none.
      if past_deadline():
        print(f'[{size} {method}] not started: past --deadline_s',
              flush=True)
        continue
      for name in process_names(method, args.processes):
        worker = start(method, name, launch)
        measured.setdefault(method, []).append(name)
        if interleave == 'auto':
          interleave = ('yes' if ready[name]['machine']['backend'] == 'cpu'
                        else 'no')
        if interleave == 'yes':
          running[name] = worker
        else:
          run_turns({name: worker}, args.steps, args.matmuls, times)
          stop(name, worker)
      if interleave == 'no':
        on_record(method_record(method))
    if running:
      # Turns go round the methods before a method's next process, so that
      # each process's neighbours in time are other methods'.
      process_index = {n: i for names in measured.values()
                       for i, n in enumerate(names)}
      run_turns({n: running[n]
                 for n in sorted(running, key=process_index.get)},
                args.steps, args.matmuls, times)
      for name, worker in list(running.items()):
        stop(name, worker)
        del running[name]
      for method in measured:
        on_record(method_record(method))
  finally:
    for worker in running.values():
      worker.close()


def make_record(args, size: str, method: str, readies: List[Dict[str, Any]],
                finishes: List[Dict[str, Any]],
                times: List[Dict[str, List[float]]], matmul_s: List[float],
                interleaved: bool) -> Dict[str, Any]:
  """The record of one configuration from its processes' ready and finish
  answers and timings (step times pooled over the processes; compile time
  their median; memory their largest) and the peak matmul's times."""
  r, f = readies[0], finishes[0]
  step_s = [t for ts in times for t in ts['step_s']]
  reference_matmul_s = [t for ts in times for t in ts['reference_matmul_s']]
  step, mm = common.stats(step_s), common.stats(matmul_s)

  def largest(answers, key):
    return max(a[key] for a in answers)

  flops = r['flops_per_step']
  matmul_flops = 2.0 * r['matmul_size'] ** 3
  peak, peak_best = matmul_flops / mm['median'], matmul_flops / mm['min']
  return {
    'kind': 'train_step', 'size': size, 'method': method,
    'dtype': args.dtype, 'batch_size': args.batch_size,
    'input_length': args.input_length,
    'target_length': args.target_length, 'dropout': args.dropout,
    'gin_bindings': list(args.gin_bindings),
    'steps': step['count'], 'warmup': args.warmup,
    'processes': len(times),
    'step_time_median_by_process_s': [
        common.stats(ts['step_s'])['median'] for ts in times],
    'step_time_min_by_process_s': [min(ts['step_s']) for ts in times],
    'run_id': args.run_id,
    'interleaved': interleaved,
    'compile_s': statistics.median(a['compile_s'] for a in readies),
    'step_time_median_s': step['median'], 'step_time_min_s': step['min'],
    'step_time_max_s': step['max'],
    'tokens_per_s': args.batch_size * (
        args.input_length + args.target_length) / step['median'],
    'flops_per_step': flops, 'flops_forward': r['flops_forward'],
    'xla_flops_per_step': r['xla_flops_per_step'],
    'flops_per_s': flops / step['median'],
    'matmul_size': r['matmul_size'], 'matmul_peak_flops': peak_best,
    'matmul_median_flops': peak,
    'peak_fraction': flops / step['min'] / peak_best,
    'peak_fraction_median': flops / step['median'] / peak,
    'peak_memory_mb': largest([a['memory'] for a in readies],
                              'peak_memory_mb'),
    'peak_memory_kind': r['memory']['peak_memory_kind'],
    'peak_memory_timed_mb': largest(finishes, 'peak_memory_timed_mb'),
    'peak_rss_lifetime_mb': largest(finishes, 'peak_rss_lifetime_mb'),
    'rss_at_start_mb': largest(readies, 'rss_at_start_mb'),
    'rss_before_steps_mb': largest(readies, 'rss_before_steps_mb'),
    'xla_temp_mb': r.get('xla_temp_mb'),
    'xla_argument_mb': r.get('xla_argument_mb'),
    'xla_total_mb': r.get('xla_total_mb'),
    'trainable_params': r['trainable_params'],
    'total_params': r['total_params'],
    'trainable_percent': 100.0 * r['trainable_params'] / r[
        'total_params'],
    'loss_first': f['losses'][0], 'loss_last': f['losses'][-1],
    'reference_matmul_flops': (
        matmul_flops / min(reference_matmul_s)
        if reference_matmul_s else None),
    'load_average_start': r['machine']['load_average'],
    'load_average_end': list(os.getloadavg()),
    **{k: v for k, v in r['machine'].items() if k != 'load_average'}}


# The goals: (numerator, denominator, field, at most).
RATIO_TARGETS = (
    ('mov-10', 'ia3', 'step_time_median_s', 1.10),
    ('molora-10', 'lora', 'step_time_median_s', 1.25),
    ('mov-10', 'full', 'step_time_median_s', 0.75),
    ('mov-10', 'full', 'peak_memory_mb', 1.0),
    ('mov-10', 'full', 'xla_total_mb', 1.0),
)
# peak_fraction at least: (size, method, goal) on CPU and on accelerators
# (where the peak is the bf16 matmul's when the benchmark runs in bf16).
PEAK_TARGETS = {'cpu': ('small', 'mov-10', 0.75),
                'accelerator': ('large', 'mov-10', 0.50)}


def targets(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """The issue's ratio goals, from records of the same run and size."""
  out = []
  by = {(r['size'], r['method']): r for r in records}
  for size in dict.fromkeys(r['size'] for r in records):
    for num, den, field, goal in RATIO_TARGETS:
      if (size, num) in by and (size, den) in by:
        ratio = by[size, num][field] / by[size, den][field]
        strict = field.endswith('_mb')
        goal_record = {'kind': 'target', 'size': size,
                       'method': f'{num} / {den}', 'field': field,
                       'value': ratio, 'goal': f'{"<" if strict else "<="} '
                                               f'{goal:g}',
                       'met': ratio < goal if strict else ratio <= goal}
        # With several processes per configuration taking turns, the ratio
        # of each pair (the i-th of each, which took turns side by side)
        # shows how much the processes alone move it.
        pair = [by[size, num], by[size, den]]
        by_process = [r.get('step_time_median_by_process_s') for r in pair]
        if (field == 'step_time_median_s' and all(by_process) and
            len(by_process[0]) == len(by_process[1]) > 1 and
            all(r.get('interleaved') for r in pair) and
            pair[0].get('run_id') == pair[1].get('run_id')):
          goal_record['value_by_process'] = [
              a / b for a, b in zip(*by_process)]
        out.append(goal_record)
  out += reference_comparisons(records)
  for (size, method), record in by.items():
    where = 'cpu' if record.get('backend') == 'cpu' else 'accelerator'
    if (size, method) == PEAK_TARGETS[where][:2]:
      goal = PEAK_TARGETS[where][2]
      value = record['peak_fraction']
      out.append({'kind': 'target', 'size': size, 'method': method,
                  'field': 'peak_fraction', 'value': value,
                  'goal': f'>= {goal:g}', 'met': value >= goal})
  return out


def reference_comparisons(records: List[Dict[str, Any]]
                          ) -> List[Dict[str, Any]]:
  """Each method against its PyTorch reference (`torch:<method>`) of the
  same run and size, and the issue's step-time ratios within PyTorch."""
  out = []
  by = {(r['size'], r['method']): r for r in records}
  for (size, method), ref in by.items():
    base = torch_reference_method(method)
    if base is not None and (size, base) in by:
      ours = by[size, base]
      out.append({
          'kind': 'reference', 'size': size, 'method': base,
          'reference': method,
          'step_time_median_s': ours['step_time_median_s'],
          'reference_step_time_median_s': ref['step_time_median_s'],
          'speedup': ref['step_time_median_s'] / ours['step_time_median_s'],
          'peak_memory_mb': ours['peak_memory_mb'],
          'reference_peak_memory_mb': ref['peak_memory_mb'],
          'memory_ratio': ours['peak_memory_mb'] / ref['peak_memory_mb']})
  for size in dict.fromkeys(r['size'] for r in records):
    for num, den, field, goal in RATIO_TARGETS:
      num, den = TORCH_PREFIX + num, TORCH_PREFIX + den
      if field == 'step_time_median_s' and (size, num) in by and (
          size, den) in by:
        out.append({'kind': 'reference_ratio', 'size': size,
                    'method': f'{num} / {den}', 'field': field,
                    'value': by[size, num][field] / by[size, den][field],
                    'goal_for_ours': f'<= {goal:g}'})
  return out


def previous_records(path: str) -> List[Dict[str, Any]]:
  """The `train_step` records already in `path` (none if it does not
  exist or is empty)."""
  if not path or not os.path.exists(path) or not os.path.getsize(path):
    return []
  try:
    with open(path, encoding='utf-8') as f:
      previous = json.load(f)
  except ValueError as e:  # not JSON (or not UTF-8)
    raise ValueError(f'--append: {path} is not a JSON file of benchmark '
                     f'records ({e}); give another --out.') from e
  if not isinstance(previous, list) or not all(
      isinstance(r, dict) for r in previous):
    raise ValueError(f'--append: {path} does not hold a list of benchmark '
                     'records; give another --out.')
  return [r for r in previous if r.get('kind') == 'train_step']


def merge_records(previous: List[Dict[str, Any]],
                  records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """`previous` less the configurations `records` measured again, then
  `records`."""
  measured = {(r['size'], r['method']) for r in records}
  return [r for r in previous
          if (r['size'], r['method']) not in measured] + records


COLUMNS = (('size', 'size', 's'), ('method', 'method', 's'),
           ('compile s', 'compile_s', '.1f'),
           ('median s', 'step_time_median_s', '.3f'),
           ('min s', 'step_time_min_s', '.3f'),
           ('tokens/s', 'tokens_per_s', '.0f'),
           ('GFLOP/step', 'flops_per_step', '.4g'),
           ('XLA GFLOP', 'xla_flops_per_step', '.4g'),
           ('GFLOP/s', 'flops_per_s', '.4g'),
           ('of peak', 'peak_fraction', '.2f'),
           ('(medians)', 'peak_fraction_median', '.2f'),
           ('peak MB', 'peak_memory_mb', '.0f'),
           ('XLA MB', 'xla_total_mb', '.0f'),
           ('trainable', 'trainable_params', ',d'))


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--sizes', default=','.join(common.SIZES),
                      help='Model gins models/t5_1_1_<size>.gin (or paths).')
  parser.add_argument('--methods', default=','.join(common.METHODS),
                      help='full, ia3, lora, mov-E, molora-E.')
  common.add_shape_flags(parser)
  parser.add_argument('--steps', type=int, default=10,
                      help='Timed steps per configuration (>= 10).')
  parser.add_argument('--warmup', type=int, default=1,
                      help='Untimed steps after compiling.')
  parser.add_argument('--matmuls', type=int, default=2,
                      help='Timed peak matmuls after each step.')
  parser.add_argument('--matmul_size', type=int, default=0,
                      help='Side of the peak matmul (0: 2048 on CPU, 8192 '
                      'on accelerators).')
  parser.add_argument('--processes', type=int, default=1,
                      help='Processes per configuration; a record pools '
                      'their steps. Two processes of the same code can '
                      'differ by several percent in their median step for '
                      'their whole life, so more processes show (in the '
                      'goals\' ratios of each pair of processes) and narrow '
                      'the spread of a ratio of two configurations. On CPU '
                      'every process of every method of a size is alive at '
                      'once (memory!), taking turns; on accelerators they '
                      'run one after another.')
  parser.add_argument('--interleave', default='auto',
                      choices=('auto', 'yes', 'no'),
                      help='Keep every process of each method alive and '
                      'take turns step by step (auto: on CPU).')
  parser.add_argument('--torch_reference', default='auto',
                      choices=('auto', 'no'),
                      help='auto: when JAX runs on CPU, also run each '
                      'method as torch:<method>, in eager PyTorch on '
                      'Hugging Face T5 (bench/torch_reference.py), taking '
                      'turns with ours. Methods listed as torch:<method> '
                      'run either way.')
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='A gin binding for every configuration (repeat '
                      'the flag for more), e.g. "network.T5Config.'
                      'remat_policy = \'minimal\'".')
  parser.add_argument('--append', action='store_true',
                      help='Keep the records already in --out (of other '
                      'runs of this script on the same machine, e.g. one '
                      'method per run) and add this run\'s, replacing '
                      'those of the same size and method; the goals are '
                      'computed over all of them.')
  parser.add_argument('--deadline_s', type=float, default=0,
                      help='Start no configuration after this many seconds '
                      '(0: no deadline); --out holds each configuration as '
                      'soon as it is measured, so a run stopped later keeps '
                      'what it finished.')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--size', help=argparse.SUPPRESS)
  parser.add_argument('--method', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker_main(args)
  args.sizes = [s for s in args.sizes.split(',') if s]
  # Records of one run share it (--append can join runs).
  args.run_id = f'{time.strftime("%Y-%m-%dT%H:%M:%S")}-{os.getpid()}'
  args.methods = [m for m in args.methods.split(',') if m]
  common.check_at_least(parser, args, 1, 'steps', 'matmuls', 'processes')
  common.check_at_least(parser, args, 0, 'warmup', 'matmul_size')
  ours = list(dict.fromkeys(torch_reference_method(m) or m
                            for m in args.methods))
  common.check_training_flags(parser, args, '--sizes', args.sizes,
                              '--methods', ours, args.gin_bindings)
  try:
    previous = previous_records(args.out) if args.append else []
  except ValueError as e:
    parser.error(str(e))

  start = time.time()
  records = []

  def on_record(record):
    # Written at once, so that a run stopped later keeps what it measured.
    records.append(record)
    if args.out:
      merged = merge_records(previous, records)
      common.save_records(args.out, merged + targets(merged))

  past_deadline = lambda: bool(args.deadline_s) and (
      time.time() - start > args.deadline_s)
  for size in args.sizes:
    measure_size(args, size, on_record, past_deadline)
  if not records:
    print('No configuration was measured.')
    return 1
  records = merge_records(previous, records)
  goals = targets(records)
  print(f'\n{records[0]["device_kind"]} ({records[0]["cpu_model"]}, '
        f'{records[0]["cpu_cores"]} cores), jax '
        f'{next((r["jax_version"] for r in records if "jax_version" in r), "-")}, '
        f'{args.dtype}; load average {records[0]["load_average_start"][0]:.1f}'
        f' -> {records[-1]["load_average_end"][0]:.1f}; '
        f'{time.time() - start:.0f}s in all')
  common.print_table(records, COLUMNS)
  for g in goals:
    if g['kind'] == 'target':
      print(f'{g["size"]:>6} {g["method"]:<20} {g["field"]:<20} '
            f'{g["value"]:.3f} (goal {g["goal"]}): '
            f'{"met" if g["met"] else "NOT met"}')
    elif g['kind'] == 'reference':
      print(f'{g["size"]:>6} {g["method"]:<20} {g["speedup"]:.2f}x the '
            f'speed of {g["reference"]}, {g["memory_ratio"]:.2f}x its peak '
            'memory')
    else:
      print(f'{g["size"]:>6} {g["method"]:<20} {g["field"]:<20} '
            f'{g["value"]:.3f} (PyTorch; our goal {g["goal_for_ours"]})')
  common.write_json(args.out, records + goals)
  return 0


if __name__ == '__main__':
  sys.exit(main())
