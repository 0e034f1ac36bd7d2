"""The T5 encoder-decoder (T5 v1.1 / LM-adapted and T5 1.0).

Follows the t5x minimal T5 (`t5x/examples/t5/network.py`): the same
`T5Config` field names, the same parameter paths and logical axes, and the
module contract t5x's `EncoderDecoderModel` relies on (`__call__`, `encode`,
`decode`). Adapters enter only through `layers.AdapterSites`; the network knows
nothing about any particular method.
"""

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mov_jax import layers

Array = layers.Array


# What a layer keeps from the forward pass for the backward pass (t5x's
# names). 'minimal' keeps the outputs of the projections (matmuls without
# batch dimensions) and recomputes the rest, chiefly the attention scores
# and probabilities, `[batch, heads, q, k]` per layer, which dominate the
# memory at long inputs; 'full' keeps only each layer's input.
REMAT_POLICIES = {
    'none': None,
    'minimal': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'full': jax.checkpoint_policies.nothing_saveable,
}


def _layer_class(layer_cls, cfg: 'T5Config', static_argnums):
  """`layer_cls`, recomputed in the backward pass per `cfg.remat_policy`
  (the parameters keep their paths)."""
  if cfg.remat_policy == 'none':
    return layer_cls
  return nn.remat(layer_cls, policy=REMAT_POLICIES[cfg.remat_policy],
                  static_argnums=static_argnums)


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Shapes and options of a T5 network (t5x's field names).

  `dtype` is the activation dtype (parameters are always float32).
  """
  vocab_size: int
  dtype: Any = jnp.float32
  emb_dim: int = 512
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  head_dim: int = 64
  mlp_dim: int = 2048
  mlp_activations: Sequence[str] = ('relu',)
  dropout_rate: float = 0.1
  logits_via_embedding: bool = False
  float32_attention_logits: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  remat_policy: str = 'none'

  def __post_init__(self):
    # Gin hands over lists; keep the config hashable.
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))
    problems = []
    for name in ('vocab_size', 'emb_dim', 'num_heads', 'num_encoder_layers',
                 'num_decoder_layers', 'head_dim', 'mlp_dim'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        problems.append(f'{name}={value!r} must be a positive integer')
    if not 0.0 <= self.dropout_rate < 1.0:
      problems.append(f'dropout_rate={self.dropout_rate!r} must be in [0, 1)')
    if not self.mlp_activations:
      problems.append('mlp_activations must name at least one activation')
    if self.remat_policy not in REMAT_POLICIES:
      problems.append(f'remat_policy={self.remat_policy!r} must be one of '
                      f'{sorted(REMAT_POLICIES)}')
    if problems:
      raise ValueError('Invalid T5Config: ' + '; '.join(problems) + '.')


def _one_hot_embedding() -> bool:
  """Embed by a one-hot matmul (t5x's choice: it partitions well on TPU) on
  TPU only; elsewhere a gather gives the same values without the
  2 * tokens * vocab * emb_dim FLOPs (and their gradient) of the matmul."""
  return jax.default_backend() == 'tpu'


def _token_mask(tokens: Array, dtype=jnp.float32) -> Array:
  return jnp.asarray(tokens > 0, dtype)


class EncoderLayer(nn.Module):
  """Pre-norm self-attention and FFN blocks with residual connections."""
  config: T5Config
  relative_embedding: nn.Module
  adapters: Optional[layers.AdapterSites] = None

  @nn.compact
  def __call__(self, inputs, encoder_mask=None, deterministic=False,
               token_mask=None):
    cfg = self.config
    length = inputs.shape[-2]
    encoder_bias = self.relative_embedding(length, length, True)

    x = layers.LayerNorm(dtype=cfg.dtype, name='pre_attention_layer_norm')(
        inputs)
    x = layers.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.dtype,
        dropout_rate=cfg.dropout_rate,
        float32_logits=cfg.float32_attention_logits, adapters=self.adapters,
        block='encoder_self', name='attention')(
            x, x, encoder_mask, encoder_bias, deterministic=deterministic,
            q_token_mask=token_mask, kv_token_mask=token_mask)
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    x = x + inputs

    y = layers.LayerNorm(dtype=cfg.dtype, name='pre_mlp_layer_norm')(x)
    y = layers.MlpBlock(
        intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
        intermediate_dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
        adapters=self.adapters, name='mlp')(
            y, deterministic=deterministic, token_mask=token_mask)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)
    y = y + x
    return layers.with_sharding_constraint(y, layers.ACT_EMBED)


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention and FFN blocks (pre-norm, residual)."""
  config: T5Config
  relative_embedding: nn.Module
  adapters: Optional[layers.AdapterSites] = None

  @nn.compact
  def __call__(self, inputs, encoded, decoder_mask=None,
               encoder_decoder_mask=None, deterministic=False, decode=False,
               max_decode_length=None, token_mask=None,
               encoder_token_mask=None):
    cfg = self.config
    length = max_decode_length if decode and max_decode_length else (
        inputs.shape[-2])
    decoder_bias = self.relative_embedding(length, length, False)

    attention = lambda block, name: layers.MultiHeadDotProductAttention(  # pylint: disable=g-long-lambda
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, dtype=cfg.dtype,
        dropout_rate=cfg.dropout_rate,
        float32_logits=cfg.float32_attention_logits, adapters=self.adapters,
        block=block, name=name)
    dropout = lambda: nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))

    x = layers.LayerNorm(dtype=cfg.dtype, name='pre_self_attention_layer_norm')(
        inputs)
    x = attention('decoder_self', 'self_attention')(
        x, x, decoder_mask, decoder_bias, decode=decode,
        deterministic=deterministic, q_token_mask=token_mask,
        kv_token_mask=token_mask)
    x = dropout()(x, deterministic=deterministic)
    x = x + inputs

    y = layers.LayerNorm(dtype=cfg.dtype,
                         name='pre_cross_attention_layer_norm')(x)
    y = attention('decoder_cross', 'encoder_decoder_attention')(
        y, encoded, encoder_decoder_mask, None, deterministic=deterministic,
        q_token_mask=token_mask, kv_token_mask=encoder_token_mask)
    y = dropout()(y, deterministic=deterministic)
    y = y + x

    z = layers.LayerNorm(dtype=cfg.dtype, name='pre_mlp_layer_norm')(y)
    z = layers.MlpBlock(
        intermediate_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
        intermediate_dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
        adapters=self.adapters, name='mlp')(
            z, deterministic=deterministic, token_mask=token_mask)
    z = dropout()(z, deterministic=deterministic)
    z = z + y
    return layers.with_sharding_constraint(z, layers.ACT_EMBED)


