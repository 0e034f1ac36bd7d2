"""IA3 / MoV / LoRA / MoLoRA: identity at init, freezing, routing, counts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from mov_jax import gin_utils
from mov_jax import layers
from mov_jax import models
from mov_jax import optim
from mov_jax import params as params_cli
from mov_jax.adapters import lora
from mov_jax.adapters import routing

METHODS = ['ia3', 'mov', 'lora', 'molora', 'full']
TINY_BINDINGS = ['NUM_EMBEDDINGS = 101']


def _batch(seed=0, batch=2, enc_len=12, dec_len=6, vocab=101):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, vocab, size=(batch, enc_len))
  enc[1, enc_len - 4:] = 0
  tgt = rng.integers(2, vocab, size=(batch, dec_len))
  tgt[1, dec_len - 2:] = 0
  return {'encoder_input_tokens': jnp.asarray(enc, jnp.int32),
          'decoder_input_tokens': models.shift_right(jnp.asarray(tgt,
                                                                 jnp.int32)),
          'decoder_target_tokens': jnp.asarray(tgt, jnp.int32)}


def _build(model, method=None, bindings=()):
  files = [f'models/{model}.gin'] + ([f'methods/{method}.gin'] if method
                                     else [])
  gin_utils.parse_gin(files, TINY_BINDINGS + list(bindings), finalize=False)
  net = gin_utils.macro_value('NETWORK')
  regex = gin_utils.macro_value('TRAINABLE_REGEX') if method else None
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  return net, regex


def _init(net, batch, seed=0):
  return net.init(jax.random.PRNGKey(seed), **batch,
                  enable_dropout=False)['params']


def _adapter_params(params):
  flat = traverse_util.flatten_dict(params, sep='/')
  return {k: v for k, v in flat.items() if '_adapter/' in k}


@pytest.mark.parametrize('model', ['t5_1_1_tiny', 't5_small'])
@pytest.mark.parametrize('method', METHODS)
def test_every_method_equals_base_model_at_init(method, model):
  bindings = []
  if model == 't5_small':  # Keep T5 1.0 test-sized.
    bindings = ['network.T5Config.emb_dim = 32', 'network.T5Config.mlp_dim = 64',
                'network.T5Config.num_heads = 2', 'network.T5Config.head_dim = 8',
                'network.T5Config.num_encoder_layers = 2',
                'network.T5Config.num_decoder_layers = 2',
                "ACTIVATION_DTYPE = 'float32'"]
  base, _ = _build(model, bindings=bindings)
  adapted, regex = _build(model, method, bindings=bindings)
  batch = _batch()
  params = _init(adapted, batch)
  adapter_params = _adapter_params(params)
  if method == 'full':
    assert not adapter_params
  else:
    assert adapter_params
    if method in ('lora', 'molora'):  # wi (T5 1.0) or wi_0 (v1.1) is adapted.
      assert any('/wi_adapter/' in k or '/wi_0_adapter/' in k
                 for k in adapter_params)
  base_params = traverse_util.unflatten_dict(
      {k: v for k, v in traverse_util.flatten_dict(params, sep='/').items()
       if '_adapter/' not in k}, sep='/')
  ours = adapted.apply({'params': params}, **batch, enable_dropout=False)
  ref = base.apply({'params': base_params}, **batch, enable_dropout=False)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
  assert optim.trainable_path_set(params, regex)


@pytest.mark.parametrize('method', ['mov', 'molora', 'ia3'])
def test_one_step_changes_only_trainable_parameters(method):
  net, regex = _build('t5_1_1_tiny', method)
  batch = _batch()
  params = _init(net, batch)
  trainable, frozen = optim.split_trainable(params, regex)
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(trainable)

  def loss_fn(trainable, frozen):
    logits = net.apply({'params': optim.merge_params(trainable, frozen)},
                       **batch, enable_dropout=False)
    total, _, weight = models.summed_target_loss(
        logits, batch['decoder_target_tokens'])
    return total / weight

  grads = jax.grad(loss_fn)(trainable, frozen)
  # Only the trainable subtree is differentiated: the gradient tree has
  # exactly the adapter paths and shapes, and nothing of the frozen base.
  grad_shapes = {k: v.shape for k, v in
                 traverse_util.flatten_dict(grads, sep='/').items()}
  assert grad_shapes == {k: v.shape for k, v in
                         _adapter_params(params).items()}
  # Optimizer state exists only for trainable parameters.
  state_sizes = sum(x.size for x in jax.tree_util.tree_leaves(opt_state))
  n_trainable = sum(x.size for x in jax.tree_util.tree_leaves(trainable))
  assert state_sizes <= 2 * n_trainable + 10
  # Two steps: MoV experts all start at 1, so routers only get a gradient
  # once the first step has made the experts differ.
  for _ in range(2):
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    grads = jax.grad(loss_fn)(trainable, frozen)
  new_params = optim.merge_params(trainable, frozen)
  old = traverse_util.flatten_dict(params, sep='/')
  new = traverse_util.flatten_dict(new_params, sep='/')
  changed = {k for k in old if not np.array_equal(old[k], new[k])}
  assert changed == set(_adapter_params(params))


def test_mov_with_equal_experts_equals_ia3_whatever_the_router():
  ia3, _ = _build('t5_1_1_tiny', 'ia3')
  mov, _ = _build('t5_1_1_tiny', 'mov', ['NUM_EXPERTS = 4'])
  batch = _batch()
  ia3_params = _init(ia3, batch)
  mov_params = _init(mov, batch, seed=1)
  rng = np.random.default_rng(0)
  flat_ia3 = traverse_util.flatten_dict(ia3_params, sep='/')
  flat_mov = traverse_util.flatten_dict(mov_params, sep='/')
  for path, value in flat_ia3.items():
    if path.endswith('mov_scaling'):
      vec = rng.uniform(0.5, 1.5, size=value.shape).astype(np.float32)
      flat_ia3[path] = vec
      flat_mov[path] = np.broadcast_to(
          vec, flat_mov[path].shape).copy()  # every expert = the IA3 vector
    else:
      flat_mov[path] = value
  for path, value in flat_mov.items():
    if path.endswith('router/kernel'):  # a random, confident router
      flat_mov[path] = rng.normal(0, 3.0, size=value.shape).astype(np.float32)
  out_ia3 = ia3.apply({'params': traverse_util.unflatten_dict(flat_ia3, sep='/')},
                      **batch, enable_dropout=False)
  out_mov = mov.apply({'params': traverse_util.unflatten_dict(flat_mov, sep='/')},
                      **batch, enable_dropout=False)
  base, _ = _build('t5_1_1_tiny')
  base_out = base.apply({'params': traverse_util.unflatten_dict(
      {k: v for k, v in flat_ia3.items() if '_adapter/' not in k}, sep='/')},
                        **batch, enable_dropout=False)
  np.testing.assert_allclose(out_mov, out_ia3, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(out_ia3) - np.asarray(base_out)).max() > 1e-2


def _run_adapter(module, inputs, outputs, in_axes, out_axes, params=None,
                 mask=None):
  kwargs = dict(deterministic=True, mask=mask, input_axes=in_axes,
                output_axes=out_axes)
  if params is None:
    params = module.init(jax.random.PRNGKey(0), inputs, outputs,
                         **kwargs)['params']
  return module.apply({'params': params}, inputs, outputs, **kwargs), params


@pytest.mark.parametrize('site', ['query', 'out', 'wo'])
def test_efficient_molora_equals_naive_per_expert_reference(site):
  rng = np.random.default_rng(1)
  b, l, emb, heads, kv, mlp, experts, rank = 2, 5, 12, 3, 4, 20, 6, 3
  shapes = {
      'query': ((b, l, emb), (b, l, heads, kv), layers.ACT_EMBED,
                layers.ACT_HEADS),
      'out': ((b, l, heads, kv), (b, l, emb), layers.ACT_HEADS,
              layers.ACT_EMBED),
      'wo': ((b, l, mlp), (b, l, emb), layers.ACT_MLP, layers.ACT_EMBED),
  }[site]
  inputs = jnp.asarray(rng.normal(size=shapes[0]), jnp.float32)
  outputs = jnp.asarray(rng.normal(size=shapes[1]), jnp.float32)
  module = lora.MixtureOfLoRA(rank=rank, alpha=8.0, num_experts=experts)
  _, params = _run_adapter(module, inputs, outputs, shapes[2], shapes[3])
  params = jax.tree_util.tree_map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  fast, _ = _run_adapter(module, inputs, outputs, shapes[2], shapes[3], params)

  # Naive: every expert's full output [b, l, E, d_out], then the mixture.
  x = np.asarray(inputs).reshape(b, l, -1)
  probs = jax.nn.softmax(x @ np.asarray(params['router']['kernel']), axis=-1)
  a, bb = np.asarray(params['lora_a']), np.asarray(params['lora_b'])
  per_expert = np.stack([x @ a[:, e] @ bb[e] for e in range(experts)], axis=2)
  mixed = np.einsum('ble,bleo->blo', probs, per_expert)
  naive = np.asarray(outputs) + (8.0 / rank) * mixed.reshape(outputs.shape)
  np.testing.assert_allclose(fast, naive, atol=1e-5, rtol=1e-5)
  assert np.abs(naive - np.asarray(outputs)).max() > 0.1


@pytest.mark.parametrize('aux_losses', [False, True])
def test_molora_gradients_equal_naive_per_expert_reference(aux_losses):
  """Gradients (input, A, B, router) of the adapter, whose router logits come
  out of the down-projection's matmul, against autodiff of the naive
  per-expert formula; and the router statistics it sows. With the router's
  auxiliary losses in the loss, their gradients flow back through the
  logits and probabilities too."""
  z_weight, balance_weight = (0.3, 0.2) if aux_losses else (0.0, 0.0)
  rng = np.random.default_rng(3)
  b, l, emb, d_out, experts, rank = 2, 6, 12, 7, 5, 3
  x = jnp.asarray(rng.normal(size=(b, l, emb)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(b, l, d_out)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(b, l, d_out)), jnp.float32)
  module = lora.MixtureOfLoRA(
      rank=rank, alpha=6.0, num_experts=experts,
      router=routing.RouterConfig(z_loss_weight=z_weight,
                                  load_balance_weight=balance_weight))
  _, params = _run_adapter(module, x, y, layers.ACT_EMBED, layers.ACT_EMBED)
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  kwargs = dict(deterministic=True, mask=None, input_axes=layers.ACT_EMBED,
                output_axes=layers.ACT_EMBED)

  def ours(params, x):
    out, sown = module.apply({'params': params}, x, y,
                             mutable=['intermediates', 'aux_loss'], **kwargs)
    aux = routing.total_aux_loss(sown['aux_loss'])
    return jnp.sum(out * g) + aux, sown['intermediates']

  def naive(params, x):
    logits = x @ params['router']['kernel']
    probs = jax.nn.softmax(logits, axis=-1)
    per_expert = jnp.einsum('bld,der,ero->bleo', x, params['lora_a'],
                            params['lora_b'])
    out = y + (6.0 / rank) * jnp.einsum('ble,bleo->blo', probs, per_expert)
    z_loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    top1 = jax.nn.one_hot(jnp.argmax(probs, axis=-1), experts)
    balance = experts * jnp.sum(jnp.mean(top1, axis=(0, 1)) *
                                jnp.mean(probs, axis=(0, 1)))
    aux = z_weight * z_loss + balance_weight * balance
    return jnp.sum(out * g) + aux, probs

  (_, sown), grads = jax.value_and_grad(ours, argnums=(0, 1), has_aux=True)(
      params, x)
  (_, probs), want = jax.value_and_grad(naive, argnums=(0, 1), has_aux=True)(
      params, x)
  for got, expect in zip(jax.tree_util.tree_leaves(grads),
                         jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(got, expect, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(grads[0]['router']['kernel']).max()) > 1e-3
  np.testing.assert_allclose(sown['router']['expert_probability'][0],
                             jnp.mean(probs, axis=(0, 1)), atol=1e-6)


def test_lora_with_one_expert_is_plain_lora():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2, 3, 10)), jnp.float32)
  module = lora.MixtureOfLoRA(rank=2, alpha=4.0, num_experts=1, router=None)
  _, params = _run_adapter(module, x, y, layers.ACT_EMBED, layers.ACT_MLP)
  assert 'router' not in params
  params = {'lora_a': jnp.asarray(rng.normal(size=(8, 1, 2)), jnp.float32),
            'lora_b': jnp.asarray(rng.normal(size=(1, 2, 10)), jnp.float32)}
  out, _ = _run_adapter(module, x, y, layers.ACT_EMBED, layers.ACT_MLP, params)
  expect = y + 2.0 * (np.asarray(x) @ params['lora_a'][:, 0] @
                      params['lora_b'][0])
  np.testing.assert_allclose(out, expect, atol=1e-5)


@pytest.mark.parametrize('renormalize', [False, True])
def test_top_k_keeps_exactly_k_experts(renormalize):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 7, 3, 16)), jnp.float32)
  router = routing.Router(num_experts=6, config=routing.RouterConfig(
      top_k=2, renormalize_top_k=renormalize))
  kwargs = dict(input_axes=layers.ACT_HEADS, deterministic=True)
  params = router.init(jax.random.PRNGKey(0), x, **kwargs)['params']
  probs = np.asarray(router.apply({'params': params}, x, **kwargs))
  assert probs.shape == (2, 7, 3, 6)
  assert ((probs > 0).sum(-1) == 2).all()
  if renormalize:
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  else:
    assert (probs.sum(-1) < 1.0).all()
  # Ties (a zero kernel gives uniform probabilities) still keep exactly k.
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  tied = np.asarray(router.apply({'params': zero}, x, **kwargs))
  assert ((tied > 0).sum(-1) == 2).all()


def test_sequence_level_routing_is_unchanged_by_extra_padding():
  net, _ = _build('t5_1_1_tiny', 'mov',
                  ["routing.RouterConfig.granularity = 'sequence'"])
  batch = _batch()
  params = _init(net, batch)
  rng = np.random.default_rng(4)
  flat = traverse_util.flatten_dict(params, sep='/')
  for k, v in flat.items():  # experts that differ, so routing matters
    if k.endswith('mov_scaling'):
      flat[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
  params = traverse_util.unflatten_dict(flat, sep='/')
  padded = dict(batch)
  padded['encoder_input_tokens'] = jnp.pad(batch['encoder_input_tokens'],
                                           ((0, 0), (0, 9)))
  for k in ('decoder_input_tokens', 'decoder_target_tokens'):
    padded[k] = jnp.pad(batch[k], ((0, 0), (0, 5)))
  out = net.apply({'params': params}, **batch, enable_dropout=False)
  out_padded = net.apply({'params': params}, **padded, enable_dropout=False)
  valid = np.asarray(batch['decoder_target_tokens'] > 0)
  np.testing.assert_allclose(np.asarray(out_padded)[:, :6][valid],
                             np.asarray(out)[valid], atol=1e-5)
  # One distribution per sequence: identical across its positions.
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
  router = routing.Router(
      num_experts=3, config=routing.RouterConfig(granularity='sequence'))
  kw = dict(input_axes=layers.ACT_MLP, deterministic=True, mask=mask)
  p = router.init(jax.random.PRNGKey(0), x, **kw)
  probs = np.asarray(router.apply(p, x, **kw))
  np.testing.assert_allclose(probs, np.broadcast_to(probs[:, :1], probs.shape))


def test_router_aux_losses_and_statistics_are_sown():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
  router = routing.Router(num_experts=3, config=routing.RouterConfig(
      z_loss_weight=0.5, load_balance_weight=0.25))
  kw = dict(input_axes=layers.ACT_MLP, deterministic=True, mask=mask)
  params = router.init(jax.random.PRNGKey(0), x, **kw)['params']
  probs, sown = router.apply({'params': params}, x, **kw,
                             mutable=['aux_loss', 'intermediates'])
  logits = np.asarray(x) @ np.asarray(params['kernel'])
  keep = np.asarray(mask, bool)
  lse = np.log(np.exp(logits).sum(-1))[keep]
  z_loss = np.mean(lse ** 2)
  p = np.asarray(probs)[keep]
  frac = np.bincount(p.argmax(-1), minlength=3) / len(p)
  balance = 3 * np.sum(frac * p.mean(0))
  stats = sown['intermediates']
  np.testing.assert_allclose(stats['z_loss'][0], z_loss, rtol=1e-5)
  np.testing.assert_allclose(stats['load_balance_loss'][0], balance, rtol=1e-5)
  np.testing.assert_allclose(stats['expert_probability'][0], p.mean(0),
                             rtol=1e-5)
  np.testing.assert_allclose(routing.total_aux_loss(sown['aux_loss']),
                             0.5 * z_loss + 0.25 * balance, rtol=1e-5)
  # The jitter noise only acts in training.
  jitter = routing.Router(num_experts=3,
                          config=routing.RouterConfig(jitter_noise=0.5))
  kw_train = dict(input_axes=layers.ACT_MLP, deterministic=False)
  a = jitter.apply({'params': params}, x, **kw_train,
                   rngs={'dropout': jax.random.PRNGKey(1)})
  b = jitter.apply({'params': params}, x, **kw_train,
                   rngs={'dropout': jax.random.PRNGKey(2)})
  assert not np.allclose(a, b)


@pytest.mark.parametrize('weighted', [False, True])
def test_statistics_switch_skips_the_statistics_not_the_losses(weighted):
  """With its switch off a router sows zeros for its statistics (they are
  not computed); with it on, or without one, the same statistics. Its
  auxiliary loss, when weighted, is the same either way, gradient
  included."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
  config = (routing.RouterConfig(z_loss_weight=0.5, load_balance_weight=0.25)
            if weighted else routing.RouterConfig())
  router = routing.Router(num_experts=4, config=config)
  kw = dict(input_axes=layers.ACT_MLP, deterministic=True, mask=mask)
  params = router.init(jax.random.PRNGKey(0), x, **kw)['params']

  def run(params, switch):
    variables = {'params': params}
    if switch is not None:
      variables[routing.STATISTICS_SWITCH] = {'compute': switch}
    probs, sown = router.apply(variables, x, **kw,
                               mutable=['aux_loss', 'intermediates'])
    aux = routing.total_aux_loss(sown['aux_loss'])
    return jnp.sum(probs * x[..., :4]) + aux, sown

  grad_fn = jax.value_and_grad(run, has_aux=True)
  (_, free), free_grad = grad_fn(params, None)
  # Traced switches (as in the training step) and a constant one.
  for switch in (jnp.asarray(True), jnp.asarray(False), False):
    fn = grad_fn if isinstance(switch, bool) else jax.jit(grad_fn)
    (_, sown), grad = fn(params, switch)
    np.testing.assert_allclose(grad['kernel'], free_grad['kernel'],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sown['aux_loss']['router'][0],
                               free['aux_loss']['router'][0], rtol=1e-6)
    on = bool(switch) or weighted  # weighted losses need them every step
    for name, (value,) in free['intermediates'].items():
      got = sown['intermediates'][name][0]
      if on:
        np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-7)
      else:
        np.testing.assert_array_equal(got, np.zeros_like(value))
    assert float(jnp.abs(free['intermediates']['entropy'][0])) > 0.1


