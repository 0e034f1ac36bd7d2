"""Helpers shared by the benchmarks in bench/ (not a benchmark itself).

* the machine: `machine_info` (CPU model, cores, load average, JAX version,
  backend, device, glibc malloc settings; `host_info` without JAX);
* the real training step: `train_config` (the gin files of a size and a
  method, as `python -m mov_jax.train` reads them), `Training` (parameters,
  the trainable / frozen split and optimizer state placed on a mesh, and the
  jitted, donated `train.make_train_step`, as `train.train` builds them),
  `synthetic_batch`;
* measurement: `Matmul` (the matmul peak, timed in the same process),
  `time_calls`, `stats`, XLA's flop and memory counts, peak memory
  (`reset_peak_memory`, `peak_memory`);
* `Worker` / `serve`: a benchmark configuration in its own Python process
  (its own peak memory, its own JAX flags), driven by JSON lines, so that
  several configurations can take turns step by step and share the
  machine's load; `TimedStepWorker`, what train_step.py's workers (ours
  and the PyTorch reference) share;
* `add_shape_flags`, the `check_*` functions, `report`: the flags the
  scripts share, their checks before anything runs, and the output.
"""

import contextlib
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# Quiet TensorFlow (imported by mov_jax.train for its input pipeline); JAX is
# configured by the environment as usual.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

METHODS = ('full', 'ia3', 'lora', 'mov-10', 'mov-30', 'molora-10')
SIZES = ('tiny', 'small')
MODEL_DIR = "'/tmp/mov_jax_bench_unused'"  # required by the gin, never written


# --------------------------------------------------------------- the machine


def cpu_model() -> str:
  """'model name' of /proc/cpuinfo, with the CPU family and model numbers
  (virtual machines often name only the brand)."""
  fields = {}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        key, _, value = line.partition(':')
        if not line.strip():
          break  # the first processor is enough
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  if 'model name' not in fields:
    return platform.processor() or platform.machine()
  return (f"{fields['model name']} (family {fields.get('cpu family', '?')}, "
          f"model {fields.get('model', '?')})")


def code_version() -> str:
  """The git commit the benchmark ran (+ '-dirty' with local changes)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root,
                            capture_output=True, text=True, check=True,
                            timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'mov_jax',
                            'bench', 'gin', ':!bench/results'], cwd=root,
                           capture_output=True,
                           text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return commit + ('-dirty' if dirty else '')


def host_info() -> Dict[str, Any]:
  """Where a benchmark ran, without JAX: code, malloc settings, CPU, load."""
  from mov_jax import host_memory  # pylint: disable=g-import-not-at-top
  return {'code_version': code_version(),
          'glibc_tunables': os.environ.get(host_memory.ENV, ''),
          'malloc_tuned': not host_memory.missing(os.environ),
          'cpu_model': cpu_model(), 'cpu_cores': os.cpu_count(),
          'load_average': list(os.getloadavg())}


def machine_info() -> Dict[str, Any]:
  """Where a benchmark ran; call it after JAX picked its backend."""
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.devices()[0]
  return {**host_info(), 'jax_version': jax.__version__,
          'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count()}


# -------------------------------------------------------- the training step


def method_gin(method: str) -> Tuple[str, List[str]]:
  """'mov-30' -> ('methods/mov.gin', ['NUM_EXPERTS = 30'])."""
  name, dash, experts = method.partition('-')
  if name not in ('full', 'ia3', 'lora', 'mov', 'molora'):
    raise ValueError(f'Unknown method {method!r}: use full, ia3, lora, '
                     'mov-E or molora-E (E experts).')
  if bool(dash) != (name in ('mov', 'molora')) or (
      dash and not (experts.isdigit() and int(experts) > 0)):
    raise ValueError(f'{method!r}: give mov and molora a positive expert '
                     'count (mov-10) and the other methods none.')
  bindings = [f'NUM_EXPERTS = {int(experts)}'] if experts else []
  return f'methods/{name}.gin', bindings


def train_config(size: str, method: str, *, batch_size: int,
                 input_length: int, target_length: int, dtype: str,
                 dropout: float, extra_bindings: Sequence[str] = ()):
  """The `train.TrainConfig` of `models/t5_1_1_<size>.gin` + a method gin +
  `runs/finetune.gin`, with the benchmark's shapes and dtype."""
  from mov_jax import train  # pylint: disable=g-import-not-at-top
  parse_config(size, method, batch_size=batch_size,
               input_length=input_length, target_length=target_length,
               dtype=dtype, dropout=dropout, extra_bindings=extra_bindings)
  return train.config_from_gin()


