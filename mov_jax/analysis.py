"""Rank-classification metrics and the T0-style aggregation of results.

Rank classification: each example has several answer choices, each scored
(summed target log-likelihood, as t5x's `score_batch`); the prediction is the
highest-scoring choice, and it is right when that choice is marked correct.

Aggregation (T0 / MoV papers): accuracy per template (one P3 task), then per
dataset the median (and mean) over its templates, then overall the average
of the per-dataset medians. Every output names its statistic.

Reporting: `markdown_tables` and `csv_rows` print the evaluation binary's
results (every header or row names its statistic); `routing_figure` draws
router usage as a task x expert heatmap.
"""

import collections
import statistics
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np


def rank_classification(example_ids: Sequence[int], choice_ids: Sequence[int],
                        is_correct: Sequence[bool], scores: Sequence[float],
                        f1: bool = False) -> Dict[str, float]:
  """Accuracy (and optionally macro F1 over choice indices) in percent.

  Rows are (example, choice) pairs in any order. Ties in score go to the
  lowest choice index, so results do not depend on row order.
  """
  if not (len(example_ids) == len(choice_ids) == len(is_correct) ==
          len(scores)):
    raise ValueError('rank_classification needs equally long example_ids, '
                     'choice_ids, is_correct and scores.')
  if not example_ids:
    raise ValueError('rank_classification got no rows to score.')
  rows = collections.defaultdict(list)
  for ex, choice, correct, score in zip(example_ids, choice_ids, is_correct,
                                        scores):
    rows[int(ex)].append((int(choice), bool(correct), float(score)))
  predicted, gold = [], []
  for ex in sorted(rows):
    choices = sorted(rows[ex])
    best = max(choices, key=lambda c: (c[2], -c[0]))
    truth = [c[0] for c in choices if c[1]]
    if not truth:
      raise ValueError(f'Example {ex} has no choice marked is_correct.')
    predicted.append(best[0])
    gold.append(truth[0] if best[0] not in truth else best[0])
  accuracy = 100.0 * sum(p == g for p, g in zip(predicted, gold)) / len(gold)
  result = {'accuracy': accuracy, 'num_examples': float(len(gold))}
  if f1:
    result['f1_macro'] = 100.0 * macro_f1(predicted, gold)
  return result


def macro_f1(predicted: Sequence[int], gold: Sequence[int]) -> float:
  """Unweighted mean over gold classes of per-class F1 (as SuperGLUE CB)."""
  scores = []
  for cls in sorted(set(gold)):
    tp = sum(p == cls and g == cls for p, g in zip(predicted, gold))
    fp = sum(p == cls and g != cls for p, g in zip(predicted, gold))
    fn = sum(p != cls and g == cls for p, g in zip(predicted, gold))
    denom = 2 * tp + fp + fn
    scores.append(2 * tp / denom if denom else 0.0)
  return sum(scores) / len(scores)


def aggregate(per_template: Mapping[str, Mapping[str, float]],
              template_to_dataset: Mapping[str, str],
              metric: str = 'accuracy') -> Dict[str, Any]:
  """Per-dataset median/mean over templates and the overall average.

  Args:
    per_template: task (template) name -> metrics dict holding `metric`.
    template_to_dataset: task name -> dataset name (e.g. 'super_glue_rte',
      'anli_r1'); every task in `per_template` must be listed.
    metric: which metric to aggregate.

  Returns:
    {'per_template': {task: value},
     'per_dataset': {dataset: {'median_<metric>', 'mean_<metric>',
                               'num_templates'}},
     'overall': {'average_of_dataset_median_<metric>',
                 'average_of_dataset_mean_<metric>', 'num_datasets'}}
  """
  unknown = sorted(set(per_template) - set(template_to_dataset))
  if unknown:
    raise ValueError(f'No dataset known for templates {unknown[:5]}.')
  by_dataset = collections.defaultdict(list)
  flat = {}
  for task, metrics in sorted(per_template.items()):
    if metric not in metrics:
      raise ValueError(f'Template {task} has no {metric!r} (has '
                       f'{sorted(metrics)}).')
    flat[task] = float(metrics[metric])
    by_dataset[template_to_dataset[task]].append(flat[task])
  per_dataset = {}
  for dataset, values in sorted(by_dataset.items()):
    per_dataset[dataset] = {
        f'median_{metric}': statistics.median(values),
        f'mean_{metric}': statistics.fmean(values),
        'num_templates': len(values),
    }
  medians = [v[f'median_{metric}'] for v in per_dataset.values()]
  means = [v[f'mean_{metric}'] for v in per_dataset.values()]
  overall = {
      f'average_of_dataset_median_{metric}':
          statistics.fmean(medians) if medians else float('nan'),
      f'average_of_dataset_mean_{metric}':
          statistics.fmean(means) if means else float('nan'),
      'num_datasets': len(per_dataset),
  }
  return {'per_template': flat, 'per_dataset': per_dataset,
          'overall': overall}


def group_rows(rows: Sequence[Tuple[int, int, bool]]
               ) -> Tuple[list, list, list]:
  """Splits (example, choice, is_correct) tuples into three lists."""
  return ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


# ------------------------------------------------------------ result tables

# Human-readable names of the statistics the tables print.
_LABELS = {'accuracy': 'accuracy (%)', 'f1_macro': 'macro F1 (%)'}


