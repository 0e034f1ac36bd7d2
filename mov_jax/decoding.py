"""Autoregressive decoding with the key/value cache: greedy, sampling, beam.

All three run the encoder once and then the decoder one position per step
(`Transformer.decode(..., decode=True)` with the `cache` collection), inside
`jax.lax.while_loop`, so `predict_batch` jits as a whole and stops as soon as
every row (or every beam search) is done. Conventions follow t5x: decoding
starts from BOS = 0 (the pad id), stops at EOS (id 1, kept in the output),
and pads after EOS with 0. Scores are log-likelihoods under the model at
temperature 1 (beam search: divided by t5x's length penalty), so they compare
with `scoring.score_batch` on the decoded tokens.
"""

from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mov_jax import layers
from mov_jax import scoring

Array = jax.Array
PyTree = Any

EOS_ID = 1
# Large but finite, as t5x: -inf would turn `-inf - -inf` into NaN.
NEG_INF = -1.0e7
# Sampling at or below this temperature is greedy (t5x's threshold).
MIN_TEMPERATURE = 1e-4


def init_cache(network, params: PyTree, encoder_input_tokens: Array,
               max_decode_length: int) -> PyTree:
  """A zeroed key/value cache for `[batch, max_decode_length]` decoding.

  As t5x: `__call__` with `decode=True` and `cache` mutable on full-length
  dummy decoder inputs creates the cache variables; they are then zeroed
  (`cache_index` = 0). Only shapes are needed, so the call is traced with
  `jax.eval_shape` and nothing is computed.
  """
  batch = encoder_input_tokens.shape[0]
  dummy = jnp.ones((batch, max_decode_length), jnp.int32)

  def create(params, tokens):
    _, variables = network.apply({'params': params}, tokens, dummy, dummy,
                                 decode=True, enable_dropout=False,
                                 mutable=['cache'])
    return variables['cache']

  shapes = jax.eval_shape(create, params, encoder_input_tokens)
  return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _step_logits(network, params, cache, encoded, encoder_input_tokens,
                 tokens, max_decode_length) -> Tuple[Array, PyTree]:
  """One decoder position: logits `[rows, vocab]` for `tokens [rows]`."""
  tokens = tokens[:, None]
  logits, variables = network.apply(
      {'params': params, 'cache': cache}, encoded, encoder_input_tokens,
      tokens, tokens, enable_dropout=False, decode=True,
      max_decode_length=max_decode_length, mutable=['cache'],
      method=network.decode)
  return logits[:, 0], variables['cache']


def _encode(network, params, encoder_input_tokens) -> Array:
  return network.apply({'params': params}, encoder_input_tokens,
                       enable_dropout=False, method=network.encode)


def _top_k_logits(logits: Array, top_k: Optional[int]) -> Array:
  """Keeps the `top_k` largest logits per row, the rest NEG_INF."""
  if top_k is None or top_k >= logits.shape[-1]:
    return logits
  kth = lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, NEG_INF)


def sample_decode(network, params: PyTree, encoder_input_tokens: Array,
                  max_decode_length: int, *, rng: Optional[Array] = None,
                  temperature: float = 1.0, top_k: Optional[int] = None,
                  eos_id: int = EOS_ID) -> Tuple[Array, Array]:
  """Greedy (`rng=None`) or temperature / top-k sampling.

  As t5x, a temperature at or below `MIN_TEMPERATURE` (it may be a traced
  value) means greedy. Returns tokens `[B, max_decode_length]` (EOS kept, 0
  after it) and the log-likelihood `[B]` of each sequence at temperature 1,
  EOS included.
  """
  greedy = rng is None
  if greedy:
    rng = jax.random.PRNGKey(0)  # unused; keeps one loop state layout
  batch = encoder_input_tokens.shape[0]
  encoded = _encode(network, params, encoder_input_tokens)
  cache = init_cache(network, params, encoder_input_tokens, max_decode_length)
  # Position 0 holds BOS; the decoded tokens fill positions 1..L.
  tokens = jnp.zeros((batch, max_decode_length + 1), jnp.int32)
  done = jnp.zeros((batch,), bool)
  log_likelihood = jnp.zeros((batch,), jnp.float32)

  def cond(state):
    step, _, done, _, _, _ = state
    return (step < max_decode_length) & ~jnp.all(done)

  def body(state):
    step, tokens, done, log_likelihood, cache, rng = state
    logits, cache = _step_logits(network, params, cache, encoded,
                                 encoder_input_tokens, tokens[:, step],
                                 max_decode_length)
    rng, step_rng = jax.random.split(rng)
    next_token = jnp.argmax(logits, axis=-1)
    if not greedy:
      scaled = logits / jnp.maximum(temperature, MIN_TEMPERATURE)
      sampled = jax.random.categorical(
          step_rng, _top_k_logits(scaled, top_k), axis=-1)
      next_token = jnp.where(temperature > MIN_TEMPERATURE, sampled,
                             next_token)
    next_token = jnp.where(done, 0, next_token).astype(jnp.int32)
    token_log_prob = jnp.take_along_axis(
        jax.nn.log_softmax(logits), next_token[:, None], axis=-1)[:, 0]
    log_likelihood += jnp.where(done, 0.0, token_log_prob)
    tokens = lax.dynamic_update_slice(tokens, next_token[:, None],
                                      (0, step + 1))
    done = done | (next_token == eos_id)
    return step + 1, tokens, done, log_likelihood, cache, rng

  state = (jnp.array(0, jnp.int32), tokens, done, log_likelihood, cache, rng)
  _, tokens, _, log_likelihood, _, _ = lax.while_loop(cond, body, state)
  return tokens[:, 1:], log_likelihood