def parse_config(size: str, method: str, *, batch_size: int,
                 input_length: int, target_length: int, dtype: str,
                 dropout: float, extra_bindings: Sequence[str] = ()
                 ) -> List[str]:
  """Parses `train_config`'s gins; returns the macros of `extra_bindings`
  that this configuration's gins do not use. `extra_bindings` apply to
  every configuration of a run, so a macro only some methods have (e.g.
  ROUTER_TOP_K) is left out of the others (`check_training_flags` catches one no
  configuration uses)."""
  import gin  # pylint: disable=g-import-not-at-top
  from mov_jax import gin_utils  # pylint: disable=g-import-not-at-top
  method_file, method_bindings = method_gin(method)
  model_file = size if size.endswith('.gin') else f'models/t5_1_1_{size}.gin'
  bindings = [f"ACTIVATION_DTYPE = '{dtype}'", f'DROPOUT_RATE = {dropout}',
              f'MODEL_DIR = {MODEL_DIR}', f'BATCH_SIZE = {batch_size}',
              "TASK_FEATURE_LENGTHS = {'inputs': %d, 'targets': %d}" % (
                  input_length, target_length)]
  gin.clear_config()
  return gin_utils.parse_gin([model_file, method_file, 'runs/finetune.gin'],
                             bindings + method_bindings + list(extra_bindings),
                             allow_unused_macros=True)


def count_params(tree) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


class Training:
  """Everything one benchmarked training configuration needs, built as
  `train.train` builds a fresh run (`train.state_layout`, its
  `initial_params` and `fresh_state`, `train.jit_train_step`), under the
  mesh and logical axis rules."""

  def __init__(self, cfg, mesh=None, seed: int = 0):
    import dataclasses  # pylint: disable=g-import-not-at-top
    from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
    from mov_jax import train  # pylint: disable=g-import-not-at-top
    self.cfg = cfg = dataclasses.replace(cfg, seed=seed)
    self.mesh = cfg.mesh.make_mesh() if mesh is None else mesh
    self.rules = cfg.mesh.rules
    partitioning.check_batch_size(cfg.batch_size, self.mesh)
    tx = cfg.optimizer.make()
    with self.context():
      layout = train.state_layout(cfg, tx, self.mesh)
      self.state = layout.fresh_state(layout.initial_params())
      self.step_fn = train.jit_train_step(cfg, tx, layout)
    self.trainable_params = count_params(self.state.trainable)
    self.total_params = self.trainable_params + count_params(
        self.state.frozen)
    self.compiled = None

  def context(self):
    """The mesh and logical axis rules the network is traced under."""
    import contextlib  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from flax import linen as nn  # pylint: disable=g-import-not-at-top
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def place(self, batch: Dict[str, Any]) -> Dict[str, Any]:
    from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
    return partitioning.host_local_to_global(batch, self.mesh)

  def compile(self, batch) -> Dict[str, Optional[float]]:
    """AOT-compiles the step for `batch`: seconds, XLA's flops and memory.
    Raises when the step cannot fit in a device's memory."""
    from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
    start = time.perf_counter()
    with self.context():
      self.compiled = self.step_fn.lower(self.state, batch).compile()
    partitioning.check_fits_in_memory(
        self.compiled, 'This training step',
        'Use a smaller --batch_size, --input_length or --target_length.')
    return {'compile_s': time.perf_counter() - start,
            'xla_flops_per_step': xla_flops(self.compiled),
            **xla_memory_mb(self.compiled)}

  def step(self, batch) -> Dict[str, Any]:
    """One training step, waited for; returns its metrics."""
    import jax  # pylint: disable=g-import-not-at-top
    fn = self.compiled if self.compiled is not None else self.step_fn
    self.state, metrics = fn(self.state, batch)
    jax.block_until_ready((self.state, metrics))
    return metrics


