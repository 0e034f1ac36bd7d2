"""Building blocks of the T5 encoder-decoder.

Small explicit Flax linen modules in the spirit of the t5x minimal T5
(`t5x/examples/t5/layers.py`): every parameter is created with
`param_with_axes` (collection `params_axes`) and every activation that crosses
a layer boundary is constrained by logical axis names, so the same code runs
on one CPU and on a partitioned mesh. Parameter names, shapes and logical axes
match the t5x minimal T5, so T5X checkpoints map one to one.

Adapter methods (IA3, MoV, LoRA, MoLoRA) plug in through *sites*: every dense
projection and the FFN hidden activation call an optional adapter module that
receives the site's input and output and returns the (possibly changed)
output. With no adapter configured a site is the identity, so the base network
is exactly the t5x network. See `AdapterSites`.
"""

import dataclasses
import functools
import operator
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning
from jax import lax

from mov_jax import kernels

param_with_axes = nn_partitioning.param_with_axes
variable_with_axes = nn_partitioning.variable_with_axes
with_sharding_constraint = nn_partitioning.with_sharding_constraint

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Logical axis names of the activations (t5x's names).
ACT_EMBED = ('batch', 'length', 'embed')
ACT_HEADS = ('batch', 'length', 'heads', 'kv')
ACT_MLP = ('batch', 'length', 'mlp')


# ---------------------------------------------------------------------------
# Adapter sites.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterSites:
  """Which adapter sits at each named site of the network.

  Each field holds an adapter *template*, an unbound Flax module such as
  `vectors.MixtureOfVectors(num_experts=10)` (in gin:
  `key = @vectors.MixtureOfVectors()`), or None for the identity. The network
  clones the template once per attention block or FFN, named
  `<site>_adapter`, and calls it as

      outputs = adapter(inputs, outputs, deterministic=..., mask=...,
                        input_axes=..., output_axes=...)

  where `inputs` is what the site's projection consumed, `outputs` what it
  produced, `mask` a `[batch, length]` float array that is 1 on real tokens
  (None where unknown, e.g. in single-step decoding), and `input_axes` /
  `output_axes` the logical axis names of the two arrays (e.g.
  `('batch', 'length', 'embed')`), from which an adapter names the axes of
  its own parameters. Templates are configured once, when gin builds them, so
  a built network never changes with later gin state.

  Sites and the shapes an adapter sees (b = batch, l = length):
    query, key, value: inputs [b, l, embed] -> outputs [b, l, heads, kv]
    out:               inputs [b, l, heads, kv] -> outputs [b, l, embed]
    wi_0, wi_1:        inputs [b, l, embed] -> outputs [b, l, mlp]
                       (T5 v1.1 gated FFN, before the activation)
    wi:                same, for the single-branch FFN of T5 1.0
    mlp_hidden:        inputs = outputs = the activated first FFN branch
                       [b, l, mlp] (before the product with `wi_1`)
    wo:                inputs [b, l, mlp] -> outputs [b, l, embed]

  `attention_blocks` restricts attention sites to some block kinds
  ('encoder_self', 'decoder_self', 'decoder_cross'); all by default.
  """
  query: Optional[nn.Module] = None
  key: Optional[nn.Module] = None
  value: Optional[nn.Module] = None
  out: Optional[nn.Module] = None
  wi_0: Optional[nn.Module] = None
  wi_1: Optional[nn.Module] = None
  wi: Optional[nn.Module] = None
  mlp_hidden: Optional[nn.Module] = None
  wo: Optional[nn.Module] = None
  attention_blocks: Tuple[str, ...] = ('encoder_self', 'decoder_self',
                                       'decoder_cross')

  def __post_init__(self):
    object.__setattr__(self, 'attention_blocks', tuple(self.attention_blocks))
    for site in self.site_names():
      template = getattr(self, site)
      if template is not None and not isinstance(template, nn.Module):
        raise TypeError(
            f'AdapterSites.{site} must be an adapter module instance or None, '
            f'got {template!r}. In gin, call the reference: '
            f'{site} = @vectors.MixtureOfVectors() (with parentheses).')
    unknown = set(self.attention_blocks) - {'encoder_self', 'decoder_self',
                                            'decoder_cross'}
    if unknown:
      raise ValueError(f'Unknown attention_blocks {sorted(unknown)}; use '
                       "'encoder_self', 'decoder_self', 'decoder_cross'.")

  @classmethod
  def site_names(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.name != 'attention_blocks')

  def template(self, site: str) -> Optional[nn.Module]:
    return getattr(self, site)

  def active_sites(self) -> Tuple[str, ...]:
    return tuple(s for s in self.site_names() if getattr(self, s) is not None)


NO_ADAPTERS = AdapterSites()


def apply_site(module: nn.Module, adapters: Optional[AdapterSites], site: str,
               inputs: Array, outputs: Array, *, deterministic: bool,
               mask: Optional[Array], input_axes: Tuple[str, ...],
               output_axes: Tuple[str, ...]) -> Array:
  """Runs the adapter configured for `site` (identity when there is none)."""
  template = adapters.template(site) if adapters is not None else None
  if template is None:
    return outputs
  # Bind a copy to the calling module's scope so its parameters live next to
  # the projection they adapt (e.g. `.../attention/key_adapter/...`).
  adapter = template.clone(parent=module, name=f'{site}_adapter')
  return adapter(inputs, outputs, deterministic=deterministic, mask=mask,
                 input_axes=input_axes, output_axes=output_axes)


# ---------------------------------------------------------------------------
# Dense, embedding, normalisation.
# ---------------------------------------------------------------------------


def _canonicalize_tuple(x: Union[int, Sequence[int]]) -> Tuple[int, ...]:
  if isinstance(x, (int, np.integer)):
    return (int(x),)
  return tuple(int(v) for v in x)


def _normalize_axes(axes: Tuple[int, ...], ndim: int) -> Tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


class DenseGeneral(nn.Module):
  """A bias-free linear map over one or more axes.

  The kernel is stored flattened to 2-D `[prod(in), prod(out)]` (the layout of
  T5X checkpoints, e.g. attention kernels `(embed, joined_kv)`) and reshaped
  for the contraction (on CPU, the input is flattened instead; see below).
  """
  features: Union[int, Tuple[int, ...]]
  axis: Union[int, Tuple[int, ...]] = -1
  dtype: DType = jnp.float32
  kernel_init: Initializer = nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal')
  kernel_axes: Tuple[str, ...] = ()

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    features = _canonicalize_tuple(self.features)
    axis = _normalize_axes(_canonicalize_tuple(self.axis), inputs.ndim)
    inputs = jnp.asarray(inputs, self.dtype)
    in_shape = tuple(inputs.shape[ax] for ax in axis)
    kernel = param_with_axes(
        'kernel', self.kernel_init,
        (int(np.prod(in_shape)), int(np.prod(features))), jnp.float32,
        axes=self.kernel_axes)
    kernel = jnp.asarray(kernel, self.dtype)
    if jax.default_backend() != 'cpu':
      kernel = jnp.reshape(kernel, in_shape + features)
      contract = tuple(range(len(axis)))
      return lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))
    # On CPU, one 2-D matmul against the kernel as stored, the input's
    # contracted axes flattened: contracting the kernel reshaped to
    # `in_shape + features` gives the same forward pass, but its input
    # gradient then contracts the kernel over several axes, and XLA's CPU
    # backend copies every such kernel into a transposed layout on every
    # step for it (90 copies in a T5-small step), where the 2-D form's
    # `dy @ kernel^T` reads the kernel in place. Accelerators keep the
    # reshaped kernel: on TPU, splitting a 384-wide activation into
    # [6, 64] would be a relayout of the activation instead.
    kept = tuple(ax for ax in range(inputs.ndim) if ax not in axis)
    inputs = jnp.transpose(inputs, kept + axis)  # no-op for trailing axes
    batch_shape = tuple(inputs.shape[:len(kept)])
    flat = jnp.reshape(inputs, batch_shape + (kernel.shape[0],))
    out = _contract_last_first(flat, kernel)
    return jnp.reshape(out, batch_shape + features)


