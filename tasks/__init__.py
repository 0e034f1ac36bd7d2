"""SeqIO tasks and mixtures of mov-jax (installed as `mov_jax.tasks`).

Importing this package registers:
  * mini-P3 (shipped): `mini_p3_train`, `mini_p3_eval_score_eval`,
    `mini_p3_train_score_eval` and one task per template;
  * when the environment variable P3_DATA_DIR names a P3 copy: one task per
    P3 task directory and the T0 mixtures `t0_train`, `t0_eval_score_eval`
    (111 held-out tasks), `t0_eval_score_eval_with_story_cloze`,
    `t0_train_score_eval`.
Binaries call `setup(p3_data_dir)` with the gin macro P3_DATA_DIR instead.
"""

import os
from typing import Dict, Optional

from mov_jax.tasks import mini_p3
from mov_jax.tasks import p3
from mov_jax.tasks import t0

get_mixture_or_task = p3.get_mixture_or_task


def setup(p3_data_dir: Optional[str] = None,
          p3_vocabulary_path: Optional[str] = None,
          p3_reuse_tokens: Optional[bool] = None
          ) -> Dict[str, p3.MixtureReport]:
  """(Re-)registers the T0 tasks for `p3_data_dir` (if given) and mini-P3."""
  reports = mini_p3.register_mini_p3()
  if p3_data_dir:
    vocabulary = (p3.t5_vocabulary(p3_vocabulary_path)
                  if p3_vocabulary_path else None)
    reports.update(t0.register_t0(p3_data_dir, vocabulary, p3_reuse_tokens))
  return reports


def setup_from_gin() -> Dict[str, p3.MixtureReport]:
  """`setup` with the gin macros P3_DATA_DIR, P3_VOCABULARY, P3_REUSE_TOKENS
  (see gin/data/p3.gin); the environment variable P3_DATA_DIR is the
  fallback for the data directory."""
  from mov_jax import gin_utils  # pylint: disable=g-import-not-at-top

  def macro(name, default=None):
    try:
      return gin_utils.macro_value(name)
    except ValueError:
      return default

  return setup(macro('P3_DATA_DIR') or os.environ.get('P3_DATA_DIR'),
               macro('P3_VOCABULARY'), macro('P3_REUSE_TOKENS'))


REPORTS = setup(os.environ.get('P3_DATA_DIR') or None)
