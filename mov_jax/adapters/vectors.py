"""Mixture of (IA)3 vectors: MoV, and IA3 as its one-expert special case.

At an IA3 site (attention keys and values after projection, the activated FFN
hidden state) the output is rescaled element-wise by a learned vector. MoV
keeps E expert vectors and merges them per token with router probabilities,
`merged = sum_e p_e * l_e`, then scales: `outputs * merged`. Experts start at 1,
so the adapted model equals the base model at initialisation.

Parameter shapes follow the official code: attention `mov_scaling
[heads, E, kv]` with a router kernel `[kv, E]` shared by all heads and applied
per head (routing per token and per head); FFN `mov_scaling [E, mlp]` with a
router kernel `[mlp, E]`. With `num_experts=1` and `router=None` this is IA3
(`mov_scaling [heads, 1, kv]` / `[1, mlp]`).
"""

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from mov_jax import kernels
from mov_jax import layers
from mov_jax.adapters import routing

Array = jax.Array

ADAPTED = 'adapted'
SITE_INPUT = 'input'


class MixtureOfVectors(nn.Module):
  """Scales a site's output by a router-weighted mixture of expert vectors.

  Attributes:
    num_experts: number of expert vectors E.
    router: how to route (`routing.RouterConfig`); None for one expert
      without routing (IA3).
    router_input: 'adapted' routes on the tensor being scaled (official), or
      'input' on the site's input (e.g. the layer input of a key projection).
    cpu_kernel: on the CPU backend, compute the whole site (router, softmax,
      mixture, scaling and their gradients) in one fused kernel
      (`mov_jax.kernels`) where it applies: float32, one device, at most 32
      experts, routing on the adapted tensor, token-level routing without
      top-k or jitter. The same arithmetic as the JAX operations, in fewer
      passes over memory.
  """
  num_experts: int = 10
  router: Optional[routing.RouterConfig] = routing.RouterConfig()
  router_input: str = ADAPTED
  cpu_kernel: bool = True

  @nn.compact
  def __call__(self, inputs: Array, outputs: Array, *, deterministic: bool,
               mask: Optional[Array], input_axes: Tuple[str, ...],
               output_axes: Tuple[str, ...]) -> Array:
    routing.check_mixture('MixtureOfVectors', self.num_experts, self.router)
    if self.router_input not in (ADAPTED, SITE_INPUT):
      raise ValueError(f'router_input must be {ADAPTED!r} or {SITE_INPUT!r}, '
                       f'got {self.router_input!r}.')
    per_head = outputs.ndim == 4  # [b, l, heads, kv]
    if per_head:
      _, _, heads, kv = outputs.shape
      shape, axes = (heads, self.num_experts, kv), (output_axes[2], 'expert',
                                                   output_axes[3])
    elif outputs.ndim == 3:  # [b, l, features]
      shape, axes = (self.num_experts, outputs.shape[-1]), ('expert',
                                                            output_axes[-1])
    else:
      raise ValueError('MixtureOfVectors expects [batch, length, features] or '
                       f'[batch, length, heads, kv] outputs, got {outputs.shape}.')
    scaling = layers.param_with_axes('mov_scaling', nn.initializers.ones,
                                     shape, jnp.float32, axes=axes)

    if self.router is None:
      merged = scaling[:, 0, :] if per_head else scaling[0]
      return outputs * jnp.asarray(merged, outputs.dtype)

    router = routing.Router(num_experts=self.num_experts,
                            config=self.router, name='router')
    # Plain routing (no top-k) also means the probabilities sum to one, the
    # mixture form the kernel computes.
    if (self.cpu_kernel and self.router_input == ADAPTED and
        router.routes_plainly(deterministic) and
        kernels.use_cpu_kernels(outputs.dtype, self.num_experts)):
      return router(outputs, input_axes=output_axes,
                    deterministic=deterministic, mask=mask,
                    fused=functools.partial(_fused_site, scaling=scaling))
    if self.router_input == ADAPTED:
      router_in, router_axes = outputs, output_axes
    else:
      router_in, router_axes = inputs, input_axes
    probs = router(
        router_in, input_axes=router_axes, deterministic=deterministic,
        mask=mask)
    if router.probabilities_sum_to_one():
      # sum_e p_e l_e = 1 + sum_e p_e (l_e - 1) when the p_e sum to 1; this form
      # is exactly 1 at initialisation (l_e = 1), so the adapted model equals
      # the base model bit for bit, and it keeps precision near 1.
      merged = 1.0 + _mix(probs, scaling - 1.0, per_head)
    else:
      # Top-k without renormalisation (official option): the kept mass is < 1.
      merged = _mix(probs, scaling, per_head)
    merged = layers.with_sharding_constraint(merged, output_axes)
    return outputs * jnp.asarray(merged, outputs.dtype)


def _fused_site(x: Array, kernel: Array, *, scaling: Array):
  """`kernels.mov_site` on `[b, l, features]` or `[b, l, heads, kv]`."""
  per_head = x.ndim == 4
  heads = x.shape[2] if per_head else 1
  per_head_scaling = scaling if per_head else scaling[None]
  y, logits, probs = kernels.mov_site(
      x.reshape(-1, heads, x.shape[-1]), kernel, per_head_scaling)
  stats_shape = x.shape[:-1] + (kernel.shape[-1],)
  return (y.reshape(x.shape), logits.reshape(stats_shape),
          probs.reshape(stats_shape))


def _mix(probs: Array, vectors: Array, per_head: bool) -> Array:
  """sum_e probs[..., e] * vectors[e] for every token (and head).

  probs: [b, l, E] or, per head, [b, l, heads, E]; vectors: [E, features]
  or, per head, [heads, E, kv]. Returns [b, l, features] / [b, l, heads, kv].
  """
  if not per_head:
    return layers.weight_matmul(probs, vectors)  # 'ble,ef->blf'
  heads, experts, kv = vectors.shape
  lead = probs.shape[:2]
  if probs.ndim == 3:  # one distribution for all heads: 'ble,hek->blhk'
    flat = vectors.transpose(1, 0, 2).reshape(experts, heads * kv)
    return layers.weight_matmul(probs, flat).reshape(lead + (heads, kv))
  if jax.default_backend() == 'cpu':
    # 'blhe,hek->blhk' as a matmul batched over a leading head axis, with
    # the (small) probabilities moved there and the output moved back
    # explicitly: XLA's CPU backend runs the einsum as written with
    # transposes around a slower batched matmul, and a 2-D matmul against
    # a block-diagonal [heads * E, heads * kv] matrix does heads times the
    # FLOPs (one MoV-10 key site of T5-small, forward and backward: 2.4 ms
    # as the block-diagonal matmul, 1.7 ms head-major).
    by_head = probs.reshape(-1, heads, experts).transpose(1, 0, 2)
    mixed = lax.dot_general(by_head, vectors, (((2,), (1,)), ((0,), (0,))))
    return mixed.transpose(1, 0, 2).reshape(lead + (heads, kv))
  return jnp.einsum('blhe,hek->blhk', probs, vectors)