def _contract_last_first(x: Array, w: Array) -> Array:
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def weight_matmul(x: Array, w: Array) -> Array:
  """`x [..., k] @ w [k, n]` for a thin parameter `w` (k or n small).

  The same product as `jnp.dot`; only the weight gradient `x^T dy` is
  computed differently on CPU. Left to itself, XLA's CPU backend computes it
  as a matmul contracting the leading (token) axis of both operands, and it
  either runs that form slowly or transposes the whole activation first;
  either costs more than the matmul when k or n is a handful of experts or
  a rank. Here the thin one of the two `[tokens, .]` operands (`x` when
  k < n, else `dy`) is transposed explicitly, so that the weight gradient
  is a plain matmul with the token axis inside:
  `[k, tokens] x [tokens, n]`, or `([n, tokens] x [tokens, k])^T`.
  """
  return _contract_last_first(x, w)


def _weight_matmul_fwd(x, w):
  # With symbolic zeros, `x` and `w` say whether anything differentiates
  # them: a frozen input (e.g. the embeddings below a first-layer adapter)
  # then costs no input-gradient matmul, as with JAX's own autodiff.
  need = (x.perturbed, w.perturbed)
  return _contract_last_first(x.value, w.value), (x.value, w.value, need)


def _weight_matmul_bwd(residuals, dy):
  x, w, (need_dx, need_dw) = residuals
  if isinstance(dy, jax.custom_derivatives.SymbolicZero):
    return None, None
  dx = dw = None
  if need_dx:
    dx = lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    dx = dx.astype(x.dtype)
  if need_dw:
    dw = _thin_weight_gradient(
        x, dy, token_axis_inside=jax.default_backend() == 'cpu')
    dw = dw.astype(w.dtype)
  return dx, dw


