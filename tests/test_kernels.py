"""The fused CPU kernel of a MoV site against the same computation in JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mov_jax import kernels
from mov_jax.adapters import routing
from mov_jax.adapters import vectors

needs_kernels = pytest.mark.skipif(
    not kernels.cpu_kernels_available(),
    reason='the fused CPU kernels could not be built here (see the warning)')


def _reference_site(x, w, v):
  """What `kernels.mov_site` computes, in plain JAX."""
  logits = jnp.einsum('rhk,ke->rhe', x, w, precision='highest')
  probs = jax.nn.softmax(logits, axis=-1)
  mixture = 1.0 + jnp.einsum('rhe,hek->rhk', probs, v - 1.0,
                             precision='highest')
  return x * mixture, logits, probs


def _site_inputs(rows, heads, k, experts, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, heads, k)).astype(np.float32)
  w = (rng.normal(size=(k, experts)) * 0.3).astype(np.float32)
  v = (1.0 + 0.2 * rng.normal(size=(heads, experts, k))).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w), jnp.asarray(v)


def _assert_close(actual, expected, what):
  """float32 agreement, relative to the array's scale (sums of many terms
  in another order)."""
  expected = np.asarray(expected)
  scale = float(np.max(np.abs(expected))) if expected.size else 1.0
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=2e-5,
                             atol=2e-6 * max(scale, 1.0), err_msg=what)


# (rows, heads, K, E): narrow sites (K <= 256: experts as lanes) and wide
# ones (K > 256), expert rows of one to four vectors (16 lanes with AVX-512,
# else 8), E = 32 (the most), K off a multiple of 8 or 16 (the tail loops)
# and rows off a multiple of the kernel's tile of 8.
SHAPES = [(37, 1, 100, 10), (19, 3, 24, 30), (21, 1, 300, 7),
          (9, 2, 272, 17), (64, 4, 16, 1), (13, 2, 36, 20), (11, 1, 516, 32)]


@needs_kernels
@pytest.mark.parametrize('shape', SHAPES)
def test_forward_and_gradients_match_jax(shape):
  x, w, v = _site_inputs(*shape)
  rng = np.random.default_rng(1)
  dy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  stats_weights = jnp.asarray(rng.normal(size=shape[:2] + (shape[3],)),
                              jnp.float32)

  for got, want, name in zip(kernels.mov_site(x, w, v),
                             _reference_site(x, w, v),
                             ('y', 'logits', 'probs')):
    _assert_close(got, want, name)

  def loss(site, with_stats):
    def fn(x, w, v):
      y, logits, probs = site(x, w, v)
      total = jnp.sum(y * dy)
      if with_stats:  # cotangents for the logits and probabilities too
        total += jnp.sum(jnp.square(jax.nn.logsumexp(logits, -1)))
        total += jnp.sum(probs * stats_weights)
      return total
    return jax.jit(jax.grad(fn, argnums=(0, 1, 2)))

  for with_stats in (False, True):
    got = loss(kernels.mov_site, with_stats)(x, w, v)
    want = loss(_reference_site, with_stats)(x, w, v)
    for g, r, name in zip(got, want, ('dx', 'dw', 'dv')):
      _assert_close(g, r, f'{name} (statistics differentiated: {with_stats})')


@needs_kernels
@pytest.mark.parametrize('shape', [(700, 2, 64, 10), (300, 1, 520, 12)])
def test_sites_split_over_threads_match_jax_and_repeat_exactly(shape):
  """Shapes large enough for several chunks on several threads: every
  chunk's rows are right, the chunks' weight gradients are summed, and in
  a fixed order, so two runs agree bit for bit whichever thread ran what."""
  x, w, v = _site_inputs(*shape)
  dy = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)

  def gradients(site):
    return jax.jit(jax.grad(lambda x, w, v: jnp.sum(site(x, w, v)[0] * dy),
                            argnums=(0, 1, 2)))

  _assert_close(kernels.mov_site(x, w, v)[0], _reference_site(x, w, v)[0], 'y')
  kernel_gradients = gradients(kernels.mov_site)
  got = kernel_gradients(x, w, v)
  for g, r, name in zip(got, gradients(_reference_site)(x, w, v),
                        ('dx', 'dw', 'dv')):
    _assert_close(g, r, name)
  for _ in range(3):
    again = kernel_gradients(x, w, v)
    for g, a, name in zip(got, again, ('dx', 'dw', 'dv')):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(a), err_msg=name)


@needs_kernels
def test_frozen_input_gets_no_input_gradient():
  """Differentiated only in its weights (a site on a frozen path), the
  backward kernel skips dx, and the weight gradients still match."""
  x, w, v = _site_inputs(29, 2, 40, 10)
  dy = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

  def grads(site):
    fn = lambda w, v: jnp.sum(site(x, w, v)[0] * dy)
    return jax.grad(fn, argnums=(0, 1))

  for g, r in zip(jax.jit(grads(kernels.mov_site))(w, v),
                  jax.jit(grads(_reference_site))(w, v)):
    _assert_close(g, r, 'weight gradients')
  jaxpr = jax.make_jaxpr(grads(kernels.mov_site))(w, v)
  backward = [e for e in jaxpr.jaxpr.eqns
              if e.params.get('target_name') == kernels.BACKWARD_TARGET]
  assert [v.aval.shape for v in backward[0].outvars][0] == (0,)


@needs_kernels
def test_identity_at_initialisation_is_exact():
  x, w, _ = _site_inputs(50, 2, 40, 10)
  y, _, _ = kernels.mov_site(x, w, jnp.ones((2, 10, 40), jnp.float32))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@needs_kernels
def test_vmap_matches_a_loop():
  x, w, v = _site_inputs(24, 2, 32, 6)
  stacked = jnp.stack([x, 2.0 * x, -x])
  batched = jax.vmap(kernels.mov_site, in_axes=(0, None, None))(stacked, w, v)
  for i in range(3):
    for got, want in zip(batched, kernels.mov_site(stacked[i], w, v)):
      np.testing.assert_array_equal(np.asarray(got[i]), np.asarray(want))


def _apply_site(per_head, cpu_kernel, experts=10, router=None):
  router = router or routing.RouterConfig(z_loss_weight=0.01,
                                          load_balance_weight=0.02)
  module = vectors.MixtureOfVectors(num_experts=experts, router=router,
                                    cpu_kernel=cpu_kernel)
  rng = np.random.default_rng(3)
  shape = (2, 11, 3, 16) if per_head else (2, 11, 40)
  axes = (('batch', 'length', 'heads', 'kv') if per_head else
          ('batch', 'length', 'mlp'))
  outputs = jnp.asarray(rng.normal(size=shape), jnp.float32)
  mask = jnp.asarray(np.arange(11)[None, :] < np.array([[11], [7]]),
                     jnp.float32)
  kwargs = dict(deterministic=False, mask=mask, input_axes=axes,
                output_axes=axes)
  variables = module.init(jax.random.PRNGKey(0), outputs, outputs, **kwargs)
  params = jax.tree_util.tree_map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
      variables['params'])

  def loss(params, outputs):
    y, sown = module.apply({'params': params}, outputs, outputs, **kwargs,
                           mutable=['aux_loss', 'intermediates'])
    aux = routing.total_aux_loss(sown['aux_loss'])
    return jnp.sum(jnp.sin(y)) + aux, (y, sown['intermediates'])

  fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  jaxpr = str(jax.make_jaxpr(fn)(params, outputs))
  return jax.jit(fn)(params, outputs), jaxpr


@needs_kernels
@pytest.mark.parametrize('per_head', [False, True])
def test_module_with_kernel_matches_module_without(per_head):
  """Outputs, router statistics, auxiliary losses and gradients (of the
  parameters and the activations) agree with the JAX path; the kernel ran."""
  (got, got_jaxpr) = _apply_site(per_head, cpu_kernel=True)
  (want, want_jaxpr) = _apply_site(per_head, cpu_kernel=False)
  assert kernels.FORWARD_TARGET in got_jaxpr and kernels.BACKWARD_TARGET in got_jaxpr
  assert kernels.FORWARD_TARGET not in want_jaxpr
  got_leaves, got_tree = jax.tree_util.tree_flatten(got)
  want_leaves, want_tree = jax.tree_util.tree_flatten(want)
  assert got_tree == want_tree
  for g, w in zip(got_leaves, want_leaves):
    _assert_close(g, w, 'module outputs, statistics or gradients')


@needs_kernels
def test_settings_the_kernel_does_not_cover_use_jax():
  """More than 32 experts, top-k routing, bfloat16: the JAX path."""
  _, jaxpr = _apply_site(False, cpu_kernel=True, experts=40)
  assert kernels.FORWARD_TARGET not in jaxpr
  _, jaxpr = _apply_site(False, cpu_kernel=True,
                         router=routing.RouterConfig(top_k=2))
  assert kernels.FORWARD_TARGET not in jaxpr
  assert not kernels.use_cpu_kernels(jnp.bfloat16, 10)


def test_missing_or_failing_compiler_means_no_kernels(monkeypatch, tmp_path):
  monkeypatch.setenv('MOV_JAX_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  available, why = kernels._load()
  assert not available and 'no-such-compiler' in why
  monkeypatch.setenv('CXX', 'false')  # runs, fails
  available, why = kernels._load()
  assert not available and why
  assert not list(tmp_path.glob('*.so')), 'no library left behind'
  monkeypatch.setenv('MOV_JAX_CPU_KERNELS', '0')
  assert kernels._load() == (False, 'MOV_JAX_CPU_KERNELS=0')


def _reference_attention(query, key, value, bias):
  """What `kernels.attention` computes, in plain JAX."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', query, key, precision='highest')
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, value, precision='highest')


