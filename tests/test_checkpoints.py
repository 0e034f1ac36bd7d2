"""Checkpoint import/export: T5X legacy and orbax, Hugging Face, ours.

Nothing can be downloaded here, so every test writes its checkpoint itself in
the exact on-disk format of the real writer: t5x's legacy msgpack file with
gzip zarr arrays (TensorStore) in dotted directories, t5x's orbax checkpoint
manager layout, and `save_pretrained` of a Hugging Face T5.
"""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization
from flax import traverse_util
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from mov_jax import checkpoints
from mov_jax import convert
from mov_jax import gin_utils
from mov_jax import network
from mov_jax import optim
from mov_jax import train
from test_network import V10_TINY
from test_network import V11_TINY
from test_network import _batch

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

CONFIGS = pytest.mark.parametrize('cfg', [V11_TINY, V10_TINY],
                                  ids=['v1_1', 'v1_0'])
# Divisible by a 2 x 4 mesh on every sharded axis (vocab, heads, mlp, kv).
SHARDABLE = network.T5Config(**{**V11_TINY.__dict__, 'vocab_size': 128,
                                'num_heads': 4, 'head_dim': 8})
# Set by test_sharded_restore_on_8_cpu_devices for its subprocess.
DEVICES_ENV = 'MOV_JAX_TEST_EXPECT_DEVICES'


def _random_params(cfg, seed=0):
  """Random float32 numpy parameters of the base network.

  Drawn with numpy from `jax.eval_shape` shapes: initialising eagerly
  compiles every op once, which would dominate this file's run time.
  """
  shapes = jax.eval_shape(lambda: network.Transformer(cfg).init(
      jax.random.PRNGKey(0), **_batch(), enable_dropout=False))['params']
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if path[-1].key == 'scale':
      return 1 + 0.1 * noise
    if path[-1].key == 'kernel':
      return noise / np.sqrt(x.shape[0]).astype(np.float32)
    return noise

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def _logits_fn(net):
  return jax.jit(lambda params: net.apply({'params': params}, **_batch(),
                                          enable_dropout=False))


@functools.lru_cache(maxsize=None)
def _init_fn(net):
  return jax.jit(lambda key: net.init(key, **_batch(),
                                      enable_dropout=False)['params'])


def _logits(cfg, params):
  return np.asarray(_logits_fn(network.Transformer(cfg))(params))


def _max_logit_diff(cfg, params, reference_params):
  valid = _batch()['decoder_target_tokens'] > 0
  return np.abs(_logits(cfg, params) - _logits(cfg, reference_params))[
      valid].max()


def _assert_same_params(got, want):
  got = traverse_util.flatten_dict(got, sep='/')
  want = traverse_util.flatten_dict(want, sep='/')
  assert set(got) == set(want)
  for path, value in want.items():
    assert np.asarray(got[path]).dtype == np.float32, path
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value),
                                  err_msg=path)


def _t5x_state(params, step=100):
  """t5x's `train_state.state_dict()` for Adafactor: factored second moments
  (`v_row`, `v_col`) for matrices, `v` for vectors, unused slots as zeros(1)."""
  def adafactor(x):
    x = np.asarray(x)
    unused = np.zeros((1,), np.float32)
    if x.ndim == 2:
      return {'v_row': (x ** 2).mean(1), 'v_col': (x ** 2).mean(0),
              'v': unused, 'm': unused}
    return {'v_row': unused, 'v_col': unused, 'v': x ** 2, 'm': unused}

  return {'target': jax.tree_util.tree_map(np.asarray, params),
          'state': {'step': np.int32(step),
                    'param_states': jax.tree_util.tree_map(adafactor,
                                                           params)}}