def brevity_penalty(alpha: float, length: Array) -> Array:
  """t5x's length penalty `((5 + length) / 6) ** alpha` (GNMT)."""
  return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def _gather_beams(x: Array, beam_indices: Array) -> Array:
  """`x [B, K_old, ...]`, `beam_indices [B, K_new]` -> `[B, K_new, ...]`."""
  index = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _gather_cache(cache: PyTree, beam_indices: Array) -> PyTree:
  """Reorders the flattened `[B * K, ...]` cache to follow the kept beams."""
  batch, beams = beam_indices.shape

  def gather(x):
    if x.ndim == 0:  # cache_index: shared by every row
      return x
    x = x.reshape((batch, beams) + x.shape[1:])
    x = _gather_beams(x, beam_indices)
    return x.reshape((batch * beams,) + x.shape[2:])

  return jax.tree_util.tree_map(gather, cache)


def _top_beams(scores: Array, k: int, *arrays: Array):
  """The `k` best entries of `scores [B, N]` and of each `[B, N, ...]` array."""
  top_scores, indices = lax.top_k(scores, k)
  return (top_scores, indices) + tuple(_gather_beams(a, indices)
                                       for a in arrays)


def beam_search(network, params: PyTree, encoder_input_tokens: Array,
                max_decode_length: int, *, beam_size: int = 4,
                alpha: float = 0.6, eos_id: int = EOS_ID
                ) -> Tuple[Array, Array]:
  """Beam search as t5x's: `2 * beam_size` candidates per step, finished
  (EOS) candidates scored `log_prob / brevity_penalty(alpha, length)`.

  A beam that reaches `max_decode_length` without EOS finishes there. The
  search stops once no alive beam can beat the worst kept finished one.
  Returns tokens `[B, K, max_decode_length]` and scores `[B, K]`, best first
  (with `alpha=0` the scores are plain log-likelihoods).
  """
  batch = encoder_input_tokens.shape[0]
  rows = batch * beam_size
  length = max_decode_length
  flat_inputs = scoring.repeat_rows(encoder_input_tokens, beam_size,
                                    ('batch', 'length'))
  encoded = scoring.repeat_rows(
      _encode(network, params, encoder_input_tokens), beam_size,
      layers.ACT_EMBED)
  cache = init_cache(network, params, flat_inputs, length)
  # Every beam starts as BOS; only the first is alive, so step one expands a
  # single hypothesis instead of K copies of it.
  alive_seqs = jnp.zeros((batch, beam_size, length + 1), jnp.int32)
  alive_log_probs = jnp.tile(
      jnp.array([0.0] + [NEG_INF] * (beam_size - 1), jnp.float32), (batch, 1))
  finished_seqs = jnp.zeros_like(alive_seqs)
  finished_scores = jnp.full((batch, beam_size), NEG_INF, jnp.float32)
  finished_flags = jnp.zeros((batch, beam_size), bool)
  best_possible_penalty = brevity_penalty(alpha, length)

  def cond(state):
    step, _, alive_log_probs, _, finished_scores, finished_flags, _ = state
    # Log-probabilities only fall, and the penalty grows at most to that of
    # the full length: an upper bound on what an alive beam can still score.
    best_alive = jnp.max(alive_log_probs, axis=1) / best_possible_penalty
    worst_finished = jnp.where(jnp.all(finished_flags, axis=1),
                               jnp.min(finished_scores, axis=1), NEG_INF)
    return (step < length) & ~jnp.all(worst_finished >= best_alive)

  def body(state):
    (step, alive_seqs, alive_log_probs, finished_seqs, finished_scores,
     finished_flags, cache) = state
    logits, cache = _step_logits(
        network, params, cache, encoded, flat_inputs,
        alive_seqs[:, :, step].reshape(rows), length)
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits).reshape(batch, beam_size, vocab)
    candidates = (alive_log_probs[:, :, None] + log_probs).reshape(
        batch, beam_size * vocab)
    # 2K candidates: even if K of them end in EOS, K stay alive.
    cand_log_probs, cand_index = lax.top_k(candidates, 2 * beam_size)
    cand_beams = cand_index // vocab
    cand_tokens = (cand_index % vocab).astype(jnp.int32)
    cand_seqs = _gather_beams(alive_seqs, cand_beams)
    cand_seqs = lax.dynamic_update_slice(cand_seqs, cand_tokens[:, :, None],
                                         (0, 0, step + 1))
    ends = (cand_tokens == eos_id) | (step + 1 == length)

    alive_log_probs, _, alive_seqs, alive_beams = _top_beams(
        jnp.where(ends, NEG_INF, cand_log_probs), beam_size, cand_seqs,
        cand_beams)
    cache = _gather_cache(cache, alive_beams)

    new_scores = cand_log_probs / brevity_penalty(alpha, step + 1)
    new_scores = jnp.where(ends, new_scores, NEG_INF)
    finished_scores, _, finished_seqs, finished_flags = _top_beams(
        jnp.concatenate([finished_scores, new_scores], axis=1), beam_size,
        jnp.concatenate([finished_seqs, cand_seqs], axis=1),
        jnp.concatenate([finished_flags, ends], axis=1))
    return (step + 1, alive_seqs, alive_log_probs, finished_seqs,
            finished_scores, finished_flags, cache)

  state = (jnp.array(0, jnp.int32), alive_seqs, alive_log_probs,
           finished_seqs, finished_scores, finished_flags, cache)
  (_, alive_seqs, alive_log_probs, finished_seqs, finished_scores,
   finished_flags, _) = lax.while_loop(cond, body, state)
  # Finished beams are sorted best first; an example whose every slot is
  # still empty (impossible once max length is reached) falls back to alive.
  some = jnp.any(finished_flags, axis=1)
  seqs = jnp.where(some[:, None, None], finished_seqs, alive_seqs)
  scores = jnp.where(some[:, None], finished_scores, alive_log_probs)
  return seqs[:, :, 1:], scores


