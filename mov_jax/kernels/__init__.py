"""Fused CPU kernels for the mixture sites and attention, as XLA FFI calls.

XLA's CPU backend runs a MoV site (router matmul, softmax, mixture, scaling
and their gradients) as about thirty operations, most of them passes over the
site's activations or thin, memory-bound matmuls; `mov_cpu.cc` does the same
arithmetic in one pass forward and one backward, on XLA's intra-op threads.
XLA runs attention's per-head products as batched matmuls at a third to a
half of its square-matmul rate on CPU; `attention_cpu.cc` computes each head
(products, bias, softmax and gradients) with its own small tiled matmul, the
heads spread over the same threads.

The kernels are C++ compiled on first use with the host's compiler (`c++`, or
`$CXX`) for the host's CPU (`-march=native`) against jaxlib's FFI headers, and
cached under `$MOV_JAX_KERNEL_CACHE` (default `~/.cache/mov_jax/kernels`),
keyed by the source, jaxlib, compiler and CPU. Where that fails (no compiler)
the models fall back to the plain JAX computation, with one warning that says
why; `MOV_JAX_CPU_KERNELS=0` turns the kernels off. They only ever run on the
CPU backend, in float32, on one device (a sharded step keeps the JAX
computation, which XLA partitions), with at most 32 experts.
"""

import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array

_SOURCES = tuple(pathlib.Path(__file__).with_name(name) for name in (
    'cpu_common.h', 'mov_cpu.cc', 'attention_cpu.cc'))
# The kernels' XLA FFI target names (they appear in jaxprs and HLO), with
# the library symbols that implement them.
FORWARD_TARGET = 'mov_jax_mov_forward'
BACKWARD_TARGET = 'mov_jax_mov_backward'
ATTENTION_FORWARD_TARGET = 'mov_jax_attention_forward'
ATTENTION_BACKWARD_TARGET = 'mov_jax_attention_backward'
_TARGETS = {FORWARD_TARGET: 'MovForward', BACKWARD_TARGET: 'MovBackward',
            ATTENTION_FORWARD_TARGET: 'AttentionForward',
            ATTENTION_BACKWARD_TARGET: 'AttentionBackward'}

# The most experts a kernel routes over (a row of logits: 2 to 4 vectors).
MAX_EXPERTS = 32

_lock = threading.Lock()
_status: Optional[Tuple[bool, str]] = None  # (available, why not)


def cache_dir() -> pathlib.Path:
  return pathlib.Path(
      os.environ.get('MOV_JAX_KERNEL_CACHE') or
      pathlib.Path.home() / '.cache' / 'mov_jax' / 'kernels')