def _write_t5x_legacy(ckpt_dir, state_dict, inline_max_size=64):
  """Writes a checkpoint as t5x's legacy `Checkpointer.save` does.

  Arrays above `inline_max_size` elements go to TensorStore (zarr, gzip) in
  a directory named by the dotted path, and the msgpack holds their spec with
  the path relative to the checkpoint; smaller ones are stored inline. The
  embedding's spec uses the older GCS layout (dummy bucket, `path` beside
  `kvstore`) of checkpoints written to gs:// with TensorStore < 0.1.14.
  """
  os.makedirs(ckpt_dir)
  written = {}
  for path, value in traverse_util.flatten_dict(state_dict).items():
    value = np.asarray(value)
    if value.size <= inline_max_size:
      written[path] = value
      continue
    name = '.'.join(path)
    chunks = [max(value.shape[0] // 2, 1)] + list(value.shape[1:])
    metadata = {'compressor': {'id': 'gzip'}, 'shape': list(value.shape),
                'chunks': chunks}
    spec = {'driver': 'zarr', 'dtype': value.dtype.name, 'metadata': metadata,
            'kvstore': {'driver': 'file', 'path': name}}
    absolute = {**spec, 'kvstore': {'driver': 'file',
                                    'path': os.path.join(ckpt_dir, name)}}
    ts.open(absolute, create=True, open=True).result().write(value).result()
    if path == ('target', 'token_embedder', 'embedding'):
      spec = {**spec, 'path': name,
              'kvstore': {'driver': 'gcs', 'bucket': 't5x-dummy-bucket'}}
    else:
      spec = ts.Spec(spec).to_json()  # What t5x's `ts.Spec.to_json` stores.
    written[path] = spec
  with open(os.path.join(ckpt_dir, 'checkpoint'), 'wb') as f:
    f.write(serialization.msgpack_serialize(
        {'version': 3, 'optimizer': traverse_util.unflatten_dict(written)}))


def _write_t5x_orbax(model_dir, state_dict, step=100, use_ocdbt=True):
  """Writes a checkpoint as t5x's `OrbaxCheckpointManagerInterface` does."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(step_prefix='checkpoint')
  handlers = {'state': ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)}
  with ocp.CheckpointManager(model_dir, options=options,
                             item_handlers=handlers) as manager:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state_dict)))
    manager.wait_until_finished()


def _tiny_gin(method=None):
  """The network of models/t5_1_1_tiny.gin (vocab 97), with `method`."""
  files = ['models/t5_1_1_tiny.gin'] + ([f'methods/{method}.gin']
                                        if method else [])
  gin_utils.parse_gin(files, ['NUM_EMBEDDINGS = 97'], finalize=False)
  net = gin_utils.macro_value('NETWORK')
  regex = gin_utils.macro_value('TRAINABLE_REGEX') if method else None
  gin.clear_config(clear_constants=True)
  return net, regex


@pytest.fixture(scope='module')
def tiny_gin_checkpoint(tmp_path_factory):
  """A legacy T5X model directory of models/t5_1_1_tiny.gin's shapes."""
  cfg = _tiny_gin()[0].config
  params = _random_params(cfg, seed=7)
  model_dir = tmp_path_factory.mktemp('t5x_tiny')
  _write_t5x_legacy(str(model_dir / 'checkpoint_7'), _t5x_state(params, 7))
  return model_dir, cfg, params


# --- T5X ------------------------------------------------------------------


@CONFIGS
def test_t5x_legacy_checkpoint_loads_exactly(tmp_path, cfg):
  params = _random_params(cfg)
  ckpt = tmp_path / 'checkpoint_100'
  _write_t5x_legacy(str(ckpt), _t5x_state(params))
  key_dir = ckpt / 'target.encoder.layers_0.attention.key.kernel'
  with open(key_dir / '.zarray', encoding='utf-8') as f:
    assert json.load(f)['compressor']['id'] == 'gzip'
  assert (ckpt / 'state.param_states.token_embedder.embedding.v_row').is_dir()
  assert not (ckpt / 'target.encoder.encoder_norm.scale').exists()  # Inline.

  assert checkpoints.infer_t5x_config(ckpt) == cfg
  for path in (ckpt, ckpt / 'checkpoint', tmp_path):  # Dir, file, model dir.
    loaded = checkpoints.load_t5x(path, cfg)
    _assert_same_params(loaded, params)
  _assert_same_params(checkpoints.load_any(tmp_path, cfg), params)
  assert _max_logit_diff(cfg, checkpoints.load_t5x(ckpt), params) <= 1e-5

  loaded, state = checkpoints.load_t5x(ckpt, cfg, include_optimizer=True)
  _assert_same_params(loaded, params)
  assert int(state['step']) == 100
  wo = state['param_states']['encoder']['layers_0']['mlp']['wo']['kernel']
  np.testing.assert_array_equal(
      wo['v_row'],
      (np.asarray(params['encoder']['layers_0']['mlp']['wo']['kernel'])
       ** 2).mean(1))


@pytest.mark.parametrize('use_ocdbt', [True, False], ids=['ocdbt', 'plain'])
def test_t5x_orbax_checkpoint_loads_exactly(tmp_path, use_ocdbt):
  cfg = V11_TINY
  params = _random_params(cfg, seed=2)
  _write_t5x_orbax(str(tmp_path), _t5x_state(params), use_ocdbt=use_ocdbt)
  ckpt = tmp_path / 'checkpoint_100'
  assert (ckpt / '_CHECKPOINT_METADATA').is_file()
  assert (ckpt / 'state' / '_METADATA').is_file()
  assert (ckpt / 'state' / 'manifest.ocdbt').is_file() == use_ocdbt

  assert checkpoints.infer_t5x_config(ckpt) == cfg
  loaded = checkpoints.load_t5x(ckpt, cfg)
  _assert_same_params(loaded, params)
  _assert_same_params(checkpoints.load_t5x(tmp_path), params)
  assert _max_logit_diff(cfg, loaded, params) <= 1e-5
  _, state = checkpoints.load_t5x(ckpt, cfg, include_optimizer=True)
  assert int(state['step']) == 100
  np.testing.assert_array_equal(
      state['param_states']['decoder']['decoder_norm']['scale']['v'],
      np.asarray(params['decoder']['decoder_norm']['scale']) ** 2)


def test_imported_checkpoint_plus_fresh_mov_adapters_equals_base(
    tiny_gin_checkpoint):
  model_dir, cfg, params = tiny_gin_checkpoint
  base, _ = _tiny_gin()
  adapted, regex = _tiny_gin('mov')
  imported = checkpoints.load_t5x(model_dir, cfg)
  # As a run from INITIAL_CHECKPOINT_PATH starts: the checkpoint's base
  # weights, and only the adapters initialised.
  key = jax.random.PRNGKey(3)
  init = lambda k: adapted.init(k, **_batch(), enable_dropout=False)['params']
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree_util.tree_map(lambda _: device,
                                     jax.eval_shape(init, key))
  merged = train.init_params(init, key, shardings, imported, str(model_dir))
  adapters, frozen = optim.split_trainable(merged, regex)
  assert adapters  # MoV vectors and routers, initialised fresh ...
  # ... to the values a full initialisation gives them.
  _assert_same_params(adapters, optim.split_trainable(
      _init_fn(adapted)(key), regex)[0])
  _assert_same_params(frozen, imported)
  np.testing.assert_array_equal(np.asarray(_logits_fn(adapted)(merged)),
                                np.asarray(_logits_fn(base)(params)))
  other = _random_params(V11_TINY)  # other shapes: named, nothing built
  with pytest.raises(ValueError, match=r'(?s)other/dir does not fit the '
                     r'configured model.*key/kernel: checkpoint \(32, 36\), '
                     r'model \(64, 64\)'):
    train.init_params(init, key, shardings, other, 'other/dir')


def test_wrong_config_lists_mismatches_and_names_the_gin_file(
    tiny_gin_checkpoint):
  model_dir, cfg, _ = tiny_gin_checkpoint
  with pytest.raises(ValueError) as e:
    checkpoints.load_t5x(model_dir, V11_TINY)
  message = str(e.value)
  assert 'shape mismatches' in message
  assert 'key/kernel: checkpoint (64, 64), model (32, 36)' in message
  assert ('--gin_file=models/t5_1_1_tiny.gin --gin.NUM_EMBEDDINGS=97'
          in message)
  with pytest.raises(ValueError, match=r'missing.*mlp/wi/kernel'):
    checkpoints.load_t5x(model_dir, network.T5Config(
        **{**cfg.__dict__, 'mlp_activations': ('relu',)}))
  xl = checkpoints.infer_config(
      {'token_embedder/embedding': (32128, 2048),
       'encoder/relpos_bias/rel_embedding': (32, 32),
       'encoder/layers_0/attention/query/kernel': (2048, 2048),
       'encoder/layers_0/mlp/wi_0/kernel': (2048, 5120),
       'encoder/layers_23/mlp/wo/kernel': (5120, 2048),
       'decoder/layers_23/mlp/wo/kernel': (5120, 2048),
       'decoder/logits_dense/kernel': (2048, 32128)})
  assert checkpoints.suggest_gin(xl) == (
      'It fits --gin_file=models/t5_1_1_xl.gin.')
  assert 'No shipped' in checkpoints.suggest_gin(V11_TINY)


def test_missing_files_raise_file_not_found(tmp_path, tiny_gin_checkpoint):
  model_dir, cfg, _ = tiny_gin_checkpoint
  absent = tmp_path / 'absent'
  for load in (checkpoints.load_t5x, checkpoints.load_hf,
               checkpoints.load_params):
    with pytest.raises(FileNotFoundError, match=re.escape(str(absent))):
      load(absent)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='checkpoint_N'):
    checkpoints.load_t5x(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='config.json'):
    checkpoints.load_hf(tmp_path / 'empty')
  (tmp_path / 'empty' / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    checkpoints.load_hf(tmp_path / 'empty')
  # A copy that lost one TensorStore array directory.
  broken = tmp_path / 'checkpoint_7'
  shutil.copytree(model_dir / 'checkpoint_7', broken)
  shutil.rmtree(broken / 'target.decoder.layers_1.mlp.wo.kernel')
  with pytest.raises(FileNotFoundError,
                     match='target.decoder.layers_1.mlp.wo.kernel'):
    checkpoints.load_t5x(broken, cfg)


# --- Hugging Face -----------------------------------------------------------


def _random_hf_model(cfg, seed=0):
  """A randomly initialised Hugging Face T5 (untied lm_head for v1.1)."""
  torch.manual_seed(seed)
  hf_config = transformers.T5Config(**checkpoints.hf_config_from_t5(cfg))
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  if not cfg.logits_via_embedding:
    # Recent transformers tie lm_head to the embedding even when asked not to.
    model.lm_head.weight = torch.nn.Parameter(
        torch.randn_like(model.lm_head.weight))
  return model


def _hf_logits(model):
  batch = {k: torch.from_numpy(v).long() for k, v in _batch().items()}
  with torch.no_grad():
    return model(input_ids=batch['encoder_input_tokens'],
                 attention_mask=(batch['encoder_input_tokens'] > 0).long(),
                 decoder_input_ids=batch['decoder_input_tokens']).logits.numpy()


def _save_hf(model, directory, variant):
  if variant == 'bin':  # What older transformers' save_pretrained wrote.
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), os.path.join(directory, 'pytorch_model.bin'))
  else:
    model.save_pretrained(directory, max_shard_size=(
        '20KB' if variant == 'sharded' else '50GB'))


