"""Opt-in glibc malloc settings that stop XLA on CPU from faulting in its
working memory anew every step: faster CPU steps for more host memory.

Why this exists: XLA's CPU runtime allocates an executable's temporary buffer
(every intermediate of a training step that lives past one fused kernel:
1.6 GB for T5-small MoV-10 at batch 8, 256/64 tokens) with malloc at each
execution and frees it at the end. With glibc's defaults a block that large
is a fresh `mmap` that `free` unmaps again (always on XLA's worker threads,
whose malloc arenas cannot hold it), so the kernel faults in and zeroes every
4 KiB page of it on every step. Measured on a 2-core EPYC: 400,000 page faults
and 0.6 s of kernel time per 1.3 s step; 560,000 faults and 1.5 s per step
once a seqio pipeline has run in the same process, as in `mov_jax.train`.

The settings below (read by glibc when a process starts, from the
`GLIBC_TUNABLES` environment variable; they cannot be applied later) make
every thread allocate from one heap that never hands memory back to the
kernel, so each step reuses the pages of the step before: no page faults in
the steps, and `python -m mov_jax.train` on T5-small MoV-10 ran 2,264 instead
of 1,680-1,940 tokens/s with identical losses. (XLA frees the buffer
asynchronously, just after the results are ready. On a machine busy with
other work, a step can allocate before the last one's free and fault in new
pages, so the gain shrinks there.)

The price, measured in the same run: the process keeps every page it ever
used, and the one heap fragments. Its peak host memory was 6.2 GB instead of
3.6 GB. Adding `glibc.malloc.hugetlb=1` (transparent huge pages) gained about
3% more and raised the peak to 9.0 GB, so it is not included. Hence opt-in:
`make bench` sets them, and `mov_jax.train` / `mov_jax.eval` print a note on
CPU when they are missing.
"""

import os
import sys
from typing import Dict, List, Mapping, Optional

ENV = 'GLIBC_TUNABLES'

# (tunable, value). trim_threshold: 1 TiB, i.e. never shrink the heap.
TUNABLES = (
    ('glibc.malloc.arena_max', '1'),
    ('glibc.malloc.mmap_max', '0'),
    ('glibc.malloc.trim_threshold', str(1 << 40)),
)


def parse(value: str) -> Dict[str, str]:
  """'a=1:b=2' -> {'a': '1', 'b': '2'} (glibc's GLIBC_TUNABLES syntax)."""
  out = {}
  for item in value.split(':'):
    name, sep, setting = item.partition('=')
    if sep and name:
      out[name] = setting
  return out


def with_tunables(env: Mapping[str, str]) -> Dict[str, str]:
  """A copy of `env` whose GLIBC_TUNABLES holds `TUNABLES`; a tunable the
  caller already set keeps the caller's value."""
  current = env.get(ENV, '')
  have = parse(current)
  extra = [f'{name}={value}' for name, value in TUNABLES if name not in have]
  out = dict(env)
  if extra:
    out[ENV] = ':'.join(([current] if current else []) + extra)
  return out


def missing(env: Mapping[str, str]) -> List[str]:
  """The names of `TUNABLES` that `env` does not set at all."""
  have = parse(env.get(ENV, ''))
  return [name for name, _ in TUNABLES if name not in have]


def glibc_version() -> Optional[str]:
  """'2.36' under glibc, None elsewhere (musl, macOS, Windows)."""
  try:
    libc = os.confstr('CS_GNU_LIBC_VERSION')  # 'glibc 2.36'
  except (AttributeError, ValueError, OSError):
    return None
  if not libc or not libc.startswith('glibc '):
    return None
  return libc.split()[1]


def advice(backend: str, env: Optional[Mapping[str, str]] = None
           ) -> Optional[str]:
  """The note a binary prints when it computes on CPU under glibc without
  the tunables; None when they are set or do not apply."""
  env = os.environ if env is None else env
  if backend != 'cpu' or glibc_version() is None:
    return None
  names = missing(env)
  if not names:
    return None
  setting = with_tunables({ENV: env.get(ENV, '')})[ENV]
  return ('note: XLA on CPU allocates each step\'s working memory afresh, and '
          'with glibc\'s default malloc the kernel faults it in page by page '
          f'every step ({", ".join(names)} not set). For steps up to 1.3x '
          'faster, at the cost of a higher peak host memory (T5-small: 6.2 '
          'instead of 3.6 GB), run this before starting Python:\n'
          f'  export {ENV}={setting}\n'
          '(see mov_jax/host_memory.py).')


def print_advice(backend: str) -> None:
  """Prints `advice` to stderr, if any (call once, on process 0)."""
  message = advice(backend)
  if message:
    print(message, file=sys.stderr, flush=True)


if __name__ == '__main__':
  # `export GLIBC_TUNABLES=$(python -m mov_jax.host_memory)`: the current
  # value with the settings above added.
  print(with_tunables(os.environ)[ENV])
