"""Checkpoint formats: T5X (legacy and orbax), Hugging Face T5, and ours.

Every loader returns our nested parameter dict (t5x parameter paths, float32
leaves) and checks it against a `network.T5Config` *before* reading any array,
so a wrong model gin file fails in seconds rather than after reading 40 GB, with
a message that lists the mismatches and names the gin file the checkpoint fits.

- T5X legacy (`checkpoint_N/checkpoint`: a flax msgpack whose large arrays are
  TensorStore specs pointing at gzip zarr arrays in dotted sibling directories)
  and T5X orbax (`checkpoint_N/state/`): `load_t5x`. Given `shardings`, each
  device reads only its own slice, so an XXL checkpoint never has to fit in one
  host's memory.
- Hugging Face `T5ForConditionalGeneration` directories: `load_hf`,
  `export_hf`. Names map one to one (`hf_name_pairs`); linear weights are
  stored transposed (`[out, in]`), and the relative position table lives only
  in block 0 of each stack, as `[buckets, heads]`.
- Ours: an orbax PyTree checkpoint of the parameters plus `t5_config.json`
  (`save_params`, `load_params`), written atomically; it also holds adapters
  or an adapter-only export.
- `load_any` picks the loader from the layout.
"""

import ast
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import uuid
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import serialization
from flax import traverse_util

from mov_jax import gin_utils
from mov_jax import network

# (our path, Hugging Face name, whether the array is transposed between them)
NamePair = Tuple[str, str, bool]
# Flat trees keyed by path tuples, e.g. ('encoder', 'layers_0', 'mlp', ...).
Flat = Dict[Tuple[str, ...], Any]


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


def _hf_layout(names) -> network.T5Config:
  """A config whose `hf_name_pairs` cover every block and FFN name in `names`.

  Only the layout (layer counts, `wi` or `wi_0`, `lm_head`) matters here: it
  lets us translate whatever a file holds, so that a wrong config is reported
  as a list of mismatches instead of a pile of unknown names.
  """
  counts = {'encoder': 0, 'decoder': 0}
  for name in names:
    m = re.match(r'(encoder|decoder)\.block\.(\d+)\.', name)
    if m:
      counts[m.group(1)] = max(counts[m.group(1)], int(m.group(2)) + 1)
  gated = any('.DenseReluDense.wi_0.' in name for name in names)
  return network.T5Config(
      vocab_size=1, num_encoder_layers=max(counts['encoder'], 1),
      num_decoder_layers=max(counts['decoder'], 1),
      mlp_activations=('gelu', 'linear') if gated else ('relu',),
      logits_via_embedding='lm_head.weight' not in names)


def params_from_hf_state_dict(state_dict: Mapping[str, Any],
                              config: network.T5Config,
                              source: str = 'Hugging Face T5 weights') -> Dict:
  """Our nested float32 parameter dict from a Hugging Face T5 state dict.

  Raises ValueError listing missing, unexpected and mis-shaped parameters
  (in our names; names we cannot translate are listed as Hugging Face names)
  and naming the model gin file that fits the weights.
  """
  state = {k: v for k, v in state_dict.items() if k not in _HF_TIED_ALIASES}
  if config.logits_via_embedding:
    state.pop('lm_head.weight', None)  # Tied to shared.weight in T5 1.0.
  table = {hf: (ours, transpose)
           for ours, hf, transpose in hf_name_pairs(_hf_layout(state))}
  found = {}
  for name, value in state.items():
    value = np.asarray(value)
    if name in table:
      ours, transpose = table[name]
      found[ours] = value.T if transpose else value
    else:
      found[name] = value
  check_params(found, config, source)
  return traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in found.items()}, sep='/')


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
          f'{config.num_decoder_layers}, '
          + ('tied embedding (T5 1.0)' if config.logits_via_embedding
             else 'separate logits_dense (T5 v1.1)'))


# ---------------------------------------------------------------------------
# Checking parameters against a config, and naming the config that fits.


def _shape_dtype(value) -> Tuple[Tuple[int, ...], Any]:
  """Shape and dtype of an array, an orbax metadata entry or a t5x spec."""
  if _is_ts_spec(value):
    return tuple(value['metadata']['shape']), jnp.dtype(value['dtype'])
  return tuple(value.shape), jnp.dtype(value.dtype)