@CONFIGS
@pytest.mark.parametrize('variant', ['safetensors', 'sharded', 'bin'])
def test_hugging_face_directory_matches_hugging_face_logits(tmp_path, cfg,
                                                            variant):
  model = _random_hf_model(cfg, seed=1)
  _save_hf(model, str(tmp_path), variant)
  expected_file = {'safetensors': 'model.safetensors',
                   'sharded': 'model.safetensors.index.json',
                   'bin': 'pytorch_model.bin'}[variant]
  assert (tmp_path / expected_file).is_file()
  assert checkpoints.read_hf_config(tmp_path) == cfg
  params = checkpoints.load_hf(tmp_path)
  valid = _batch()['decoder_target_tokens'] > 0
  diff = np.abs(_logits(cfg, params) - _hf_logits(model))[valid]
  assert diff.max() <= 1e-4, diff.max()
  assert _logits(cfg, params)[valid].std() > 0.1  # Not vacuous.


@CONFIGS
def test_ours_to_hugging_face_and_back_is_exact(tmp_path, cfg):
  params = _random_params(cfg, seed=5)
  checkpoints.export_hf(params, cfg, tmp_path / 'hf')
  _assert_same_params(checkpoints.load_any(tmp_path / 'hf'), params)
  assert sorted(os.listdir(tmp_path / 'hf')) == ['config.json',
                                                 'model.safetensors']
  assert checkpoints.read_hf_config(tmp_path / 'hf') == cfg
  _assert_same_params(checkpoints.load_hf(tmp_path / 'hf'), params)
  model = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / 'hf').eval()
  valid = _batch()['decoder_target_tokens'] > 0
  diff = np.abs(_logits(cfg, params) - _hf_logits(model))[valid]
  assert diff.max() <= 1e-4, diff.max()

  checkpoints.save_params(tmp_path / 'ours', params, cfg)
  loaded, loaded_cfg = checkpoints.load_params(tmp_path / 'ours')
  assert loaded_cfg == cfg
  _assert_same_params(loaded, params)