def xla_flops(compiled) -> Optional[float]:
  """The flops XLA's cost analysis counts for a compiled computation."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return float(flops) if flops is not None and flops > 0 else None


def xla_memory_mb(compiled) -> Dict[str, float]:
  """XLA's buffer sizes for a compiled computation (per device), in MiB."""
  from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
  need = partitioning.compiled_memory_bytes(compiled)
  if need is None:
    return {}
  return {'xla_temp_mb': need['temp'] / 2 ** 20,
          'xla_argument_mb': need['arguments'] / 2 ** 20,
          'xla_total_mb': need['total'] / 2 ** 20}


def synthetic_batch(batch_size: int, input_length: int, target_length: int,
                    vocab_size: int, seed: int = 0):
  """Random tokens (no padding) shaped like an unpacked training batch."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, vocab_size, (batch_size, input_length))
  targets = rng.integers(2, vocab_size, (batch_size, target_length))
  # `models.shift_right` in NumPy (BOS = 0), so that the PyTorch reference
  # (torch_reference.py) needs no JAX.
  shifted = np.pad(targets, ((0, 0), (1, 0)))[:, :-1]
  return {'encoder_input_tokens': inputs.astype(np.int32),
          'decoder_target_tokens': targets.astype(np.int32),
          'decoder_input_tokens': shifted.astype(np.int32),
          'decoder_loss_weights': np.ones_like(targets, np.int32)}


# ------------------------------------------------------------- measurement


def stats(times: Sequence[float]) -> Dict[str, float]:
  return {'median': statistics.median(times), 'min': min(times),
          'max': max(times), 'count': len(times)}


def time_calls(fn: Callable[[], Any], repeats: int) -> List[float]:
  """Wall seconds of `repeats` calls of `fn` (which waits for its result)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


class Matmul:
  """An n x n matmul of random values, jitted: the peak FLOP/s to compare to.

  On CPU, 2048 x 2048 float32 (the issue's reference); on accelerators a
  larger square in the benchmark's dtype.
  """

  def __init__(self, dtype: str = 'float32', n: int = 0):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    self.n = n or (2048 if jax.default_backend() == 'cpu' else 8192)
    self.dtype = dtype
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    self.x = jax.random.normal(kx, (self.n, self.n), dtype)
    self.y = jax.random.normal(ky, (self.n, self.n), dtype)
    self.fn = jax.jit(jnp.matmul)
    self.flops = 2.0 * self.n ** 3
    for _ in range(2):  # compile, warm up
      self.run()

  def run(self):
    self.fn(self.x, self.y).block_until_ready()

  def seconds(self, repeats: int) -> List[float]:
    return time_calls(self.run, repeats)