def _thin_weight_gradient(x: Array, dy: Array,
                          token_axis_inside: bool) -> Array:
  """`x^T dy` contracted over the token axes; with `token_axis_inside`, as
  a matmul with the token axis inside (see `weight_matmul`), the form
  XLA:CPU runs fast. Accelerators' matmuls take a transposed operand at no
  cost, so there the plain contraction does, without extra transposes."""
  tokens = tuple(range(x.ndim - 1))
  if not token_axis_inside:
    return lax.dot_general(x, dy, ((tokens, tokens), ((), ())))
  # Moving the feature axis of the thin operand to the front is a
  # transpose, not a reshape, so that partitioned token axes stay as they
  # are; the barriers keep XLA from folding the transposes back into the dot.
  feature_first = (x.ndim - 1,) + tokens
  moved = tuple(range(1, x.ndim))
  if x.shape[-1] <= dy.shape[-1]:  # w has no more rows than columns
    x_t = lax.optimization_barrier(jnp.transpose(x, feature_first))
    return lax.dot_general(x_t, dy, ((moved, tokens), ((), ())))
  dy_t = lax.optimization_barrier(jnp.transpose(dy, feature_first))
  dw_t = lax.dot_general(dy_t, x, ((moved, tokens), ((), ())))
  return lax.optimization_barrier(dw_t).T


weight_matmul.defvjp(_weight_matmul_fwd, _weight_matmul_bwd, symbolic_zeros=True)


class Embed(nn.Module):
  """Token embedding table `(vocab, embed)`, also usable as tied logits."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32
  attend_dtype: Optional[DType] = None
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
  one_hot: bool = False

  def setup(self):
    self.embedding = param_with_axes(
        'embedding', self.embedding_init,
        (self.num_embeddings, self.features), jnp.float32,
        axes=('vocab', 'embed'))

  def __call__(self, inputs: Array) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f'Embed expects integer token ids, got {inputs.dtype}.')
    if self.one_hot:
      # A one-hot matmul partitions better than a gather on TPU.
      iota = lax.iota(jnp.int32, self.num_embeddings)
      one_hot = jnp.asarray(inputs[..., None] == iota, dtype=self.dtype)
      output = jnp.dot(one_hot, jnp.asarray(self.embedding, self.dtype))
    else:
      output = jnp.asarray(self.embedding, self.dtype)[inputs]
    return with_sharding_constraint(output, ACT_EMBED)

  def attend(self, query: Array) -> Array:
    """Logits against the embedding table (tied output layer)."""
    dtype = self.attend_dtype if self.attend_dtype is not None else self.dtype
    return jnp.dot(query, jnp.asarray(self.embedding, dtype).T)


class LayerNorm(nn.Module):
  """T5's RMS norm: scale only, no mean subtraction, no bias."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.asarray(x, jnp.float32)
    mean2 = jnp.mean(lax.square(x), axis=-1, keepdims=True)
    y = jnp.asarray(x * lax.rsqrt(mean2 + self.epsilon), self.dtype)
    scale = param_with_axes('scale', nn.initializers.ones, (x.shape[-1],),
                            jnp.float32, axes=('embed',))
    return y * jnp.asarray(scale, self.dtype)


# ---------------------------------------------------------------------------
# Relative position bias.
# ---------------------------------------------------------------------------