def test_export_refuses_adapters_and_ours_keeps_them(tmp_path):
  net, regex = _tiny_gin('mov')
  params = _init_fn(net)(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r'unexpected.*_adapter'):
    checkpoints.export_hf(params, net.config, tmp_path / 'hf')
  assert not (tmp_path / 'hf').exists()
  # Our format keeps adapters alongside the base parameters, or alone.
  checkpoints.save_params(tmp_path / 'ours', params, net.config)
  loaded, _ = checkpoints.load_params(tmp_path / 'ours')
  _assert_same_params(loaded, params)
  adapters, base = optim.split_trainable(params, regex)
  checkpoints.save_params(tmp_path / 'adapter', adapters, net.config)
  loaded, _ = checkpoints.load_params(tmp_path / 'adapter')
  _assert_same_params(loaded, adapters)
  # load_any wants a whole base model: fine for 'ours', not for 'adapter',
  # which it names for what it is.
  _assert_same_params(checkpoints.load_any(tmp_path / 'ours'), params)
  with pytest.raises(ValueError, match='no base model parameters, only .* '
                     'others .an adapter export.*ADAPTER_CHECKPOINT_PATH'):
    checkpoints.load_any(tmp_path / 'adapter')
  bad = {**base, 'token_embedder': {'embedding': np.zeros((5, 64))}}
  with pytest.raises(ValueError, match='token_embedder/embedding: checkpoint'):
    checkpoints.save_params(tmp_path / 'bad', bad, net.config)


