"""The main job on the embedded default: MoV instruction tuning on mini-P3.

    python -m mov_jax.demo [--model_dir=DIR] [--gin.TRAIN_STEPS=600] [...]

1. Builds the tiny T5 with MoV-10 adapters from `runs/demo.gin` and saves its
   freshly initialised base model (`<DIR>/base`).
2. Trains MoV on `mini_p3_train` from that base with the training binary's
   code (checkpoints, metrics, TensorBoard, adapter export).
3. Evaluates the held-out datasets (`mini_p3_eval_score_eval`, zero-shot rank
   classification) for the base model and the trained checkpoint, prints both
   tables, and writes a routing heatmap of the trained model.
About 70 s on two CPU cores. Extra `--gin.X=...` flags override
runs/demo.gin (e.g. `--gin.NUM_EXPERTS=30`).
"""

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

from mov_jax import checkpoints
from mov_jax import eval as eval_lib
from mov_jax import gin_utils
from mov_jax import host_memory
from mov_jax import partitioning
from mov_jax import train

HELD_OUT = 'mini_p3_eval_score_eval'
OVERALL = 'average_of_dataset_median_accuracy'


def _default_model_dir() -> str:
  return os.path.join(os.getcwd(), 'demo_runs',
                      time.strftime('mov10_tiny_%Y%m%d-%H%M%S'))


def save_initial_base(cfg: train.TrainConfig, path: str) -> None:
  """A randomly initialised base model (no adapters), as training starts."""
  tokens = np.ones((1, 8), np.int32)
  base = dataclasses.replace(cfg.network, adapters=None)
  params = base.init(jax.random.PRNGKey(cfg.seed), tokens, tokens, tokens,
                     enable_dropout=False)['params']
  checkpoints.save_params(path, params, base.config)


def evaluate(cfg: train.TrainConfig, checkpoint_path: str, output_dir: str,
             routing: bool):
  eval_cfg = eval_lib.EvalConfig(
      checkpoint_path=checkpoint_path, output_dir=output_dir,
      network=cfg.network, mixture_or_task_name=HELD_OUT,
      task_feature_lengths=dict(cfg.task_feature_lengths), batch_size=16,
      seed=cfg.seed, routing_analysis=routing)
  return eval_lib.evaluate(eval_cfg)


def _overall(summary) -> float:
  return summary['results']['rank_classification']['accuracy']['overall'][
      OVERALL]


def _files(value):
  """Every path string inside a (nested) files entry."""
  if isinstance(value, str):
    return [value]
  if isinstance(value, dict):
    value = list(value.values())
  if isinstance(value, (list, tuple)):
    return [f for v in value for f in _files(v)]
  return []


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  gin_utils.add_gin_flags(parser)
  parser.add_argument('--model_dir', default=None,
                      help='Where everything goes (default: '
                      './demo_runs/mov10_tiny_<time>).')
  args = gin_utils.parse_args(parser, argv)
  partitioning.hide_accelerators_from_tensorflow()
  host_memory.print_advice(jax.default_backend())
  model_dir = args.model_dir or _default_model_dir()
  try:
    gin_utils.parse_gin(['runs/demo.gin'] + args.gin_file,
                        [f'MODEL_DIR = {model_dir!r}'] + args.gin_bindings,
                        [p for p in args.gin_search_paths.split(',') if p])
    from mov_jax import tasks  # pylint: disable=g-import-not-at-top
    tasks.setup_from_gin()
    cfg = train.config_from_gin()
    base_dir = os.path.join(model_dir, 'base')
    if not os.path.exists(base_dir):
      save_initial_base(cfg, base_dir)
    cfg = dataclasses.replace(cfg, initial_checkpoint_path=base_dir)
    start = time.perf_counter()
    print(f'== Training MoV on mini_p3_train -> {model_dir}', flush=True)
    summary = train.train(cfg)
    print(f'== Zero-shot held-out evaluation ({HELD_OUT})', flush=True)
    before = evaluate(cfg, base_dir, os.path.join(model_dir, 'eval_base'),
                      routing=False)
    after = evaluate(cfg, summary['checkpoint'], os.path.join(model_dir, 'eval'),
                     routing=True)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  base_score = _overall(before[0]) if before else float('nan')
  trained = after[-1] if after else None
  print('\n== Summary')
  print(f'checkpoints:   {os.path.join(model_dir, "checkpoints")}')
  print(f'metrics:       {summary["metrics"]} (TensorBoard: '
        f'{summary["tensorboard"]})')
  if 'adapter_export' in summary:
    print(f'adapter only:  {summary["adapter_export"]}')
  if trained is not None:
    print(f'results:       {trained["files"].get("markdown")}')
    figures = [f for f in _files(trained['files'].get('routing'))
               if f.endswith('.png')]
    if figures:
      print(f'routing:       {figures[0]}')
    print(f'held-out accuracy, average of per-dataset medians: base '
          f'{base_score:.1f} -> trained {_overall(trained):.1f}')
  print(f'took {time.perf_counter() - start:.0f} s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