def relative_position_bucket(relative_position: np.ndarray,
                             bidirectional: bool = True,
                             num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
  """T5's bucketing of `memory_position - query_position`.

  Half the buckets (per direction) are exact small distances; the rest grow
  logarithmically up to `max_distance`, beyond which all share one bucket.
  Computed with numpy: the positions are static, so this folds into a constant.
  """
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int32) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      np.log(np.maximum(n, 1).astype(np.float32) / max_exact + np.finfo(
          np.float32).eps) / np.log(max_distance / max_exact) *
      (num_buckets - max_exact)).astype(np.int32)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  ret += np.where(is_small, n, val_if_large)
  return ret


class RelativePositionBiases(nn.Module):
  """Learned per-head attention bias indexed by bucketed relative position."""
  num_buckets: int
  max_distance: int
  num_heads: int
  dtype: DType = jnp.float32
  embedding_init: Initializer = nn.initializers.variance_scaling(
      1.0, 'fan_avg', 'uniform')

  @nn.compact
  def __call__(self, qlen: int, klen: int, bidirectional: bool) -> Array:
    """Returns a `[1, heads, qlen, klen]` bias."""
    context = np.arange(qlen, dtype=np.int32)[:, None]
    memory = np.arange(klen, dtype=np.int32)[None, :]
    buckets = relative_position_bucket(
        memory - context, bidirectional=bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)
    table = param_with_axes('rel_embedding', self.embedding_init,
                            (self.num_heads, self.num_buckets), jnp.float32,
                            axes=('heads', 'relpos_buckets'))
    table = jnp.asarray(table, self.dtype)
    # A one-hot contraction instead of a gather: it partitions over heads.
    # The one-hot is made in the graph from the `[q, k]` bucket ids: as a
    # constant it would be `num_buckets` times larger (134 MB of program at
    # 1024 tokens, slow to compile).
    iota = lax.broadcasted_iota(jnp.int32, (1, 1, self.num_buckets), 2)
    one_hot = jnp.asarray(jnp.asarray(buckets)[..., None] == iota, self.dtype)
    values = jnp.einsum('hb,qkb->hqk', table, one_hot)
    return values[None]


# ---------------------------------------------------------------------------
# Masks.
# ---------------------------------------------------------------------------


def make_attention_mask(query_input: Array, key_input: Array,
                        pairwise_fn: Callable[..., Array] = jnp.multiply,
                        dtype: DType = jnp.float32) -> Array:
  """`[batch, 1, q, k]` mask from per-position query and key values."""
  mask = pairwise_fn(query_input[..., :, None], key_input[..., None, :])
  return jnp.asarray(mask[..., None, :, :], dtype)


def make_causal_mask(x: Array, dtype: DType = jnp.float32) -> Array:
  idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
  return make_attention_mask(idxs, idxs, jnp.greater_equal, dtype=dtype)


def combine_masks(*masks: Optional[Array],
                  dtype: DType = jnp.float32) -> Optional[Array]:
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  mask = functools.reduce(jnp.logical_and, masks)
  return jnp.asarray(mask, dtype)


def combine_biases(*biases: Optional[Array]) -> Optional[Array]:
  biases = [b for b in biases if b is not None]
  if not biases:
    return None
  return functools.reduce(operator.add, biases)


def make_decoder_mask(decoder_target_tokens: Array,
                      dtype: DType,
                      decoder_segment_ids: Optional[Array] = None) -> Array:
  """Causal mask over non-padding targets, within the same packed segment."""
  masks = [
      make_causal_mask(decoder_target_tokens, dtype=dtype),
      make_attention_mask(decoder_target_tokens > 0,
                          decoder_target_tokens > 0, dtype=dtype),
  ]
  if decoder_segment_ids is not None:
    masks.append(
        make_attention_mask(decoder_segment_ids, decoder_segment_ids,
                            jnp.equal, dtype=dtype))
  return combine_masks(*masks, dtype=dtype)


def mask_to_bias(mask: Array, dtype: DType) -> Array:
  """0 where attention is allowed, a large negative number elsewhere."""
  big_neg = jnp.finfo(dtype).min if jnp.issubdtype(
      dtype, jnp.floating) else -1e10
  return lax.select(mask > 0,
                    jnp.zeros(mask.shape, dtype),
                    jnp.full(mask.shape, big_neg, dtype))


# ---------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------


