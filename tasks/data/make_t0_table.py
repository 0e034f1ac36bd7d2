"""Writes tasks/data/t0_tasks.tsv, mov-jax's compact table of T0 / P3 tasks.

    python tasks/data/make_t0_table.py ../shared/data/p3_tasks.json

The input is the project's fact sheet `p3_tasks.json`, compiled from
bigscience-workshop/t-zero (t0/datasets.csv and t0/seqio_tasks at commit
7a699e3) and promptsource v0.1.0 (commit 4a66271); see its `source` block.
One output row per P3 task (template; ANLI: one per round).
"""

import csv
import json
import pathlib
import re
import sys

HEADER = [
    '# T0 / P3 tasks for mov-jax, one row per P3 task (template).',
    '# Sources: bigscience-workshop/t-zero t0/datasets.csv + t0/seqio_tasks '
    '(commit 7a699e3), promptsource v0.1.0 (commit 4a66271).',
    '# role: train = T0 training mixture (do_train=BASE); eval = held-out '
    '(do_eval=BASE).',
    '# mixture_rate: train_size, or 500000 // templates when train_size > '
    '500000 (train rows only).',
    '# Written by tasks/data/make_t0_table.py; do not edit by hand.',
]
COLUMNS = ['p3_task', 'dataset', 'role', 'original_task', 'answer_choices',
           'train_size', 'mixture_rate', 'f1']
# Held-out datasets whose usual metric includes macro F1 (SuperGLUE CB).
F1_DATASETS = {'super_glue_cb'}


def clean(name: str) -> str:
  return re.sub(r'[^\w\d._]+', '_', name)


def rows_from(facts: dict):
  for entry in facts['datasets']:
    hf_name, subset, role = entry['hf_name'], entry['subset'], entry['role']
    dataset = clean(hf_name + (f'_{subset}' if subset else ''))
    rate = entry.get('t0_mixture_rate_per_template', '')
    for template in entry['templates']:
      names = template['p3_task_name']
      if isinstance(names, str):
        names = [names]
      for name in names:
        ds = dataset
        if hf_name == 'anli':
          ds = f'anli_{name.rsplit("_", 1)[1]}'  # anli_r1, anli_r2, anli_r3
        yield {
            'p3_task': name,
            'dataset': ds,
            'role': role,
            'original_task': int(bool(template['original_task'])),
            'answer_choices': int(bool(template['has_answer_choices'])),
            'train_size': entry.get('train_size') or '',
            'mixture_rate': rate if role == 'train' else '',
            'f1': int(dataset in F1_DATASETS),
        }


def main(argv):
  facts = json.loads(pathlib.Path(argv[1]).read_text())
  out = pathlib.Path(__file__).with_name('t0_tasks.tsv')
  rows = sorted(rows_from(facts), key=lambda r: (r['role'], r['p3_task']))
  with out.open('w', newline='') as f:
    f.write('\n'.join(HEADER) + '\n')
    writer = csv.DictWriter(f, COLUMNS, delimiter='\t', lineterminator='\n')
    writer.writeheader()
    writer.writerows(rows)
  print(f'wrote {len(rows)} rows to {out}')


if __name__ == '__main__':
  main(sys.argv)