def trim_malloc() -> None:
  """Gives freed heap (e.g. compiler scratch) back to the OS (glibc)."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def _vm_hwm_mb() -> Optional[float]:
  try:
    with open('/proc/self/status', encoding='utf-8') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def rss_mb() -> float:
  with open('/proc/self/statm', encoding='utf-8') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2 ** 20


# mallopt(3) parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
# glibc's default trim and mmap thresholds and mmap count.
_DEFAULT_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@contextlib.contextmanager
def unpooled_malloc():
  """Inside, glibc's malloc hands large blocks and freed memory back to the
  kernel as with its default settings; after, the settings of
  `mov_jax.host_memory` (which keep every page) apply again.

  With those settings the heap only grows and fragments, so the host RSS
  peak of a few steps depends on the order of earlier allocations (the same
  configuration measured 2.4 or 3.2 GB); without them it follows the
  memory the steps hold. Does nothing where those settings are not in use
  (then glibc's defaults already apply) or malloc is not glibc's.
  """
  from mov_jax import host_memory  # pylint: disable=g-import-not-at-top
  tuned = host_memory.parse(os.environ.get(host_memory.ENV, ''))
  mmap_max = tuned.get('glibc.malloc.mmap_max')
  trim = tuned.get('glibc.malloc.trim_threshold')
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    mallopt = None
  if mallopt is None or (mmap_max is None and trim is None):
    yield
    return
  mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
  mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
  mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
  trim_malloc()
  try:
    yield
  finally:
    if mmap_max is not None:
      mallopt(_M_MMAP_MAX, int(mmap_max))
    if trim is not None:
      # mallopt takes an int, which glibc converts to a size_t: -1 stands
      # for "never" (1 TiB, the tunable's value, does not fit).
      mallopt(_M_TRIM_THRESHOLD, int(trim) if int(trim) < 2 ** 31 else -1)


def reset_peak_memory() -> bool:
  """Starts a new host-RSS peak here (Linux: /proc/self/clear_refs 5), after
  handing freed heap back, so that compilation's peak does not count."""
  trim_malloc()
  try:
    with open('/proc/self/clear_refs', 'w', encoding='utf-8') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_memory(reset_worked: bool, jax_devices: bool = True
                ) -> Dict[str, Any]:
  """Peak memory of this process: JAX's device statistics on accelerators
  (unless not `jax_devices`), else host RSS (since `reset_peak_memory` where
  that worked, else ever)."""
  lifetime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
  out = {'peak_rss_lifetime_mb': lifetime}
  device_stats = None
  if jax_devices:
    import jax  # pylint: disable=g-import-not-at-top
  if jax_devices and jax.default_backend() != 'cpu':
    try:
      device_stats = jax.devices()[0].memory_stats()
    except Exception:  # pylint: disable=broad-except
      device_stats = None
  if device_stats and 'peak_bytes_in_use' in device_stats:
    out['peak_memory_mb'] = device_stats['peak_bytes_in_use'] / 2 ** 20
    out['peak_memory_kind'] = 'device peak_bytes_in_use'
  elif reset_worked and _vm_hwm_mb() is not None:
    out['peak_memory_mb'] = _vm_hwm_mb()
    out['peak_memory_kind'] = 'host RSS peak since reset_peak_memory'
  else:
    out['peak_memory_mb'] = lifetime
    out['peak_memory_kind'] = 'host ru_maxrss (includes compilation)'
  return out


# ------------------------------------------------ the training step's workers


class TimedStepWorker:
  """What both kinds of `bench/train_step.py` worker (ours in JAX, and the
  PyTorch reference) share: the peak-memory steps and the protocol.

  Requests: {'cmd': 'steps', 'steps': n, 'matmuls': m} runs one untimed
  step, then n timed steps and m timed peak matmuls; {'cmd': 'finish'}
  answers the timed steps' memory peak and every step's loss. Subclasses
  define `_run_step` (one step, waited for; returns its loss) and
  `_matmul_times`.
  """

  # Untimed steps whose peak is the configuration's peak memory.
  MEMORY_STEPS = 2

  def __init__(self, jax_devices: bool):
    self.jax_devices = jax_devices
    self.losses = []
    self.reset_worked = False

  def _run_step(self) -> Any:
    raise NotImplementedError

  def _matmul_times(self, count: int) -> Dict[str, List[float]]:
    raise NotImplementedError

  def _step(self) -> float:
    """One step; returns its seconds and keeps its loss."""
    start = time.perf_counter()
    loss = self._run_step()
    seconds = time.perf_counter() - start
    self.losses.append(float(loss))
    return seconds

  def measure_memory(self) -> Dict[str, Any]:
    """Peak memory from steps of their own, with malloc handing memory back
    (`unpooled_malloc`): the timed steps' host RSS peak follows malloc's
    settings more than the step (kept as `peak_memory_timed_mb`). Then
    starts the timed steps' peak."""
    with unpooled_malloc():
      reset_worked = reset_peak_memory()
      for _ in range(self.MEMORY_STEPS):
        self._step()
      memory = peak_memory(reset_worked, self.jax_devices)
    if memory['peak_memory_kind'].startswith('host RSS peak since'):
      memory['peak_memory_kind'] = (
          f'host RSS peak over {self.MEMORY_STEPS} steps, malloc handing '
          'memory back (bench/common.py unpooled_malloc)')
    self.reset_worked = reset_peak_memory()
    return memory

  def handle(self, message: Dict[str, Any]) -> Dict[str, Any]:
    if message['cmd'] == 'steps':
      # Untimed: the trim after the last turn handed the step's freed working
      # memory back to the kernel, and with the malloc settings of
      # mov_jax.host_memory a real run never does that.
      self._step()
      answer = {'step_s': [self._step() for _ in range(message['steps'])],
                **self._matmul_times(message['matmuls'])}
      trim_malloc()  # idle between turns: hold only the state
      return answer
    if message['cmd'] == 'finish':
      timed = peak_memory(self.reset_worked, self.jax_devices)
      return {'peak_memory_timed_mb': timed['peak_memory_mb'],
              'peak_rss_lifetime_mb': timed['peak_rss_lifetime_mb'],
              'losses': self.losses}
    raise ValueError(f'unknown command {message}')


def step_worker_flags(args, size: str, method: str) -> List[str]:
  """The flags every train_step.py worker takes (its configuration)."""
  return [f'--size={size}', f'--method={method}',
          f'--batch_size={args.batch_size}',
          f'--input_length={args.input_length}',
          f'--target_length={args.target_length}', f'--dtype={args.dtype}',
          f'--warmup={args.warmup}', f'--seed={args.seed}',
          f'--matmul_size={args.matmul_size}']


# ----------------------------------------------------- one process per config


class Worker:
  """A child Python process answering JSON requests, one per line.

  The child runs `script --worker ARGS...` and calls `serve(handler)`;
  `request` sends one object and returns the handler's answer. Anything the
  child prints itself (or libraries print) is ignored; its stderr is kept in
  a file and shown if it fails.
  """

  PREFIX = '@@bench@@'

  def __init__(self, script: str, args: Sequence[str],
               env: Optional[Dict[str, str]] = None, label: str = ''):
    self.label = label or ' '.join(args)
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self._proc = subprocess.Popen(
        [sys.executable, script, '--worker', *args], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        env={**os.environ, **(env or {})})

  def request(self, message: Dict[str, Any]) -> Dict[str, Any]:
    self._proc.stdin.write(json.dumps(message) + '\n')
    self._proc.stdin.flush()
    return self.read()

  def read(self) -> Dict[str, Any]:
    for line in self._proc.stdout:
      if line.startswith(self.PREFIX):
        answer = json.loads(line[len(self.PREFIX):])
        if 'progress' in answer:  # see `progress`
          print(f'[{self.label}] {answer["progress"]}', flush=True)
          continue
        if 'error' in answer:
          raise RuntimeError(f'{self.label}: {answer["error"]}')
        return answer
    self._proc.wait()
    self._stderr.seek(0)
    tail = self._stderr.read()[-3000:]
    raise RuntimeError(f'{self.label} exited with status '
                       f'{self._proc.returncode}:\n{tail}')

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      try:
        self._proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self._proc.kill()
    self._stderr.close()


def progress(text: str) -> None:
  """From a child: a line for the parent to print at once (long phases
  such as building the state, compiling and warming up then show where the
  time goes, also when a run is stopped before it answers)."""
  sys.stdout.write(Worker.PREFIX + json.dumps({'progress': text}) + '\n')
  sys.stdout.flush()


def serve(handler: Callable[[Dict[str, Any]], Dict[str, Any]],
          ready: Dict[str, Any]) -> None:
  """The child side of `Worker`: announces `ready`, then answers requests
  until stdin closes. An exception is sent back as {'error': ...}."""
  out = sys.stdout

  def send(obj):
    out.write(Worker.PREFIX + json.dumps(obj) + '\n')
    out.flush()

  send(ready)
  for line in sys.stdin:
    if not line.strip():
      continue
    try:
      send(handler(json.loads(line)))
    except Exception as e:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      send({'error': f'{type(e).__name__}: {e}\n{traceback.format_exc()}'})


def start_worker(script: str, args: Sequence[str],
                 env: Optional[Dict[str, str]] = None,
                 label: str = '') -> Tuple[Worker, Dict[str, Any]]:
  """Starts a `Worker` and waits for its ready message."""
  worker = Worker(script, args, env, label)
  try:
    return worker, worker.read()
  except Exception:
    worker.close()
    raise


# ------------------------------------------------------------------- flags


def add_shape_flags(parser) -> None:
  """The flags every training benchmark shares: shapes, dtype, output."""
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--input_length', type=int, default=256)
  parser.add_argument('--target_length', type=int, default=64)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'),
                      help='Activation dtype (parameters stay float32); '
                      'bfloat16 on GPU/TPU.')
  parser.add_argument('--dropout', type=float, default=0.0,
                      help='DROPOUT_RATE, the same for every configuration.')
  parser.add_argument('--seed', type=int, default=0)
  add_out_flags(parser)


