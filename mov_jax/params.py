"""Parameter accounting: total, trainable and per-site counts of a gin model.

    python -m mov_jax.params --gin_file=models/t5_1_1_xl.gin \
        --gin_file=methods/mov.gin [--gin.NUM_EXPERTS=30] [--json]

Shapes come from `jax.eval_shape`: nothing is allocated, so XXL takes seconds.
Trainable parameters are those matched by the method's `TRAINABLE_REGEX`
(everything when no method gin file sets it).
"""

import argparse
import collections
import json
import re
import sys
from typing import Any, Dict

import jax
import numpy as np
from flax import traverse_util

from mov_jax import gin_utils
from mov_jax import optim


def abstract_params(network) -> Dict[str, Any]:
  """Parameter shapes of `network` without allocating them."""
  tokens = jax.ShapeDtypeStruct((1, 8), np.int32)

  def init(enc, dec):
    return network.init(jax.random.PRNGKey(0), enc, dec, dec,
                        enable_dropout=False)['params']

  return jax.eval_shape(init, tokens, tokens)


def site_of(path: str) -> str:
  """Groups repeated layers: 'encoder/layers_3/mlp/wo/kernel' ->
  'encoder/layers_*/mlp/wo/kernel'."""
  return re.sub(r'layers_\d+', 'layers_*', path)


def count(network, trainable_regex) -> Dict[str, Any]:
  """Total/trainable counts and a per-site breakdown of trainable params."""
  params = abstract_params(network)
  flat = traverse_util.flatten_dict(params, sep='/')
  trainable_paths = optim.trainable_path_set(params, trainable_regex)
  sizes = {p: int(np.prod(x.shape)) for p, x in flat.items()}
  total = sum(sizes.values())
  trainable = sum(sizes[p] for p in trainable_paths)
  by_site = collections.OrderedDict()
  for path in sorted(trainable_paths):
    site = site_of(path)
    by_site[site] = by_site.get(site, 0) + sizes[path]
  return {
      'total': total,
      'trainable': trainable,
      'trainable_percent': 100.0 * trainable / total,
      'frozen': total - trainable,
      'by_site': dict(by_site),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawTextHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument('--json', action='store_true',
                      help='Print one JSON object instead of a table.')
  args = gin_utils.parse_args(parser, argv)
  if not args.gin_file:
    parser.error('pass a model gin file, e.g. --gin_file=models/t5_1_1_xl.gin '
                 '(and a method, e.g. --gin_file=methods/mov.gin)')
  try:
    gin_utils.setup_from_args(args)
    network = gin_utils.macro_value(
        'NETWORK',
        'Pass a model gin file, e.g. --gin_file=models/t5_1_1_xl.gin.')
    try:
      regex = gin_utils.macro_value('TRAINABLE_REGEX')
    except ValueError:
      regex = ['.*']  # No method gin: full fine-tuning.
    result = count(network, regex)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result['trainable_regex'] = list([regex] if isinstance(regex, str) else regex)
  if args.json:
    print(json.dumps(result))
    return 0
  print(f'total parameters      {result["total"]:>16,}')
  print(f'trainable parameters  {result["trainable"]:>16,}  '
        f'({result["trainable_percent"]:.4f}%)')
  print(f'trainable regex       {result["trainable_regex"]}')
  print('trainable parameters by site:')
  width = max((len(s) for s in result['by_site']), default=10)
  for site, n in result['by_site'].items():
    print(f'  {site:<{width}}  {n:>14,}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
