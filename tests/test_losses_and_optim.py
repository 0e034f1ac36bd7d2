"""Loss normalisation (packed and unpacked) and the optimizer settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mov_jax import models
from mov_jax import optim


def _token_losses(logits, targets):
  logp = jax.nn.log_softmax(logits, -1)
  return -np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]


def test_loss_normalizing_factors_by_hand_and_under_packing():
  rng = np.random.default_rng(0)
  vocab = 11
  a_tgt, b_tgt = np.array([3, 4, 5, 1]), np.array([6, 1])
  a_log = rng.normal(size=(4, vocab)).astype(np.float32)
  b_log = rng.normal(size=(2, vocab)).astype(np.float32)
  # Unpacked: one sequence per row, padded to 6.
  pad = lambda x, n: np.pad(x, [(0, n - len(x))] + [(0, 0)] * (x.ndim - 1))
  unpacked = {'decoder_target_tokens': np.stack([pad(a_tgt, 6),
                                                 pad(b_tgt, 6)])}
  unpacked_logits = np.stack([pad(a_log, 6), pad(b_log, 6)])
  # Packed: both sequences in one row, told apart by segment ids.
  packed = {'decoder_target_tokens': np.concatenate([a_tgt, b_tgt])[None],
            'decoder_segment_ids': np.array([[1, 1, 1, 1, 2, 2]])}
  packed_logits = np.concatenate([a_log, b_log])[None]
  la, lb = _token_losses(a_log, a_tgt), _token_losses(b_log, b_tgt)
  expected = {
      None: la.sum() + lb.sum(),
      4.0: (la.sum() + lb.sum()) / 4.0,
      models.NUM_REAL_TARGET_TOKENS: (la.sum() + lb.sum()) / 6,
      models.AVERAGE_PER_SEQUENCE: (la.mean() + lb.mean()) / 2,
  }
  for factor, want in expected.items():
    for batch, logits in ((unpacked, unpacked_logits),
                          (packed, packed_logits)):
      got, metrics = models.normalized_loss(jnp.asarray(logits), batch, factor)
      np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=str(factor))
      assert metrics['target_tokens'] == 6
  total, _ = models.normalized_loss(jnp.asarray(unpacked_logits), unpacked,
                                    models.NUM_TOTAL_TARGET_TOKENS)
  np.testing.assert_allclose(total, (la.sum() + lb.sum()) / 12, rtol=1e-5)
  with pytest.raises(ValueError, match='Unknown LOSS_NORMALIZING_FACTOR'):
    models.normalized_loss(jnp.asarray(packed_logits), packed, 'PER_TOKEN')


def test_output_z_loss_is_added():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 7)) + 4.0,
                       jnp.float32)
  batch = {'decoder_target_tokens': np.array([[2, 3, 1]])}
  plain, _ = models.normalized_loss(logits, batch, None)
  with_z, metrics = models.normalized_loss(logits, batch, None, z_loss=1e-2)
  log_z = jax.nn.logsumexp(logits, -1)
  np.testing.assert_allclose(with_z - plain, 1e-2 * jnp.sum(log_z ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics['z_loss'], with_z - plain, rtol=1e-5)


def test_accuracy_counts_real_targets_at_the_maximum_logit():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(2, 5, 13)).astype(np.float32)
  targets = rng.integers(1, 13, size=(2, 5))
  targets[0, :2] = logits[0, :2].argmax(-1)  # some hits for sure
  targets[1, 3:] = 0  # padding never counts
  batch = {'decoder_target_tokens': targets}
  _, metrics = models.normalized_loss(jnp.asarray(logits), batch, None)
  real = targets > 0
  want = ((logits.argmax(-1) == targets) & real).sum() / real.sum()
  assert 2 <= ((logits.argmax(-1) == targets) & real).sum() < real.sum()
  np.testing.assert_allclose(metrics['accuracy'], want, rtol=1e-6)


def test_learning_rate_schedules():
  const = optim.OptimizerConfig(learning_rate=0.1).learning_rate_fn()
  assert float(const(0)) == float(const(10 ** 6)) == pytest.approx(0.1)
  rsqrt = optim.OptimizerConfig(learning_rate=0.1, schedule='rsqrt',
                                warmup_steps=10).learning_rate_fn()
  assert float(rsqrt(0)) == pytest.approx(0.01)  # linear warmup
  assert float(rsqrt(9)) == pytest.approx(0.1)
  assert float(rsqrt(39)) == pytest.approx(0.05)  # 0.1 * sqrt(10 / 40)
  cosine = optim.OptimizerConfig(learning_rate=0.1, schedule='cosine',
                                 warmup_steps=10,
                                 decay_steps=110).learning_rate_fn()
  assert float(cosine(10)) == pytest.approx(0.1)
  assert float(cosine(60)) == pytest.approx(0.05, rel=1e-3)
  assert float(cosine(110)) == pytest.approx(0.0, abs=1e-7)
  with pytest.raises(ValueError, match='decay_steps'):
    optim.OptimizerConfig(schedule='cosine').learning_rate_fn()
  with pytest.raises(ValueError, match="Unknown learning-rate schedule"):
    optim.OptimizerConfig(schedule='linear').learning_rate_fn()


def test_run_gin_cosine_schedule_reaches_zero_at_train_steps(tmp_path):
  import gin  # pylint: disable=g-import-not-at-top
  from mov_jax import gin_utils  # pylint: disable=g-import-not-at-top
  from mov_jax import train  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  try:
    gin_utils.parse_gin(['runs/demo.gin'], [
        f"MODEL_DIR = '{tmp_path}'", 'TRAIN_STEPS = 110', 'WARMUP_STEPS = 10',
        "LR_SCHEDULE = 'cosine'", 'LEARNING_RATE = 0.1'])
    schedule = train.config_from_gin().optimizer.learning_rate_fn()
  finally:
    gin.clear_config()
  assert float(schedule(10)) == pytest.approx(0.1)
  assert float(schedule(60)) == pytest.approx(0.05, rel=1e-3)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize('name', ['adafactor', 'adamw'])
def test_gradient_accumulation_averages_micro_batches(name):
  params = {'w': jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)),
                             jnp.float32)}
  g1 = {'w': jnp.full((4, 3), 0.5)}
  g2 = {'w': jnp.full((4, 3), -0.1)}
  accumulated = optim.OptimizerConfig(
      name=name, learning_rate=0.1, gradient_accumulation_steps=2).make()
  single = optim.OptimizerConfig(name=name, learning_rate=0.1).make()
  state = accumulated.init(params)
  updates, state = accumulated.update(g1, state, params)
  after_one = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(after_one['w'], params['w'])  # no step yet
  updates, state = accumulated.update(g2, state, after_one)
  after_two = optax.apply_updates(after_one, updates)
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
  ref_updates, _ = single.update(mean, single.init(params), params)
  np.testing.assert_allclose(after_two['w'],
                             optax.apply_updates(params, ref_updates)['w'],
                             rtol=1e-6)


def test_gradient_clipping_is_applied_before_the_optimizer():
  params = {'w': jnp.zeros((3,))}
  big, small = {'w': jnp.array([30.0, 40.0, 0.0])}, {'w': jnp.array(
      [0.3, -0.1, 0.2])}
  clip = optax.clip_by_global_norm(1.0)

  def two_steps(tx, transform=lambda g: g):
    state, p = tx.init(params), params
    for g in (big, small):
      updates, state = tx.update(transform(g), state, p)
      p = optax.apply_updates(p, updates)
    return p['w']

  clipped_tx = optim.OptimizerConfig(name='adamw', learning_rate=0.1,
                                     clip_grad_norm=1.0).make()
  plain_tx = optim.OptimizerConfig(name='adamw', learning_rate=0.1).make()
  manual = two_steps(plain_tx,
                     lambda g: clip.update(g, optax.EmptyState())[0])
  np.testing.assert_allclose(two_steps(clipped_tx), manual, rtol=1e-6)
  # Adam's second moment remembers the unclipped gradient: results differ.
  assert not np.allclose(two_steps(plain_tx), manual, rtol=1e-3)
  with pytest.raises(ValueError, match='Unknown optimizer'):
    optim.OptimizerConfig(name='sgd').make()
