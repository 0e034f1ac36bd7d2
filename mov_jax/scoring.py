"""Rank-classification scoring: summed target log-likelihood per choice.

Two ways to score the same thing (t5x `score_batch` semantics: the sum over
target tokens of `log p(token)`, weighted by `decoder_target_tokens > 0` or by
`decoder_loss_weights`; no length normalisation unless asked for):

* `score_batch`: tiled rows, one per (example, choice), each running the
  encoder and the decoder. This is what t5x does with P3 `score_eval` rows.
* `score_choices`: encode-once. Each example's input is encoded once and its
  encoder output is repeated for its choices, so only the (short) decoder
  runs per choice. P3 inputs are long (hundreds of tokens) and answer choices
  short (a few tokens), so the encoder dominates and encode-once is several
  times cheaper for the same numbers.

Array layout of `score_choices` (B examples, up to C choices each):
  encoder_input_tokens  [B, L_in]      one row per example
  choice_targets        [B, C, L_tgt]  target tokens per choice, 0-padded
  choice_mask           [B, C]         1 for real choices (default: a choice
                                       with any non-zero target token)
  result                [B, C]         masked choices score -inf

`choices_from_rows` builds that layout on the host from tiled rows (e.g.
P3 score-eval rows grouped by `idx[0]`). Everything else is pure jnp with
static shapes: jit it as it is, and under a mesh the repeated activations
keep t5x's logical axes (`batch` first), so rows stay with their example.
"""

from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mov_jax import layers
from mov_jax import models

Array = jax.Array
PyTree = Any