# --- Our format -------------------------------------------------------------


def test_save_params_never_overwrites_by_accident(tmp_path):
  cfg = V10_TINY
  first, second = _random_params(cfg, seed=1), _random_params(cfg, seed=2)
  path = tmp_path / 'params'
  checkpoints.save_params(path, first, cfg)
  with pytest.raises(FileExistsError, match='overwrite'):
    checkpoints.save_params(path, second, cfg)
  _assert_same_params(checkpoints.load_params(path)[0], first)
  checkpoints.save_params(path, second, cfg, overwrite=True)
  _assert_same_params(checkpoints.load_params(path)[0], second)
  assert sorted(os.listdir(tmp_path)) == ['params']  # No temporaries left.
  with pytest.raises(ValueError, match='shape mismatches'):
    checkpoints.save_params(tmp_path / 'wrong', first, V11_TINY)
  assert not (tmp_path / 'wrong').exists()


# --- Sharded restore --------------------------------------------------------


def _shardings(cfg, params):
  """NamedShardings from the parameters' logical axes and t5x's default
  rules, on a (data, model) mesh over every device (model = 4 if possible)."""
  devices = np.array(jax.devices())
  model = 4 if devices.size % 4 == 0 else 1
  mesh = Mesh(devices.reshape(-1, model), ('data', 'model'))
  rules = {'vocab': 'model', 'mlp': 'model', 'heads': 'model',
           'joined_kv': 'model'}
  axes = jax.eval_shape(lambda: network.Transformer(cfg).init(
      jax.random.PRNGKey(0), **_batch(vocab=cfg.vocab_size),
      enable_dropout=False))['params_axes']
  flat = traverse_util.flatten_dict(axes, sep='/')
  specs = {path[:-len('_axes')]: PartitionSpec(*[rules.get(n) for n in
                                                  meta.names])
           for path, meta in flat.items()}
  assert set(specs) == set(traverse_util.flatten_dict(params, sep='/'))
  return traverse_util.unflatten_dict(
      {k: NamedSharding(mesh, v) for k, v in specs.items()}, sep='/')