def check_params(found: Mapping[str, Any], config: network.T5Config,
                 source: str, allow_extra: bool = False,
                 allow_missing: bool = False) -> None:
  """Raises ValueError unless `found` holds the base parameters of `config`.

  `found` maps slash paths to arrays, orbax metadata or t5x TensorStore specs,
  so a checkpoint is checked from its metadata alone. Floating dtypes are
  accepted (loaders cast them to float32, the network's parameter dtype);
  `allow_extra` admits parameters beyond the base model (adapters);
  `allow_missing` a subset of it (an adapter-only export).
  """
  expected = _expected_shapes(config)
  missing = [] if allow_missing else sorted(set(expected) - set(found))
  unexpected = [] if allow_extra else sorted(set(found) - set(expected))
  shapes, dtypes = [], []
  for path in sorted(set(found) & set(expected)):
    shape, dtype = _shape_dtype(found[path])
    if shape != expected[path]:
      shapes.append(f'{path}: checkpoint {shape}, model {expected[path]}')
    if not jnp.issubdtype(dtype, jnp.floating):
      dtypes.append(f'{path}: {dtype}, expected floating point')
  if not (missing or unexpected or shapes or dtypes):
    return
  lines = [f'{source} does not fit this T5Config ({_describe(config)}).',
           _fit_hint({p: _shape_dtype(v)[0] for p, v in found.items()})]
  for label, items in (('missing', missing), ('unexpected', unexpected),
                       ('shape mismatches', shapes),
                       ('dtype mismatches', dtypes)):
    if items:
      more = f' ... and {len(items) - 10} more' if len(items) > 10 else ''
      lines.append(f'  {label} ({len(items)}): {items[:10]}{more}')
  raise ValueError('\n'.join(lines))


def _fit_hint(shapes: Mapping[str, Tuple[int, ...]]) -> str:
  inferred = infer_config(shapes)
  if inferred is None:
    return ('The checkpoint does not hold a complete base T5 (looked for '
            'token_embedder/embedding, encoder/relpos_bias/rel_embedding and '
            'encoder/layers_0), so no model gin file can be suggested. Gated '
            'FFNs (wi_0, wi_1) are T5 v1.1: models/t5_1_1_*.gin; a single wi '
            'is T5 1.0: models/t5_*.gin.')
  return (f'The checkpoint holds a T5 with {_describe(inferred)}. '
          f'{suggest_gin(inferred)}')