def add_out_flags(parser) -> None:
  """--out and --overwrite (see `check_out`)."""
  parser.add_argument('--out', default='', help='Write the records here '
                      '(JSON); its directory must exist.')
  parser.add_argument('--overwrite', action='store_true',
                      help='Replace --out when it already holds results '
                      '(make bench does, for bench/results/latest).')


def network_from_gin_flags(parser, args, default_gin_file: str,
                           bindings: Sequence[str]):
  """The NETWORK of `--gin_file` (default `default_gin_file`) and
  `--gin.X` flags, with `bindings` applied first; a usage error naming
  the problem if the gin files do not give one."""
  from mov_jax import gin_utils  # pylint: disable=g-import-not-at-top
  if not args.gin_file:
    args.gin_file = [default_gin_file]
  try:
    gin_utils.setup_from_args(args, extra_bindings=bindings)
    return gin_utils.macro_value(
        'NETWORK', f'Pass a model gin file, e.g. --gin_file={default_gin_file}.')
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))


# Checks of the flags, in the parent before anything is measured: a bad
# value is a usage error (exit 2) naming the flag, not a traceback from a
# worker after earlier configurations ran.


def check_at_least(parser, args, minimum: int, *names: str) -> None:
  """Each integer flag `names` (as in `args`) is at least `minimum`."""
  for name in names:
    value = getattr(args, name)
    if value < minimum:
      parser.error(f'--{name}={value}: must be at least {minimum}.')