def _attention_inputs(batch, q_len, kv_len, heads, head_dim, bias_shape,
                      seed=0):
  rng = np.random.default_rng(seed)
  query, key, value = (jnp.asarray(rng.normal(size=(batch, length, heads,
                                                    head_dim)), jnp.float32)
                       for length in (q_len, kv_len, kv_len))
  bias = None
  if bias_shape is not None:
    bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  return query, key, value, bias


# (batch, q_len, kv_len, heads, head_dim, bias shape): lengths and head
# sizes off the register tile (6 or 14 rows, 16 or 32 columns) and off the
# vector width, one query (decoding), biases broadcast over the batch (T5's
# position bias), over the heads (a padding mask) or over both, and none.
ATTENTION_SHAPES = [
    (2, 37, 19, 3, 20, (1, 3, 37, 19)),
    (3, 8, 33, 2, 64, (3, 1, 8, 33)),
    (1, 1, 45, 4, 7, (1, 4, 1, 45)),
    (2, 17, 17, 1, 33, (1, 1, 17, 17)),
    (2, 29, 12, 2, 16, (2, 2, 29, 12)),
    (2, 9, 70, 3, 8, None),
]


@needs_kernels
@pytest.mark.parametrize('shape', ATTENTION_SHAPES)
def test_attention_forward_and_gradients_match_jax(shape):
  query, key, value, bias = _attention_inputs(*shape)
  _assert_close(kernels.attention(query, key, value, bias),
                _reference_attention(query, key, value, bias), 'outputs')
  cotangent = jnp.asarray(
      np.random.default_rng(1).normal(size=query.shape), jnp.float32)
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

  def loss(fn):
    return lambda *args: jnp.sum(fn(*args) * cotangent)

  got = jax.grad(loss(kernels.attention), argnums)(query, key, value, bias)
  want = jax.grad(loss(_reference_attention), argnums)(query, key, value, bias)
  for name, g, w in zip(('query', 'key', 'value', 'bias'), got, want):
    assert g.shape == w.shape, name
    _assert_close(g, w, f'{name} gradient')


