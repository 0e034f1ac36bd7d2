"""Mixture of LoRA: MoLoRA, and LoRA as its one-expert special case.

A projection `y = W x` becomes `y + (alpha / r) * sum_e p_e B_e A_e x`, with a
router per adapted projection fed that projection's input. The outputs of the
experts are mixed (not A and B separately). A ~ normal(0.02) and B = 0, so the
adapted model equals the base model at initialisation.

The official code materialises every expert's output `[b, l, E, d_out]`. Here
all experts' down-projections are one contraction `x A -> [b, l, E, r]`
(rank E*r), the router probabilities scale those rank activations, and one
contraction over (expert, rank) with B produces `[b, l, d_out]` directly:
the same sum, without the E-fold output tensor. Where routing is plain
(float32, token-level, no top-k or jitter), the router's logits come out of
the same matmul as the down-projection.
"""

import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mov_jax import layers
from mov_jax.adapters import routing

Array = jax.Array


def _flat_features_axis(axes: Tuple[str, ...]) -> str:
  """Logical name of the flattened feature axes ([heads, kv] -> joined_kv)."""
  features = tuple(axes[2:])
  if features == ('heads', 'kv'):
    return 'joined_kv'
  if len(features) != 1:
    raise ValueError(f'Cannot name flattened feature axes {features}.')
  return features[0]


class MixtureOfLoRA(nn.Module):
  """Adds a router-weighted mixture of low-rank updates to a projection.

  Attributes:
    rank: rank r of each expert.
    alpha: scale numerator; the update is multiplied by alpha / r.
    num_experts: number of experts E.
    router: how to route (`routing.RouterConfig`); None for one expert
      without routing (LoRA).
    lora_a_init: initialiser of A (official: normal(0.02)); B starts at 0.
  """
  rank: int = 4
  alpha: float = 16.0
  num_experts: int = 10
  router: Optional[routing.RouterConfig] = routing.RouterConfig()
  lora_a_init: Callable[..., Array] = nn.initializers.normal(stddev=0.02)

  @nn.compact
  def __call__(self, inputs: Array, outputs: Array, *, deterministic: bool,
               mask: Optional[Array], input_axes: Tuple[str, ...],
               output_axes: Tuple[str, ...]) -> Array:
    routing.check_mixture('MixtureOfLoRA', self.num_experts, self.router)
    if self.rank < 1:
      raise ValueError(f'LoRA rank must be >= 1, got {self.rank}.')
    batch, length = inputs.shape[:2]
    d_in = int(np.prod(inputs.shape[2:]))
    d_out = int(np.prod(outputs.shape[2:]))
    in_axis = _flat_features_axis(input_axes)
    out_axis = _flat_features_axis(output_axes)
    x = inputs.reshape(batch, length, d_in)
    dtype = outputs.dtype

    lora_a = layers.param_with_axes(
        'lora_a', self.lora_a_init, (d_in, self.num_experts, self.rank),
        jnp.float32, axes=(in_axis, 'expert', 'rank'))
    lora_b = layers.param_with_axes(
        'lora_b', nn.initializers.zeros, (self.num_experts, self.rank, d_out),
        jnp.float32, axes=('expert', 'rank', out_axis))

    rows = self.num_experts * self.rank
    flat_a = jnp.asarray(lora_a, dtype).reshape(d_in, rows)
    router = None
    if self.router is not None:
      router = routing.Router(num_experts=self.num_experts,
                              config=self.router, name='router')
    if router is not None and self._route_with_down_projection(
        router, dtype, deterministic):
      hidden = router(
          x, input_axes=('batch', 'length', in_axis),
          deterministic=deterministic, mask=mask,
          fused=functools.partial(_down_project_and_route, lora_a=flat_a,
                                  rank=self.rank))
    else:
      # 'bld,der->bler' as one 2-D matmul with a thin weight (rank E*r).
      hidden = layers.weight_matmul(x.astype(dtype), flat_a)
      hidden = hidden.reshape(batch, length, self.num_experts, self.rank)
      if router is not None:
        probs = router(
            x, input_axes=('batch', 'length', in_axis),
            deterministic=deterministic, mask=mask)
        hidden = hidden * jnp.asarray(probs, dtype)[..., None]
    hidden = layers.with_sharding_constraint(
        hidden, ('batch', 'length', 'expert', 'rank'))
    # 'bler,ero->blo' as one 2-D matmul whose weight gradient stays cheap.
    # The alpha / r scale multiplies B, not the [b, l, d_out] update: the
    # same product without a pass over the update forward and backward (T5-
    # small MoLoRA-10 training step 1.5% faster on CPU; LoRA's default scale
    # of 1 costs nothing either way).
    scale = jnp.asarray(self.alpha / self.rank, dtype)
    delta = layers.weight_matmul(
        hidden.reshape(batch, length, rows),
        jnp.asarray(lora_b, dtype).reshape(rows, d_out) * scale)
    return outputs + delta.reshape(outputs.shape)

  @staticmethod
  def _route_with_down_projection(router: routing.Router, dtype,
                                  deterministic: bool) -> bool:
    """Whether the router's logits can come out of the down-projection's
    matmul: plain routing, float32 activations (the router computes in
    float32), and the expert axis not partitioned (the joint weight's
    columns mix the expert axis with the rank axis)."""
    return (jnp.dtype(dtype) == jnp.float32 and
            router.routes_plainly(deterministic) and
            nn.logical_to_mesh_axes(('expert',))[0] is None)


