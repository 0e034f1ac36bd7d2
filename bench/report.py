"""Markdown tables of a directory of benchmark results (for the README).

    python bench/report.py bench/results/latest

Reads what `make bench` writes there (train_step.json, matmul_floor.json,
packing.json, scaling.json, scoring.json, mov_site.json; any of them may be
missing) and prints one Markdown table per benchmark, with the machine and
code version they ran on. Further runs of a benchmark kept beside them,
named after its file (train_step_tiny.json, matmul_floor_gpu.json), follow
its table, each under its file's name.
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple


def load(directory: str, name: str) -> Optional[List[Dict[str, Any]]]:
  """The records in `directory`/`name` (None if it does not exist); raises
  ValueError naming the file where it holds no list of records."""
  path = os.path.join(directory, name)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      records = json.load(f)
  except ValueError as e:  # not JSON (or not UTF-8)
    raise ValueError(f'{path} is not valid JSON ({e}); rerun its benchmark '
                     'or move the file away.') from e
  if not isinstance(records, list) or not all(
      isinstance(r, dict) for r in records):
    raise ValueError(f'{path} does not hold a list of benchmark records; '
                     'rerun its benchmark or move the file away.')
  return records


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join('---:' if i else '---' for i in range(len(header)))
           + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return '\n'.join(lines)


def machine(record: Dict[str, Any]) -> str:
  load_avg = record.get('load_average') or record.get('load_average_start')
  text = (f"{record.get('device_kind', '?')} backend, "
          f"{record.get('cpu_model', '?')}, {record.get('cpu_cores', '?')} "
          f"cores, jax {record.get('jax_version', '?')}, code "
          f"{record.get('code_version', '?')}")
  if 'malloc_tuned' in record and record.get('backend') == 'cpu':
    text += (', glibc malloc tuned for XLA (mov_jax/host_memory.py)'
             if record['malloc_tuned'] else ', default glibc malloc')
  if load_avg:
    text += f', load average {load_avg[0]:.1f} at the start'
  return text


def train_step_section(records) -> str:
  steps = [r for r in records if r['kind'] == 'train_step']
  goals = [r for r in records if r['kind'] == 'target']
  first = steps[0]
  rows = [[r['size'], r['method'], f"{r['step_time_median_s']:.4g}",
           f"{r['tokens_per_s']:,.0f}", f"{r['flops_per_step'] / 1e9:.1f}",
           f"{r['peak_fraction']:.2f}", f"{r['peak_fraction_median']:.2f}",
           f"{r['peak_memory_mb']:,.0f}",
           # None for the PyTorch reference, which XLA does not compile.
           '-' if r.get('xla_total_mb') is None else
           f"{r['xla_total_mb']:,.0f}",
           f"{r['trainable_params']:,}"] for r in steps]
  counts = {(r['size'], r['method']): r.get('processes', 1) for r in steps}
  per_process = first['steps'] // first.get('processes', 1)
  if len(set(counts.values())) > 1:  # runs joined with --append
    timed = (f'{per_process} timed steps per process; processes per '
             'configuration: ' + ', '.join(
                 f'{size} {method} {n}'
                 for (size, method), n in counts.items()))
  elif first.get('processes', 1) > 1:
    timed = (f"{per_process} timed steps in each of {first['processes']} "
             'processes per configuration')
  else:
    timed = f'{per_process} timed steps'
  out = [f"Training step ({first['dtype']}, batch {first['batch_size']}, "
         f"{first['input_length']} input / {first['target_length']} target "
         f"tokens, dropout {first['dropout']}, {timed}; "
         f"{machine(first)}; matmul peak {first['matmul_size']}^2: fastest "
         f"{first['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, median "
         f"{first['matmul_median_flops'] / 1e9:.0f} GFLOP/s):", '',
         table(rows, ['size', 'method', 'median s', 'tokens/s',
                      'GFLOP/step', 'of peak', 'of peak (medians)',
                      'peak RSS MB' if first.get('backend') == 'cpu' else
                      'peak device MB', 'XLA MB', 'trainable'])]
  if goals:
    rows = [[g['size'], g['method'], g['field'], f"{g['value']:.3f}",
             g['goal'], 'yes' if g['met'] else '**no**'] for g in goals]
    header = ['size', 'ratio', 'of', 'value', 'goal', 'met']
    if any('value_by_process' in g for g in goals):
      # The spread of the ratio between pairs of processes.
      header.insert(4, 'process pairs')
      for row, g in zip(rows, goals):
        pairs = g.get('value_by_process')
        row.insert(4, f'{min(pairs):.3f}-{max(pairs):.3f}' if pairs else '-')
    out += ['', table(rows, header)]
  references = [r for r in records if r['kind'] == 'reference']
  if references:
    torch_version = next((r['torch_version'] for r in steps
                          if r.get('torch_version')), '?')
    rows = [[r['size'], r['method'],
             f"{r['reference_step_time_median_s']:.4g}",
             f"{r['step_time_median_s']:.4g}", f"{r['speedup']:.2f}",
             f"{r['reference_peak_memory_mb']:,.0f}",
             f"{r['peak_memory_mb']:,.0f}", f"{r['memory_ratio']:.2f}"]
            for r in references]
    out += ['', f'Against the PyTorch reference (`torch:<method>`: eager '
            f'PyTorch {torch_version} on Hugging Face T5, same shapes, '
            'adapters and loss; bench/torch_reference.py), in the same run:',
            '', table(rows, ['size', 'method', 'PyTorch median s',
                             'mov-jax median s', 'speed-up',
                             'PyTorch peak MB', 'mov-jax peak MB',
                             'memory ratio'])]
    ratios = [r for r in records if r['kind'] == 'reference_ratio']
    if ratios:
      rows = [[r['size'], r['method'], f"{r['value']:.3f}",
               r['goal_for_ours']] for r in ratios]
      out += ['', 'The step-time goals\' ratios within PyTorch:', '',
              table(rows, ['size', 'ratio', 'value', 'our goal'])]
  return '\n'.join(out)


def packing_section(records) -> str:
  first = records[0]
  rows = [[r['mode'], f"{r['step_time_median_s']:.3f}",
           f"{r['examples_per_step']:.1f}", f"{r['fill_fraction']:.2f}",
           f"{r['real_tokens_per_s']:,.0f}",
           f"{r['speedup_real_tokens']:.2f}"] for r in records]
  return '\n'.join([
      f"Packing ({first['size']} {first['method']}, batch "
      f"{first['batch_size']} rows of {first['input_length']} / "
      f"{first['target_length']} tokens, P3-like lengths; "
      f"{machine(first)}):", '',
      table(rows, ['mode', 'median s', 'examples/step', 'real-token fill',
                   'real tokens/s', 'speed-up'])])


def scaling_section(records) -> str:
  first = records[0]
  rows = [[r['mesh'], r['method'], f"{r['step_time_median_s']:.3f}",
           f"{r['max_abs_loss_diff_vs_1x1']:.1e}"] for r in records]
  return '\n'.join([
      f"Scaling ({first['size']}, batch {first['batch_size']}, simulated CPU "
      'devices sharing the same cores: partitioning overhead and numerics, '
      f'not speed-up; {machine(first)}):', '',
      table(rows, ['mesh (data x model)', 'method', 'median s',
                   'largest loss difference from 1x1'])])


def scoring_section(records) -> str:
  first = records[0]
  rows = [[r['method'], f"{r['median_s'] * 1e3:.0f}",
           f"{r['examples_per_s']:.1f}", f"{r['speedup']:.2f}"]
          for r in records]
  return '\n'.join([
      f"Rank-classification scoring ({', '.join(first['gin_file'])}, "
      f"{first['batch_size']} examples x {first['num_choices']} choices, "
      f"{first['input_length']}-token inputs; largest score difference "
      f"{first['max_abs_diff']:.1e}; {machine(first)}):", '',
      table(rows, ['method', 'median ms', 'examples/s', 'speed-up'])])


def matmul_floor_section(records) -> str:
  first = records[0]
  rows = [[r['size'], r['method'], f"{r['matmuls']:,}",
           f"{r['matmul_flops_per_step'] / 1e9:.1f}",
           f"{r['traced_layouts_s']:.3f}", f"{r['floor_s']:.3f}",
           f"{r['floor_flops_per_s'] / 1e9:.0f}",
           f"{r['matmul_peak_fraction']:.2f}",
           f"{r['max_peak_fraction']:.2f}"] for r in records]
  return '\n'.join([
      f"The training step's matmuls, each timed alone ({first['dtype']}, "
      f"batch {first['batch_size']}, {first['input_length']} input / "
      f"{first['target_length']} target tokens; {machine(first)}; matmul "
      f"peak {first['matmul_peak_flops'] / 1e9:.0f} GFLOP/s):", '',
      table(rows, ['size', 'method', 'matmuls', 'GFLOP', 'as traced s',
                   'floor s', 'GFLOP/s', 'of peak', 'max peak_fraction'])])


def mov_site_section(records) -> str:
  first = records[0]
  rows = [[r['site'], r['method'], 'yes' if r['fused_kernel'] else 'no',
           f"{r['min_ms']:.3f}", f"{r['median_ms']:.3f}",
           f"{r['vs_ia3']:.2f}"] for r in records]
  return '\n'.join([
      f"One MoV site, forward and backward, timed alone "
      f"({', '.join(first['gin_file'])}, batch {first['batch_size']}, "
      f"{first['input_length']} input / {first['target_length']} target "
      f"tokens, {first['repeats']} runs; {machine(first)}):", '',
      table(rows, ['site', 'method', 'fused kernel', 'fastest ms',
                   'median ms', 'x IA3 (fastest)'])])


SECTIONS: Tuple[Tuple[str, Any], ...] = (
    ('train_step.json', train_step_section),
    ('matmul_floor.json', matmul_floor_section),
    ('packing.json', packing_section),
    ('scaling.json', scaling_section),
    ('scoring.json', scoring_section),
    ('mov_site.json', mov_site_section))


def result_files(directory: str, name: str) -> List[str]:
  """`name` (e.g. train_step.json) and the further runs of its benchmark in
  `directory` (train_step_<anything>.json), sorted."""
  stem = name[:-len('.json')]
  return [name] + sorted(
      f for f in os.listdir(directory)
      if f.startswith(stem + '_') and f.endswith('.json'))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('directory')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.directory):
    parser.error(f'{args.directory} is not a directory; give one that '
                 'make bench (or bench/*.py --out) wrote results into.')
  parts = []
  for main_name, section in SECTIONS:
    for name in result_files(args.directory, main_name):
      try:
        records = load(args.directory, name)
        if records:
          text = section(records)
          parts.append(text if name == main_name else f'`{name}`:\n\n{text}')
      except ValueError as e:
        parser.error(str(e))
      except (KeyError, IndexError, TypeError) as e:
        # Records of another benchmark, or of an older version of it.
        parser.error(f'{os.path.join(args.directory, name)}: not the records '
                     f'its benchmark writes ({type(e).__name__}: {e}); rerun '
                     'it or move the file away.')
  if not parts:
    print(f'No benchmark results (*.json of make bench) in '
          f'{args.directory}.', file=sys.stderr)
    return 1
  print('\n\n'.join(parts))
  return 0


if __name__ == '__main__':
  sys.exit(main())