@pytest.mark.parametrize('fmt', ['t5x_legacy', 't5x_orbax', 'ours'])
def test_sharded_restore(tmp_path, fmt):
  if os.environ.get(DEVICES_ENV):
    assert jax.device_count() == int(os.environ[DEVICES_ENV])
  cfg = SHARDABLE
  params = _random_params(cfg, seed=3)
  state = _t5x_state(params)
  if fmt == 't5x_legacy':
    _write_t5x_legacy(str(tmp_path / 'checkpoint_100'), state)
    load = lambda s: checkpoints.load_t5x(tmp_path, cfg, shardings=s)
  elif fmt == 't5x_orbax':
    _write_t5x_orbax(str(tmp_path), state)
    load = lambda s: checkpoints.load_t5x(tmp_path, cfg, shardings=s)
  else:
    checkpoints.save_params(tmp_path / 'ours', params, cfg)
    load = lambda s: checkpoints.load_params(tmp_path / 'ours', s)[0]
  shardings = _shardings(cfg, params)
  loaded = load(shardings)
  want = traverse_util.flatten_dict(shardings, sep='/')
  split = 0
  for path, value in traverse_util.flatten_dict(loaded, sep='/').items():
    assert isinstance(value, jax.Array), path
    assert value.sharding == want[path], (path, value.sharding)
    shard_shape = want[path].shard_shape(value.shape)
    assert all(s.data.shape == shard_shape for s in value.addressable_shards)
    split += shard_shape != value.shape
  model_axes = sum('model' in s.spec for s in want.values())
  assert model_axes > 20
  assert split == (model_axes if jax.device_count() % 4 == 0 else 0)
  _assert_same_params(loaded, params)
  # A sharding for the whole tree at once (e.g. replicated) also works.
  replicated = NamedSharding(want['decoder/decoder_norm/scale'].mesh,
                             PartitionSpec())
  assert all(x.sharding == replicated
             for x in jax.tree_util.tree_leaves(load(replicated)))
  with pytest.raises(ValueError, match='no sharding for'):
    load({'encoder': shardings['encoder']})


