"""T0 training mixture and held-out evaluation tasks over a P3 copy.

Registered mixtures (each over the tasks present under the P3 root; absent
ones are reported, not fatal):
  t0_train             the 38 T0 training datasets, all 313 templates, each
                       template weighted by its dataset's train size (or
                       500,000 // templates above 500,000 examples);
  t0_eval_score_eval   held-out datasets' original-task score-eval templates,
                       without story_cloze (111 tasks, as the MoV paper);
  t0_eval_score_eval_with_story_cloze   the same plus story_cloze 2016 (116),
                       for users who add it (P3 lacks it);
  t0_train_score_eval  rank-classification versions of the training templates
                       that have answer choices (built from `answer_choices`).
The facts come from `data/t0_tasks.tsv` (see its header for the sources).
"""

import csv
import dataclasses
import io
import os
import pathlib
from typing import Dict, Iterable, List, Optional, Sequence

import seqio

from mov_jax.tasks import p3
from mov_jax.tasks import p3_format

TABLE_PATH = pathlib.Path(__file__).with_name('data') / 't0_tasks.tsv'
STORY_CLOZE = 'story_cloze_2016'
SCORE_EVAL = '_score_eval'


@dataclasses.dataclass(frozen=True)
class TemplateRow:
  p3_task: str
  dataset: str
  role: str  # 'train' or 'eval'
  original_task: bool
  answer_choices: bool
  train_size: Optional[int]
  mixture_rate: Optional[int]
  f1: bool


def read_table(path: os.PathLike) -> List[TemplateRow]:
  """Rows of a task table (TSV with '#' comment lines)."""
  text = pathlib.Path(path).read_text(encoding='utf-8')
  lines = [l for l in text.splitlines() if l and not l.startswith('#')]
  rows = []
  for r in csv.DictReader(io.StringIO('\n'.join(lines)), delimiter='\t'):
    rows.append(TemplateRow(
        p3_task=r['p3_task'], dataset=r['dataset'], role=r['role'],
        original_task=r['original_task'] == '1',
        answer_choices=r['answer_choices'] == '1',
        train_size=int(r['train_size']) if r.get('train_size') else None,
        mixture_rate=int(r['mixture_rate']) if r['mixture_rate'] else None,
        f1=r['f1'] == '1'))
  return rows


def template_to_dataset(rows: Iterable[TemplateRow]) -> Dict[str, str]:
  """Task name (plain and `_score_eval`) -> dataset, for aggregation."""
  mapping = {}
  for row in rows:
    mapping[row.p3_task] = row.dataset
    mapping[row.p3_task + SCORE_EVAL] = row.dataset
  return mapping


def mixture_rates(rows: Sequence[TemplateRow], prefix: str,
                  excluded_eval_datasets: Sequence[str] = ()
                  ) -> Dict[str, Dict[str, float]]:
  """Mixture name -> {task: rate} for a table, before checking presence."""
  train = [r for r in rows if r.role == 'train']
  held_out = [r for r in rows if r.role == 'eval' and r.original_task and
              r.answer_choices]
  mixtures = {
      f'{prefix}_train': {r.p3_task: float(r.mixture_rate) for r in train},
      f'{prefix}_train_score_eval': {r.p3_task + SCORE_EVAL: 1.0
                                     for r in train if r.answer_choices},
      f'{prefix}_eval_score_eval': {
          r.p3_task + SCORE_EVAL: 1.0 for r in held_out
          if r.dataset not in excluded_eval_datasets},
  }
  for dataset in excluded_eval_datasets:
    mixtures[f'{prefix}_eval_score_eval_with_{dataset.rsplit("_", 1)[0]}'] = {
        r.p3_task + SCORE_EVAL: 1.0 for r in held_out}
  return mixtures


def register_from_table(rows: Sequence[TemplateRow], root: str, prefix: str,
                        vocabulary: seqio.Vocabulary, reuse_tokens: bool,
                        excluded_eval_datasets: Sequence[str] = ()
                        ) -> Dict[str, p3.MixtureReport]:
  """Registers every task directory under `root` and the table's mixtures.

  Returns one report per mixture (tasks present, tasks missing).
  """
  found = p3_format.find_task_dirs(root)
  by_task = {r.p3_task: r for r in rows}
  specs = []
  for name, task_dir in sorted(found.items()):
    base = name[:-len(SCORE_EVAL)] if name.endswith(SCORE_EVAL) else name
    row = by_task.get(base)
    specs.append(p3.TaskSpec(name=name, task_dir=task_dir,
                             score_eval=name.endswith(SCORE_EVAL),
                             f1=bool(row and row.f1)))
  # Score-eval versions of templates with answer choices that the copy does
  # not store (P3 has them only for held-out datasets): expand the choices.
  for row in rows:
    score_name = row.p3_task + SCORE_EVAL
    if row.answer_choices and score_name not in found and row.p3_task in found:
      specs.append(p3.TaskSpec(name=score_name, task_dir=found[row.p3_task],
                               expand_choices=True, f1=row.f1))
  available = p3.register_tasks(specs, vocabulary, reuse_tokens)
  reports = {}
  for mixture, rates in mixture_rates(rows, prefix,
                                      excluded_eval_datasets).items():
    reports[mixture] = p3.register_mixture(mixture, rates, available, root)
  return reports


def unregister_t0() -> None:
  """Removes the T0 mixtures and P3 tasks an earlier `register_t0` added
  (seqio's registry is per process), so that they name no stale copy."""
  rows = read_table(TABLE_PATH)
  for name in mixture_rates(rows, 't0', excluded_eval_datasets=(STORY_CLOZE,)):
    if name in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(name)
  for name in template_to_dataset(rows):
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)


def register_t0(data_dir: str,
                vocabulary: Optional[seqio.Vocabulary] = None,
                reuse_tokens: Optional[bool] = None
                ) -> Dict[str, p3.MixtureReport]:
  """Registers the P3 tasks under `data_dir` and the T0 mixtures.

  Args:
    data_dir: P3 root (local or gs://...): holds `data/<task>/` or `<task>/`.
    vocabulary: defaults to T5's SentencePiece model.
    reuse_tokens: use P3's stored token ids; default: only when `vocabulary`
      is the T5 vocabulary P3 was made with, else re-tokenise the text.
  """
  vocabulary = vocabulary or p3.t5_vocabulary()
  if reuse_tokens is None:
    reuse_tokens = p3.vocabulary_matches_p3(vocabulary)
  return register_from_table(read_table(TABLE_PATH), data_dir, 't0',
                             vocabulary, reuse_tokens,
                             excluded_eval_datasets=(STORY_CLOZE,))