def test_statistics_switch_names_every_router_of_a_network():
  net, _ = _build('t5_1_1_tiny', 'mov')
  batch = _batch()
  params = _init(net, batch)
  switch = routing.statistics_switch(params, True)
  flat = traverse_util.flatten_dict(switch, sep='/')
  routers = {k[:-len('/kernel')] for k in traverse_util.flatten_dict(
      params, sep='/') if k.endswith('/router/kernel')}
  assert routers and {k[:-len('/compute')] for k in flat} == routers
  assert all(v is True for v in flat.values())
  _, sown = net.apply({'params': params, routing.STATISTICS_SWITCH:
                       routing.statistics_switch(params, False)}, **batch,
                      enable_dropout=False, mutable=['intermediates'])
  entropies = [v[0] for k, v in traverse_util.flatten_dict(
      sown['intermediates'], sep='/').items() if k.endswith('/entropy')]
  assert len(entropies) == len(routers)
  assert all(float(e) == 0.0 for e in entropies)


def test_router_input_can_be_the_site_input():
  net, _ = _build('t5_1_1_tiny', 'mov',
                  ["vectors.MixtureOfVectors.router_input = 'input'"])
  params = _init(net, _batch())
  flat = traverse_util.flatten_dict(params, sep='/')
  # Attention routers read the layer input (embed), FFN routers the FFN input.
  emb = net.config.emb_dim
  assert flat['encoder/layers_0/attention/key_adapter/router/kernel'].shape == (
      emb, 10)
  axes = traverse_util.flatten_dict(
      jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), **_batch(),
                                      enable_dropout=False))['params_axes'],
      sep='/')
  assert axes['encoder/layers_0/attention/key_adapter/router/kernel_axes'
             ].names == ('embed', 'expert')


