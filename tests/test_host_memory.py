"""glibc malloc settings for XLA on CPU (mov_jax/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from mov_jax import host_memory

needs_glibc = pytest.mark.skipif(host_memory.glibc_version() is None,
                                 reason='glibc malloc only')

# A jitted program whose intermediates live in XLA's temporary buffer (64 MiB:
# matmul results that outlive the fusions between them; more than glibc's
# largest default mmap threshold, 32 MiB). Prints the temporary buffer's size
# and the page faults of the least-faulting of 5 executions after warm-up.
# XLA frees the buffer asynchronously, just after the result is ready; under
# load (measured: pytest-xdist on 2 cores) the next execution could allocate
# before that free and fault in a new region, so each execution starts after
# a pause.
_PROGRAM = r'''
import resource, time
import jax, jax.numpy as jnp

@jax.jit
def program(a, b):
  y1 = a @ b
  y2 = jnp.tanh(y1) @ b.T
  return jnp.sum(jnp.sin(y1) * (jnp.tanh(y2) @ b))

a = jnp.ones((8192, 1024), jnp.float32)
b = jnp.ones((1024, 1024), jnp.float32) * 0.01
temp = program.lower(a, b).compile().memory_analysis().temp_size_in_bytes
for _ in range(2):
  program(a, b).block_until_ready()
faults = []
for _ in range(5):
  time.sleep(0.05)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  program(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(faults)
print(temp, faults)
'''


def _temp_and_faults(env):
  env = dict(env, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run([sys.executable, '-c', _PROGRAM], env=env, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  temp, faults = out.split()[-2:]
  return int(temp), float(faults)


def _transparent_huge_pages_always() -> bool:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled',
              encoding='utf-8') as f:
      return '[always]' in f.read()
  except OSError:
    return False


@needs_glibc
def test_tuned_malloc_reuses_xlas_temporary_buffer_without_page_faults():
  default_env = {k: v for k, v in os.environ.items()
                 if k != host_memory.ENV}
  temp, default_faults = _temp_and_faults(default_env)
  _, tuned_faults = _temp_and_faults(host_memory.with_tunables(default_env))
  pages = temp / os.sysconf('SC_PAGE_SIZE')
  assert temp >= 48 * 2 ** 20, temp  # the program really has a big temp
  # With the settings, each execution reuses the heap pages of the last.
  assert tuned_faults < 0.05 * pages, (tuned_faults, pages)
  if not _transparent_huge_pages_always():
    # glibc's default: a fresh mmap per execution, every page faulted in.
    assert default_faults > 0.5 * pages, (default_faults, pages)


def test_with_tunables_adds_the_settings_and_keeps_the_callers():
  env = {host_memory.ENV: 'glibc.malloc.arena_max=4:glibc.rtld.nns=2',
         'OTHER': 'x'}
  tuned = host_memory.with_tunables(env)
  settings = host_memory.parse(tuned[host_memory.ENV])
  assert settings['glibc.malloc.arena_max'] == '4'  # the caller's value
  assert settings['glibc.rtld.nns'] == '2'
  for name, value in host_memory.TUNABLES[1:]:
    assert settings[name] == value
  assert tuned['OTHER'] == 'x'
  assert env[host_memory.ENV] == 'glibc.malloc.arena_max=4:glibc.rtld.nns=2'
  assert host_memory.with_tunables(tuned) == tuned
  assert host_memory.missing(tuned) == []
  assert host_memory.missing({}) == [n for n, _ in host_memory.TUNABLES]


@needs_glibc
def test_advice_names_the_missing_settings_only_on_cpu():
  note = host_memory.advice('cpu', env={})
  expected = host_memory.with_tunables({})[host_memory.ENV]
  assert f'export {host_memory.ENV}={expected}' in note
  assert 'glibc.malloc.mmap_max' in note
  partial = host_memory.advice(
      'cpu', env={host_memory.ENV: 'glibc.malloc.arena_max=2'})
  assert 'GLIBC_TUNABLES=glibc.malloc.arena_max=2:' in partial
  assert '(glibc.malloc.mmap_max, glibc.malloc.trim_threshold not set)' in partial
  assert host_memory.advice('cpu', env=host_memory.with_tunables({})) is None
  assert host_memory.advice('gpu', env={}) is None


def test_module_prints_the_setting_to_export():
  env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
  out = subprocess.run([sys.executable, '-m', 'mov_jax.host_memory'],
                       env=env, check=True, capture_output=True, text=True,
                       timeout=120).stdout.strip()
  assert out == host_memory.with_tunables({})[host_memory.ENV]
