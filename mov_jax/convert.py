"""Converts T5 checkpoints between T5X, Hugging Face and mov-jax's format.

    python -m mov_jax.convert --from t5x gs_copy/t5_1_1_xl/checkpoint_1000000 \
        t5_1_1_xl_params
    python -m mov_jax.convert --from hf google_t5-v1_1-xl t5_1_1_xl_params
    python -m mov_jax.convert --from ours t5_1_1_xl_params hf_dir --to hf

`--from t5x` reads legacy (msgpack + TensorStore) and orbax T5X checkpoints;
`--from hf` a Hugging Face T5 directory (config.json + safetensors or
pytorch_model.bin); `--from ours` a directory written by this tool. The
T5Config comes from the checkpoint (T5X: inferred from the shapes; HF: its
config.json; ours: t5_config.json) unless a model gin file is given, e.g.
`--gin_file=models/t5_1_1_xl.gin`, in which case the checkpoint must fit it.
DST is never replaced unless --overwrite is passed.
"""

import argparse
import os
import sys
from typing import Optional, Tuple

import jax
import numpy as np
from flax import traverse_util

from mov_jax import checkpoints
from mov_jax import gin_utils
from mov_jax import network


def _gin_config(args) -> Optional[network.T5Config]:
  """The T5Config of the model gin files given, or None when there are none."""
  if not args.gin_file:
    return None
  gin_utils.setup_from_args(args)
  net = gin_utils.macro_value('NETWORK', 'Pass a model gin file, e.g. '
                              '--gin_file=models/t5_1_1_xl.gin.')
  return net.config


def _read(kind: str, src: str,
          config: Optional[network.T5Config]) -> Tuple[dict, network.T5Config]:
  if kind == 't5x':
    config = config or checkpoints.infer_t5x_config(src)
    return checkpoints.load_t5x(src, config), config
  if kind == 'hf':
    config = config or checkpoints.read_hf_config(src)
    return checkpoints.load_hf(src, config), config
  params, saved = checkpoints.load_params(src)
  if config is not None:
    checkpoints.check_params(
        traverse_util.flatten_dict(params, sep='/'),
        config, f'Parameter checkpoint {src}', allow_extra=True)
  return params, config or saved


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument('--from', dest='source_format', required=True,
                      choices=('t5x', 'hf', 'ours'),
                      help='Format of SRC.')
  parser.add_argument('--to', dest='target_format', default='ours',
                      choices=('ours', 'hf'),
                      help='Format to write DST in (default: ours).')
  parser.add_argument('--overwrite', action='store_true',
                      help='Replace DST if it exists and is not empty.')
  parser.add_argument('src', help='Checkpoint to read.')
  parser.add_argument('dst', help='Directory to write (must not exist, or be '
                      'empty, unless --overwrite).')
  gin_utils.add_gin_flags(parser)
  args = gin_utils.parse_args(parser, argv)
  if not os.path.exists(args.src):
    parser.error(f'SRC {args.src} does not exist.')
  src, dst = (os.path.realpath(p) for p in (args.src, args.dst))
  if os.path.commonpath([src, dst]) in (src, dst):
    parser.error(f'DST {args.dst} and SRC {args.src} are the same directory '
                 'or one holds the other; writing DST would change or remove '
                 'the checkpoint being read. Choose a DST elsewhere.')
  dst_taken = os.path.isfile(args.dst) or (
      os.path.isdir(args.dst) and os.listdir(args.dst))
  if dst_taken and not args.overwrite:
    parser.error(f'DST {args.dst} exists and is not empty; pass --overwrite '
                 'to replace it.')

  try:
    checkpoints.refuse_training_checkpoint(args.src)
    params, config = _read(args.source_format, args.src, _gin_config(args))
    leaves = jax.tree_util.tree_leaves(params)
    count = sum(int(np.prod(np.shape(x))) for x in leaves)
    print(f'read {args.source_format} checkpoint {args.src}: {len(leaves)} '
          f'arrays, {count:,} parameters')
    print(f'config: {checkpoints.config_to_json(config)}')
    print(f'  {checkpoints.suggest_gin(config)}')
    if args.target_format == 'hf':
      checkpoints.export_hf(params, config, args.dst, overwrite=args.overwrite)
    else:
      checkpoints.save_params(args.dst, params, config,
                              overwrite=args.overwrite)
  except (ValueError, OSError) as e:  # OSError: DST's directory unwritable.
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {args.target_format} to {os.path.abspath(args.dst)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
