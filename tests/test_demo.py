"""The README's main job (`make demo`) runs end to end on mini-P3."""

import os

from mov_jax import demo


def test_demo_trains_evaluates_and_reports(tmp_path, capsys):
  model_dir = tmp_path / 'demo'
  assert demo.main([f'--model_dir={model_dir}', '--gin.TRAIN_STEPS=30',
                    '--gin.CHECKPOINT_PERIOD=30', '--gin.LOG_PERIOD=10']) == 0
  out = capsys.readouterr().out
  assert 'step     30/30' in out and 'tokens/s' in out and 'ETA' in out
  assert 'held-out accuracy, average of per-dataset medians: base' in out
  for line in ('checkpoints:', 'metrics:', 'adapter only:', 'results:',
               'routing:'):
    assert line in out, out[-2000:]
  assert (model_dir / 'checkpoints' / '30').is_dir()
  assert (model_dir / 'adapter').is_dir()
  pngs = list((model_dir / 'eval').rglob('*.png'))
  assert pngs and all(os.path.getsize(p) > 1000 for p in pngs)
