"""Rank-classification scoring (tiled and encode-once) and cached decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mov_jax import decoding
from mov_jax import gin_utils
from mov_jax import models
from mov_jax import scoring

VOCAB = 101
SEQUENCE_ROUTING = ["routing.RouterConfig.granularity = 'sequence'"]
MODELS = {
    'base': (None, []),
    'mov': ('mov', ['NUM_EXPERTS = 4']),
    'mov_sequence_routing': ('mov', ['NUM_EXPERTS = 4'] + SEQUENCE_ROUTING),
}


@functools.lru_cache(maxsize=None)
def _model(name):
  """The tiny T5 (optionally with MoV) and random, non-trivial parameters.

  Every weight is perturbed, MoV experts differ and routers are confident,
  so routing (per token or per sequence) changes the scores.
  """
  import gin  # pylint: disable=g-import-not-at-top
  method, bindings = MODELS[name]
  files = ['models/t5_1_1_tiny.gin'] + ([f'methods/{method}.gin'] if method
                                        else [])
  gin_utils.parse_gin(files, [f'NUM_EMBEDDINGS = {VOCAB}'] + bindings,
                      finalize=False)
  net = gin_utils.macro_value('NETWORK')
  gin.clear_config(clear_constants=True)
  tokens = jnp.ones((1, 4), jnp.int32)
  params = net.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                    enable_dropout=False)['params']
  rng = np.random.default_rng(1)
  flat = traverse_util.flatten_dict(params, sep='/')
  for path, value in flat.items():
    if path.endswith('mov_scaling'):
      flat[path] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
    elif path.endswith('router/kernel'):
      flat[path] = rng.normal(0, 2.0, value.shape).astype(np.float32)
    else:
      flat[path] = value + rng.normal(0, 0.05, value.shape).astype(np.float32)
  return net, traverse_util.unflatten_dict(flat, sep='/')


def _choice_batch(seed=0):
  """4 examples with 2..5 choices of uneven lengths, inputs unevenly padded."""
  rng = np.random.default_rng(seed)
  num_choices, in_len, tgt_len = [2, 5, 3, 4], 13, 7
  inputs = rng.integers(2, VOCAB, size=(4, in_len))
  inputs[np.arange(in_len) >= np.array([13, 6, 9, 3])[:, None]] = 0
  targets = np.zeros((4, 5, tgt_len), np.int64)
  for ex, n in enumerate(num_choices):
    for choice in range(n):
      length = rng.integers(1, tgt_len)  # then EOS
      targets[ex, choice, :length] = rng.integers(2, VOCAB, size=length)
      targets[ex, choice, length] = 1
  mask = np.arange(5) < np.array(num_choices)[:, None]
  return inputs.astype(np.int32), targets.astype(np.int32), mask


def _tiled(inputs, targets, mask):
  """One row per (example, choice), in a shuffled order, as P3 score-eval."""
  ex, choice = np.nonzero(mask)
  order = np.random.default_rng(7).permutation(len(ex))
  ex, choice = ex[order], choice[order]
  tgt = jnp.asarray(targets[ex, choice])
  batch = {'encoder_input_tokens': jnp.asarray(inputs[ex]),
           'decoder_input_tokens': models.shift_right(tgt),
           'decoder_target_tokens': tgt}
  return ex, choice, batch


@functools.lru_cache(maxsize=None)
def _scores(name):
  """Tiled and encode-once scores of `_choice_batch()`, one jit per model.

  Length-normalised too for the base model (one more compile is enough).
  """
  net, params = _model(name)
  inputs, targets, mask = _choice_batch()
  ex, choice, tiled = _tiled(inputs, targets, mask)

  def score(params, tiled, inputs, targets):
    out = {}
    for norm in (False, True) if name == 'base' else (False,):
      out['tiled', norm] = scoring.score_batch(net, params, tiled,
                                               length_normalize=norm)
      out['once', norm] = scoring.score_choices(net, params, inputs, targets,
                                                length_normalize=norm)
    return out

  out = jax.jit(score)(params, tiled, inputs, targets)
  return {k: np.asarray(v) for k, v in out.items()}, (ex, choice, tiled)


@pytest.mark.parametrize('name', list(MODELS))
def test_encode_once_scores_equal_tiled_scores(name):
  scores, (ex, choice, tiled) = _scores(name)
  inputs, targets, mask = _choice_batch()
  for kind, norm in scores:
    if kind == 'tiled':
      continue
    once, rows = scores['once', norm], scores['tiled', norm]
    assert once.shape == (4, 5)
    assert np.all(np.isneginf(once[~mask]))
    np.testing.assert_allclose(once[ex, choice], rows, atol=1e-5, rtol=0)
    assert np.ptp(rows) > 0.5  # Scores differ: the comparison has teeth.
  # The host-side grouping of tiled rows gives back the choice layout.
  grouped = scoring.choices_from_rows(
      ex, choice, tiled['encoder_input_tokens'], tiled['decoder_target_tokens'],
      num_choices=5)
  np.testing.assert_array_equal(grouped['encoder_input_tokens'], inputs)
  np.testing.assert_array_equal(grouped['choice_targets'], targets)
  np.testing.assert_array_equal(grouped['choice_mask'], mask)


def test_routing_granularity_changes_the_scores():
  # Same weights, per-token vs per-sequence routing: different scores, so the
  # encode-once equality above does exercise sequence-level token masks.
  _, _, mask = _choice_batch()
  token = _scores('mov')[0]['once', False][mask]
  sequence = _scores('mov_sequence_routing')[0]['once', False][mask]
  assert np.abs(token - sequence).max() > 1e-3


def test_score_batch_is_the_summed_log_softmax_of_the_targets():
  net, params = _model('mov')
  inputs, targets, mask = _choice_batch(seed=2)
  _, _, batch = _tiled(inputs, targets, mask)
  tgt = np.asarray(batch['decoder_target_tokens'])
  weights = np.random.default_rng(3).uniform(size=tgt.shape) * (tgt > 0)

  @jax.jit
  def run(params, batch, weights):
    weighted = dict(batch, decoder_loss_weights=weights)
    return (net.apply({'params': params}, **batch, enable_dropout=False),
            scoring.score_batch(net, params, batch),
            scoring.score_batch(net, params, weighted),
            scoring.score_batch(net, params, batch, length_normalize=True))

  logits, plain, weighted, normalized = run(
      params, batch, jnp.asarray(weights, jnp.float32))
  logits = np.asarray(logits, np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token = np.take_along_axis(log_probs, tgt[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(plain, (token * (tgt > 0)).sum(-1), atol=1e-4,
                             rtol=1e-6)
  # decoder_loss_weights, when present, replace `targets > 0`.
  np.testing.assert_allclose(weighted, (token * weights).sum(-1), atol=1e-4,
                             rtol=1e-6)
  np.testing.assert_allclose(
      normalized, (token * (tgt > 0)).sum(-1) / (tgt > 0).sum(-1), atol=1e-5,
      rtol=1e-6)


def test_choices_from_rows_rejects_inconsistent_rows():
  inputs = np.array([[5, 6, 1], [5, 7, 1]])
  targets = np.array([[3, 1], [4, 1]])
  with pytest.raises(ValueError, match='different inputs'):
    scoring.choices_from_rows([0, 0], [0, 1], inputs, targets)
  with pytest.raises(ValueError, match='twice'):
    scoring.choices_from_rows([0, 0], [1, 1], inputs[[0, 0]], targets)


# ---------------------------------------------------------------------------
# Decoding.
# ---------------------------------------------------------------------------

MAX_LEN = 9


def _prompts(seed=4):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, VOCAB, size=(5, 11))
  tokens[np.arange(11) >= np.array([11, 4, 8, 2, 10])[:, None]] = 0
  return jnp.asarray(tokens, jnp.int32)


@functools.lru_cache(maxsize=None)
def _decoder_model():
  """The tiny MoV model with EOS made likely, so some rows stop early."""
  net, params = _model('mov')
  kernel = np.array(params['decoder']['logits_dense']['kernel'])
  kernel[:, 1] *= 4.0
  params = jax.tree_util.tree_map(lambda x: x, params)
  params['decoder']['logits_dense']['kernel'] = jnp.asarray(kernel)
  return net, params


@functools.lru_cache(maxsize=None)
def _compiled(method, **static):
  """Jitted `predict_batch`; rng, temperature and alpha are traced."""
  net, _ = _decoder_model()

  def predict(params, prompts, rng, temperature, alpha):
    return decoding.predict_batch(net, params, prompts, MAX_LEN, method,
                                  rng=rng, temperature=temperature,
                                  alpha=alpha, **static)

  return jax.jit(predict)


def _predict(method, seed=0, temperature=1.0, alpha=0.0, **static):
  """Decodes `_prompts()`; `seed` makes the sampling rng."""
  _, params = _decoder_model()
  tokens, scores = _compiled(method, **static)(
      params, _prompts(), jax.random.PRNGKey(seed), temperature, alpha)
  return np.asarray(tokens), np.asarray(scores)


def _decoded_positions(tokens):
  """True up to and including the first EOS (everything without one)."""
  eos = tokens == decoding.EOS_ID
  return np.cumsum(eos, axis=-1) - eos == 0


@jax.jit
def _teacher_forcing(params, targets, valid):
  """Logits and log-likelihoods of decoded `targets` (scored where `valid`).

  Decoding may emit the pad id 0 (an untrained model does); the network reads
  decoder_target_tokens only as a mask, so it gets 2 where `valid`.
  """
  net, _ = _decoder_model()
  batch = {'encoder_input_tokens': _prompts(),
           'decoder_input_tokens': models.shift_right(targets),
           'decoder_target_tokens': jnp.where(valid, 2, 0)}
  logits = net.apply({'params': params}, **batch, enable_dropout=False)
  return logits, scoring.sequence_scores(logits, targets, valid)


def _teacher_forced(tokens):
  _, params = _decoder_model()
  logits, scores = _teacher_forcing(params, jnp.asarray(tokens),
                                    jnp.asarray(_decoded_positions(tokens)))
  return np.asarray(logits), np.asarray(scores)


def _check_padding(tokens):
  assert (tokens[~_decoded_positions(tokens)] == 0).all()  # 0 after EOS


def test_greedy_decoding_is_the_argmax_of_teacher_forcing():
  tokens, scores = _predict('greedy')
  _check_padding(tokens)
  ended = (tokens == decoding.EOS_ID).any(-1)
  assert ended.any() and not ended.all()  # both cases covered
  logits, tf_scores = _teacher_forced(tokens)
  valid = _decoded_positions(tokens)
  np.testing.assert_array_equal(logits.argmax(-1)[valid], tokens[valid])
  np.testing.assert_allclose(scores, tf_scores, atol=1e-4)


def test_beam_search_of_size_one_is_greedy_or_an_earlier_eos():
  """Beam size 1 keeps greedy's path alive. Like t5x it also keeps the best
  finished hypothesis among each step's 2 candidates, so it returns greedy's
  sequence, or a prefix of it ended by EOS as the runner-up token when that
  is more likely than the whole greedy sequence."""
  greedy, greedy_scores = _predict('greedy')
  tokens, scores = _predict('beam', beam_size=1)
  _check_padding(tokens)
  logits, _ = _teacher_forced(greedy)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = _decoded_positions(greedy)
  chosen = np.take_along_axis(log_probs, greedy[..., None], -1)[..., 0]
  before = np.cumsum(chosen * valid, -1) - chosen * valid
  eos = decoding.EOS_ID
  eos_second = (logits > logits[..., eos:eos + 1]).sum(-1) == 1
  early = np.where(valid & eos_second, before + log_probs[..., eos], -np.inf)
  np.testing.assert_allclose(scores, np.maximum(greedy_scores, early.max(-1)),
                             atol=1e-4)
  expected = greedy.copy()
  for row, step in enumerate(early.argmax(-1)):
    if early[row, step] > greedy_scores[row]:
      expected[row, step:] = 0
      expected[row, step] = eos
  np.testing.assert_array_equal(tokens, expected)
  assert (tokens == greedy).all(-1).sum() >= 3  # mostly plain greedy
  assert (tokens != greedy).any()  # but the early-EOS case is covered


def test_beam_search_finds_sequences_at_least_as_likely_as_greedy():
  _, greedy_scores = _predict('greedy')
  tokens, scores = _predict('beam', beam_size=4, return_all_beams=True)
  assert tokens.shape == (5, 4, MAX_LEN) and scores.shape == (5, 4)
  assert (np.diff(scores, axis=1) <= 0).all()  # best first
  assert (scores[:, 0] >= greedy_scores - 1e-5).all()
  assert (scores[:, 0] > greedy_scores + 1e-3).any()  # and sometimes better
  for beam in range(4):
    _check_padding(tokens[:, beam])
    # With alpha = 0 a beam's score is its log-likelihood.
    np.testing.assert_allclose(_teacher_forced(tokens[:, beam])[1],
                               scores[:, beam], atol=1e-4)
  # The length penalty (alpha > 0) divides the log-likelihood.
  tokens, scores = _predict('beam', beam_size=4, alpha=0.6,
                            return_all_beams=True)
  lengths = _decoded_positions(tokens[:, 0]).sum(-1)
  np.testing.assert_allclose(
      scores[:, 0] * decoding.brevity_penalty(0.6, lengths),
      _teacher_forced(tokens[:, 0])[1], atol=1e-4)


def test_sampling_limits_and_reproducibility():
  greedy, _ = _predict('greedy')
  for kwargs in ({'top_k': 1}, {'temperature': 1e-4}, {'temperature': 0.0}):
    np.testing.assert_array_equal(_predict('sample', seed=3, **kwargs)[0],
                                  greedy)
  tokens, scores = _predict('sample', seed=3, temperature=1.5)
  again, _ = _predict('sample', seed=3, temperature=1.5)
  other, _ = _predict('sample', seed=4, temperature=1.5)
  np.testing.assert_array_equal(tokens, again)
  assert not np.array_equal(tokens, other)
  assert not np.array_equal(tokens, greedy)
  _check_padding(tokens)
  # Scores are log-likelihoods at temperature 1, whatever the sampling.
  np.testing.assert_allclose(scores, _teacher_forced(tokens)[1], atol=1e-4)
  top_k, _ = _predict('sample', seed=3, temperature=1.5, top_k=3)
  logits, _ = _teacher_forced(top_k)
  ranks = (logits > np.take_along_axis(logits, top_k[..., None], -1)).sum(-1)
  assert (ranks[_decoded_positions(top_k)] < 3).all()
  assert (ranks[_decoded_positions(top_k)] > 0).any()


def test_unknown_method_and_missing_rng_are_errors():
  net, params = _model('base')
  with pytest.raises(ValueError, match='needs an rng'):
    decoding.predict_batch(net, params, _prompts(), 4, method='sample')
  with pytest.raises(ValueError, match='Unknown decoding method'):
    decoding.predict_batch(net, params, _prompts(), 4, method='nucleus')