def check_out(parser, args) -> None:
  """`args.out` can be written, and holds no earlier results unless
  --overwrite (or --append, where the script has it) says what to do with
  them. A missing directory is an error, not created: a typo in the path
  should not leave results somewhere unexpected (make bench creates its
  own)."""
  path = args.out
  if not path:
    return
  appends = getattr(args, 'append', False)
  if appends and args.overwrite:
    parser.error('--append keeps the records in --out and --overwrite '
                 'replaces them: give one of the two.')
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    parser.error(f'--out={path} is a directory: give a file name, e.g. '
                 f'--out={os.path.join(path, "results.json")}.')
  if not os.path.isdir(directory):
    parser.error(f'--out={path}: the directory {directory} does not exist; '
                 f'create it (mkdir -p {directory}) or give another --out.')
  if not os.access(directory, os.W_OK | os.X_OK):
    parser.error(f'--out={path}: cannot write in {directory}; give another '
                 '--out.')
  if os.path.exists(path) and os.path.getsize(path) and not (
      appends or args.overwrite):
    append = ', --append to add to its records' if hasattr(
        args, 'append') else ''
    parser.error(f'--out={path} already holds results: pass --overwrite to '
                 f'replace them{append}, or give another --out.')


def _check_methods(parser, flag: str, methods: Sequence[str]) -> None:
  """Each of `methods` (given by `flag`) is one `method_gin` knows."""
  if not methods:
    parser.error(f'{flag}: give at least one method (full, ia3, lora, '
                 'mov-E, molora-E).')
  for method in methods:
    try:
      method_gin(method)
    except ValueError as e:
      parser.error(f'{flag}: {e}')


