"""Rank-classification metrics and the T0-style aggregation of results.

Rank classification: each example has several answer choices, each scored
(summed target log-likelihood, as t5x's `score_batch`); the prediction is the
highest-scoring choice, and it is right when that choice is marked correct.

Aggregation (T0 / MoV papers): accuracy per template (one P3 task), then per
dataset the median (and mean) over its templates, then overall the average
of the per-dataset medians. Every output names its statistic.
"""

import collections
import statistics
from typing import Any, Dict, Mapping, Sequence, Tuple


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
