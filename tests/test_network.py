"""The T5 network against Hugging Face T5, its cache, paths and axes."""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax import ad_checkpoint

from mov_jax import checkpoints
from mov_jax import layers
from mov_jax import network

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# num_heads * head_dim (3 * 12 = 36) != emb_dim (32) on purpose.
V11_TINY = network.T5Config(
    vocab_size=97, dtype=jnp.float32, emb_dim=32, num_heads=3, head_dim=12,
    mlp_dim=48, num_encoder_layers=2, num_decoder_layers=3,
    mlp_activations=('gelu', 'linear'), dropout_rate=0.0,
    logits_via_embedding=False)
V10_TINY = network.T5Config(
    vocab_size=97, dtype=jnp.float32, emb_dim=32, num_heads=4, head_dim=10,
    mlp_dim=40, num_encoder_layers=3, num_decoder_layers=2,
    mlp_activations=('relu',), dropout_rate=0.0, logits_via_embedding=True)


def _batch(seed=0, batch=3, enc_len=19, dec_len=7, vocab=97):
  """Random tokens with right padding of different lengths in every row."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, size=(batch, enc_len))
  enc_lens = np.array([enc_len, enc_len - 6, 4][:batch])
  enc = np.where(np.arange(enc_len) < enc_lens[:, None], enc, 0)
  tgt = rng.integers(2, vocab, size=(batch, dec_len))
  dec_lens = np.array([dec_len, 3, dec_len - 2][:batch])
  tgt = np.where(np.arange(dec_len) < dec_lens[:, None], tgt, 0)
  dec_in = np.pad(tgt, ((0, 0), (1, 0)))[:, :-1]
  return {'encoder_input_tokens': enc.astype(np.int32),
          'decoder_input_tokens': dec_in.astype(np.int32),
          'decoder_target_tokens': tgt.astype(np.int32)}


def _random_params(cfg, seed=0):
  """Initialised parameters, perturbed so that no two norms are equal."""
  model = network.Transformer(cfg)
  batch = _batch()
  params = model.init(jax.random.PRNGKey(seed), **batch,
                      enable_dropout=False)['params']
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _hf_model(cfg, params):
  hf_cfg = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim,
      d_ff=cfg.mlp_dim, num_layers=cfg.num_encoder_layers,
      num_decoder_layers=cfg.num_decoder_layers, num_heads=cfg.num_heads,
      relative_attention_num_buckets=32, relative_attention_max_distance=128,
      dropout_rate=0.0, layer_norm_epsilon=1e-6,
      feed_forward_proj='gated-gelu' if len(cfg.mlp_activations) == 2
      else 'relu',
      tie_word_embeddings=cfg.logits_via_embedding, decoder_start_token_id=0,
      pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(hf_cfg).eval()
  if not cfg.logits_via_embedding:
    # Recent transformers tie lm_head to the embedding even when asked not to.
    model.lm_head.weight = torch.nn.Parameter(
        torch.zeros_like(model.lm_head.weight))
  state = {k: torch.from_numpy(np.array(v))
           for k, v in checkpoints.hf_state_dict_from_params(params, cfg).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected
  assert set(missing) <= {'encoder.embed_tokens.weight',
                          'decoder.embed_tokens.weight', 'lm_head.weight'}
  if not cfg.logits_via_embedding:
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr()
    np.testing.assert_array_equal(
        model.lm_head.weight.detach().numpy(),
        np.asarray(params['decoder']['logits_dense']['kernel']).T)
  return model


@pytest.mark.parametrize('cfg', [V11_TINY, V10_TINY], ids=['v1_1', 'v1_0'])
def test_logits_match_hugging_face(cfg):
  params = _random_params(cfg)
  batch = _batch()
  ours = np.asarray(network.Transformer(cfg).apply(
      {'params': params}, **batch, enable_dropout=False))
  hf = _hf_model(cfg, params)
  with torch.no_grad():
    theirs = hf(
        input_ids=torch.from_numpy(batch['encoder_input_tokens']).long(),
        attention_mask=torch.from_numpy(
            batch['encoder_input_tokens'] > 0).long(),
        decoder_input_ids=torch.from_numpy(
            batch['decoder_input_tokens']).long()).logits.numpy()
  valid = batch['decoder_target_tokens'] > 0
  assert valid.sum() > 10 and not valid.all()
  diff = np.abs(ours - theirs)[valid]
  assert diff.max() <= 1e-4, diff.max()
  # The comparison is not vacuous: logits vary a lot across the vocabulary.
  assert ours[valid].std() > 0.5


def test_relative_position_buckets_match_hugging_face():
  from transformers.models.t5 import modeling_t5  # pylint: disable=g-import-not-at-top
  rel = np.arange(-300, 301)[None, :]
  for bidirectional in (True, False):
    ours = layers.relative_position_bucket(rel, bidirectional, 32, 128)
    theirs = modeling_t5.T5Attention._relative_position_bucket(
        torch.from_numpy(rel), bidirectional=bidirectional, num_buckets=32,
        max_distance=128).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_hf_mapping_rejects_wrong_config():
  params = _random_params(V11_TINY)
  state = checkpoints.hf_state_dict_from_params(params, V11_TINY)
  roundtrip = checkpoints.params_from_hf_state_dict(state, V11_TINY)
  for a, b in zip(jax.tree_util.tree_leaves(roundtrip),
                  jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)
  wrong = network.T5Config(**{**V11_TINY.__dict__, 'mlp_dim': 64})
  with pytest.raises(ValueError, match='shape mismatches.*mlp'):
    checkpoints.params_from_hf_state_dict(state, wrong)
  with pytest.raises(ValueError, match='missing.*wi\\b'):
    checkpoints.params_from_hf_state_dict(state, V10_TINY)


@pytest.mark.parametrize('cfg', [V11_TINY, V10_TINY], ids=['v1_1', 'v1_0'])
def test_incremental_decoding_matches_teacher_forcing(cfg):
  params = _random_params(cfg)
  batch = _batch(seed=3)
  model = network.Transformer(cfg)
  full = model.apply({'params': params}, **batch, enable_dropout=False)
  length = batch['decoder_input_tokens'].shape[1]
  _, init_vars = model.apply({'params': params}, **batch, decode=True,
                             enable_dropout=False, mutable=['cache'])
  cache = jax.tree_util.tree_map(jnp.zeros_like, init_vars['cache'])
  encoded = model.apply({'params': params}, batch['encoder_input_tokens'],
                        enable_dropout=False, method=model.encode)
  step_logits = []
  for i in range(length):
    tokens = batch['decoder_input_tokens'][:, i:i + 1]
    logits, new_vars = model.apply(
        {'params': params, 'cache': cache}, encoded,
        batch['encoder_input_tokens'], tokens, tokens, enable_dropout=False,
        decode=True, max_decode_length=length, mutable=['cache'],
        method=model.decode)
    cache = new_vars['cache']
    step_logits.append(logits[:, 0])
  step_logits = np.stack(step_logits, axis=1)
  valid = batch['decoder_target_tokens'] > 0
  np.testing.assert_allclose(step_logits[valid], np.asarray(full)[valid],
                             atol=1e-5, rtol=0)


def test_packed_rows_equal_separate_examples():
  cfg = V11_TINY
  params = _random_params(cfg)
  model = network.Transformer(cfg)
  a, b = _batch(seed=5, batch=1), _batch(seed=6, batch=1)
  sep = [np.asarray(model.apply({'params': params}, **x, enable_dropout=False))
         for x in (a, b)]

  def cat(key):
    return np.concatenate([a[key][0], b[key][0]])[None]

  def seg(key):
    return np.concatenate([np.where(a[key][0] > 0, 1, 0),
                           np.where(b[key][0] > 0, 2, 0)])[None]

  packed = {k: cat(k) for k in a}
  # Decoder inputs restart with BOS (0) at a segment start, as seqio packs.
  packed_logits = np.asarray(model.apply(
      {'params': params}, **packed,
      encoder_segment_ids=seg('encoder_input_tokens'),
      decoder_segment_ids=seg('decoder_target_tokens'),
      enable_dropout=False))
  dec_len = a['decoder_target_tokens'].shape[1]
  for i, (x, logits) in enumerate(zip((a, b), sep)):
    valid = x['decoder_target_tokens'][0] > 0
    part = packed_logits[0, i * dec_len:(i + 1) * dec_len]
    np.testing.assert_allclose(part[valid], logits[0][valid], atol=1e-5)


def _spec_param_axes(cfg):
  """Parameter paths and logical axes as listed in SPEC section 4."""
  expect = {'token_embedder/embedding': ('vocab', 'embed')}
  attn = {f'{p}/kernel': ('embed', 'joined_kv')
          for p in ('query', 'key', 'value')}
  attn['out/kernel'] = ('joined_kv', 'embed')
  mlp = ({'wi_0/kernel': ('embed', 'mlp'), 'wi_1/kernel': ('embed', 'mlp')}
         if len(cfg.mlp_activations) == 2 else {'wi/kernel': ('embed', 'mlp')})
  mlp['wo/kernel'] = ('mlp', 'embed')
  stacks = {
      'encoder': (cfg.num_encoder_layers, ['attention'],
                  ['pre_attention_layer_norm', 'pre_mlp_layer_norm']),
      'decoder': (cfg.num_decoder_layers,
                  ['self_attention', 'encoder_decoder_attention'],
                  ['pre_self_attention_layer_norm',
                   'pre_cross_attention_layer_norm', 'pre_mlp_layer_norm']),
  }
  for stack, (n, blocks, norms) in stacks.items():
    expect[f'{stack}/relpos_bias/rel_embedding'] = ('heads', 'relpos_buckets')
    expect[f'{stack}/{stack}_norm/scale'] = ('embed',)
    for i in range(n):
      for block in blocks:
        for k, v in attn.items():
          expect[f'{stack}/layers_{i}/{block}/{k}'] = v
      for k, v in mlp.items():
        expect[f'{stack}/layers_{i}/mlp/{k}'] = v
      for norm in norms:
        expect[f'{stack}/layers_{i}/{norm}/scale'] = ('embed',)
  if not cfg.logits_via_embedding:
    expect['decoder/logits_dense/kernel'] = ('embed', 'vocab')
  return expect


@pytest.mark.parametrize('cfg', [V11_TINY, V10_TINY], ids=['v1_1', 'v1_0'])
def test_parameter_paths_and_axes_follow_spec(cfg):
  variables = jax.eval_shape(
      lambda: network.Transformer(cfg).init(jax.random.PRNGKey(0), **_batch(),
                                            enable_dropout=False))
  params = traverse_util.flatten_dict(variables['params'], sep='/')
  axes = traverse_util.flatten_dict(variables['params_axes'], sep='/')
  expect = _spec_param_axes(cfg)
  assert set(params) == set(expect)
  assert {k[:-len('_axes')] for k in axes} == set(params)
  for path, names in expect.items():
    assert axes[path + '_axes'].names == names, path
    assert len(names) == len(params[path].shape), path
    assert params[path].dtype == jnp.float32


def test_bfloat16_activations_keep_float32_params():
  cfg = network.T5Config(**{**V11_TINY.__dict__, 'dtype': jnp.bfloat16})
  params = _random_params(V11_TINY)
  batch = _batch()
  model = network.Transformer(cfg)
  logits = model.apply({'params': params}, **batch, enable_dropout=False)
  ref = network.Transformer(V11_TINY).apply({'params': params}, **batch,
                                            enable_dropout=False)
  assert logits.dtype == jnp.float32
  valid = batch['decoder_target_tokens'] > 0
  # bfloat16 keeps ~3 significant digits: close to float32, but not equal.
  err = np.abs(np.asarray(logits) - np.asarray(ref))[valid]
  assert 0 < err.mean() < 0.05 * np.abs(np.asarray(ref)[valid]).mean()


def test_dropout_is_active_only_when_enabled():
  cfg = network.T5Config(**{**V11_TINY.__dict__, 'dropout_rate': 0.3})
  params = _random_params(V11_TINY)
  batch = _batch()
  model = network.Transformer(cfg)
  run = lambda seed, drop: np.asarray(model.apply(
      {'params': params}, **batch, enable_dropout=drop,
      rngs={'dropout': jax.random.PRNGKey(seed)}))
  np.testing.assert_array_equal(run(0, False), run(1, False))
  assert not np.allclose(run(0, True), run(1, True))


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match='num_heads=0'):
    network.T5Config(vocab_size=10, num_heads=0)


def test_relative_position_bias_is_a_lookup_without_a_one_hot_constant():
  qlen = klen = 512
  module = layers.RelativePositionBiases(num_buckets=32, max_distance=128,
                                         num_heads=4)
  params = module.init(jax.random.PRNGKey(0), qlen, klen, True)
  apply = jax.jit(lambda p: module.apply(p, qlen, klen, True))
  buckets = layers.relative_position_bucket(
      np.arange(klen)[None, :] - np.arange(qlen)[:, None], bidirectional=True,
      num_buckets=32, max_distance=128)
  table = np.asarray(params['params']['rel_embedding'])
  np.testing.assert_allclose(apply(params)[0], table[:, buckets], rtol=1e-6)
  # The program holds the [q, k] bucket ids, not a [q, k, buckets] one-hot
  # (which would be 32x larger and slow to compile at long lengths).
  assert len(apply.lower(params).as_text()) < qlen * klen * 32


def _parameter_copies(hlo: str, argument: str) -> list:
  """Instructions of an optimized HLO module's entry computation that read
  nothing but the jitted function's `argument` and are not matmuls: copies,
  transposes, elementwise loop fusions (a layout change of it)."""
  entry = hlo[hlo.index('\nENTRY '):]
  name = re.search(r'%%(\S+) = \S+ parameter\(\d+\), metadata={op_name="%s"}'
                   % argument, entry).group(1)
  return [line.strip() for line in entry.splitlines()
          if re.search(r'(copy|transpose|fusion)\(%%%s\)' % re.escape(name), line)
          and 'kind=kCustom' not in line]


@pytest.mark.parametrize('x_shape,axis,features', [
    ((2, 16, 24), (-1,), (4, 8)),  # into the heads, like query/key/value
    ((2, 16, 4, 8), (-2, -1), (24,)),  # out of the heads, like `out`
])
def test_dense_general_input_gradient_reads_the_kernel_in_place(
    x_shape, axis, features):
  # The projections into and out of the attention heads contract or produce
  # several axes. As a contraction with the kernel reshaped to those axes,
  # XLA's CPU backend copied each kernel into a transposed layout on every
  # step for the input gradient; as a 2-D matmul it reads the kernel as
  # stored.
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  module = layers.DenseGeneral(features=features, axis=axis)
  kernel = module.init(jax.random.PRNGKey(1), x)['params']['kernel']
  out_shape = module.apply({'params': {'kernel': kernel}}, x).shape
  cotangent = jax.random.normal(jax.random.PRNGKey(2), out_shape)

  def input_gradient(x, kernel):
    return jax.grad(lambda x: jnp.sum(module.apply(
        {'params': {'kernel': kernel}}, x) * cotangent))(x)

  # The same gradient as the multi-axis contraction's.
  contracted = tuple(a % x.ndim for a in axis)
  reshaped = kernel.reshape(tuple(x.shape[a] for a in contracted) + features)
  expected = jax.grad(lambda x: jnp.sum(jax.lax.dot_general(
      x, reshaped, ((contracted, tuple(range(len(contracted)))), ((), ())))
      * cotangent))(x)
  np.testing.assert_allclose(input_gradient(x, kernel), expected, rtol=1e-5,
                             atol=1e-5)
  if jax.default_backend() == 'cpu':
    hlo = jax.jit(input_gradient).lower(x, kernel).compile().as_text()
    assert _parameter_copies(hlo, 'kernel') == []


@pytest.mark.parametrize('policy', ['minimal', 'full'])
def test_recomputing_layers_changes_the_memory_not_the_gradients(policy):
  base = network.T5Config(**{**V11_TINY.__dict__, 'dropout_rate': 0.2})
  params = _random_params(V11_TINY)
  batch = _batch(enc_len=96, dec_len=16)

  def grad_fn(cfg):
    def loss(p):
      logits = network.Transformer(cfg).apply(
          {'params': p}, **batch, enable_dropout=True,
          rngs={'dropout': jax.random.PRNGKey(3)})
      return jnp.mean(jax.nn.log_softmax(logits)[..., 5])
    return jax.jit(jax.value_and_grad(loss))

  plain = grad_fn(base)
  recomputed = grad_fn(network.T5Config(**{**base.__dict__,
                                           'remat_policy': policy}))
  # The same parameters, the same dropout masks, the same gradients.
  (l0, g0), (l1, g1) = plain(params), recomputed(params)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)

  # What the backward pass keeps: without recomputation, every attention
  # layer's [batch, heads, q, k] scores and probabilities; with it, none.
  # (XLA:CPU's schedule saves no memory at these sizes; accelerators' do.)
  def kept_attention_tensors(cfg):
    def loss(p):
      logits = network.Transformer(cfg).apply(
          {'params': p}, **batch, enable_dropout=True,
          rngs={'dropout': jax.random.PRNGKey(3)})
      return jnp.mean(logits)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      ad_checkpoint.print_saved_residuals(loss, params)
    return re.findall(r'^\w+\[3,3,(?:96|16),(?:96|16)\]', out.getvalue(),
                      re.MULTILINE)
  assert kept_attention_tensors(base)
  assert not kept_attention_tensors(
      network.T5Config(**{**base.__dict__, 'remat_policy': policy}))


def test_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match="remat_policy='some'.*'minimal'"):
    network.T5Config(vocab_size=10, remat_policy='some')
