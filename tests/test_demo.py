"""The README's main job runs end to end and its loss falls."""

from mov_jax import demo


def test_demo_trains_the_tiny_model(capsys):
  assert demo.main(['--steps=6', '--gin.DROPOUT_RATE=0.1']) == 0
  out = capsys.readouterr().out
  assert 'step    6/6' in out and 'tokens/s' in out
  first, last = out.strip().splitlines()[-1].split('loss ')[1].split(' -> ')
  assert float(last) < float(first)