def _cpu_signature() -> str:
  """What `-march=native` compiles for: the CPU's model and feature flags."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      lines = [l for l in f if l.startswith(('model name', 'flags'))]
    return ''.join(sorted(set(lines)))
  except OSError:
    return platform.processor() or platform.machine()


def _compile(compiler: str) -> pathlib.Path:
  include = jax.ffi.include_dir()
  version = subprocess.run([compiler, '--version'], capture_output=True,
                           text=True, check=True).stdout
  import jaxlib  # pylint: disable=g-import-not-at-top
  # jaxlib's version stands for the FFI headers compiled against.
  key = hashlib.sha256('\0'.join([
      *(source.read_text(encoding='utf-8') for source in _SOURCES),
      jaxlib.__version__,
      str(pathlib.Path(include).resolve()), version, _cpu_signature()
  ]).encode()).hexdigest()[:16]
  target = cache_dir() / f'cpu_kernels_{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Compiled to a temporary name and renamed: processes that build at once
  # (pytest workers) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
  os.close(fd)
  try:
    cmd = [compiler, '-O3', '-march=native', '-fopenmp-simd', '-std=c++17',
           '-shared', '-fPIC', '-w', f'-I{include}',
           *(str(source) for source in _SOURCES if source.suffix == '.cc'),
           '-o', tmp]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f'{" ".join(cmd)} failed:\n{result.stderr[-2000:]}')
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


def _load() -> Tuple[bool, str]:
  if os.environ.get('MOV_JAX_CPU_KERNELS', '1') == '0':
    return False, 'MOV_JAX_CPU_KERNELS=0'
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not compiler:
    return False, 'no C++ compiler found (install g++ or set $CXX)'
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    library = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(
          target, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return False, str(e)
  return True, ''


def cpu_kernels_available() -> bool:
  """Builds and registers the kernels once per process; False if it cannot."""
  global _status
  with _lock:
    if _status is None:
      _status = _load()
      if not _status[0]:
        logging.warning(
            'mov_jax: fused CPU kernels unavailable (%s); the mixture sites '
            'and attention run as plain JAX operations, which is slower on '
            'CPU.',
            _status[1])
    return _status[0]


def use_cpu_kernels(dtype, num_experts: int) -> bool:
  """Whether a site with activations of `dtype` should use the kernels."""
  return (jax.default_backend() == 'cpu' and jax.device_count() == 1 and
          jnp.dtype(dtype) == jnp.float32 and
          1 <= num_experts <= MAX_EXPERTS and cpu_kernels_available())


def _require_kernels():
  if not cpu_kernels_available():
    raise RuntimeError(f'mov_jax: the fused CPU kernels are unavailable '
                       f'({_status[1]}); check use_cpu_kernels() first.')


def _call_forward(x, w, v):
  _require_kernels()
  rows, heads, _ = x.shape
  stats = jax.ShapeDtypeStruct((rows, heads, w.shape[1]), jnp.float32)
  return jax.ffi.ffi_call(
      FORWARD_TARGET, (jax.ShapeDtypeStruct(x.shape, jnp.float32), stats, stats),
      vmap_method='sequential')(x, w, v)


@jax.custom_vjp
def mov_site(x: Array, w: Array, v: Array) -> Tuple[Array, Array, Array]:
  """One MoV site: `(x * (1 + sum_e p_e (v_e - 1)), logits, p)`.

  x: `[rows, heads, K]` float32 (the tensor that is routed and scaled);
  w: router kernel `[K, E]`; v: expert vectors `[heads, E, K]`, routed per
  head with the shared kernel; logits and probabilities `[rows, heads, E]`.
  """
  return _call_forward(x, w, v)


def _mov_site_fwd(x, w, v):
  # With symbolic zeros, x says whether anything differentiates it: a site
  # on a frozen path (e.g. the keys of the first layer, computed from the
  # frozen embeddings) needs no input gradient, as in JAX's own autodiff.
  y, logits, probs = _call_forward(x.value, w.value, v.value)
  return (y, logits, probs), (x.value, w.value, v.value, probs, x.perturbed)


def _mov_site_bwd(residuals, cotangents):
  x, w, v, probs, need_dx = residuals
  dy, dlogits, dprobs = cotangents
  # The logits and probabilities get a cotangent only when router losses or
  # statistics are differentiated; otherwise the kernel takes an empty
  # array for them instead of a materialised zero per token. An empty dx
  # result tells it not to compute the input gradient.
  empty = jnp.zeros((0,), jnp.float32)
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    dy = jnp.zeros(x.shape, jnp.float32)
  if isinstance(dlogits, jax.custom_derivatives.SymbolicZero):
    dlogits = empty
  if isinstance(dprobs, jax.custom_derivatives.SymbolicZero):
    dprobs = empty
  shapes = tuple(jax.ShapeDtypeStruct(shape, jnp.float32) for shape in (
      x.shape if need_dx else (0,), w.shape, v.shape))
  dx, dw, dv = jax.ffi.ffi_call(BACKWARD_TARGET, shapes, vmap_method='sequential')(
      x, w, v, probs, dy, dlogits, dprobs)
  return (dx if need_dx else None), dw, dv


mov_site.defvjp(_mov_site_fwd, _mov_site_bwd, symbolic_zeros=True)


def use_cpu_attention(dtype) -> bool:
  """Whether attention on activations of `dtype` should use the kernels
  (the conditions of `use_cpu_kernels`; dropout is the caller's check)."""
  return use_cpu_kernels(dtype, 1)


def attention(query: Array, key: Array, value: Array,
              bias: Optional[Array]) -> Array:
  """T5 attention of float32 `query [b, lq, h, d]` over `key`/`value
  [b, lk, h, d]` with an additive `bias` broadcastable to `[b, h, lq, lk]`
  (or None): `softmax(q k^T + bias) v` per head, `[b, lq, h, d]`."""
  batch, q_len, heads, _ = query.shape
  kv_len = key.shape[1]
  if bias is None:
    bias = jnp.zeros((0,), jnp.float32)
  else:
    bias = jnp.asarray(bias, jnp.float32)
    if bias.ndim != 4:
      raise ValueError(f'attention bias must have 4 dims [b, h, lq, lk], got '
                       f'shape {bias.shape}.')
    # Only the batch and head axes stay broadcast (the kernel reads them so);
    # autodiff sums the gradient back over the others.
    bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, kv_len))
    if bias.shape[0] not in (1, batch) or bias.shape[1] not in (1, heads):
      raise ValueError(f'attention bias of shape {bias.shape} does not '
                       f'broadcast to [{batch}, {heads}, {q_len}, {kv_len}].')
  return _attention(query, key, value, bias)


def _call_attention_forward(query, key, value, bias):
  _require_kernels()
  batch, q_len, heads, _ = query.shape
  probs = jax.ShapeDtypeStruct((batch, heads, q_len, key.shape[1]),
                               jnp.float32)
  return jax.ffi.ffi_call(
      ATTENTION_FORWARD_TARGET,
      (jax.ShapeDtypeStruct(query.shape, jnp.float32), probs),
      vmap_method='sequential')(query, key, value, bias)


@jax.custom_vjp
def _attention(query, key, value, bias):
  return _call_attention_forward(query, key, value, bias)[0]


