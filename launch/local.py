"""Runs a mov-jax binary as N local processes joined by jax.distributed.

    python launch/local.py --num_processes=2 --devices_per_process=4 -- \
        python -m mov_jax.train --gin_file=runs/demo.gin --gin.MODEL_PARALLEL=2

Each process gets `--coordinator_address=127.0.0.1:<port> --num_processes=N
--process_id=i` and `devices_per_process` simulated CPU devices, which is how
the tests check multi-host code paths on one machine. Output lines are
prefixed with the process id; the exit code is the first non-zero one.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _pump(stream, prefix, sink):
  for line in iter(stream.readline, ''):
    sink.write(f'[{prefix}] {line}')
    sink.flush()


def launch(command, num_processes: int, devices_per_process: int,
           timeout: float = 3600.0) -> int:
  port = free_port()
  procs, threads = [], []
  for i in range(num_processes):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count='
                         f'{devices_per_process}')
    args = list(command) + [f'--coordinator_address=127.0.0.1:{port}',
                            f'--num_processes={num_processes}',
                            f'--process_id={i}']
    try:
      proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    except OSError:
      # The processes already started would wait for this one forever.
      for p in procs:
        p.kill()
        p.wait()
      raise
    thread = threading.Thread(target=_pump, args=(proc.stdout, i, sys.stdout),
                              daemon=True)
    thread.start()
    procs.append(proc)
    threads.append(thread)
  codes = []
  for proc in procs:
    try:
      codes.append(proc.wait(timeout=timeout))
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      codes.append(124)
  for thread in threads:
    thread.join(timeout=5)
  return next((c for c in codes if c), 0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=4)
  parser.add_argument('--timeout', type=float, default=3600.0)
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the command to run after --')
  for flag in ('num_processes', 'devices_per_process', 'timeout'):
    if getattr(args, flag) <= 0:
      parser.error(f'--{flag}={getattr(args, flag)}: must be positive.')
  try:
    return launch(command, args.num_processes, args.devices_per_process,
                  args.timeout)
  except OSError as e:
    parser.error(f'cannot start {command[0]!r}: {e.strerror or e}; give an '
                 'executable (a path, or a name on PATH) after --.')


if __name__ == '__main__':
  sys.exit(main())
