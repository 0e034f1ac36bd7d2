"""Checkpoint formats: the Hugging Face T5 name mapping.

Hugging Face `T5ForConditionalGeneration` names map one to one onto our (t5x)
parameter paths; linear weights are stored transposed (`[out, in]`), and the
relative position table lives only in block 0 of each stack, as
`[buckets, heads]`. File loading (safetensors, T5X legacy and orbax) builds on
these functions.
"""

from typing import Dict, List, Mapping, Tuple

import numpy as np
from flax import traverse_util

from mov_jax import network

# (our path, Hugging Face name, whether the array is transposed between them)
NamePair = Tuple[str, str, bool]


def hf_name_pairs(config: network.T5Config) -> List[NamePair]:
  """Every parameter of a base T5 network with its Hugging Face name."""
  pairs: List[NamePair] = [('token_embedder/embedding', 'shared.weight', False)]
  attention_blocks = {
      'encoder': [('attention', 'SelfAttention', 'pre_attention_layer_norm')],
      'decoder': [
          ('self_attention', 'SelfAttention', 'pre_self_attention_layer_norm'),
          ('encoder_decoder_attention', 'EncDecAttention',
           'pre_cross_attention_layer_norm'),
      ],
  }
  if len(config.mlp_activations) == 1:
    mlp_names = ['wi']
  else:
    mlp_names = [f'wi_{i}' for i in range(len(config.mlp_activations))]
  for stack, num_layers in (('encoder', config.num_encoder_layers),
                            ('decoder', config.num_decoder_layers)):
    pairs.append((f'{stack}/relpos_bias/rel_embedding',
                  f'{stack}.block.0.layer.0.SelfAttention.'
                  'relative_attention_bias.weight', True))
    for i in range(num_layers):
      ours, hf = f'{stack}/layers_{i}', f'{stack}.block.{i}.layer'
      blocks = attention_blocks[stack]
      for j, (name, hf_name, norm) in enumerate(blocks):
        for proj, hf_proj in (('query', 'q'), ('key', 'k'), ('value', 'v'),
                              ('out', 'o')):
          pairs.append((f'{ours}/{name}/{proj}/kernel',
                        f'{hf}.{j}.{hf_name}.{hf_proj}.weight', True))
        pairs.append((f'{ours}/{norm}/scale', f'{hf}.{j}.layer_norm.weight',
                      False))
      j = len(blocks)
      for proj in mlp_names + ['wo']:
        pairs.append((f'{ours}/mlp/{proj}/kernel',
                      f'{hf}.{j}.DenseReluDense.{proj}.weight', True))
      pairs.append((f'{ours}/pre_mlp_layer_norm/scale',
                    f'{hf}.{j}.layer_norm.weight', False))
    pairs.append((f'{stack}/{stack}_norm/scale',
                  f'{stack}.final_layer_norm.weight', False))
  if not config.logits_via_embedding:
    pairs.append(('decoder/logits_dense/kernel', 'lm_head.weight', True))
  return pairs


# Names Hugging Face may carry that are aliases of `shared.weight`.
_HF_TIED_ALIASES = ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight')


def params_from_hf_state_dict(state_dict: Mapping[str, np.ndarray],
                              config: network.T5Config) -> Dict:
  """Our nested parameter dict from a Hugging Face T5 state dict.

  Raises ValueError listing missing, unexpected and mis-shaped names.
  """
  pairs = hf_name_pairs(config)
  expected = {hf for _, hf, _ in pairs}
  ignorable = set(_HF_TIED_ALIASES)
  if config.logits_via_embedding:
    ignorable.add('lm_head.weight')  # Tied to shared.weight in T5 1.0.
  missing = sorted(expected - set(state_dict))
  unexpected = sorted(set(state_dict) - expected - ignorable)
  flat, mismatched = {}, []
  for ours, hf, transpose in pairs:
    if hf not in state_dict:
      continue
    value = np.asarray(state_dict[hf])
    if transpose:
      value = value.T
    flat[tuple(ours.split('/'))] = value
  expected_shapes = _expected_shapes(config)
  for path, value in flat.items():
    want = expected_shapes['/'.join(path)]
    if value.shape != want:
      mismatched.append(f'{"/".join(path)}: checkpoint {value.shape}, '
                        f'model {want}')
  if missing or unexpected or mismatched:
    raise ValueError(
        'Hugging Face T5 weights do not fit this T5Config '
        f'({_describe(config)}).\n  missing: {missing[:20]}\n  unexpected: '
        f'{unexpected[:20]}\n  shape mismatches: {mismatched[:20]}\n'
        'Pick the model gin file whose shapes match the checkpoint '
        '(gated-gelu checkpoints are T5 v1.1: models/t5_1_1_*.gin; relu ones '
        'T5 1.0: models/t5_*.gin).')
  return traverse_util.unflatten_dict(
      {k: v.astype(np.float32) for k, v in flat.items()})


def hf_state_dict_from_params(params: Mapping,
                              config: network.T5Config) -> Dict[str, np.ndarray]:
  """The inverse of `params_from_hf_state_dict` (base parameters only)."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  out = {}
  for ours, hf, transpose in hf_name_pairs(config):
    value = np.asarray(flat[ours])
    out[hf] = np.ascontiguousarray(value.T if transpose else value)
  return out


def _expected_shapes(config: network.T5Config) -> Dict[str, Tuple[int, ...]]:
  c = config
  inner = c.num_heads * c.head_dim
  shapes = {}
  for ours, _, _ in hf_name_pairs(config):
    leaf = ours.split('/')
    if ours == 'token_embedder/embedding':
      shape = (c.vocab_size, c.emb_dim)
    elif leaf[-1] == 'rel_embedding':
      shape = (c.num_heads, c.relative_attention_num_buckets)
    elif leaf[-1] == 'scale':
      shape = (c.emb_dim,)
    elif leaf[-2] in ('query', 'key', 'value'):
      shape = (c.emb_dim, inner)
    elif leaf[-2] == 'out':
      shape = (inner, c.emb_dim)
    elif leaf[-2] == 'wo':
      shape = (c.mlp_dim, c.emb_dim)
    elif leaf[-2].startswith('wi'):
      shape = (c.emb_dim, c.mlp_dim)
    elif leaf[-2] == 'logits_dense':
      shape = (c.emb_dim, c.vocab_size)
    else:
      raise AssertionError(f'unhandled parameter {ours}')
    shapes[ours] = shape
  return shapes


def _describe(config: network.T5Config) -> str:
  return (f'vocab {config.vocab_size}, emb {config.emb_dim}, heads '
          f'{config.num_heads} x {config.head_dim}, mlp {config.mlp_dim} '
          f'{config.mlp_activations}, layers {config.num_encoder_layers}/'
          f'{config.num_decoder_layers}')