def infer_config(shapes: Mapping[str, Sequence[int]]) -> Optional[
    network.T5Config]:
  """The base T5 that parameters of these shapes (slash paths) belong to.

  Heads come from the relative position table, head_dim from the query
  kernel, layer counts from the highest `layers_i`. A gated FFN is taken to be
  T5 v1.1's gated GELU; shapes cannot tell GELU from another activation.
  Returns None when the shapes are not a complete T5.
  """
  def shape(path):
    return tuple(shapes[path]) if path in shapes else None

  emb = shape('token_embedder/embedding')
  rel = shape('encoder/relpos_bias/rel_embedding')
  query = shape('encoder/layers_0/attention/query/kernel')
  gated = 'encoder/layers_0/mlp/wi_0/kernel' in shapes
  wi = shape(f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel")
  if not all(s is not None and len(s) == 2 for s in (emb, rel, query, wi)):
    return None
  if query[1] % rel[0]:
    return None

  def num_layers(stack):
    found = [int(m.group(1)) for p in shapes
             for m in [re.match(stack + r'/layers_(\d+)/', p)] if m]
    return max(found) + 1 if found else 0

  try:
    return network.T5Config(
        vocab_size=emb[0], emb_dim=emb[1], num_heads=rel[0],
        head_dim=query[1] // rel[0], mlp_dim=wi[1],
        num_encoder_layers=num_layers('encoder'),
        num_decoder_layers=num_layers('decoder'),
        mlp_activations=('gelu', 'linear') if gated else ('relu',),
        relative_attention_num_buckets=rel[1], dropout_rate=0.0,
        logits_via_embedding='decoder/logits_dense/kernel' not in shapes)
  except ValueError:
    return None


# T5Config fields that decide parameter shapes, besides the vocabulary.
_SHAPE_FIELDS = ('emb_dim', 'num_heads', 'head_dim', 'mlp_dim',
                 'num_encoder_layers', 'num_decoder_layers', 'mlp_activations',
                 'logits_via_embedding', 'relative_attention_num_buckets')


def shipped_model_gins() -> Dict[str, Dict[str, Any]]:
  """T5Config values set by each shipped `models/*.gin`, by relative path.

  The files are read as text, not parsed with gin: parsing would clobber the
  caller's gin configuration. Macros (`%NUM_EMBEDDINGS`) are resolved.
  """
  out = {}
  for path in sorted((gin_utils.gin_dir() / 'models').glob('*.gin')):
    macros, values = {}, {}
    for line in path.read_text(encoding='utf-8').splitlines():
      m = re.match(r'(\s*)([A-Za-z_]\w*)\s*=\s*([^#]+?)\s*(#.*)?$', line)
      if not m:
        continue
      indent, name, raw = m.groups()[:3]
      if raw.startswith('%'):
        value = macros.get(raw[1:])
      else:
        try:
          value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
          continue
      (values if indent else macros)[name] = value
    out[f'models/{path.name}'] = values
  return out


def suggest_gin(config: network.T5Config) -> str:
  """Which shipped model gin file (and vocabulary flag) builds `config`."""
  defaults = {f.name: f.default for f in dataclasses.fields(network.T5Config)}
  want = {f: getattr(config, f) for f in _SHAPE_FIELDS}
  for name, values in shipped_model_gins().items():
    have = {f: values.get(f, defaults[f]) for f in _SHAPE_FIELDS}
    have['mlp_activations'] = tuple(have['mlp_activations'])
    if have == want:
      flag = ('' if values.get('vocab_size') == config.vocab_size
              else f' --gin.NUM_EMBEDDINGS={config.vocab_size}')
      return f'It fits --gin_file={name}{flag}.'
  fields = ', '.join(f'{f} = {want[f]!r}' for f in _SHAPE_FIELDS)
  return ('No shipped models/*.gin has these shapes; write one like '
          f'models/t5_1_1_tiny.gin with {fields} and NUM_EMBEDDINGS = '
          f'{config.vocab_size}.')


# ---------------------------------------------------------------------------
# Shared plumbing: flat trees, shardings, orbax, atomic directories.


def _slash(flat: Flat) -> Dict[str, Any]:
  return {'/'.join(k): v for k, v in flat.items()}


def _flat_shardings(shardings, paths) -> Optional[Flat]:
  """`shardings` (a pytree like the params, or one Sharding for all) as a
  flat dict over `paths`; None stays None."""
  if shardings is None:
    return None
  if isinstance(shardings, jax.sharding.Sharding):
    return {p: shardings for p in paths}
  flat = traverse_util.flatten_dict(dict(shardings))
  missing = sorted('/'.join(p) for p in set(paths) - set(flat))
  extra = sorted('/'.join(p) for p in set(flat) - set(paths))
  if missing or extra:
    raise ValueError('shardings must match the parameters exactly: no '
                     f'sharding for {missing[:10]}; shardings for unknown '
                     f'parameters {extra[:10]}.')
  return flat


def _ocp():
  """orbax.checkpoint, imported on first use (slow import, noisy logs)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


def _orbax_metadata(directory: str) -> Flat:
  """Flat tree of orbax array metadata (shape, dtype): nothing is read."""
  meta = _ocp().PyTreeCheckpointer().metadata(directory)
  for attr in ('item_metadata', 'tree'):  # Newer orbax wraps the tree.
    meta = getattr(meta, attr, meta)
  if not isinstance(meta, Mapping):
    raise ValueError(f'{directory} has no readable orbax PyTree metadata '
                     '(_METADATA); is the checkpoint complete?')
  return traverse_util.flatten_dict(dict(meta))


def _orbax_restore(directory: str, leaves: Flat, shardings: Optional[Flat],
                   dtype=None, prefix: Tuple[str, ...] = ()) -> Flat:
  """Restores the `leaves` (paths under `prefix`) of an orbax checkpoint.

  With a sharding, orbax reads only each device's slice; without one the
  leaf comes back as a numpy array. `dtype` casts while reading. Nothing
  outside `leaves` is read (partial restore).
  """
  ocp = _ocp()
  item, args = {}, {}
  for rel_path, meta in leaves.items():
    sharding = shardings.get(rel_path) if shardings else None
    path = prefix + rel_path
    if sharding is not None:
      item[path] = jax.ShapeDtypeStruct(meta.shape, dtype or meta.dtype,
                                        sharding=sharding)
      args[path] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype)
    else:
      item[path] = jax.ShapeDtypeStruct(meta.shape, dtype or meta.dtype)
      args[path] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)
  restored = ocp.PyTreeCheckpointer().restore(
      directory, args=ocp.args.PyTreeRestore(
          item=traverse_util.unflatten_dict(item),
          restore_args=traverse_util.unflatten_dict(args),
          partial_restore=True))
  for key in prefix:
    restored = restored[key]
  return traverse_util.flatten_dict(restored)


def _occupied(path: str) -> bool:
  if os.path.isdir(path):
    return bool(os.listdir(path))
  return os.path.lexists(path)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


@contextlib.contextmanager
def _atomic_directory(path, overwrite: bool) -> Iterator[str]:
  """Yields a fresh sibling directory that becomes `path` once fully written.

  A failure leaves `path` as it was; the old content is removed only after
  the new one is in place. Refuses an existing non-empty `path` unless
  `overwrite`. (Single-process writers only.)
  """
  path = os.path.abspath(os.fspath(path))
  if _occupied(path) and not overwrite:
    raise FileExistsError(
        f'{path} already exists and is not empty; refusing to overwrite it '
        '(pass overwrite=True, or --overwrite on the command line).')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = f'{path}.tmp-{tag}'
  os.makedirs(tmp)
  try:
    yield tmp
    if os.path.lexists(path):
      old = f'{path}.old-{tag}'
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      _remove(old)
    else:
      os.rename(tmp, path)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def _check_and_restore(read, leaves: Flat, config: Optional[network.T5Config],
                       source: str, shardings, **check_options
                       ) -> Tuple[Dict, network.T5Config]:
  """Checks `leaves` (our paths -> metadata) against `config` (inferred when
  None), then reads them as float32 with `read(leaves, shardings, dtype)`."""
  if config is None:
    config = _inferred_config(leaves, source)
  check_params(_slash(leaves), config, source, **check_options)
  flat = read(leaves, _flat_shardings(shardings, leaves), np.float32)
  return traverse_util.unflatten_dict(flat), config


def _inferred_config(leaves: Flat, source: str) -> network.T5Config:
  shapes = {p: _shape_dtype(v)[0] for p, v in _slash(leaves).items()}
  config = infer_config(shapes)
  if config is None:
    raise ValueError(f'{source} does not hold a complete base T5 (paths look '
                     f'like {sorted(shapes)[:5]}); pass a config.')
  return config


# ---------------------------------------------------------------------------
# T5X checkpoints.

_T5X_LAYOUT = (
    'Expected a T5X checkpoint_N/ directory holding either a `checkpoint` '
    'msgpack file next to its TensorStore array directories (legacy T5X) or '
    'a `state/` orbax directory and `_CHECKPOINT_METADATA` (orbax T5X), or a '
    'model directory holding checkpoint_N/ steps.')


def _find_t5x(path) -> Tuple[str, str]:
  """('legacy', checkpoint_N dir) or ('orbax', its state/ dir).

  Accepts, as t5x does, the checkpoint_N directory, its `checkpoint` file, or
  a model directory of checkpoint_N steps (the latest is taken).
  """
  path = os.fspath(path)
  if os.path.isfile(path) and os.path.basename(path) == 'checkpoint':
    return 'legacy', os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No T5X checkpoint at {path}: it does not exist. '
                            + _T5X_LAYOUT)
  if os.path.isfile(os.path.join(path, '_METADATA')):  # The state/ itself.
    return 'orbax', path
  if os.path.isfile(os.path.join(path, 'checkpoint')):
    return 'legacy', path
  if os.path.isdir(os.path.join(path, 'state')):
    return 'orbax', os.path.join(path, 'state')
  steps = [(int(m.group(1)), name) for name in os.listdir(path)
           for m in [re.fullmatch(r'checkpoint_(\d+)', name)]
           if m and os.path.isdir(os.path.join(path, name))]
  if steps:
    return _find_t5x(os.path.join(path, max(steps)[1]))
  raise FileNotFoundError(f'No T5X checkpoint in {path} (it holds '
                          f'{sorted(os.listdir(path))[:10]}). ' + _T5X_LAYOUT)


def _is_ts_spec(value) -> bool:
  return isinstance(value, dict) and {'driver', 'kvstore'} <= set(value)


def _flatten_t5x(tree, prefix=()) -> Flat:
  """Flattens the msgpack tree, keeping TensorStore spec dicts as leaves."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value and not _is_ts_spec(value):
      out.update(_flatten_t5x(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _local_ts_spec(spec: Mapping, ckpt_dir: str, path: Tuple[str, ...]):
  """A spec as t5x wrote it, made absolute under `ckpt_dir` and local.

  t5x writes paths relative to the checkpoint (portable checkpoints) and, on
  GCS, a dummy bucket; TensorStore < 0.1.14 put `path` beside `kvstore`.
  Normalising through `ts.Spec` handles both layouts.
  """
  spec = ts.Spec(dict(spec)).to_json()
  kvstore = spec['kvstore']
  if kvstore.get('driver') not in ('file', 'gfile', 'gcs'):
    raise ValueError(f'{"/".join(path)}: unsupported TensorStore kvstore '
                     f'{kvstore} in the T5X checkpoint {ckpt_dir}.')
  if spec.get('dtype') == 'uint16':
    raise ValueError(f'{"/".join(path)} is stored as uint16 (T5X checkpoint '
                     'version 1 bfloat16); re-save it with a current t5x.')
  spec['kvstore'] = {'driver': 'file',
                     'path': os.path.join(ckpt_dir, kvstore.get('path', ''))}
  # Chunking and compression are whatever the writer chose; do not insist.
  spec['metadata'] = {k: v for k, v in spec['metadata'].items()
                      if k not in ('chunks', 'compressor')}
  return spec


def _t5x_legacy_leaves(ckpt_dir: str) -> Flat:
  """The optimizer state of a legacy T5X checkpoint, flat: inline arrays as
  they are, TensorStore arrays as local specs (nothing read yet)."""
  with open(os.path.join(ckpt_dir, 'checkpoint'), 'rb') as f:
    contents = serialization.msgpack_restore(f.read())
  # Version 0 is a plain flax checkpoint without the 'optimizer' wrapper.
  state = contents.get('optimizer') if contents.get('version', 0) else contents
  if not isinstance(state, dict) or 'target' not in state:
    raise ValueError(
        f'{ckpt_dir}/checkpoint is not a T5X checkpoint: expected '
        "{'version': V, 'optimizer': {'target': ..., 'state': ...}}, found "
        f'keys {sorted(contents)}.')
  leaves = {}
  for path, value in _flatten_t5x(state).items():
    leaves[path] = (_local_ts_spec(value, ckpt_dir, path)
                    if _is_ts_spec(value) else value)
  return leaves


def _check_ts_files(leaves: Flat) -> None:
  absent = [v['kvstore']['path'] for v in leaves.values()
            if _is_ts_spec(v) and not os.path.isfile(
                os.path.join(v['kvstore']['path'], '.zarray'))]
  if absent:
    raise FileNotFoundError(
        f'The T5X checkpoint is incomplete: its `checkpoint` file refers to '
        f'{len(absent)} TensorStore arrays that are missing, e.g. '
        f'{absent[:3]}. Each should be a directory (named by the dotted '
        'parameter path) holding `.zarray` and gzip chunks, copied along with '
        'the `checkpoint` file.')


def _read_t5x_legacy(leaves: Flat, shardings: Optional[Flat],
                     dtype=None) -> Flat:
  """Reads inline arrays and TensorStore specs.

  Without shardings all arrays are read concurrently into host memory. With
  them, `jax.make_array_from_callback` asks for each addressable shard and
  only that slice is read from disk.
  """
  _check_ts_files(leaves)

  def cast(x):
    if isinstance(x, (dict, int, float)):  # Optimizer bookkeeping leaves.
      return x
    return np.asarray(x, dtype)
  opening = {p: ts.open(v, open=True, read=True)
             for p, v in leaves.items() if _is_ts_spec(v)}
  stores = {p: f.result() for p, f in opening.items()}
  if not shardings:
    reading = {p: s.read() for p, s in stores.items()}
    return {p: cast(reading[p].result() if p in reading else v)
            for p, v in leaves.items()}
  out = {}
  for path, value in leaves.items():
    if path in stores:
      store = stores[path]
      read = lambda index, store=store: cast(store[index].read().result())
    else:
      array = np.asarray(value)
      read = lambda index, array=array: cast(array[index])
    out[path] = jax.make_array_from_callback(
        _shape_dtype(value)[0], shardings[path], read)
  return out


def _t5x_leaves(path) -> Tuple[str, str, Flat]:
  """(format, directory, flat metadata of the whole optimizer state)."""
  kind, directory = _find_t5x(path)
  if kind == 'legacy':
    return kind, directory, _t5x_legacy_leaves(directory)
  return kind, directory, _orbax_metadata(directory)


def _subtree(flat: Flat, key: str) -> Flat:
  return {p[1:]: v for p, v in flat.items() if p[0] == key}


def _t5x_reader(kind: str, directory: str, key: str):
  """`read(leaves, shardings, dtype)` for leaves of the `key` subtree."""
  if kind == 'legacy':
    return _read_t5x_legacy
  return functools.partial(_orbax_restore, directory, prefix=(key,))


def infer_t5x_config(path) -> network.T5Config:
  """The T5Config a T5X checkpoint was written for, from its metadata."""
  kind, directory, leaves = _t5x_leaves(path)
  return _inferred_config(_subtree(leaves, 'target'),
                          f'T5X checkpoint {directory} ({kind})')


def load_t5x(path, config: Optional[network.T5Config] = None, *,
             shardings=None, include_optimizer: bool = False):
  """Base parameters (the `target` subtree) of a T5X checkpoint.

  Reads both formats t5x writes: legacy (msgpack `checkpoint` + TensorStore
  zarr arrays) and orbax (`state/`). `path` is a checkpoint_N directory, its
  `checkpoint` file, or a model directory (latest step). `config` defaults
  to the one the shapes imply (`infer_t5x_config`). `shardings` (a pytree of
  `jax.sharding.Sharding` like the params, or one for all) makes every
  parameter a sharded jax.Array read shard by shard; otherwise numpy arrays.

  Returns the float32 params, or `(params, optimizer_state)` when
  `include_optimizer` (the `state` subtree: step and e.g. Adafactor
  `param_states`, as stored, in host memory).
  """
  kind, directory, leaves = _t5x_leaves(path)
  params, _ = _check_and_restore(
      _t5x_reader(kind, directory, 'target'), _subtree(leaves, 'target'),
      config, f'T5X checkpoint {directory} ({kind} format)', shardings)
  if not include_optimizer:
    return params
  state = _subtree(leaves, 'state')
  if not state:
    raise ValueError(f'T5X checkpoint {directory} holds no optimizer state.')
  state = _t5x_reader(kind, directory, 'state')(state, None, None)
  return params, traverse_util.unflatten_dict(state)


# ---------------------------------------------------------------------------
# Hugging Face T5 directories.

# Hugging Face's T5Config defaults, for keys a config.json leaves out.
_HF_DEFAULTS = {'vocab_size': 32128, 'd_model': 512, 'd_kv': 64, 'd_ff': 2048,
                'num_layers': 6, 'num_heads': 8, 'feed_forward_proj': 'relu',
                'relative_attention_num_buckets': 32,
                'relative_attention_max_distance': 128, 'dropout_rate': 0.1,
                'layer_norm_epsilon': 1e-6}
# Hugging Face activation names -> flax.linen names. HF's plain 'gelu' is
# the exact (erf) GELU, which nn.gelu (tanh approximation) is not.
_HF_ACTIVATIONS = {'relu': 'relu', 'gelu_new': 'gelu', 'silu': 'silu'}
_HF_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json',
                    'pytorch_model.bin', 'pytorch_model.bin.index.json')


def _activations_from_hf(proj: str) -> Tuple[str, ...]:
  gated = proj.startswith('gated-')
  name = proj[len('gated-'):] if gated else proj
  if gated and name == 'gelu':
    name = 'gelu_new'  # HF runs 'gated-gelu' with the tanh approximation.
  if name not in _HF_ACTIVATIONS:
    raise ValueError(f'feed_forward_proj={proj!r} is not supported; mov-jax '
                     f'runs {sorted(_HF_ACTIVATIONS)} (optionally gated-).')
  ours = _HF_ACTIVATIONS[name]
  return (ours, 'linear') if gated else (ours,)


def _activations_to_hf(activations: Sequence[str]) -> str:
  acts = tuple(activations)
  reverse = {v: k for k, v in _HF_ACTIVATIONS.items()}
  if len(acts) == 2 and acts[1] == 'linear' and acts[0] in reverse:
    return 'gated-' + ('gelu' if acts[0] == 'gelu' else reverse[acts[0]])
  if len(acts) == 1 and acts[0] in reverse:
    return reverse[acts[0]]
  raise ValueError(f'mlp_activations={acts} has no Hugging Face T5 '
                   "equivalent; use ('relu',) or ('gelu', 'linear').")


def t5_config_from_hf(hf: Mapping[str, Any], **overrides) -> network.T5Config:
  """Our T5Config from a Hugging Face T5 `config.json` dict.

  Whether logits go through the tied, rescaled embedding (T5 1.0) is
  `tie_word_embeddings` (absent = tied) in configs written before
  transformers 5, and `scale_decoder_outputs` in those written since
  (transformers 5 always writes `tie_word_embeddings: true`).
  """
  hf = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
  if hf.get('model_type', 't5') not in ('t5', 'mt5'):
    raise ValueError(f"model_type {hf['model_type']!r} is not a T5.")
  if hf['layer_norm_epsilon'] != 1e-6:
    raise ValueError(f"layer_norm_epsilon={hf['layer_norm_epsilon']} is not "
                     "supported (mov-jax's T5 layer norm uses 1e-6).")
  if 'scale_decoder_outputs' in hf:
    tied = bool(hf['scale_decoder_outputs'])
  else:
    tied = bool(hf.get('tie_word_embeddings', True))
  fields = dict(
      vocab_size=hf['vocab_size'], emb_dim=hf['d_model'],
      num_heads=hf['num_heads'], head_dim=hf['d_kv'], mlp_dim=hf['d_ff'],
      num_encoder_layers=hf['num_layers'],
      num_decoder_layers=hf.get('num_decoder_layers', hf['num_layers']),
      mlp_activations=_activations_from_hf(hf['feed_forward_proj']),
      dropout_rate=float(hf['dropout_rate']), logits_via_embedding=tied,
      relative_attention_num_buckets=hf['relative_attention_num_buckets'],
      relative_attention_max_distance=hf['relative_attention_max_distance'])
  fields.update(overrides)
  return network.T5Config(**fields)


def hf_config_from_t5(config: network.T5Config) -> Dict[str, Any]:
  """A Hugging Face T5 `config.json` dict for `config` (inverse of
  `t5_config_from_hf`); readable by transformers 4 and 5."""
  return {
      'architectures': ['T5ForConditionalGeneration'],
      'model_type': 't5',
      'vocab_size': config.vocab_size,
      'd_model': config.emb_dim,
      'd_kv': config.head_dim,
      'd_ff': config.mlp_dim,
      'num_layers': config.num_encoder_layers,
      'num_decoder_layers': config.num_decoder_layers,
      'num_heads': config.num_heads,
      'relative_attention_num_buckets': config.relative_attention_num_buckets,
      'relative_attention_max_distance':
          config.relative_attention_max_distance,
      'dropout_rate': config.dropout_rate,
      'layer_norm_epsilon': 1e-6,
      'initializer_factor': 1.0,
      'feed_forward_proj': _activations_to_hf(config.mlp_activations),
      'tie_word_embeddings': bool(config.logits_via_embedding),
      'is_encoder_decoder': True,
      'use_cache': True,
      'pad_token_id': 0,
      'eos_token_id': 1,
      'decoder_start_token_id': 0,
  }


def _read_hf_json(directory: str) -> Dict[str, Any]:
  path = os.path.join(directory, 'config.json')
  if not os.path.isfile(path):
    what = 'does not exist' if not os.path.isdir(directory) else (
        'has no config.json')
    raise FileNotFoundError(
        f'No Hugging Face T5 model at {directory}: it {what}. Expected a '
        'directory written by save_pretrained: config.json plus '
        f'{" or ".join(_HF_WEIGHT_FILES)}.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def read_hf_config(path) -> network.T5Config:
  """Our T5Config from the `config.json` of a Hugging Face T5 directory."""
  return t5_config_from_hf(_read_hf_json(os.fspath(path)))


def _load_weight_file(path: str) -> Dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is missing: the Hugging Face index '
                            'file next to it lists it as a weight shard.')
  if path.endswith('.safetensors'):
    from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
    return st.load_file(path)
  import torch  # pylint: disable=g-import-not-at-top
  # weights_only: a .bin is a pickle; never let it run code.
  state = torch.load(path, map_location='cpu', weights_only=True)
  return {k: v.detach().to(torch.float32).numpy() if v.is_floating_point()
          else v.detach().numpy() for k, v in state.items()}


def _hf_state_dict(directory: str) -> Dict[str, np.ndarray]:
  """All weights of a Hugging Face directory (single or sharded files)."""
  for name in _HF_WEIGHT_FILES:
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith('.index.json'):
      return _load_weight_file(path)
    with open(path, encoding='utf-8') as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state = {}
    for shard in shards:
      state.update(_load_weight_file(os.path.join(directory, shard)))
    return state
  raise FileNotFoundError(
      f'No Hugging Face weights in {directory}: expected one of '
      f'{list(_HF_WEIGHT_FILES)} next to config.json (found '
      f'{sorted(os.listdir(directory))[:10]}).')


def load_hf(path, config: Optional[network.T5Config] = None) -> Dict:
  """Float32 params of a Hugging Face T5 directory (v1.1 or 1.0).

  Reads `model.safetensors`, a sharded `model.safetensors.index.json`, or
  `pytorch_model.bin` (through `torch.load(weights_only=True)`). `config`
  defaults to the one `config.json` describes (`read_hf_config`).
  """
  directory = os.fspath(path)
  hf = _read_hf_json(directory)
  if config is None:
    config = t5_config_from_hf(hf)
  state = _hf_state_dict(directory)
  if (not config.logits_via_embedding and 'lm_head.weight' not in state and
      hf.get('tie_word_embeddings', True) and 'shared.weight' in state):
    # transformers 5 ties lm_head to the embedding of every T5 it builds and
    # then saves only shared.weight: the unscaled head is that embedding.
    state['lm_head.weight'] = state['shared.weight']
  return params_from_hf_state_dict(
      state, config, source=f'Hugging Face T5 weights in {directory}')


def export_hf(params: Mapping, config: network.T5Config, path, *,
              overwrite: bool = False) -> None:
  """Writes a Hugging Face T5 directory: config.json + model.safetensors.

  `transformers.T5ForConditionalGeneration.from_pretrained(path)` loads it.
  Only a base model can be exported (Hugging Face T5 has no adapter sites).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  check_params(traverse_util.flatten_dict(dict(params), sep='/'), config,
               'Parameters to export to Hugging Face (base model only, no '
               'adapters)')
  state = {k: np.asarray(v, np.float32)
           for k, v in hf_state_dict_from_params(params, config).items()}
  with _atomic_directory(path, overwrite) as tmp:
    with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(hf_config_from_t5(config), f, indent=2, sort_keys=True)
    save_file(state, os.path.join(tmp, 'model.safetensors'),
              metadata={'format': 'pt'})


# ---------------------------------------------------------------------------
# Our format: orbax PyTree checkpoint + t5_config.json.

_OURS_CONFIG = 't5_config.json'
_OURS_PARAMS = 'params'
_OURS_FORMAT = 'mov-jax-params'


def config_to_json(config: network.T5Config) -> Dict[str, Any]:
  out = dataclasses.asdict(config)
  out['dtype'] = jnp.dtype(config.dtype).name
  out['mlp_activations'] = list(config.mlp_activations)
  return out


def config_from_json(fields: Mapping[str, Any]) -> network.T5Config:
  fields = dict(fields)
  if 'dtype' in fields:
    fields['dtype'] = jnp.dtype(fields['dtype'])
  try:
    return network.T5Config(**fields)
  except TypeError as e:
    raise ValueError(f'Invalid T5Config in {_OURS_CONFIG}: {e}') from e


def save_params(path, params: Mapping, config: network.T5Config, *,
                overwrite: bool = False) -> None:
  """Writes `params` and the `config` they belong to, to `path`.

  `params` is any subset of the network's parameters: the full base model,
  base plus adapters, or an adapter-only export; present base parameters must
  have the config's shapes. The directory holds `params/` (an orbax PyTree
  checkpoint: sharded arrays are written shard by shard) and
  `t5_config.json`. It is written beside `path` and renamed into place, so
  `path` is never half written; an existing non-empty `path` is replaced only
  with `overwrite=True`.
  """
  flat = traverse_util.flatten_dict(dict(params))
  check_params(_slash(flat), config, 'Parameters to save', allow_extra=True,
               allow_missing=True)
  ocp = _ocp()
  with _atomic_directory(path, overwrite) as tmp:
    ocp.PyTreeCheckpointer().save(
        os.path.join(tmp, _OURS_PARAMS),
        args=ocp.args.PyTreeSave(traverse_util.unflatten_dict(flat)))
    with open(os.path.join(tmp, _OURS_CONFIG), 'w', encoding='utf-8') as f:
      json.dump({'format': _OURS_FORMAT, 'version': 1,
                 't5_config': config_to_json(config)}, f, indent=2)


def load_params(path, shardings=None) -> Tuple[Dict, network.T5Config]:
  """`(params, config)` written by `save_params`; with `shardings` (a pytree
  like the params, or one Sharding) each device reads only its shard.

  The params are whatever was saved (see `save_params`); `load_any` insists
  on a complete base model.
  """
  directory = os.fspath(path)
  config_file = os.path.join(directory, _OURS_CONFIG)
  params_dir = os.path.join(directory, _OURS_PARAMS)
  if not (os.path.isfile(config_file) and os.path.isdir(params_dir)):
    raise FileNotFoundError(
        f'No mov-jax parameter checkpoint at {directory}: expected '
        f'{config_file} and the orbax directory {params_dir}/ (written by '
        'checkpoints.save_params or python -m mov_jax.convert).')
  with open(config_file, encoding='utf-8') as f:
    config = config_from_json(json.load(f)['t5_config'])
  return _check_and_restore(
      functools.partial(_orbax_restore, params_dir),
      _orbax_metadata(params_dir), config,
      f'Parameter checkpoint {directory}', shardings, allow_extra=True,
      allow_missing=True)


def refuse_training_checkpoint(directory: str) -> None:
  """A training run's checkpoint holds a TrainState, not base weights."""
  from mov_jax import train_state  # pylint: disable=g-import-not-at-top
  if train_state.is_train_checkpoint(directory):
    kind = 'a step directory of a mov-jax training run'
  elif train_state.list_train_checkpoints(directory):
    kind = 'a mov-jax training run (MODEL_DIR)'
  else:
    return
  raise ValueError(
      f'{directory} is {kind}, not a base model checkpoint. To continue that '
      'run, train again with its MODEL_DIR; to start a new run from what it '
      'learned, pass its adapter export (<MODEL_DIR>/adapter) as '
      'ADAPTER_CHECKPOINT_PATH and the base model as INITIAL_CHECKPOINT_PATH '
      '(the export of a full fine-tuning run is a complete model: pass it as '
      'INITIAL_CHECKPOINT_PATH). python -m mov_jax.eval reads training '
      'checkpoints as they are.')


def load_any(path, config: Optional[network.T5Config] = None, *,
             shardings=None) -> Dict:
  """Base parameters from our format, a Hugging Face directory or T5X.

  The layout decides: `t5_config.json` is ours, `config.json` Hugging Face,
  anything else T5X (`load_t5x`). `config` defaults to the checkpoint's
  own; every base parameter must be present (adapters may come along).
  """
  directory = os.fspath(path)
  refuse_training_checkpoint(directory)
  if os.path.isfile(os.path.join(directory, _OURS_CONFIG)):
    params, saved = load_params(directory, shardings)
    flat = traverse_util.flatten_dict(params, sep='/')
    if not set(flat) & set(_expected_shapes(config or saved)):
      raise ValueError(
          f'{directory} holds no base model parameters, only {len(flat)} '
          'others (an adapter export: the trainable parameters of a run). '
          'Pass it as ADAPTER_CHECKPOINT_PATH, with the base model it was '
          'trained on as INITIAL_CHECKPOINT_PATH (CHECKPOINT_PATH in eval).')
    check_params(flat, config or saved, f'Parameter checkpoint {directory}',
                 allow_extra=True)
    return params
  if os.path.isfile(os.path.join(directory, 'config.json')):
    params = load_hf(directory, config)
    return params if shardings is None else jax.device_put(params, shardings)
  return load_t5x(directory, config, shardings=shardings)