class Encoder(nn.Module):
  """Embeds input tokens and runs the encoder stack."""
  config: T5Config
  shared_embedding: nn.Module
  adapters: Optional[layers.AdapterSites] = None

  @nn.compact
  def __call__(self, encoder_input_tokens, encoder_mask=None,
               deterministic=False):
    cfg = self.config
    if encoder_input_tokens.ndim != 2:
      raise ValueError('encoder_input_tokens must be [batch, length], got '
                       f'shape {encoder_input_tokens.shape}.')
    rel_emb = layers.RelativePositionBiases(
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        num_heads=cfg.num_heads, dtype=cfg.dtype, name='relpos_bias')
    token_mask = _token_mask(encoder_input_tokens)

    x = self.shared_embedding(encoder_input_tokens.astype('int32'))
    x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
        x, deterministic=deterministic)
    x = x.astype(cfg.dtype)
    # Arguments by position: `nn.remat` makes `deterministic` (3, counting
    # the module) static.
    layer_cls = _layer_class(EncoderLayer, cfg, static_argnums=(3,))
    for lyr in range(cfg.num_encoder_layers):
      x = layer_cls(config=cfg, relative_embedding=rel_emb,
                    adapters=self.adapters, name=f'layers_{lyr}')(
                        x, encoder_mask, deterministic, token_mask)
    x = layers.LayerNorm(dtype=cfg.dtype, name='encoder_norm')(x)
    return nn.Dropout(rate=cfg.dropout_rate)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Embeds target tokens, runs the decoder stack and produces logits."""
  config: T5Config
  shared_embedding: nn.Module
  adapters: Optional[layers.AdapterSites] = None

  @nn.compact
  def __call__(self, encoded, decoder_input_tokens, decoder_positions=None,
               decoder_mask=None, encoder_decoder_mask=None,
               deterministic=False, decode=False, max_decode_length=None,
               decoder_token_mask=None, encoder_token_mask=None):
    cfg = self.config
    if decoder_input_tokens.ndim != 2:
      raise ValueError('decoder_input_tokens must be [batch, length], got '
                       f'shape {decoder_input_tokens.shape}.')
    rel_emb = layers.RelativePositionBiases(
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        num_heads=cfg.num_heads, dtype=cfg.dtype, name='relpos_bias')

    y = self.shared_embedding(decoder_input_tokens.astype('int32'))
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)
    y = y.astype(cfg.dtype)
    # Arguments by position: `nn.remat` makes `deterministic`, `decode` and
    # `max_decode_length` (5, 6, 7, counting the module) static. Decoding
    # step by step computes no gradients: no recomputation there.
    layer_cls = DecoderLayer if decode else _layer_class(
        DecoderLayer, cfg, static_argnums=(5, 6, 7))
    for lyr in range(cfg.num_decoder_layers):
      y = layer_cls(config=cfg, relative_embedding=rel_emb,
                    adapters=self.adapters, name=f'layers_{lyr}')(
                        y, encoded, decoder_mask, encoder_decoder_mask,
                        deterministic, decode, max_decode_length,
                        decoder_token_mask, encoder_token_mask)
    y = layers.LayerNorm(dtype=cfg.dtype, name='decoder_norm')(y)
    y = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=(-2,))(
        y, deterministic=deterministic)

    if cfg.logits_via_embedding:
      # T5 1.0: tied output layer, rescaled because the embedding is shared.
      logits = self.shared_embedding.attend(y)
      logits = logits / jnp.sqrt(y.shape[-1]).astype(logits.dtype)
    else:
      logits = layers.DenseGeneral(
          cfg.vocab_size, dtype=jnp.float32, kernel_axes=('embed', 'vocab'),
          name='logits_dense')(y)
    return layers.with_sharding_constraint(logits, ('batch', 'length', 'vocab'))


class Transformer(nn.Module):
  """T5 encoder-decoder with t5x's module contract.

  Attributes:
    config: the network's shapes and options.
    adapters: which adapter (if any) sits at each site; see
      `layers.AdapterSites`. None means the plain base model.
  """
  config: T5Config
  adapters: Optional[layers.AdapterSites] = None

  def setup(self):
    cfg = self.config
    self.shared_embedding = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim, dtype=cfg.dtype,
        attend_dtype=jnp.float32,
        embedding_init=nn.initializers.normal(stddev=1.0),
        one_hot=_one_hot_embedding(),
        name='token_embedder')
    self.encoder = Encoder(config=cfg, shared_embedding=self.shared_embedding,
                           adapters=self.adapters)
    self.decoder = Decoder(config=cfg, shared_embedding=self.shared_embedding,
                           adapters=self.adapters)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None,
             enable_dropout=True):
    """Runs the encoder; returns `[batch, length, embed]`."""
    cfg = self.config
    encoder_mask = layers.make_attention_mask(
        encoder_input_tokens > 0, encoder_input_tokens > 0, dtype=cfg.dtype)
    if encoder_segment_ids is not None:
      encoder_mask = layers.combine_masks(
          encoder_mask,
          layers.make_attention_mask(encoder_segment_ids, encoder_segment_ids,
                                     jnp.equal, dtype=cfg.dtype))
    return self.encoder(encoder_input_tokens, encoder_mask,
                        deterministic=not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens, encoder_segment_ids=None,
             decoder_segment_ids=None, decoder_positions=None,
             enable_dropout=True, decode=False, max_decode_length=None):
    """Runs the decoder on `encoded`; returns float32 logits.

    With `decode=True` (and the `cache` collection mutable) it consumes one
    target position per call, reading and extending the key/value cache.
    """
    cfg = self.config
    if decode:
      # The cache enforces causality; padding in the prompt is irrelevant.
      decoder_mask = None
      encoder_decoder_mask = layers.make_attention_mask(
          jnp.ones_like(decoder_target_tokens), encoder_input_tokens > 0,
          dtype=cfg.dtype)
      decoder_token_mask = None
    else:
      decoder_mask = layers.make_decoder_mask(
          decoder_target_tokens, dtype=cfg.dtype,
          decoder_segment_ids=decoder_segment_ids)
      encoder_decoder_mask = layers.make_attention_mask(
          decoder_target_tokens > 0, encoder_input_tokens > 0,
          dtype=cfg.dtype)
      decoder_token_mask = _token_mask(decoder_target_tokens)
    if encoder_segment_ids is not None:
      if decode:
        raise ValueError('Packed (segmented) inputs are not supported during '
                         'incremental decoding; unpack the batch first.')
      encoder_decoder_mask = layers.combine_masks(
          encoder_decoder_mask,
          layers.make_attention_mask(decoder_segment_ids, encoder_segment_ids,
                                     jnp.equal, dtype=cfg.dtype))
    return self.decoder(
        encoded, decoder_input_tokens=decoder_input_tokens,
        decoder_positions=decoder_positions, decoder_mask=decoder_mask,
        encoder_decoder_mask=encoder_decoder_mask,
        deterministic=not enable_dropout, decode=decode,
        max_decode_length=max_decode_length,
        decoder_token_mask=decoder_token_mask,
        encoder_token_mask=_token_mask(encoder_input_tokens))

  def __call__(self, encoder_input_tokens, decoder_input_tokens,
               decoder_target_tokens, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None,
               decoder_positions=None, *, enable_dropout: bool = True,
               decode: bool = False, max_decode_length: Optional[int] = None):
    """Teacher-forced logits `[batch, target_length, vocab]` (float32).

    `encoder_positions` is accepted for t5x compatibility; relative position
    biases only need offsets, which packing keeps intact within a segment.
    """
    del encoder_positions
    if (encoder_segment_ids is None) != (decoder_segment_ids is None):
      raise ValueError('Packed batches need both encoder_segment_ids and '
                       'decoder_segment_ids (or neither).')
    encoded = self.encode(encoder_input_tokens,
                          encoder_segment_ids=encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens,
                       encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions,
                       enable_dropout=enable_dropout, decode=decode,
                       max_decode_length=max_decode_length)