def test_sharded_restore_on_8_cpu_devices():
  """XLA flags cannot change once jax has started: run it in a subprocess."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', **{DEVICES_ENV: '8'},
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
       f'{__file__}::test_sharded_restore'],
      cwd=os.path.dirname(__file__), env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert '3 passed' in result.stdout


# --- Command line -----------------------------------------------------------


def test_convert_cli(tmp_path, tiny_gin_checkpoint, capsys):
  model_dir, cfg, params = tiny_gin_checkpoint
  ours, hf, back = tmp_path / 'ours', tmp_path / 'hf', tmp_path / 'back'
  assert convert.main(['--from', 't5x', str(model_dir), str(ours)]) == 0
  out = capsys.readouterr().out
  assert f'{sum(np.size(x) for x in jax.tree_util.tree_leaves(params)):,}' \
      ' parameters' in out
  assert 'models/t5_1_1_tiny.gin --gin.NUM_EMBEDDINGS=97' in out
  assert convert.main(['--from', 'ours', str(ours), str(hf), '--to',
                       'hf']) == 0
  assert convert.main(['--from', 'hf', str(hf), str(back)]) == 0
  loaded, loaded_cfg = checkpoints.load_params(back)
  _assert_same_params(loaded, params)
  assert checkpoints.suggest_gin(loaded_cfg) == checkpoints.suggest_gin(cfg)

  with pytest.raises(SystemExit):  # DST exists: refused, left untouched.
    convert.main(['--from', 't5x', str(model_dir), str(back)])
  assert 'overwrite' in capsys.readouterr().err
  _assert_same_params(checkpoints.load_params(back)[0], params)
  assert convert.main(['--from', 't5x', str(model_dir), str(back),
                       '--overwrite', '--gin_file=models/t5_1_1_tiny.gin',
                       '--gin.NUM_EMBEDDINGS=97']) == 0
  gin.clear_config(clear_constants=True)
  capsys.readouterr()
  # A model gin the checkpoint does not fit: an error line naming the gin
  # file it fits, and nothing written.
  assert convert.main(['--from', 't5x', str(model_dir), str(tmp_path / 'x'),
                       '--gin_file=models/t5_1_1_small.gin']) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 't5_1_1_tiny.gin' in err
  assert not (tmp_path / 'x').exists()
  # DST inside SRC would write into the checkpoint being read.
  with pytest.raises(SystemExit):
    convert.main(['--from', 'ours', str(ours), str(ours / 'sub')])
  assert 'one holds the other' in capsys.readouterr().err
  assert not (ours / 'sub').exists()


def test_training_from_an_imported_t5x_checkpoint_starts_at_the_source(
    tmp_path):
  """INITIAL_CHECKPOINT_PATH = a T5X legacy checkpoint, MoV adapters fresh:
  with learning rate 0 the first checkpoint computes the source's logits."""
  from mov_jax import train  # pylint: disable=g-import-not-at-top
  from mov_jax import train_state  # pylint: disable=g-import-not-at-top
  import mov_jax.tasks  # pylint: disable=g-import-not-at-top
  gin_utils.parse_gin(['runs/demo.gin'], [
      f"MODEL_DIR = '{tmp_path / 'run'}'", 'TRAIN_STEPS = 1',
      'LEARNING_RATE = 0.0', 'BATCH_SIZE = 4', 'CHECKPOINT_PERIOD = 1',
      "TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 8}",
      f"INITIAL_CHECKPOINT_PATH = '{tmp_path / 'lm100k' / 'checkpoint_9'}'",
      'train.TrainConfig.export_adapter = False'])
  mov_jax.tasks.setup_from_gin()
  cfg = train.config_from_gin()
  base_cfg = cfg.network.config  # tiny, mini-P3 vocabulary (384)
  source = _random_params(base_cfg, seed=11)
  _write_t5x_legacy(str(tmp_path / 'lm100k' / 'checkpoint_9'),
                    _t5x_state(source, 9))
  summary = train.train(cfg)
  params = train_state.restore_train_params(summary['checkpoint'])
  adapter_paths = [k for k in traverse_util.flatten_dict(params, sep='/')
                   if '_adapter/' in k]
  assert adapter_paths  # MoV adapters exist, initialised fresh
  batch = _batch()
  adapted = cfg.network.apply({'params': params}, **batch,
                              enable_dropout=False)
  base = network.Transformer(base_cfg).apply({'params': source}, **batch,
                                             enable_dropout=False)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(base))

  # What INITIAL_CHECKPOINT_PATH must not be, each named for what it is.
  with pytest.raises(ValueError, match='step directory of a mov-jax training '
                     'run, not a base model.*MODEL_DIR'):
    checkpoints.load_any(summary['checkpoint'], base_cfg)
  with pytest.raises(ValueError, match=r'training run \(MODEL_DIR\)'):
    checkpoints.load_any(str(tmp_path / 'run'), base_cfg)