def predict_batch(network, params: PyTree, encoder_input_tokens: Array,
                  max_decode_length: int, method: str = 'greedy', *,
                  rng: Optional[Array] = None, temperature: float = 1.0,
                  top_k: Optional[int] = None, beam_size: int = 4,
                  alpha: float = 0.6, eos_id: int = EOS_ID,
                  return_all_beams: bool = False) -> Tuple[Array, Array]:
  """Decodes `encoder_input_tokens [B, L_in]`; returns `(tokens, scores)`.

  `method`: 'greedy' (argmax), 'sample' (needs `rng`; `temperature`,
  optional `top_k`) or 'beam' (`beam_size`, length penalty `alpha`). Tokens
  are `[B, max_decode_length]` (`[B, K, L]` with `return_all_beams`), EOS
  kept and 0 after it; scores `[B]` (`[B, K]`) as described in the module
  docstring. Jit with `method`, lengths and sizes static, e.g.
  `jax.jit(functools.partial(predict_batch, net, max_decode_length=32))`.
  """
  if method == 'greedy':
    return sample_decode(network, params, encoder_input_tokens,
                         max_decode_length, eos_id=eos_id)
  if method == 'sample':
    if rng is None:
      raise ValueError("method='sample' needs an rng (jax.random.PRNGKey).")
    return sample_decode(network, params, encoder_input_tokens,
                         max_decode_length, rng=rng, temperature=temperature,
                         top_k=top_k, eos_id=eos_id)
  if method == 'beam':
    tokens, scores = beam_search(network, params, encoder_input_tokens,
                                 max_decode_length, beam_size=beam_size,
                                 alpha=alpha, eos_id=eos_id)
    if return_all_beams:
      return tokens, scores
    return tokens[:, 0], scores[:, 0]
  raise ValueError(f"Unknown decoding method {method!r}: use 'greedy', "
                   "'sample' or 'beam'.")