def model_sizes() -> List[str]:
  """The <size> of every models/t5_1_1_<size>.gin of mov-jax."""
  from mov_jax import gin_utils  # pylint: disable=g-import-not-at-top
  return sorted(p.name[len('t5_1_1_'):-len('.gin')]
                for p in (gin_utils.gin_dir() / 'models').glob('t5_1_1_*.gin'))


def check_training_flags(parser, args, size_flag: str, sizes: Sequence[str],
                         methods_flag: str, methods: Sequence[str],
                         extra_bindings: Sequence[str] = ()) -> None:
  """The checks of a benchmark of training configurations
  (`add_shape_flags`): the shapes, --out, the method names, and the gins of
  every (size, method) read with the flags' shapes and bindings as the
  workers will (a fraction of a second each), so that a missing model gin
  or a bad binding fails now."""
  from mov_jax import train  # pylint: disable=g-import-not-at-top
  check_at_least(parser, args, 1, 'batch_size', 'input_length',
                 'target_length')
  check_out(parser, args)
  _check_methods(parser, methods_flag, methods)
  if not sizes:
    parser.error(f'{size_flag}: give at least one model size.')
  unused_by_all = None
  for size in sizes:
    for method in methods:
      try:
        unused = parse_config(
            size, method, batch_size=args.batch_size,
            input_length=args.input_length, target_length=args.target_length,
            dtype=args.dtype, dropout=args.dropout,
            extra_bindings=extra_bindings)
        train.config_from_gin()  # Values the TrainConfig refuses fail too.
      except FileNotFoundError:
        parser.error(f'{size_flag}: no model gin for {size!r}; give one of '
                     f'{", ".join(model_sizes())} (gin/models/t5_1_1_<size>'
                     '.gin) or the path of a model .gin file.')
      except ValueError as e:
        parser.error(f'{size} {method}: {e}')
      unused_by_all = set(unused) if unused_by_all is None else (
          unused_by_all & set(unused))
  if unused_by_all:
    parser.error('--gin_bindings: no configuration of this run uses the '
                 f'macro(s) {", ".join(sorted(unused_by_all))}, so the '
                 'binding would have no effect; check the spelling.')


# ------------------------------------------------------------------ output


def save_records(path: str, records: List[Dict[str, Any]]) -> None:
  """Writes the records to `path` through a temporary file and a rename, so
  that a run stopped meanwhile leaves the previous version whole."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(records, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)


def write_json(path: str, records: List[Dict[str, Any]]) -> None:
  """Writes the records (if `path`), then, on CPU without the malloc settings
  of `mov_jax.host_memory`, the note that the steps above ran slower than
  they need to."""
  if path:
    save_records(path, records)
    print(f'wrote {len(records)} records to {path}')
  import jax  # pylint: disable=g-import-not-at-top
  from mov_jax import host_memory  # pylint: disable=g-import-not-at-top
  host_memory.print_advice(jax.default_backend())


def report(records: List[Dict[str, Any]],
           columns: Sequence[Tuple[str, str, str]], footer: str,
           out: str) -> None:
  """Prints the records' table and a footer line; writes them to `out`."""
  print_table(records, columns)
  print(footer)
  write_json(out, records)


def print_table(records: Sequence[Dict[str, Any]],
                columns: Sequence[Tuple[str, str, str]]) -> None:
  """Prints `records` as a table of (header, key, format) columns."""
  rows = [[h for h, _, _ in columns]]
  for r in records:
    rows.append([format(r[k], fmt) if r.get(k) is not None else '-'
                 for _, k, fmt in columns])
  widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
  for row in rows:
    print('  '.join(cell.rjust(w) for cell, w in zip(row, widths)))
