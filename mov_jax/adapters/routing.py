"""The router shared by every mixture adapter (MoV and MoLoRA).

A router maps the tensor it is fed (`[..., features]`) to probabilities over
experts (`[..., experts]`) with a bias-free dense layer computed in float32 and
a softmax, as in the official MoV code. Everything beyond that is optional and
off by default (the official behaviour): top-k masking, jitter noise,
sequence-level routing, and the auxiliary losses.

Side outputs (only when the caller makes the collection mutable, so t5x and
plain inference pay nothing):
  * `aux_loss/router`: the weighted sum of the router z-loss and the
    load-balancing loss, which the training loss adds (weights from gin,
    default 0);
  * `intermediates/{z_loss, load_balance_loss, expert_probability,
    expert_top1_fraction, entropy}`: per-router statistics for analysis.

A caller that reports the statistics only now and then (the training step
on CPU: they are logged every `log_period` steps) passes a boolean per
router in the `STATISTICS_SWITCH` collection (`statistics_switch` builds
it): where it is False the statistics are sown as zeros and not computed
(a few passes over every site's probabilities, 2-3% of a tiny model's
MoV-10 or MoLoRA-10 training step on CPU). The auxiliary losses are always
computed when weighted.
"""

import dataclasses
import functools
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util
from jax import lax

from mov_jax import layers

Array = jax.Array

TOKEN = 'token'
SEQUENCE = 'sequence'

# Variable collection of per-router booleans: compute the statistics now.
STATISTICS_SWITCH = 'router_statistics'
_SWITCH_NAME = 'compute'


def statistics_switch(params, compute) -> dict:
  """The `STATISTICS_SWITCH` collection for a network's `params`: `compute`
  (a boolean, traced or not) for every router in them."""
  flat = traverse_util.flatten_dict(dict(params))
  switches = {path[:-1] + (_SWITCH_NAME,): compute for path in flat
              if path[-2:] == ('router', 'kernel')}
  return traverse_util.unflatten_dict(switches)


def _masked_mean(x: Array, weights: Optional[Array], axes: Tuple[int, ...]):
  if weights is None:
    return jnp.mean(x, axis=axes)
  weights = jnp.broadcast_to(weights, x.shape)
  return jnp.sum(x * weights, axis=axes) / jnp.maximum(
      jnp.sum(weights, axis=axes), 1.0)


def _expand_mask(mask: Optional[Array], ndim: int) -> Optional[Array]:
  """`[batch, length]` -> `[batch, length, 1, ...]` with `ndim` dims."""
  if mask is None:
    return None
  return jnp.asarray(mask, jnp.float32).reshape(
      mask.shape + (1,) * (ndim - mask.ndim))


def _mean_entropy(probs: Array, token_weights: Optional[Array]) -> Array:
  """Mean over tokens of the entropy of `probs [..., experts]`.

  One reduction over every element instead of a per-token sum over the
  (short) expert axis followed by a mean: the same value, but a reduction
  along an axis of a handful of experts is slow on CPU.
  """
  plogp = probs * jnp.log(probs + 1e-9)
  if token_weights is None:
    return -jnp.sum(plogp) / (plogp.size // probs.shape[-1])
  weights = jnp.broadcast_to(token_weights, probs.shape[:-1] + (1,))
  return -jnp.sum(plogp * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def top_k_mask(probs: Array, k: int) -> Array:
  """1.0 on exactly the k largest experts of each row (ties by index)."""
  _, idx = lax.top_k(probs, k)
  return jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=probs.dtype),
                 axis=-2)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """How a mixture adapter routes (gin: `router = @routing.RouterConfig()`).

  A plain frozen dataclass rather than a module template, so that every
  adapter builds its own `Router` (named `router`) from the same settings.

  Attributes:
    top_k: keep only the k most probable experts (None: soft merging over
      all, the paper's best setting).
    renormalize_top_k: rescale the kept probabilities to sum to 1 (the
      official code does not).
    jitter_noise: multiplicative uniform noise `[1-eps, 1+eps]` on the router
      input during training (uses the 'dropout' rng stream).
    granularity: 'token' (a distribution per token, official) or 'sequence'
      (one per sequence, from the mean of the non-padding tokens).
    z_loss_weight: weight of the router z-loss `mean(logsumexp(logits)^2)`.
    load_balance_weight: weight of the Switch-style load-balancing loss
      `E * sum_e fraction_e * mean_probability_e`.
    kernel_stddev: router kernel initialiser normal(stddev) (official: 0.02).
  """
  top_k: Optional[int] = None
  renormalize_top_k: bool = False
  jitter_noise: float = 0.0
  granularity: str = TOKEN
  z_loss_weight: float = 0.0
  load_balance_weight: float = 0.0
  kernel_stddev: float = 0.02

  def __post_init__(self):
    if self.granularity not in (TOKEN, SEQUENCE):
      raise ValueError(f'Router granularity must be {TOKEN!r} or '
                       f'{SEQUENCE!r}, got {self.granularity!r}.')
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f'Router top_k must be None or >= 1, got {self.top_k}.')
    if self.jitter_noise < 0:
      raise ValueError(f'jitter_noise must be >= 0, got {self.jitter_noise}.')


