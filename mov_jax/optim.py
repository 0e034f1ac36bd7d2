"""Which parameters train, and how: trainable regexes and the optimizer.

Each method's gin file names its trainable parameters (`TRAINABLE_REGEX`, a
list of regexes fully matched against paths such as
`encoder/layers_0/attention/key_adapter/mov_scaling`). The train step
differentiates only the trainable subtree and the optimizer keeps state only
for it, so frozen weights cost neither gradient memory nor optimizer state.
"""

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax.numpy as jnp
import optax
from flax import traverse_util

Params = Mapping[str, Any]


def _compile(regexes: Union[str, Sequence[str]]):
  if isinstance(regexes, str):
    regexes = [regexes]
  if not regexes:
    raise ValueError('TRAINABLE_REGEX is empty: name at least one regex '
                     "(e.g. '.*_adapter/.*' for adapters, '.*' for all).")
  compiled = []
  for pattern in regexes:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f'TRAINABLE_REGEX entry {pattern!r} is not a valid '
                       f'regex: {e}.') from e
  return compiled


def trainable_path_set(params: Params,
                       regexes: Union[str, Sequence[str]]) -> set:
  """Slash-joined paths of the parameters that some regex fully matches.

  Raises ValueError if a regex matches nothing (a typo would otherwise
  silently freeze the whole model) or if nothing is trainable.
  """
  compiled = _compile(regexes)
  paths = list(traverse_util.flatten_dict(dict(params), sep='/'))
  trainable = set()
  for rx in compiled:
    hits = {p for p in paths if rx.fullmatch(p)}
    if not hits:
      example = paths[0] if paths else '(no parameters)'
      raise ValueError(
          f'TRAINABLE_REGEX entry {rx.pattern!r} matches no parameter. Paths '
          f'look like {example!r}; did the method gin file (which adds the '
          'adapters) come after the model gin file?')
    trainable |= hits
  return trainable


def split_trainable(params: Params, regexes: Union[str, Sequence[str]]
                    ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Splits a nested parameter dict into (trainable, frozen) nested dicts."""
  trainable_paths = trainable_path_set(params, regexes)
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  trainable = {k: v for k, v in flat.items() if k in trainable_paths}
  frozen = {k: v for k, v in flat.items() if k not in trainable_paths}
  return (traverse_util.unflatten_dict(trainable, sep='/'),
          traverse_util.unflatten_dict(frozen, sep='/'))


def merge_params(trainable: Params, frozen: Params) -> Dict[str, Any]:
  """Inverse of `split_trainable`: one nested dict holding both parts."""
  flat = traverse_util.flatten_dict(dict(frozen), sep='/')
  for path, value in traverse_util.flatten_dict(dict(trainable),
                                                sep='/').items():
    if path in flat:
      raise ValueError(f'Parameter {path} is both trainable and frozen.')
    flat[path] = value
  return traverse_util.unflatten_dict(flat, sep='/')


# --------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """The optimizer of the trainable subtree (gin: `optim.OptimizerConfig`).

  Attributes:
    name: 'adafactor' (t5x-style: factored second moments, decay 0.8,
      update clipping 1.0, parameter-scale relative steps) or 'adamw'.
    learning_rate: peak learning rate.
    schedule: 'constant', 'rsqrt' (linear warmup, then lr * sqrt(warmup /
      step)) or 'cosine' (linear warmup, cosine decay to 0 at decay_steps).
    warmup_steps: linear warmup length (0: none).
    decay_steps: end of the cosine decay (required for 'cosine').
    decay_rate: Adafactor's second-moment decay exponent.
    multiply_by_parameter_scale: Adafactor's relative step size.
    weight_decay: AdamW's decoupled weight decay.
    clip_grad_norm: clip gradients to this global norm (None: no clipping).
    gradient_accumulation_steps: average gradients over this many
      micro-batches before one update (optax.MultiSteps).
  """
  name: str = 'adafactor'
  learning_rate: float = 3e-4
  schedule: str = 'constant'
  warmup_steps: int = 0
  decay_steps: Optional[int] = None
  decay_rate: float = 0.8
  multiply_by_parameter_scale: bool = True
  weight_decay: float = 0.0
  clip_grad_norm: Optional[float] = None
  gradient_accumulation_steps: int = 1

  def learning_rate_fn(self) -> optax.Schedule:
    lr, warmup = self.learning_rate, self.warmup_steps
    if self.schedule == 'constant':
      if not warmup:
        return optax.constant_schedule(lr)
      return optax.linear_schedule(0.0, lr, warmup)
    if self.schedule == 'rsqrt':
      def rsqrt(step):
        step = jnp.asarray(step, jnp.float32)
        w = max(warmup, 1)
        ramp = jnp.minimum(1.0, (step + 1.0) / w) if warmup else 1.0
        return lr * ramp * jnp.sqrt(w / jnp.maximum(step + 1.0, w))
      return rsqrt
    if self.schedule == 'cosine':
      if not self.decay_steps or self.decay_steps <= warmup:
        raise ValueError(
            'The cosine schedule needs decay_steps > warmup_steps, got '
            f'decay_steps={self.decay_steps}, warmup_steps={warmup} (set '
            'optim.OptimizerConfig.decay_steps; runs/finetune.gin sets it '
            'to TRAIN_STEPS).')
      return optax.warmup_cosine_decay_schedule(0.0, lr, warmup,
                                                self.decay_steps)
    raise ValueError(f'Unknown learning-rate schedule {self.schedule!r}: use '
                     "'constant', 'rsqrt' or 'cosine'.")

  def make(self) -> optax.GradientTransformation:
    schedule = self.learning_rate_fn()
    if self.name == 'adafactor':
      core = optax.adafactor(
          learning_rate=schedule, decay_rate=self.decay_rate,
          decay_offset=0, multiply_by_parameter_scale=(
              self.multiply_by_parameter_scale),
          clipping_threshold=1.0, factored=True, min_dim_size_to_factor=128)
    elif self.name == 'adamw':
      core = optax.adamw(schedule, weight_decay=self.weight_decay)
    else:
      raise ValueError(f'Unknown optimizer {self.name!r}: use "adafactor" or '
                       '"adamw".')
    chain = [core]
    if self.clip_grad_norm:
      chain.insert(0, optax.clip_by_global_norm(self.clip_grad_norm))
    tx = optax.chain(*chain) if len(chain) > 1 else core
    if self.gradient_accumulation_steps > 1:
      tx = optax.MultiSteps(tx, self.gradient_accumulation_steps)
    return tx
