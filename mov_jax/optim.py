"""Which parameters train: regexes over parameter paths.

Each method's gin file names its trainable parameters (`TRAINABLE_REGEX`, a
list of regexes fully matched against paths such as
`encoder/layers_0/attention/key_adapter/mov_scaling`). The train step
differentiates only the trainable subtree and the optimizer keeps state only
for it, so frozen weights cost neither gradient memory nor optimizer state.
"""

import re
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

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