def test_every_adapter_parameter_has_logical_axes():
  for method in METHODS[:-1]:
    net, _ = _build('t5_1_1_tiny', method)
    variables = jax.eval_shape(lambda n=net: n.init(
        jax.random.PRNGKey(0), **_batch(), enable_dropout=False))
    params = traverse_util.flatten_dict(variables['params'], sep='/')
    axes = traverse_util.flatten_dict(variables['params_axes'], sep='/')
    for path, value in params.items():
      names = axes[path + '_axes'].names
      assert len(names) == len(value.shape), (method, path, names)
  net, _ = _build('t5_1_1_tiny', 'mov')
  variables = jax.eval_shape(lambda: net.init(
      jax.random.PRNGKey(0), **_batch(), enable_dropout=False))
  axes = traverse_util.flatten_dict(variables['params_axes'], sep='/')
  assert axes['encoder/layers_0/attention/key_adapter/mov_scaling_axes'
             ].names == ('heads', 'expert', 'kv')
  assert axes['encoder/layers_0/mlp/mlp_hidden_adapter/mov_scaling_axes'
             ].names == ('expert', 'mlp')
  assert axes['encoder/layers_0/mlp/mlp_hidden_adapter/router/kernel_axes'
             ].names == ('mlp', 'expert')


def test_bad_trainable_regex_is_explained():
  net, _ = _build('t5_1_1_tiny')
  params = _init(net, _batch())
  with pytest.raises(ValueError, match='matches no parameter'):
    optim.split_trainable(params, [r'.*_adapter/.*'])
  with pytest.raises(ValueError, match='not a valid regex'):
    optim.split_trainable(params, ['(unclosed'])


