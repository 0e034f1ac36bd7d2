"""Losses and model-level helpers around the T5 network.

t5x's `EncoderDecoderModel` computes the same quantities; the [train] and
[eval] work builds `score_batch` and `predict_batch` on these.
"""

from typing import Optional, Tuple

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