def sequence_scores(logits: Array, targets: Array,
                    weights: Optional[Array] = None,
                    length_normalize: bool = False) -> Array:
  """Per-row sum of weighted target log-probabilities, `[rows]` float32.

  `weights` defaults to `targets > 0`. With `length_normalize` the sum is
  divided by the weight sum (a mean log-probability per target token).
  """
  if weights is None:
    weights = jnp.asarray(targets > 0, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  token_loss, _ = models.cross_entropy_with_logits(logits, targets)
  scores = -jnp.sum(token_loss * weights, axis=-1)
  if length_normalize:
    scores = scores / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
  return scores


def score_batch(network, params: PyTree, batch: Mapping[str, Array],
                length_normalize: bool = False) -> Array:
  """t5x `score_batch` on tiled rows: `[rows]` summed target log-likelihood.

  `batch` holds `encoder_input_tokens`, `decoder_input_tokens`,
  `decoder_target_tokens` and optionally `decoder_loss_weights` (then those
  weigh each token instead of `decoder_target_tokens > 0`). `params` may
  include adapter parameters; dropout is off.
  """
  logits = network.apply(
      {'params': params}, batch['encoder_input_tokens'],
      batch['decoder_input_tokens'], batch['decoder_target_tokens'],
      enable_dropout=False)
  return sequence_scores(logits, batch['decoder_target_tokens'],
                         batch.get('decoder_loss_weights'), length_normalize)


def repeat_rows(x: Array, repeats: int, axes) -> Array:
  """`[B, ...]` -> `[B * repeats, ...]`, each row's copies kept together.

  A broadcast and reshape rather than a gather, so a batch sharded over
  `data` stays sharded the same way (an example's copies never move), and
  the result is constrained to the logical `axes` of the rows it makes.
  """
  expanded = jnp.broadcast_to(x[:, None], (x.shape[0], repeats) + x.shape[1:])
  flat = expanded.reshape((x.shape[0] * repeats,) + x.shape[1:])
  return layers.with_sharding_constraint(flat, axes)


def score_choices(network, params: PyTree, encoder_input_tokens: Array,
                  choice_targets: Array, choice_mask: Optional[Array] = None,
                  choice_weights: Optional[Array] = None,
                  length_normalize: bool = False) -> Array:
  """Encode-once rank-classification scores `[B, C]` (masked choices -inf).

  Args:
    network: a `network.Transformer` (with or without adapters).
    params: its parameters.
    encoder_input_tokens: `[B, L_in]`, one row per example.
    choice_targets: `[B, C, L_tgt]`, each choice's target tokens (ending in
      EOS, 0-padded); examples with fewer than C choices pad with all-0 rows.
    choice_mask: `[B, C]`, 1 for real choices; default: any target token > 0.
    choice_weights: `[B, C, L_tgt]` per-token weights (t5x
      `decoder_loss_weights`); default `choice_targets > 0`.
    length_normalize: divide each score by its number of weighted tokens.

  Equals `score_batch` on the tiled rows (same numbers up to float rounding):
  the encoder output is repeated, not recomputed, and the decoder gets the
  repeated input tokens too, since its cross-attention mask and adapters
  with sequence-level routing read their token mask from them.
  """
  batch, num_choices, target_length = choice_targets.shape
  if encoder_input_tokens.shape[0] != batch:
    raise ValueError(
        f'encoder_input_tokens has {encoder_input_tokens.shape[0]} rows but '
        f'choice_targets has {batch} examples; both must be one per example.')
  if choice_mask is None:
    choice_mask = jnp.any(choice_targets > 0, axis=-1)
  variables = {'params': params}
  encoded = network.apply(variables, encoder_input_tokens,
                          enable_dropout=False, method=network.encode)
  encoded = repeat_rows(encoded, num_choices, layers.ACT_EMBED)
  input_tokens = repeat_rows(encoder_input_tokens, num_choices,
                             ('batch', 'length'))
  targets = choice_targets.reshape(batch * num_choices, target_length)
  logits = network.apply(variables, encoded, input_tokens,
                         models.shift_right(targets), targets,
                         enable_dropout=False, method=network.decode)
  weights = None
  if choice_weights is not None:
    weights = choice_weights.reshape(batch * num_choices, target_length)
  scores = sequence_scores(logits, targets, weights, length_normalize)
  scores = scores.reshape(batch, num_choices)
  return jnp.where(jnp.asarray(choice_mask, bool), scores, -jnp.inf)


def choices_from_rows(example_ids: Sequence[int], choice_ids: Sequence[int],
                      inputs: np.ndarray, targets: np.ndarray,
                      num_choices: Optional[int] = None
                      ) -> Dict[str, np.ndarray]:
  """Groups tiled (example, choice) rows into `score_choices`' layout (host).

  Rows of one example must share their input (P3 score-eval rows do). Returns
  numpy arrays `encoder_input_tokens [B, L_in]`, `choice_targets [B, C,
  L_tgt]`, `choice_mask [B, C]` and `example_ids [B]` (sorted), where choice
  `c` of an example sits at column `c`. `num_choices` fixes C (default: the
  largest choice id + 1), so batches of a task keep one shape under jit.
  """
  example_ids = np.asarray(example_ids)
  choice_ids = np.asarray(choice_ids)
  inputs, targets = np.asarray(inputs), np.asarray(targets)
  if not len(example_ids) == len(choice_ids) == len(inputs) == len(targets):
    raise ValueError('choices_from_rows needs one example id, choice id, '
                     'input row and target row per tiled row.')
  width = int(choice_ids.max()) + 1 if num_choices is None else num_choices
  if choice_ids.min() < 0 or choice_ids.max() >= width:
    raise ValueError(f'Choice ids must lie in [0, {width}), got '
                     f'{choice_ids.min()}..{choice_ids.max()}.')
  unique, row_example = np.unique(example_ids, return_inverse=True)
  encoder_input_tokens = np.zeros((len(unique), inputs.shape[1]), inputs.dtype)
  choice_targets = np.zeros((len(unique), width, targets.shape[1]),
                            targets.dtype)
  choice_mask = np.zeros((len(unique), width), bool)
  for row, (ex, choice) in enumerate(zip(row_example, choice_ids)):
    if choice_mask[ex, choice]:
      raise ValueError(f'Example {unique[ex]} has choice {choice} twice.')
    if choice_mask[ex].any() and not np.array_equal(
        encoder_input_tokens[ex], inputs[row]):
      raise ValueError(f'Rows of example {unique[ex]} have different inputs; '
                       'encode-once scoring needs one input per example.')
    encoder_input_tokens[ex] = inputs[row]
    choice_targets[ex, choice] = targets[row]
    choice_mask[ex, choice] = True
  return {'encoder_input_tokens': encoder_input_tokens,
          'choice_targets': choice_targets, 'choice_mask': choice_mask,
          'example_ids': unique}