def _params_json(capsys, *argv):
  assert params_cli.main(list(argv) + ['--json']) == 0
  return json.loads(capsys.readouterr().out)


def test_parameter_counts_of_the_paper(capsys):
  mov10_xl = _params_json(capsys, '--gin_file=models/t5_1_1_xl.gin',
                          '--gin_file=methods/mov.gin')
  assert mov10_xl['trainable'] == 7_956_480
  assert abs(mov10_xl['trainable_percent'] - 0.28) < 0.005
  import gin  # pylint: disable=g-import-not-at-top
  gin.clear_config(clear_constants=True)
  mov60_xxl = _params_json(capsys, '--gin_file=models/t5_1_1_xxl.gin',
                           '--gin_file=methods/mov.gin',
                           '--gin.NUM_EXPERTS=60')
  assert mov60_xxl['trainable_percent'] < 1.0
  gin.clear_config(clear_constants=True)
  ia3_xl = _params_json(capsys, '--gin_file=models/t5_1_1_xl.gin',
                        '--gin_file=methods/ia3.gin')
  assert abs(ia3_xl['trainable_percent'] - 0.019) < 0.0005
  assert ia3_xl['trainable'] == sum(ia3_xl['by_site'].values())
  gin.clear_config(clear_constants=True)
  full = _params_json(capsys, '--gin_file=models/t5_1_1_tiny.gin',
                      '--gin_file=methods/full.gin')
  assert full['trainable'] == full['total']
  gin.clear_config(clear_constants=True)
  # A misspelt binding: an error line naming it, not a traceback.
  assert params_cli.main(['--gin_file=models/t5_1_1_tiny.gin',
                          '--gin.network.T5Config.emb_dimm=3']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'emb_dimm' in err


def test_mixture_without_router_needs_one_expert():
  x = jnp.ones((1, 2, 4), jnp.float32)
  kw = dict(deterministic=True, mask=None, input_axes=layers.ACT_MLP,
            output_axes=layers.ACT_MLP)
  with pytest.raises(ValueError, match='num_experts=3 needs a router'):
    lora.MixtureOfLoRA(num_experts=3, router=None).init(
        jax.random.PRNGKey(0), x, x, **kw)
  with pytest.raises(TypeError, match='with parentheses'):
    layers.AdapterSites(key=lora.MixtureOfLoRA)


@pytest.mark.parametrize('k,n', [(3, 40), (40, 3)], ids=['thin_x', 'thin_dy'])
def test_weight_matmul_gradients_equal_a_plain_matmul(k, n):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, k))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, n))
  g = jax.random.normal(jax.random.PRNGKey(2), (2, 5, n))
  ours = jax.grad(lambda x, w: jnp.sum(layers.weight_matmul(x, w) * g),
                  argnums=(0, 1))(x, w)
  plain = jax.grad(lambda x, w: jnp.sum(jnp.dot(x, w) * g),
                   argnums=(0, 1))(x, w)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # The CPU form (token axis inside) and the accelerators' (a plain
  # contraction) are the same weight gradient.
  np.testing.assert_allclose(
      layers._thin_weight_gradient(x, g, token_axis_inside=True),  # pylint: disable=protected-access
      layers._thin_weight_gradient(x, g, token_axis_inside=False),  # pylint: disable=protected-access
      rtol=1e-5, atol=1e-5)
