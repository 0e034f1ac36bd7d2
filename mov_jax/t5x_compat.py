"""Small callables that let `gin/t5x/*.gin` run under the real t5x binaries.

`python -m t5x.train` / `python -m t5x.eval` build everything from gin; what
t5x cannot express in gin alone lives here:

* `t5x_module(network)`: the `mov_jax.network.Transformer` built by a
  `gin/models/` file, as the module of t5x's `EncoderDecoderModel`: its
  `init` returns parameters (and their axes) but not the routers' side
  outputs (`aux_loss`), which t5x would otherwise treat as model state to
  partition and checkpoint.
* `trainable_filter(regexes)`: the `filter_fn` of the
  `flax.traverse_util.ModelParamTraversal` that t5x's
  `optimizers.MultiOptimizer` uses to freeze everything but the adapters;
  regexes are fully matched against slash-joined parameter paths, exactly as
  `mov_jax.optim` matches `TRAINABLE_REGEX`.
* `logical_factor_rules(additional_rules)`: t5x Adafactor's standard
  factorisation rules plus rules for the logical axes our adapters add
  (`expert`, `rank`, `unmodeled`); without them Adafactor raises
  `KeyError: 'expert'`.
* `p3_task(name, ...)`: registers the P3 / T0 / mini-P3 SeqIO tasks for a
  P3 copy named in gin (or by the environment variable P3_DATA_DIR) and
  returns `name`, for `MIXTURE_OR_TASK_NAME = @t5x_compat.p3_task()`.

t5x is imported lazily, only by `logical_factor_rules`, so this module (and
every gin file that names it) loads without t5x installed.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from flax import linen as nn

from mov_jax import network as network_lib
from mov_jax import optim

# Collections modules only sow into (statistics, auxiliary losses): never
# model state, so never part of what t5x initialises, shards and saves.
SIDE_OUTPUT_COLLECTIONS = ('intermediates', 'aux_loss')


class T5xTransformer(network_lib.Transformer):
  """`network.Transformer` whose `init` leaves out side-output collections.

  t5x's `EncoderDecoderModel.get_initial_variables` calls `module.init`
  (which by default keeps every collection but `intermediates`) and treats
  whatever is not `params` as mutable state needing logical axes; the
  routers' sown `aux_loss` has none. Training and decoding are unchanged:
  t5x applies the module without `aux_loss` mutable, so nothing is sown.
  """

  def init(self, *args, **kwargs):
    kwargs.setdefault('mutable', nn.DenyList(SIDE_OUTPUT_COLLECTIONS))
    return super().init(*args, **kwargs)


def t5x_module(network: network_lib.Transformer) -> T5xTransformer:
  """`network` (e.g. gin's `%NETWORK`) as a `T5xTransformer`: the same
  configuration, parameter paths and module contract."""
  if not isinstance(network, network_lib.Transformer):
    raise TypeError('t5x_module expects a mov_jax.network.Transformer (the '
                    f'NETWORK macro of a gin/models/ file), got {network!r}.')
  fields = {f.name: getattr(network, f.name)
            for f in dataclasses.fields(network_lib.Transformer)
            if f.init and f.name not in ('parent', 'name')}
  return T5xTransformer(**fields)


def trainable_filter(regexes: Union[str, Sequence[str]]
                     ) -> Callable[[str, Any], bool]:
  """`filter_fn(path, value)` selecting parameters some regex fully matches.

  flax's `ModelParamTraversal` passes paths with a leading slash
  (`/encoder/layers_0/attention/key_adapter/mov_scaling`); it is stripped so
  the regexes are those of the method gin files (`TRAINABLE_REGEX`).
  """
  compiled = optim._compile(regexes)  # pylint: disable=protected-access

  def filter_fn(path: str, value: Any) -> bool:
    del value
    path = path.lstrip('/')
    return any(rx.fullmatch(path) for rx in compiled)

  return filter_fn


def logical_factor_rules(
    additional_rules: Optional[Mapping[str, Any]] = None) -> Mapping[str, Any]:
  """`adafactor.standard_logical_factor_rules()` plus `additional_rules`.

  `additional_rules` maps logical axis names to `adafactor.FactorDim` members
  or their names ('none', 'row', 'column', 'batch'); a name already in the
  standard rules is replaced.
  """
  from flax.core import frozen_dict  # pylint: disable=g-import-not-at-top
  from t5x import adafactor  # pylint: disable=g-import-not-at-top

  rules = frozen_dict.unfreeze(adafactor.standard_logical_factor_rules())
  for axis, rule in (additional_rules or {}).items():
    try:
      rules[axis] = adafactor.factor_name_to_factordim(rule)
    except KeyError:
      raise ValueError(
          f'Adafactor factor rule {rule!r} for logical axis {axis!r} must be '
          "one of 'none', 'row', 'column', 'batch'.") from None
  return frozen_dict.freeze(rules)


def p3_task(name: str,
            p3_data_dir: Optional[str] = None,
            p3_vocabulary: Optional[str] = None,
            p3_reuse_tokens: Optional[bool] = None) -> str:
  """Registers our SeqIO tasks and returns `name` once it is registered.

  `p3_data_dir` (default: the environment variable P3_DATA_DIR) is the P3
  copy the T0 tasks and mixtures are registered from; mini-P3 is always
  registered. Raises ValueError, naming the data directory, when `name` is
  not a registered task or mixture (e.g. no P3 copy was given).
  """
  from mov_jax import tasks  # pylint: disable=g-import-not-at-top

  _register_tasks(p3_data_dir or os.environ.get('P3_DATA_DIR') or None,
                  p3_vocabulary, p3_reuse_tokens)
  tasks.get_mixture_or_task(name)
  return name


@functools.lru_cache(maxsize=None)
def _register_tasks(p3_data_dir: Optional[str], p3_vocabulary: Optional[str],
                    p3_reuse_tokens: Optional[bool]) -> None:
  # t5x evaluates MIXTURE_OR_TASK_NAME once per dataset config (train,
  # train_eval, infer_eval): list a remote P3 copy only once.
  from mov_jax import tasks  # pylint: disable=g-import-not-at-top
  tasks.setup(p3_data_dir, p3_vocabulary, p3_reuse_tokens)