def dot_product_attention(query: Array, key: Array, value: Array,
                          bias: Optional[Array] = None,
                          dropout_rng: Optional[Array] = None,
                          dropout_rate: float = 0.,
                          deterministic: bool = False,
                          dtype: DType = jnp.float32,
                          float32_logits: bool = False) -> Array:
  """T5 attention: no 1/sqrt(d) here, it is folded into the query kernel.

  `query [b, q, h, d]`, `key`/`value [b, k, h, d]`; returns `[b, q, h, d]`.
  """
  if float32_logits:
    query = jnp.asarray(query, jnp.float32)
    key = jnp.asarray(key, jnp.float32)
  dropout = not deterministic and dropout_rate > 0.
  if not dropout and all(
      kernels.use_cpu_attention(x.dtype) for x in (query, key, value)) and (
          kernels.use_cpu_attention(dtype)):
    # One fused kernel per direction on CPU (see `kernels.attention`).
    return kernels.attention(query, key, value, bias)
  # Heads next to the batch before the per-head matmuls: with (batch, heads)
  # leading, every head's product (and its gradients' products) is one
  # contiguous matrix. XLA's CPU dots are slow on the strided per-head
  # matrices of the projections' [b, q, h, d] layout; this way the whole
  # T5-small training step ran ~7% faster (interleaved A/B, 2-core CPU).
  query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))
  logits = jnp.einsum('bhqd,bhkd->bhqk', query, key)
  if bias is not None:
    logits = logits + jnp.asarray(bias, logits.dtype)
  weights = jax.nn.softmax(logits).astype(dtype)
  if dropout:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = weights * (keep.astype(dtype) / jnp.asarray(1.0 - dropout_rate,
                                                          dtype))
  return jnp.swapaxes(jnp.einsum('bhqk,bhkd->bhqd', weights, value), 1, 2)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with an optional autoregressive key/value cache.

  Attributes:
    block: which kind of block this is ('encoder_self', 'decoder_self',
      'decoder_cross'); adapters may be limited to some kinds.
  """
  num_heads: int
  head_dim: int
  dtype: DType = jnp.float32
  dropout_rate: float = 0.
  kernel_init: Initializer = nn.initializers.variance_scaling(
      1.0, 'fan_in', 'normal')
  float32_logits: bool = False
  adapters: Optional[AdapterSites] = None
  block: str = 'encoder_self'

  def _site_adapters(self) -> Optional[AdapterSites]:
    if self.adapters is None or self.block not in self.adapters.attention_blocks:
      return None
    return self.adapters

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array,
               mask: Optional[Array] = None, bias: Optional[Array] = None,
               *, decode: bool = False, deterministic: bool = False,
               q_token_mask: Optional[Array] = None,
               kv_token_mask: Optional[Array] = None) -> Array:
    """Attends from `inputs_q [b, q, embed]` to `inputs_kv [b, k, embed]`.

    `q_token_mask` / `kv_token_mask` (`[b, len]`, 1 on real tokens) are only
    passed on to adapters (e.g. for sequence-level routing).
    """
    adapters = self._site_adapters()
    projection = functools.partial(
        DenseGeneral, axis=-1, features=(self.num_heads, self.head_dim),
        kernel_axes=('embed', 'joined_kv'), dtype=self.dtype)
    # Fold 1/sqrt(head_dim) into the query initialisation, as T5 does.
    depth_scaling = jnp.sqrt(self.head_dim).astype(jnp.float32)

    def query_init(*args):
      return self.kernel_init(*args) / depth_scaling

    def project(name, init, x, token_mask):
      y = projection(kernel_init=init, name=name)(x)
      y = apply_site(self, adapters, name, x, y, deterministic=deterministic,
                     mask=token_mask, input_axes=ACT_EMBED,
                     output_axes=ACT_HEADS)
      return with_sharding_constraint(y, ACT_HEADS)

    query = project('query', query_init, inputs_q, q_token_mask)
    key = project('key', self.kernel_init, inputs_kv, kv_token_mask)
    value = project('value', self.kernel_init, inputs_kv, kv_token_mask)

    if decode:
      key, value, mask, bias = self._update_cache(query, key, value, mask,
                                                  bias)

    attention_bias = None
    if mask is not None:
      attention_bias = mask_to_bias(mask, self.dtype)
    attention_bias = combine_biases(attention_bias, bias)

    dropout_rng = None
    if not deterministic and self.dropout_rate > 0.:
      dropout_rng = self.make_rng('dropout')

    x = dot_product_attention(
        query, key, value, bias=attention_bias, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, deterministic=deterministic,
        dtype=self.dtype, float32_logits=self.float32_logits)
    x = with_sharding_constraint(x, ACT_HEADS)

    out = DenseGeneral(features=inputs_q.shape[-1], axis=(-2, -1),
                       kernel_init=self.kernel_init,
                       kernel_axes=('joined_kv', 'embed'), dtype=self.dtype,
                       name='out')(x)
    out = apply_site(self, adapters, 'out', x, out,
                     deterministic=deterministic, mask=q_token_mask,
                     input_axes=ACT_HEADS, output_axes=ACT_EMBED)
    return with_sharding_constraint(out, ACT_EMBED)

  def _update_cache(self, query, key, value, mask, bias):
    """Writes this step's key/value into the cache and attends over it.

    The first call (cache variables absent) only creates a cache sized by the
    given `key` (the full target length) and computes attention normally; later
    calls take one position at a time, as `decode` in t5x does.
    """
    is_initialized = self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape,
                               key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                 value.shape, value.dtype)
    cache_index = self.variable('cache', 'cache_index',
                                lambda: jnp.array(0, dtype=jnp.int32))
    if not is_initialized:
      return key, value, mask, bias
    batch, length, num_heads, head_dim = cached_key.value.shape
    expected = (batch, 1, num_heads, head_dim)
    if query.shape != expected:
      raise ValueError(
          f'Autoregressive cache shape error: expected query shape {expected} '
          f'(one position per step) but got {query.shape}.')
    cur_index = cache_index.value
    zero = jnp.array(0, dtype=jnp.int32)
    start = (zero, cur_index, zero, zero)
    key = lax.dynamic_update_slice(cached_key.value,
                                   key.astype(cached_key.value.dtype), start)
    value = lax.dynamic_update_slice(cached_value.value,
                                     value.astype(cached_value.value.dtype),
                                     start)
    cached_key.value = key
    cached_value.value = value
    cache_index.value = cur_index + 1
    # Attend only to positions already written (the cache enforces causality).
    step_mask = jnp.broadcast_to(
        jnp.arange(length) <= cur_index, (batch, 1, 1, length))
    mask = combine_masks(mask, step_mask)
    if bias is not None:
      bias = lax.dynamic_slice_in_dim(bias, cur_index, 1, axis=-2)
    return key, value, mask, bias


# ---------------------------------------------------------------------------
# Feed-forward.
# ---------------------------------------------------------------------------


def _activation(name: Union[str, Callable[[Array], Array]]):
  if callable(name):
    return name
  if name == 'linear':
    return lambda x: x
  if name == 'gelu':
    # T5 v1.1's GELU is the tanh approximation (flax's default).
    return functools.partial(nn.gelu, approximate=True)
  if hasattr(nn, name):
    return getattr(nn, name)
  raise ValueError(f'Unknown activation {name!r}: use "linear", "gelu", '
                   '"relu" or another flax.linen activation name.')


class MlpBlock(nn.Module):
  """T5 feed-forward: one branch per activation (`wi` or `wi_0, wi_1, ...`),
  multiplied together, then projected back by `wo`."""
  intermediate_dim: int = 2048
  activations: Sequence[Union[str, Callable]] = ('relu',)
  kernel_init: Initializer = nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal')
  intermediate_dropout_rate: float = 0.1
  dtype: DType = jnp.float32
  adapters: Optional[AdapterSites] = None

  @nn.compact
  def __call__(self, inputs: Array, *, deterministic: bool = False,
               token_mask: Optional[Array] = None) -> Array:
    site = functools.partial(apply_site, self, self.adapters,
                             deterministic=deterministic, mask=token_mask)
    branches = []
    for idx, act in enumerate(self.activations):
      name = 'wi' if len(self.activations) == 1 else f'wi_{idx}'
      x = DenseGeneral(self.intermediate_dim, dtype=self.dtype,
                       kernel_init=self.kernel_init,
                       kernel_axes=('embed', 'mlp'), name=name)(inputs)
      x = site(name, inputs, x, input_axes=ACT_EMBED, output_axes=ACT_MLP)
      x = _activation(act)(x)
      if idx == 0:
        # IA3's FFN site: the activated first branch, before the product.
        x = site('mlp_hidden', x, x, input_axes=ACT_MLP, output_axes=ACT_MLP)
      branches.append(x)
    x = functools.reduce(operator.mul, branches)
    x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    x = with_sharding_constraint(x, ACT_MLP)
    output = DenseGeneral(inputs.shape[-1], dtype=self.dtype,
                          kernel_init=self.kernel_init,
                          kernel_axes=('mlp', 'embed'), name='wo')(x)
    output = site('wo', x, output, input_axes=ACT_MLP, output_axes=ACT_EMBED)
    return with_sharding_constraint(output, ACT_EMBED)
