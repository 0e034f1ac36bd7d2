"""Every model gin file parses and builds, with the published sizes."""

import time

import gin
import jax
import numpy as np
import pytest

from mov_jax import gin_utils
from mov_jax import network

# Parameter counts of the published checkpoints (Hugging Face / T5X), which
# our shapes must reproduce exactly; tiny is ours.
PUBLISHED = {
    't5_1_1_small': 76_961_152,
    't5_1_1_base': 247_577_856,
    't5_1_1_large': 783_150_080,
    't5_1_1_xl': 2_849_757_184,
    't5_1_1_xxl': 11_135_332_352,
    't5_small': 60_506_624,
    't5_base': 222_903_552,
    't5_large': 737_668_096,
    't5_3B': 2_851_598_336,
    't5_11B': 11_307_321_344,
}
MODEL_FILES = sorted(p.stem for p in (gin_utils.gin_dir() / 'models').glob('*.gin'))


def _abstract_params(net):
  tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
  init = lambda enc, dec: net.init(jax.random.PRNGKey(0), enc, dec, dec,
                                   enable_dropout=False)
  return jax.eval_shape(init, tokens, tokens)['params']


def test_every_published_size_has_a_gin_file():
  assert set(PUBLISHED) | {'t5_1_1_tiny'} == set(MODEL_FILES)


@pytest.mark.parametrize('name', MODEL_FILES)
def test_model_gin_builds_with_published_shapes(name):
  gin_utils.parse_gin([f'models/{name}.gin'])
  net = gin_utils.macro_value('NETWORK')
  assert isinstance(net, network.Transformer)
  start = time.perf_counter()
  params = _abstract_params(net)
  elapsed = time.perf_counter() - start
  leaves = jax.tree_util.tree_leaves(params)
  # eval_shape allocates nothing: every leaf is an abstract shape.
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  count = sum(int(np.prod(x.shape)) for x in leaves)
  if name in PUBLISHED:
    assert count == PUBLISHED[name], (name, count, elapsed)
  assert net.config.vocab_size == 32128


def test_macros_override_from_bindings():
  gin_utils.parse_gin(['models/t5_1_1_small.gin'],
                      ['NUM_EMBEDDINGS = 1000', "ACTIVATION_DTYPE = 'float32'",
                       'DROPOUT_RATE = 0.1'])
  cfg = gin_utils.macro_value('NETWORK').config
  assert (cfg.vocab_size, cfg.dtype, cfg.dropout_rate) == (1000, 'float32', 0.1)


def test_gin_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match='models/t5_1_1_smal.gin'):
    gin_utils.parse_gin(['models/t5_1_1_smal.gin'])
  bad = tmp_path / 'bad.gin'
  bad.write_text('from __gin__ import dynamic_registration\n'
                 'from mov_jax import network\n'
                 'network.T5Config.emb_dimm = 3\n')
  with pytest.raises(ValueError, match='bad.gin.*emb_dimm'):
    gin_utils.parse_gin([str(bad)])


def test_a_binding_of_a_macro_nothing_uses_is_refused():
  # gin itself would create TRAIN_STEPZ and train for TRAIN_STEPS.
  with pytest.raises(ValueError, match=r'TRAIN_STEPZ \(did you mean '
                     r'TRAIN_STEPS\?\)'):
    gin_utils.parse_gin(['runs/demo.gin'], ['TRAIN_STEPZ = 2'],
                        finalize=False)
  gin.clear_config(clear_constants=True)
  # NUM_EXPERTS belongs to the mixture method gins: IA3 has none.
  with pytest.raises(ValueError, match='macro.s. NUM_EXPERTS, so the binding'):
    gin_utils.parse_gin(['models/t5_1_1_tiny.gin', 'methods/ia3.gin'],
                        ['NUM_EXPERTS = 30'], finalize=False)
  gin.clear_config(clear_constants=True)
  # A macro of the user's own, used by a later binding, is fine.
  gin_utils.parse_gin(['models/t5_1_1_tiny.gin', 'methods/mov.gin'],
                      ['MY_EXPERTS = 4', 'NUM_EXPERTS = %MY_EXPERTS'])
  assert gin_utils.macro_value('NUM_EXPERTS') == 4


def test_a_gin_flag_without_value_is_a_usage_error(capsys):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  gin_utils.add_gin_flags(parser)
  with pytest.raises(SystemExit) as exit_info:
    gin_utils.parse_args(parser, ['--gin.TRAIN_STEPS'])
  assert exit_info.value.code == 2
  assert '--gin.TRAIN_STEPS needs a value' in capsys.readouterr().err


def test_missing_macro_is_explained():
  gin_utils.parse_gin(['data/p3.gin'])
  with pytest.raises(ValueError, match='NETWORK is not defined.*model gin'):
    gin_utils.macro_value('NETWORK', 'Include a model gin file.')


def test_gin_flag_rewriting():
  assert gin_utils.rewrite_gin_args(
      ['--gin.TRAIN_STEPS=10', '--gin.MODEL_DIR', '"/tmp/x"', '--other=1']) == [
          '--gin_bindings=TRAIN_STEPS = 10',
          '--gin_bindings=MODEL_DIR = "/tmp/x"', '--other=1']