@needs_kernels
def test_attention_fully_masked_rows_and_large_logits():
  """A row that masks every key (-1e10, T5's mask) averages the values like
  the JAX softmax does; logits in the hundreds neither overflow nor lose the
  largest term."""
  query, key, value, _ = _attention_inputs(2, 5, 6, 2, 4, None)
  mask = np.zeros((2, 1, 5, 6), np.float32)
  mask[0, 0, 2, :] = -1e10  # every key of one query
  mask[1, 0, :, 4:] = -1e10  # padding keys
  mask = jnp.asarray(mask)
  for q in (query, query * 40.0):
    _assert_close(kernels.attention(q, key, value, mask),
                  _reference_attention(q, key, value, mask), 'outputs')
    got = jax.grad(lambda q, k, v: jnp.sum(
        kernels.attention(q, k, v, mask) ** 2), (0, 1, 2))(q, key, value)
    want = jax.grad(lambda q, k, v: jnp.sum(
        _reference_attention(q, k, v, mask) ** 2), (0, 1, 2))(q, key, value)
    for g, w in zip(got, want):
      _assert_close(g, w, 'gradients')


@needs_kernels
def test_attention_bias_shape_errors():
  query, key, value, _ = _attention_inputs(2, 4, 5, 3, 8, None)
  with pytest.raises(ValueError, match='4 dims'):
    kernels.attention(query, key, value, jnp.zeros((4, 5)))
  with pytest.raises(ValueError, match='does not broadcast'):
    kernels.attention(query, key, value, jnp.zeros((2, 2, 4, 5)))