def check_mixture(kind: str, num_experts: int,
                  router: Optional[RouterConfig]) -> None:
  """Validates a mixture adapter's expert count against its router."""
  if num_experts < 1:
    raise ValueError(f'{kind} num_experts must be >= 1, got {num_experts}.')
  if router is None and num_experts != 1:
    single = 'IA3' if 'Vectors' in kind else 'LoRA'
    raise ValueError(
        f'{kind} with num_experts={num_experts} needs a router; set '
        f'router=@routing.RouterConfig() or num_experts=1 ({single}).')


class Router(nn.Module):
  """Dense (no bias) + softmax router over `num_experts` experts."""
  num_experts: int
  config: RouterConfig = RouterConfig()

  def probabilities_sum_to_one(self) -> bool:
    """False only for top-k masking without renormalisation."""
    cfg = self.config
    return (cfg.top_k is None or cfg.top_k >= self.num_experts or
            cfg.renormalize_top_k)

  def routes_plainly(self, deterministic: bool) -> bool:
    """True when routing is a softmax of `inputs @ kernel`, token by token.

    That is: token granularity, no top-k masking, no jitter in this call.
    Only then can a fused kernel compute the routing (see `fused`).
    """
    cfg = self.config
    return (cfg.granularity == TOKEN and
            (cfg.top_k is None or cfg.top_k >= self.num_experts) and
            (cfg.jitter_noise == 0.0 or deterministic))

  @nn.compact
  def __call__(self, inputs: Array, *, input_axes: Tuple[str, ...],
               deterministic: bool, mask: Optional[Array] = None,
               fused: Optional[Callable[[Array, Array], Tuple[Array, Array,
                                                             Array]]] = None):
    """Probabilities `[..., experts]` (float32) for `inputs [b, l, ..., d]`.

    `input_axes` are the logical names of `inputs`' axes; the kernel is named
    `(input_axes[-1], 'expert')`. `mask` (`[b, l]`, 1 on real tokens) drives
    sequence-level pooling and the statistics.

    `fused(inputs, kernel) -> (result, logits, probs)`, where routing is
    plain (`routes_plainly`), computes the routing together with what
    consumes it (a whole MoV site in one kernel; MoLoRA's down-projection
    and logits in one matmul); the router then sows its statistics from
    that call's logits and probabilities and returns `result` instead of
    the probabilities.
    """
    cfg = self.config
    if self.num_experts < 1:
      raise ValueError(f'Router num_experts must be >= 1, got '
                       f'{self.num_experts}.')
    if cfg.top_k is not None and cfg.top_k > self.num_experts:
      raise ValueError(f'Router top_k={cfg.top_k} exceeds num_experts='
                       f'{self.num_experts}.')
    x = jnp.asarray(inputs, jnp.float32)
    token_weights = _expand_mask(mask, x.ndim)
    if cfg.granularity == SEQUENCE:
      x = _masked_mean(x, token_weights, axes=(1,))[:, None]
    if cfg.jitter_noise > 0.0 and not deterministic:
      x = x * jax.random.uniform(self.make_rng('dropout'), x.shape,
                                 minval=1.0 - cfg.jitter_noise,
                                 maxval=1.0 + cfg.jitter_noise)
    kernel = layers.param_with_axes(
        'kernel', nn.initializers.normal(stddev=cfg.kernel_stddev), (x.shape[-1], self.num_experts),
        jnp.float32, axes=(input_axes[-1], 'expert'))
    if fused is not None:
      if not self.routes_plainly(deterministic):
        raise ValueError('Router: a fused routing kernel needs token-level '
                         'routing without top-k or jitter; got '
                         f'{cfg}.')
      result, logits, probs = fused(x, kernel)
      self._sow_statistics(logits, probs, token_weights)
      return result
    # A thin kernel ([features, experts]): see `layers.weight_matmul`.
    logits = layers.weight_matmul(x, kernel)
    logits = layers.with_sharding_constraint(
        logits, tuple(input_axes[:-1]) + ('expert',))
    probs = jax.nn.softmax(logits, axis=-1)

    self._sow_statistics(logits, probs, token_weights)

    if cfg.top_k is not None and cfg.top_k < self.num_experts:
      probs = probs * top_k_mask(probs, cfg.top_k)
      if cfg.renormalize_top_k:
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    if cfg.granularity == SEQUENCE:
      probs = jnp.broadcast_to(
          probs, inputs.shape[:1] + (inputs.shape[1],) + probs.shape[2:])
    return probs

  def _sow_statistics(self, logits, probs, token_weights):
    if self.is_initializing():
      # Side outputs of `init` would become part of the initial variables
      # (t5x then expects them in every later call).
      return
    cfg = self.config
    weighted = bool(cfg.z_loss_weight or cfg.load_balance_weight)
    switch = (self.get_variable(STATISTICS_SWITCH, _SWITCH_NAME)
              if self.has_variable(STATISTICS_SWITCH, _SWITCH_NAME) else None)
    statistics = functools.partial(_statistics, self.num_experts,
                                   cfg.granularity)
    if switch is None or weighted:  # (weighted: the losses need them)
      stats = statistics(logits, probs, token_weights)
    else:
      zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in jax.eval_shape(
          statistics, logits, probs, token_weights).items()}
      stats = lax.cond(jnp.asarray(switch, bool), statistics,
                       lambda *_: zeros, logits, probs, token_weights)
    for name, value in stats.items():
      self.sow('intermediates', name, value)
    # Only losses with a weight enter the graph: a zero-weighted term would
    # still be differentiated (0 * its gradient) in every training step.
    aux = jnp.zeros((), jnp.float32)
    if cfg.z_loss_weight:
      aux = aux + cfg.z_loss_weight * stats['z_loss']
    if cfg.load_balance_weight:
      aux = aux + cfg.load_balance_weight * stats['load_balance_loss']
    self.sow('aux_loss', 'router', aux)