def _down_project_and_route(x: Array, kernel: Array, *, lora_a: Array,
                            rank: int):
  """`Router` `fused` callable: the down-projection `x A` and the router
  logits `x W` as one matmul against `[A | W]` (`[d_in, E*r + E]`): one
  pass over `x` and one weight-gradient and one input-gradient matmul
  instead of two each (a T5-small MoLoRA-10 training step 5-9% faster on
  CPU). Returns the probability-scaled rank activations `[b, l, E, r]`, the
  logits and the probabilities."""
  experts = kernel.shape[-1]
  joint = layers.weight_matmul(x, jnp.concatenate([lora_a, kernel], axis=1))
  hidden, logits, probs = _route_rank_activations(joint, experts, rank)
  return hidden.reshape(x.shape[:-1] + (experts, rank)), logits, probs


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _route_rank_activations(joint: Array, experts: int, rank: int):
  """From `joint = [x A | x W]` (`[..., E*r + E]`): the rank activations
  scaled by their expert's probability (`[..., E*r]`), the logits and the
  probabilities (`[..., E]`).

  Its own gradient, for two reasons. The cotangent of `joint` comes out as
  one concatenation (autodiff of the two column slices pads each cotangent
  with zeros to the full width and adds them: two more passes per site).
  And the gradient's sums over a handful of values per token (over an
  expert's r ranks; the softmax's `p . d` over E experts) are sums of
  strided slices (`_sum_column_groups`): as reductions along the innermost
  axis, XLA's CPU backend ran them slowly (0.27 ms for one `[2048, 10, 4]
  -> [2048, 10]` sum; a tiny model's MoLoRA-10 step 1.5-2% slower). The
  forward's softmax takes its maximum and sum the same way.
  """
  rows = experts * rank
  logits = joint[..., rows:]
  probs = _softmax_of_columns(logits)
  return joint[..., :rows] * _repeat_columns(probs, rank), logits, probs


def _route_rank_activations_fwd(joint, experts, rank):
  scaled, logits, probs = _route_rank_activations(joint, experts, rank)
  return (scaled, logits, probs), (joint[..., :experts * rank], probs)


def _route_rank_activations_bwd(experts, rank, residuals, cotangents):
  hidden, probs = residuals
  d_scaled, d_logits, d_probs = cotangents
  d_hidden = d_scaled * _repeat_columns(probs, rank)
  d_probs = d_probs + _sum_column_groups(d_scaled * hidden, rank)
  weighted = _sum_column_groups(probs * d_probs, experts)  # [..., 1]
  d_logits = d_logits + probs * (d_probs - weighted)
  return (jnp.concatenate([d_hidden, d_logits], axis=-1),)


_route_rank_activations.defvjp(_route_rank_activations_fwd,
                               _route_rank_activations_bwd)


def _softmax_of_columns(logits: Array) -> Array:
  """`jax.nn.softmax(logits, axis=-1)` over a handful of columns, its
  maximum and sum taken over column slices: elementwise passes that XLA
  fuses with the rest of the routing, where its CPU backend runs the
  reductions along the short innermost axis as separate, slow operations
  (a tiny model's MoLoRA-10 step 0.8-1.3% faster)."""
  columns = [logits[..., e:e + 1] for e in range(logits.shape[-1])]
  shifted = jnp.exp(logits - functools.reduce(jnp.maximum, columns))
  return shifted / _sum_column_groups(shifted, logits.shape[-1])


def _repeat_columns(x: Array, times: int) -> Array:
  """`[..., n] -> [..., n * times]`, each column repeated `times` times."""
  return jnp.broadcast_to(x[..., None], x.shape + (times,)).reshape(
      x.shape[:-1] + (x.shape[-1] * times,))


def _sum_column_groups(x: Array, group: int) -> Array:
  """`[..., n * group] -> [..., n]`: sums of consecutive `group` columns.

  As `group` strided column slices added together: one elementwise pass,
  which XLA fuses with what produces `x`, where a reduction along a short
  innermost axis runs slowly on CPU (see `_route_rank_activations`)."""
  return sum(x[..., i::group] for i in range(group))