@needs_kernels
def test_attention_computes_only_the_gradients_something_needs():
  """A frozen first layer's query, a mask: the backward kernel gets empty
  results for their gradients (and skips those matmuls); the others stay
  exact."""
  query, key, value, _ = _attention_inputs(2, 4, 5, 3, 8, None)
  mask = jnp.asarray(np.random.default_rng(2).normal(size=(2, 1, 4, 5)),
                     jnp.float32)

  def backward_results(fn, argnums):
    jaxpr = jax.make_jaxpr(jax.grad(fn, argnums))(query, key, value, mask)
    call, = [eqn for eqn in jaxpr.jaxpr.eqns if eqn.params.get(
        'target_name') == kernels.ATTENTION_BACKWARD_TARGET]
    return [tuple(v.aval.shape) for v in call.outvars]

  loss = lambda fn: lambda *args: jnp.sum(fn(*args) ** 2)
  for argnums in ((2,), (1, 2), (0, 3)):
    results = backward_results(loss(kernels.attention), argnums)
    full = [query.shape, key.shape, value.shape, (2, 3, 4, 5)]
    assert results == [shape if i in argnums else (0,)
                       for i, shape in enumerate(full)], argnums
    got = jax.grad(loss(kernels.attention), argnums)(query, key, value, mask)
    want = jax.grad(loss(_reference_attention), argnums)(query, key, value,
                                                         mask)
    for g, w in zip(got, want):
      _assert_close(g, w, f'gradients of {argnums}')


@needs_kernels
def test_attention_vmap_matches_a_loop():
  query, key, value, bias = _attention_inputs(3, 6, 7, 2, 5, (3, 2, 6, 7))
  stacked = [x[None].repeat(2, 0) * jnp.asarray([1.0, 0.5]).reshape(
      2, 1, 1, 1, 1) for x in (query, key, value, bias)]
  got = jax.vmap(kernels.attention)(*stacked)
  for i in range(2):
    _assert_close(got[i], kernels.attention(*(x[i] for x in stacked)),
                  f'vmapped attention {i}')


@needs_kernels
def test_dot_product_attention_uses_the_kernel_only_where_it_applies(
    monkeypatch):
  """float32 without dropout: the kernel, with the JAX path's results;
  dropout or bfloat16: the JAX path."""
  from mov_jax import layers  # pylint: disable=g-import-not-at-top
  query, key, value, bias = _attention_inputs(2, 7, 9, 3, 16, (1, 3, 7, 9))

  def run(**kwargs):
    fn = lambda q, k, v: jnp.sum(layers.dot_product_attention(
        q, k, v, bias, dropout_rng=jax.random.PRNGKey(0), **kwargs) ** 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(fn, (0, 1, 2)))(query, key, value))
    return jax.value_and_grad(fn, (0, 1, 2))(query, key, value), jaxpr

  with_kernel, jaxpr = run(deterministic=True)
  assert kernels.ATTENTION_FORWARD_TARGET in jaxpr
  _, jaxpr = run(deterministic=False, dropout_rate=0.1)
  assert kernels.ATTENTION_FORWARD_TARGET not in jaxpr
  assert not kernels.use_cpu_attention(jnp.bfloat16)
  monkeypatch.setattr(kernels, 'use_cpu_attention', lambda dtype: False)
  without_kernel, jaxpr = run(deterministic=True)
  assert kernels.ATTENTION_FORWARD_TARGET not in jaxpr
  for g, w in zip(jax.tree_util.tree_leaves(with_kernel),
                  jax.tree_util.tree_leaves(without_kernel)):
    _assert_close(g, w, 'loss or gradients')


def test_attention_equivalent_matmuls_count_the_model_flops():
  """Two forward and four backward products of 2 b h lq lk d FLOPs each,
  the same as the JAX path's dots."""
  batch, q_len, kv_len, heads, depth = 2, 7, 9, 3, 16
  queries = (batch, q_len, heads, depth)
  keys = (batch, kv_len, heads, depth)
  probs = (batch, heads, q_len, kv_len)

  def flops(matmuls):
    total = 0
    for lhs, rhs, ((_, rhs_contracting), (_, rhs_batch)) in matmuls:
      kept = [n for axis, n in enumerate(rhs)
              if axis not in rhs_contracting + rhs_batch]
      total += 2 * int(np.prod(lhs)) * int(np.prod(kept))
    return total

  product = 2 * batch * heads * q_len * kv_len * depth
  forward = kernels.equivalent_matmuls(
      kernels.ATTENTION_FORWARD_TARGET, [queries, keys, keys, probs],
      [queries, probs])
  backward = kernels.equivalent_matmuls(
      kernels.ATTENTION_BACKWARD_TARGET,
      [queries, keys, keys, probs, queries], [queries, keys, keys, (0,)])
  assert flops(forward) == 2 * product
  assert flops(backward) == 4 * product
  # Only the gradients the call computes: no dq (a frozen query) leaves
  # dprobs, dv and dk; dv alone is one product.
  assert flops(kernels.equivalent_matmuls(
      kernels.ATTENTION_BACKWARD_TARGET,
      [queries, keys, keys, probs, queries],
      [(0,), keys, keys, (0,)])) == 3 * product
  assert flops(kernels.equivalent_matmuls(
      kernels.ATTENTION_BACKWARD_TARGET,
      [queries, keys, keys, probs, queries],
      [(0,), (0,), keys, (0,)])) == product