def _attention_fwd(query, key, value, bias):
  out, probs = _call_attention_forward(query.value, key.value, value.value,
                                       bias.value)
  # The backward kernel skips the gradients nothing differentiates: a bias
  # that is a mask (or T5's frozen position bias), the query or key of a
  # frozen first layer.
  wanted = (query.perturbed, key.perturbed, value.perturbed, bias.perturbed)
  return out, (query.value, key.value, value.value, probs, wanted,
               bias.value.shape)


def _attention_bwd(residuals, dout):
  query, key, value, probs, wanted, bias_shape = residuals
  if isinstance(dout, jax.custom_derivatives.SymbolicZero):
    dout = jnp.zeros(query.shape, jnp.float32)
  shapes = tuple(jax.ShapeDtypeStruct(shape if want else (0,), jnp.float32)
                 for shape, want in zip((query.shape, key.shape, value.shape,
                                         probs.shape), wanted))
  gradients = list(jax.ffi.ffi_call(
      ATTENTION_BACKWARD_TARGET, shapes, vmap_method='sequential')(
          query, key, value, probs, dout))
  if wanted[3]:  # summed over the axes the bias is broadcast along
    broadcast = tuple(axis for axis in (0, 1)
                      if bias_shape[axis] == 1 and probs.shape[axis] != 1)
    if broadcast:
      gradients[3] = jnp.sum(gradients[3], axis=broadcast, keepdims=True)
  return tuple(g if want else None for g, want in zip(gradients, wanted))


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


# (lhs shape, rhs shape, dot_general dimension numbers)
Matmul = Tuple[Tuple[int, ...], Tuple[int, ...], tuple]


def equivalent_matmuls(target_name: str,
                       operand_shapes: Sequence[Tuple[int, ...]],
                       result_shapes: Sequence[Tuple[int, ...]]
                       ) -> Optional[List[Matmul]]:
  """The matmuls the JAX path of a site runs where a kernel call runs.

  For FLOP accounting (`bench/`): the forward kernel stands for the router
  (`[R*H, K] x [K, E]`) and the per-head mixture (`[H, R, E] x [H, E, K]`),
  the backward one for their gradient matmuls (the router's input gradient
  only where it computes dx), each 2 R H K E FLOPs; the attention kernels
  for the per-head products of `dot_product_attention` (two forward, four
  backward). None for a target that is not one of these kernels.
  """
  if target_name in (ATTENTION_FORWARD_TARGET, ATTENTION_BACKWARD_TARGET):
    return _attention_matmuls(target_name, operand_shapes, result_shapes)
  if target_name not in (FORWARD_TARGET, BACKWARD_TARGET):
    return None
  rows, heads, k = operand_shapes[0]
  experts = operand_shapes[1][1]
  tokens = rows * heads
  plain = (((1,), (0,)), ((), ()))
  if target_name == FORWARD_TARGET:
    return [((tokens, k), (k, experts), plain),
            ((heads, rows, experts), (heads, experts, k),
             (((2,), (1,)), ((0,), (0,))))]
  gradients = [((tokens, k), (tokens, experts), (((0,), (0,)), ((), ()))),
               ((heads, rows, k), (heads, experts, k),
                (((2,), (2,)), ((0,), (0,)))),
               ((heads, rows, experts), (heads, rows, k),
                (((1,), (1,)), ((0,), (0,))))]
  if tuple(result_shapes[0]) != (0,):  # the router's input gradient
    gradients.append(((tokens, experts), (k, experts),
                      (((1,), (1,)), ((), ()))))
  return gradients


def _attention_matmuls(target_name: str,
                       operand_shapes: Sequence[Tuple[int, ...]],
                       result_shapes: Sequence[Tuple[int, ...]]
                       ) -> List[Matmul]:
  """The per-head matmuls of attention as the JAX path runs them, on
  `[b, h, len, d]` operands and `[b, h, lq, lk]` probabilities; backward,
  only those of the gradients the call computes (the empty results not)."""
  batch, q_len, heads, depth = operand_shapes[0]
  kv_len = operand_shapes[1][1]
  queries = (batch, heads, q_len, depth)
  keys = (batch, heads, kv_len, depth)
  probs = (batch, heads, q_len, kv_len)

  def batched(lhs_contracting, rhs_contracting):
    return (((lhs_contracting,), (rhs_contracting,)), ((0, 1), (0, 1)))

  if target_name == ATTENTION_FORWARD_TARGET:
    return [(queries, keys, batched(3, 3)),   # logits = q k^T
            (probs, keys, batched(3, 2))]     # out = probs v
  write_dq, write_dk, write_dv, write_dlogits = (
      tuple(shape) != (0,) for shape in result_shapes)
  matmuls = []
  if write_dq or write_dk or write_dlogits:
    matmuls.append((queries, keys, batched(3, 3)))  # dprobs = dout v^T
  if write_dv:
    matmuls.append((probs, queries, batched(2, 2)))  # dv = probs^T dout
  if write_dq:
    matmuls.append((probs, keys, batched(3, 2)))  # dq = dlogits k
  if write_dk:
    matmuls.append((probs, queries, batched(2, 2)))  # dk = dlogits^T q
  return matmuls