def _fmt(value) -> str:
  return f'{value:.2f}' if isinstance(value, float) else str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(header) - 1)) + '|']
  lines += ['| ' + ' | '.join(_fmt(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def markdown_tables(rank: Mapping[str, Any],
                    generation: Mapping[str, Mapping[str, float]]) -> str:
  """Markdown tables of evaluation results, each header naming its statistic.

  Args:
    rank: the `rank_classification` section of results.json: `per_template`
      (task -> {'dataset', 'num_examples', metric: value}) and, per metric,
      the output of `aggregate` under the metric's name ('accuracy', ...).
    generation: task -> prediction metrics of decoded tasks.
  """
  parts = []
  per_template = rank.get('per_template', {})
  metrics = [m for m in _LABELS if m in rank]
  for metric in metrics:
    agg = rank[metric]
    label = _LABELS[metric]
    rows = [(dataset, v['num_templates'], v[f'median_{metric}'],
             v[f'mean_{metric}'])
            for dataset, v in agg['per_dataset'].items()]
    overall = agg['overall']
    rows.append((f'**average of the {overall["num_datasets"]} datasets**',
                 sum(v['num_templates'] for v in agg['per_dataset'].values()),
                 overall[f'average_of_dataset_median_{metric}'],
                 overall[f'average_of_dataset_mean_{metric}']))
    parts.append(_markdown(
        ['dataset', 'templates', f'median over templates of {label}',
         f'mean over templates of {label}'], rows))
  if per_template:
    header = ['dataset', 'template', 'examples'] + [_LABELS[m] for m in metrics]
    rows = [[v['dataset'], task, v['num_examples']] +
            [v.get(m, '') for m in metrics]
            for task, v in sorted(per_template.items(),
                                  key=lambda kv: (kv[1]['dataset'], kv[0]))]
    parts.append(_markdown(header, rows))
  if generation:
    names = sorted({k for v in generation.values() for k in v
                    if k != 'num_examples'})
    rows = [[task, v['num_examples']] + [v.get(k, '') for k in names]
            for task, v in sorted(generation.items())]
    parts.append(_markdown(['generation task', 'examples'] + names, rows))
  return '\n\n'.join(parts) + '\n'


def csv_rows(rank: Mapping[str, Any],
             generation: Mapping[str, Mapping[str, float]]) -> List[List[Any]]:
  """Long-format rows `[level, dataset, task, statistic, value]` (with a
  header row) of the same numbers as `markdown_tables`."""
  rows: List[List[Any]] = [['level', 'dataset', 'task', 'statistic', 'value']]
  for task, values in sorted(rank.get('per_template', {}).items()):
    for stat, value in sorted(values.items()):
      if stat != 'dataset':
        rows.append(['template', values['dataset'], task, stat, value])
  for metric in _LABELS:
    if metric not in rank:
      continue
    for dataset, values in rank[metric]['per_dataset'].items():
      for stat, value in sorted(values.items()):
        if stat == 'num_templates':
          stat = f'num_templates_with_{metric}'
        rows.append(['dataset', dataset, '', stat, value])
    for stat, value in sorted(rank[metric]['overall'].items()):
      if stat == 'num_datasets':
        stat = f'num_datasets_with_{metric}'
      rows.append(['overall', '', '', stat, value])
  for task, values in sorted(generation.items()):
    for stat, value in sorted(values.items()):
      rows.append(['generation', '', task, stat, value])
  return rows


# ---------------------------------------------------------- routing figures


def routing_figure(usage: Mapping[str, Sequence[float]], title: str,
                   value_label: str = 'mean router probability'):
  """A task x expert heatmap (a matplotlib Figure on an Agg canvas: no
  pyplot, so no display and no global backend state).

  The colours span the values' own range (routers near uniform still show
  their preferences); every cell is annotated with its value.

  Args:
    usage: task name -> one value per expert (e.g. the task's mean router
      probability at one site).
    title: figure title, e.g. the router site.
    value_label: what the colours mean (the colour bar's label).
  """
  # matplotlib loads slowly: only when a figure is drawn.
  # pylint: disable=g-import-not-at-top
  from matplotlib import figure as mpl_figure
  from matplotlib.backends import backend_agg
  # pylint: enable=g-import-not-at-top
  tasks = list(usage)
  matrix = np.asarray([list(usage[t]) for t in tasks], np.float64)
  num_tasks, num_experts = matrix.shape
  low, high = float(matrix.min()), float(matrix.max())
  high = max(high, low + 1e-6)
  digits = 2 if high - low >= 0.1 else 3
  fig = mpl_figure.Figure(figsize=(
      2.5 + (0.45 + 0.1 * digits) * num_experts +
      0.08 * max(len(t) for t in tasks), 1.6 + 0.4 * num_tasks))
  backend_agg.FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(matrix, aspect='auto', cmap='viridis', vmin=low,
                    vmax=high)
  ax.set_xticks(range(num_experts))
  ax.set_xticklabels([str(e) for e in range(num_experts)])
  ax.set_yticks(range(num_tasks))
  ax.set_yticklabels(tasks)
  ax.set_xlabel('expert')
  ax.set_title(title)
  if num_tasks * num_experts <= 600:
    for i in range(num_tasks):
      for j in range(num_experts):
        bright = (matrix[i, j] - low) / (high - low) > 0.6
        ax.text(j, i, f'{matrix[i, j]:.{digits}f}', ha='center',
                va='center', fontsize=7, color='black' if bright else 'white')
  fig.colorbar(image, ax=ax, label=value_label)
  fig.tight_layout()
  return fig