def _statistics(num_experts: int, granularity: str, logits: Array,
                probs: Array, token_weights: Optional[Array]):
  """A router's statistics, by name, from its logits and probabilities
  `[..., experts]`; tokens weighted by `token_weights` (token routing)."""
  weights = None
  if token_weights is not None and granularity == TOKEN:
    weights = jnp.broadcast_to(token_weights, logits.shape[:-1] + (1,))
  all_but_experts = tuple(range(logits.ndim - 1))
  z_loss = _masked_mean(
      jnp.square(jax.nn.logsumexp(logits, axis=-1, keepdims=True)), weights,
      all_but_experts)[0]
  mean_probs = _masked_mean(probs, weights, all_but_experts)
  top1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), num_experts)
  top1_fraction = _masked_mean(top1, weights, all_but_experts)
  return {
      'z_loss': z_loss,
      'load_balance_loss': num_experts * jnp.sum(top1_fraction * mean_probs),
      'expert_probability': mean_probs,
      'expert_top1_fraction': top1_fraction,
      'entropy': _mean_entropy(probs, weights),
  }


def total_aux_loss(aux_collection) -> Array:
  """Sum of every sown `aux_loss` value (0.0 for an empty collection)."""
  leaves = jax.tree_util.tree_leaves(aux_collection)
  return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))
