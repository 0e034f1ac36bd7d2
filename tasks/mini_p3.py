"""mini-P3: the small synthetic P3-format mixture shipped in the repository.

Registered through exactly the same P3 source code as real P3:
  mini_p3_train               training templates (rate = examples);
  mini_p3_eval_score_eval     held-out score-eval templates;
  mini_p3_train_score_eval    training templates' rank-classification rows.
`data/mini_p3/` is written by `data/make_mini_p3.py` (deterministic).
"""

import pathlib
from typing import Dict

import seqio

from mov_jax.tasks import p3
from mov_jax.tasks import p3_format
from mov_jax.tasks import t0

ROOT = pathlib.Path(__file__).with_name('data') / 'mini_p3'
VOCABULARY_PATH = str(ROOT / 'spm.model')
TABLE_PATH = ROOT / 'mini_p3_tasks.tsv'
LAYOUT_ROOTS = {p3_format.TFRECORD: ROOT / 'tfrecord',
                p3_format.PARQUET: ROOT / 'parquet'}


def vocabulary() -> seqio.Vocabulary:
  """mini-P3's SentencePiece vocabulary (T5 ids: pad 0, eos 1, unk 2)."""
  return seqio.SentencePieceVocabulary(VOCABULARY_PATH, extra_ids=0)


def register_mini_p3(layout: str = p3_format.TFRECORD
                     ) -> Dict[str, p3.MixtureReport]:
  """Registers mini-P3's tasks (from one of its two layouts) and mixtures."""
  if layout not in LAYOUT_ROOTS:
    raise ValueError(f'mini-P3 layout must be one of {sorted(LAYOUT_ROOTS)}, '
                     f'got {layout!r}.')
  return t0.register_from_table(
      t0.read_table(TABLE_PATH), str(LAYOUT_ROOTS[layout]), 'mini_p3',
      vocabulary(), reuse_tokens=True)
