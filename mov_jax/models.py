"""Losses and model-level helpers around the T5 network.

t5x's `EncoderDecoderModel` computes the same quantities; the [train] and
[eval] work builds `score_batch` and `predict_batch` on these.
"""

import numbers
from typing import Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array


def cross_entropy_with_logits(logits: Array, targets: Array,
                              z_loss: float = 0.0) -> Tuple[Array, Array]:
  """Per-token cross entropy of integer `targets`, plus t5x's output z-loss.

  The z-loss `z_loss * log(Z)^2` keeps the softmax normaliser near 1, which
  matters for bfloat16 logits. Both results have the shape of `targets`;
  the first already includes the z-loss term.
  """
  logits = jnp.asarray(logits, jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  z_term = z_loss * jnp.square(log_z)
  return log_z - target_logit + z_term, z_term


def summed_target_loss(logits: Array, targets: Array,
                       weights: Optional[Array] = None,
                       z_loss: float = 0.0) -> Tuple[Array, Array, Array]:
  """Sum over target tokens of the loss, the z-loss part, and the weight sum.

  `weights` defaults to `targets > 0` (padding id 0 does not count).
  """
  if weights is None:
    weights = jnp.asarray(targets > 0, jnp.float32)
  token_loss, z_term = cross_entropy_with_logits(logits, targets, z_loss)
  return (jnp.sum(token_loss * weights), jnp.sum(z_term * weights),
          jnp.sum(weights))


def shift_right(targets: Array, bos_id: int = 0) -> Array:
  """Decoder inputs from targets: prepend BOS (T5 uses the pad id 0)."""
  shifted = jnp.pad(targets, ((0, 0), (1, 0)), constant_values=bos_id)
  return shifted[:, :-1]


# t5x's special loss-normalising factors.
NUM_REAL_TARGET_TOKENS = 'NUM_REAL_TARGET_TOKENS'
NUM_TOTAL_TARGET_TOKENS = 'NUM_TOTAL_TARGET_TOKENS'
AVERAGE_PER_SEQUENCE = 'AVERAGE_PER_SEQUENCE'


def loss_weights_and_normalizer(batch, loss_normalizing_factor
                                ) -> Tuple[Array, Array]:
  """Per-token loss weights and the divisor of their weighted sum.

  `loss_normalizing_factor` follows t5x: None sums the token losses; a number
  divides by it; NUM_REAL_TARGET_TOKENS by the count of non-padding targets;
  NUM_TOTAL_TARGET_TOKENS by batch * target length; AVERAGE_PER_SEQUENCE
  averages within each sequence (each packed segment counts as one) and then
  over sequences, so long and short targets weigh the same.
  """
  targets = batch['decoder_target_tokens']
  weights = batch.get('decoder_loss_weights')
  weights = jnp.asarray(targets > 0 if weights is None else weights,
                        jnp.float32)
  factor = loss_normalizing_factor
  if factor is None:
    return weights, jnp.asarray(1.0, jnp.float32)
  if isinstance(factor, (int, float)):
    return weights, jnp.asarray(float(factor), jnp.float32)
  if factor == NUM_REAL_TARGET_TOKENS:
    return weights, jnp.maximum(jnp.sum(weights), 1.0)
  if factor == NUM_TOTAL_TARGET_TOKENS:
    return weights, jnp.asarray(float(targets.size), jnp.float32)
  if factor == AVERAGE_PER_SEQUENCE:
    segments = batch.get('decoder_segment_ids')
    if segments is None:  # unpacked: each row is one sequence
      segments = jnp.asarray(weights > 0, jnp.int32)
    same = (segments[:, :, None] == segments[:, None, :]) & (
        segments[:, :, None] > 0)
    tokens_in_segment = jnp.einsum('bqk,bk->bq', same.astype(jnp.float32),
                                   weights)
    fractional = weights / jnp.maximum(tokens_in_segment, 1.0)
    num_sequences = jnp.sum(fractional)  # each segment's fractions sum to 1
    return fractional, jnp.maximum(num_sequences, 1.0)
  raise ValueError(
      f'Unknown LOSS_NORMALIZING_FACTOR {factor!r}: use None, a number, '
      f"'{NUM_REAL_TARGET_TOKENS}', '{NUM_TOTAL_TARGET_TOKENS}' or "
      f"'{AVERAGE_PER_SEQUENCE}'.")


def normalized_loss(logits: Array, batch, loss_normalizing_factor,
                    z_loss: float = 0.0) -> Tuple[Array, dict]:
  """Training loss (cross entropy + output z-loss) and its metrics."""
  targets = batch['decoder_target_tokens']
  weights, normalizer = loss_weights_and_normalizer(batch,
                                                    loss_normalizing_factor)
  token_loss, z_term = cross_entropy_with_logits(logits, targets, z_loss)
  loss = jnp.sum(token_loss * weights) / normalizer
  real = jnp.asarray(targets > 0, jnp.float32)
  # A target whose logit reaches the maximum is correct (an exact tie with
  # another token counts too). Same as argmax == target otherwise, and far
  # cheaper on CPU, where an argmax over the vocabulary (a reduction that
  # carries value and index) costs more than the rest of the loss.
  target_logits = jnp.take_along_axis(
      logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  correct = jnp.asarray(target_logits >= jnp.max(logits, axis=-1),
                        jnp.float32)
  metrics = {
      'loss': loss,
      'z_loss': jnp.sum(z_term * weights) / normalizer,
      'cross_entropy_per_token': jnp.sum((token_loss - z_term) * real) /
                                 jnp.maximum(jnp.sum(real), 1.0),
      'accuracy': jnp.sum(correct * real) / jnp.maximum(jnp.sum(real), 1.0),
      'target_tokens': jnp.sum(real),
  }
  return loss, metrics


def network_and_length_problems(network, task_feature_lengths) -> list:
  """What is wrong with a binary's NETWORK and TASK_FEATURE_LENGTHS."""
  from mov_jax import network as network_lib  # pylint: disable=g-import-not-at-top
  problems = []
  if not isinstance(network, network_lib.Transformer):
    problems.append(f'network must be a network.Transformer, got '
                    f'{type(network).__name__}')
  if not isinstance(task_feature_lengths, Mapping):
    problems.append("TASK_FEATURE_LENGTHS must be a dict such as {'inputs': "
                    f"1024, 'targets': 256}}, got {task_feature_lengths!r}")
    return problems
  if set(task_feature_lengths) != {'inputs', 'targets'}:
    problems.append('TASK_FEATURE_LENGTHS must have exactly the keys '
                    f"'inputs' and 'targets', got {task_feature_lengths}")
  bad = {k: v for k, v in task_feature_lengths.items()
         if isinstance(v, bool) or not isinstance(v, numbers.Integral) or
         v < 1}
  if bad:
    problems.append(f'TASK_FEATURE_LENGTHS values must be positive integers '
                    f'(token counts), got {bad}')
  return problems
