"""gin/t5x/: our modules and gin files under the real t5x binaries.

Without t5x (it is not on PyPI, so CI lacks it) every file under gin/t5x/ is
read with gin's own parser, and what it names is checked: imports, includes,
macros, and every mov_jax attribute. Where t5x is installed, each method
trains for real in-process, and `python -m t5x.train` / `python -m t5x.eval`
run MoV on mini-P3 end to end.
"""

import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio
from flax import traverse_util
from flax.linen import partitioning as flax_partitioning
from gin import config_parser

from mov_jax import gin_utils
from mov_jax import network
from mov_jax import optim
from mov_jax import t5x_compat

GIN_DIR = gin_utils.gin_dir()
T5X_GIN_DIR = GIN_DIR / 't5x'
T5X_FILES = sorted(p.relative_to(GIN_DIR).as_posix()
                   for p in T5X_GIN_DIR.rglob('*.gin'))
METHODS = ('ia3', 'mov', 'lora', 'molora', 'full')
# Files meant to be passed to a binary (the others are only included).
ENTRY_FILES = [f for f in T5X_FILES
               if f.startswith(('t5x/models/t5', 't5x/data/', 't5x/runs/')) or
               f in {f't5x/methods/{m}.gin' for m in METHODS}]
# t5x's own gin files (found through the t5x package's directory).
T5X_OWN = 't5x/configs/'
# Logical axis names that t5x's standard rules already cover
# (partitioning.standard_logical_axis_rules / adafactor's factor rules).
T5X_SHARDING_AXES = {'batch', 'vocab', 'embed', 'mlp', 'heads', 'kv',
                     'joined_kv', 'relpos_buckets', 'abspos_buckets', 'length',
                     'layers', 'stack', 'mlp_activations'}
T5X_FACTOR_AXES = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'joined_kv',
                   'relpos_buckets', 'layers', 'stack', 'q_wi_fused',
                   'o_wo_fused', 'multiquery_heads', 'kv_fused',
                   'layer_norm_scale', 'mlp_activations'}


# ------------------------------------------------------------ gin reading


class _Reference:

  def __init__(self, kind, name):
    self.kind, self.name = kind, name  # '@' configurable or '%' macro.


class _Delegate(config_parser.ParserDelegate):

  def configurable_reference(self, scoped_configurable_name, evaluate):
    del evaluate
    return _Reference('@', scoped_configurable_name)

  def macro(self, macro_name):
    return _Reference('%', macro_name)


def _statements(path):
  with open(GIN_DIR / path, encoding='utf-8') as f:
    return list(config_parser.ConfigParser(f, _Delegate()))


def _references(value):
  if isinstance(value, _Reference):
    yield value
  elif isinstance(value, dict):
    for item in value.items():
      yield from _references(item)
  elif isinstance(value, (list, tuple)):
    for item in value:
      yield from _references(item)


def _unscoped(name):
  return name.rsplit('/', 1)[-1]


def _is_macro_binding(stmt):
  return not stmt.arg_name


def _read(path):
  """Imports (alias -> module path), includes, and named things of a file."""
  imports, includes, names, macros_used, macros_defined = {}, [], [], [], {}
  for stmt in _statements(path):
    if isinstance(stmt, config_parser.ImportStatement):
      imports[stmt.bound_name()] = stmt.module
    elif isinstance(stmt, config_parser.IncludeStatement):
      includes.append(stmt.filename)
    elif isinstance(stmt, config_parser.BindingStatement):
      if _is_macro_binding(stmt):
        macros_defined[stmt.selector] = stmt.value
      else:
        names.append(stmt.selector)
      for ref in _references(stmt.value):
        (names if ref.kind == '@' else macros_used).append(
            _unscoped(ref.name))
  return imports, includes, names, macros_used, macros_defined


def _closure(path, seen=None):
  """`path` and every file of ours it includes, in gin's order."""
  seen = [] if seen is None else seen
  _, includes, *_ = _read(path)
  for inc in includes:
    if inc not in seen and not inc.startswith(T5X_OWN):
      _closure(inc, seen)
  if path not in seen:
    seen.append(path)
  return seen


def _resolve(dotted):
  """Imports the longest module prefix of `dotted`, then getattrs the rest."""
  parts = dotted.split('.')
  for cut in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module('.'.join(parts[:cut]))
    except ModuleNotFoundError as e:
      if cut == 1 or not '.'.join(parts[:cut]).startswith(e.name or ''):
        raise
      continue
    for attr in parts[cut:]:
      obj = getattr(obj, attr)
    return obj
  raise ImportError(dotted)


def _t5x_search_path():
  """Directory holding the t5x package (t5x binaries' default gin path)."""
  try:
    spec = importlib.util.find_spec('t5x')
  except ModuleNotFoundError:
    return None
  if spec is None:
    return None
  return os.path.dirname(os.path.dirname(spec.origin))


def _macro_value(path, name):
  """Literal value of macro `name` as the last file of `path`'s closure
  that defines it leaves it."""
  value = None
  for f in _closure(path):
    value = _read(f)[4].get(name, value)
  return value


# ------------------------------------------------------- without t5x


def test_there_are_t5x_files_for_every_size_and_method():
  assert {f'models/{p.stem}' for p in (GIN_DIR / 'models').glob('*.gin')} == {
      f[len('t5x/'):-len('.gin')] for f in T5X_FILES
      if f.startswith('t5x/models/t5')}
  for method in METHODS:
    assert f't5x/methods/{method}.gin' in T5X_FILES


@pytest.mark.parametrize('path', T5X_FILES)
def test_gin_file_parses_and_names_only_what_it_imports(path):
  imports, includes, names, _, _ = _read(path)
  if names:
    assert imports.get('dynamic_registration') == '__gin__.dynamic_registration'
  for inc in includes:
    if inc.startswith(T5X_OWN):
      t5x_root = _t5x_search_path()
      assert t5x_root is None or os.path.isfile(os.path.join(t5x_root, inc))
    else:
      assert (GIN_DIR / inc).is_file(), f'{path}: include {inc!r} not found'
  for name in names:
    alias = name.split('.')[0]
    assert alias in imports, f'{path} names {name} but does not import {alias}'
    if name.startswith('gin.') or imports[alias] == '__main__':
      continue  # `__main__` is the t5x binary that parses the file.
    dotted = imports[alias] + name[len(alias):]
    try:
      obj = _resolve(dotted)
    except ModuleNotFoundError as e:
      if (e.name or '').split('.')[0] == 't5x':
        continue  # Checked by the t5x tests below where t5x is installed.
      raise
    assert callable(obj), f'{path}: {dotted} is not callable'
  for alias, module in imports.items():
    if module.startswith('mov_jax'):
      _resolve(module)  # e.g. `import mov_jax.tasks` registers our tasks.


@pytest.mark.parametrize('path', ENTRY_FILES)
def test_every_macro_used_is_defined_in_the_include_closure(path):
  closure = _closure(path)
  used, defined = set(), set()
  for f in closure:
    _, _, _, macros_used, macros_defined = _read(f)
    used |= set(macros_used)
    defined |= set(macros_defined)
  used -= {'gin.REQUIRED'}
  if path.startswith('t5x/methods/') or path.startswith('t5x/data/'):
    # Passed after a model gin: may use what the model defines.
    defined |= set().union(*(
        set(_read(f)[4]) for f in _closure('t5x/models/t5_1_1_tiny.gin')))
  assert used <= defined, f'{path}: undefined macros {sorted(used - defined)}'


def test_method_gins_set_the_papers_recipe():
  peft = {m: f't5x/methods/{m}.gin' for m in ('ia3', 'mov', 'lora', 'molora')}
  for path in peft.values():
    assert _macro_value(path, 'BATCH_SIZE') == 32
    assert _macro_value(path, 'TRAIN_STEPS') == 1_600_000
    assert _macro_value(path, 'TRAINABLE_REGEX') == [r'.*_adapter/.*']
    assert _macro_value(path, 'ADAPTER_ASSIGNMENT_MAP') == (
        (r'.*_adapter/.*', None),)
  full = 't5x/methods/full.gin'
  assert _macro_value(full, 'BATCH_SIZE') == 256
  assert _macro_value(full, 'TRAIN_STEPS') == 1_110_000
  for path in list(peft.values()) + [full]:
    assert _macro_value(path, 'DROPOUT_RATE') == 0.1
    assert _macro_value(path, 'LOSS_NORMALIZING_FACTOR') == (
        'AVERAGE_PER_SEQUENCE')
  model = 't5x/models/t5_1_1_xl.gin'
  assert _macro_value(model, 'Z_LOSS') == 1e-4
  assert _macro_value('t5x/data/t0.gin', 'TASK_FEATURE_LENGTHS') == {
      'inputs': 1024, 'targets': 256}


def test_assignment_map_skips_exactly_the_adapter_parameters():
  (pattern, replacement), = _macro_value('t5x/methods/mov.gin',
                                         'ADAPTER_ASSIGNMENT_MAP')
  assert replacement is None
  # t5x fully matches slash-joined optimizer-state keys.
  for key in ('target/encoder/layers_0/attention/key_adapter/mov_scaling',
              'target/decoder/layers_1/mlp/mlp_hidden_adapter/router/kernel',
              'state/param_states/encoder/layers_0/attention/query_adapter/'
              'lora_a/v'):
    assert re.fullmatch(pattern, key)
  for key in ('target/encoder/layers_0/attention/key/kernel',
              'state/param_states/decoder/logits_dense/kernel/v_row',
              'state/step'):
    assert not re.fullmatch(pattern, key)


def _logical_axes(method):
  gin_utils.parse_gin(['models/t5_1_1_tiny.gin', f'methods/{method}.gin'],
                      ['NUM_EMBEDDINGS = 384'])
  net = gin_utils.macro_value('NETWORK')
  tokens = jax.ShapeDtypeStruct((1, 8), np.int32)
  variables = jax.eval_shape(
      lambda t: net.init(jax.random.PRNGKey(0), t, t, t, enable_dropout=False),
      tokens)
  names = flax_partitioning.get_axis_names(variables['params_axes'])
  return {axis for spec in jax.tree_util.tree_leaves(
      names, is_leaf=lambda x: isinstance(x, tuple)) for axis in spec}


@pytest.mark.parametrize('method', METHODS)
def test_every_logical_axis_has_sharding_and_adafactor_rules(method):
  axes = _logical_axes(method)
  rules = _macro_value('t5x/axis_rules.gin', 'ADAPTER_AXIS_RULES')
  factor_rules = _macro_value('t5x/axis_rules.gin', 'ADAPTER_FACTOR_RULES')
  assert axes <= T5X_SHARDING_AXES | {name for name, _ in rules}
  assert axes <= T5X_FACTOR_AXES | set(factor_rules)
  if method in ('mov', 'molora'):
    assert 'expert' in axes
  if method in ('lora', 'molora'):
    assert 'rank' in axes


def test_trainable_filter_matches_like_trainable_regex():
  keep = t5x_compat.trainable_filter([r'.*_adapter/.*'])
  # flax's ModelParamTraversal passes paths with a leading slash.
  assert keep('/encoder/layers_0/attention/key_adapter/mov_scaling', None)
  assert keep('decoder/layers_0/mlp/mlp_hidden_adapter/router/kernel', None)
  assert not keep('/encoder/layers_0/attention/key/kernel', None)
  with pytest.raises(ValueError):
    t5x_compat.trainable_filter([])


def test_t5x_module_drops_router_side_outputs_from_init():
  gin_utils.parse_gin(['models/t5_1_1_tiny.gin', 'methods/mov.gin'],
                      ['NUM_EMBEDDINGS = 384', 'NUM_EXPERTS = 3'])
  net = gin_utils.macro_value('NETWORK')
  module = t5x_compat.t5x_module(net)
  assert isinstance(module, network.Transformer)
  assert (module.config, module.adapters) == (net.config, net.adapters)
  tokens = np.ones((2, 8), np.int32)
  init = lambda m: m.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                          enable_dropout=False)
  plain, wrapped = init(net), init(module)
  # Routers sow nothing during init, and the wrapper also keeps any other
  # side-output collection out of what t5x would take for model state.
  assert set(plain) == set(wrapped) == {'params', 'params_axes'}
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain['params'],
                         wrapped['params'])
  with pytest.raises(TypeError):
    t5x_compat.t5x_module('not a network')


def test_p3_task_registers_and_names_the_mixture(monkeypatch):
  monkeypatch.delenv('P3_DATA_DIR', raising=False)
  assert t5x_compat.p3_task('mini_p3_train') == 'mini_p3_train'
  with pytest.raises(ValueError, match='t0_train'):
    t5x_compat.p3_task('t0_train')


def test_data_gins_name_registered_tasks_and_their_vocabulary(monkeypatch):
  # The training data gins import only mov_jax: gin evaluates them without t5x.
  from mov_jax.tasks import mini_p3  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv('P3_DATA_DIR', raising=False)
  gin_utils.parse_gin(['t5x/data/mini_p3.gin'])
  assert gin_utils.macro_value('VOCABULARY') == mini_p3.vocabulary()
  assert mini_p3.vocabulary().vocab_size <= gin_utils.macro_value(
      'NUM_EMBEDDINGS')
  assert gin_utils.macro_value('USE_CACHED_TASKS') is False
  assert seqio.get_mixture_or_task(
      gin_utils.macro_value('MIXTURE_OR_TASK_NAME')).name == 'mini_p3_train'
  gin.clear_config(clear_constants=True)
  gin_utils.parse_gin(['t5x/data/t0.gin'],
                      ["P3_MIXTURE = 'mini_p3_train_score_eval'"])
  assert gin_utils.macro_value('MIXTURE_OR_TASK_NAME') == (
      'mini_p3_train_score_eval')
  gin.clear_config(clear_constants=True)
  gin_utils.parse_gin(['t5x/data/t0.gin'])
  with pytest.raises(ValueError, match='t0_train'):
    gin_utils.macro_value('MIXTURE_OR_TASK_NAME')  # No P3 copy here.


# ---------------------------------------------------------- with t5x

TINY = 't5x/models/t5_1_1_tiny.gin'
PARTITIONER_BINDINGS = """
from __gin__ import dynamic_registration
from t5x import partitioning
PARTITIONER = @partitioning.PjitPartitioner()
partitioning.PjitPartitioner.num_partitions = 1
partitioning.PjitPartitioner.logical_axis_rules = \\
    @partitioning.standard_logical_axis_rules()
"""


def _batch(vocab_size, rng):
  enc = rng.integers(2, vocab_size, (2, 12)).astype(np.int32)
  tgt = rng.integers(2, vocab_size, (2, 6)).astype(np.int32)
  dec_in = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], axis=1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec_in,
          'decoder_target_tokens': tgt,
          'decoder_loss_weights': np.ones_like(tgt, np.float32)}


@pytest.mark.parametrize('method', METHODS)
def test_t5x_trains_only_the_trainable_parameters(method):
  pytest.importorskip('t5x')
  from t5x import utils  # pylint: disable=g-import-not-at-top

  bindings = ['NUM_EXPERTS = 3'] if method in ('mov', 'molora') else []
  gin_utils.parse_gin([TINY, f't5x/methods/{method}.gin',
                       't5x/data/mini_p3.gin'], bindings, finalize=False)
  gin.parse_config(PARTITIONER_BINDINGS)
  model = gin_utils.macro_value('MODEL')
  partitioner = gin_utils.macro_value('PARTITIONER')
  regex = gin_utils.macro_value('TRAINABLE_REGEX')
  batch = _batch(model.module.config.vocab_size, np.random.default_rng(0))
  shapes = {k: v.shape for k, v in batch.items()}
  types = {k: v.dtype for k, v in batch.items()}
  initializer = utils.TrainStateInitializer(
      model.optimizer_def, model.get_initial_variables, shapes, partitioner,
      types)
  state = initializer.from_scratch(jax.random.PRNGKey(0))
  before = traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  trainable = optim.trainable_path_set(before, regex)
  if method != 'full':
    assert trainable and trainable < set(before)
  # Frozen parameters get no optimizer state.
  opt_state = traverse_util.flatten_dict(
      state.param_states, sep='/', is_leaf=lambda _, x: x is None)
  with_state = {p for p in before
                if any(k.startswith(p + '/') or k == p
                       for k, v in opt_state.items() if v is not None)}
  assert with_state == trainable

  grad_fn = jax.jit(jax.grad(lambda p, b: model.loss_fn(p, b, None)[0]))
  for _ in range(3):  # A router's gradient is 0 until its experts differ.
    grads = grad_fn(state.params, batch)
    state = state.apply_gradient(grads, learning_rate=1e-2)
  after = traverse_util.flatten_dict(jax.device_get(state.params), sep='/')
  changed = {p for p in before if not np.array_equal(before[p], after[p])}
  assert changed <= trainable
  assert changed, 'nothing trained'
  if method != 'full':
    assert changed == trainable


def _run(args, log_path, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             CUDA_VISIBLE_DEVICES='')
  with open(log_path, 'w', encoding='utf-8') as log:
    proc = subprocess.run([sys.executable, '-m'] + args, env=env, stdout=log,
                          stderr=subprocess.STDOUT, timeout=timeout,
                          check=False)
  with open(log_path, encoding='utf-8') as log:
    text = log.read()
  assert proc.returncode == 0, text[-5000:]
  return text


def _params(path):
  from t5x import checkpoints  # pylint: disable=g-import-not-at-top
  target = checkpoints.load_t5x_checkpoint(str(path))['target']
  flat = traverse_util.flatten_dict(target, sep='/')
  return {k: np.asarray(v) for k, v in flat.items()}


def test_t5x_binaries_train_mov_from_a_base_checkpoint_and_evaluate(tmp_path):
  pytest.importorskip('t5x')
  common = [f'--gin_search_paths={GIN_DIR}', f'--gin_file={TINY}',
            '--gin.BATCH_SIZE=8']
  base_dir, mov_dir, eval_dir = (tmp_path / 'base', tmp_path / 'mov',
                                 tmp_path / 'eval')
  # A plain base model in t5x's legacy checkpoint format, like lm100k.
  _run(['t5x.train'] + common + [
      '--gin_file=t5x/configs/runs/pretrain.gin',
      '--gin_file=t5x/data/mini_p3.gin', f"--gin.MODEL_DIR='{base_dir}'",
      '--gin.TRAIN_STEPS=2', '--gin.train.use_orbax=False'],
       tmp_path / 'base.log')
  # MoV fine-tuning from it: adapters initialised from scratch, base frozen;
  # then the run resumes from its own checkpoint (as after a preemption).
  finetune = ['t5x.train'] + common + [
      '--gin_file=t5x/runs/finetune.gin', '--gin_file=t5x/methods/mov.gin',
      '--gin_file=t5x/data/mini_p3.gin', f"--gin.MODEL_DIR='{mov_dir}'",
      f"--gin.INITIAL_CHECKPOINT_PATH='{base_dir}/checkpoint_2'",
      '--gin.NUM_EXPERTS=4']
  log = _run(finetune + ['--gin.TRAIN_STEPS=5'], tmp_path / 'mov.log')
  assert 'Skipping optimizer param=target/encoder/layers_0/attention/' \
      'key_adapter/mov_scaling' in log
  log = _run(finetune + ['--gin.TRAIN_STEPS=6'], tmp_path / 'resume.log')
  assert 'Skipping optimizer param' not in log

  base = _params(base_dir / 'checkpoint_2')
  start = _params(mov_dir / 'checkpoint_2')
  final = _params(mov_dir / 'checkpoint_6')
  adapters = {p for p in final if '_adapter/' in p}
  assert adapters and set(final) == set(base) | adapters
  assert set(start) == set(final)
  for path in base:  # Restored from the base and never trained.
    np.testing.assert_array_equal(final[path], base[path], err_msg=path)
  for path in adapters:
    if path.endswith('mov_scaling'):
      np.testing.assert_array_equal(start[path], 1.0, err_msg=path)
    assert not np.array_equal(final[path], start[path]), path

  evaluate = ['t5x.eval', f'--gin_search_paths={GIN_DIR}', f'--gin_file={TINY}',
              '--gin_file=t5x/configs/runs/eval.gin',
              '--gin_file=t5x/methods/mov.gin', '--gin.NUM_EXPERTS=4',
              f"--gin.CHECKPOINT_PATH='{mov_dir}/checkpoint_6'"]
  log = _run(evaluate + ['--gin_file=t5x/data/mini_p3_eval.gin',
                         f"--gin.EVAL_OUTPUT_DIR='{eval_dir}'"],
             tmp_path / 'eval.log')
  assert 'from scratch' not in log  # The trained adapters were loaded.
  metrics = sorted((eval_dir / 'inference_eval').glob('*-metrics.jsonl'))
  assert len(metrics) == 9  # mini-P3's held-out score-eval templates.
  for path in metrics:
    row = json.loads(path.read_text().splitlines()[-1])
    assert row['step'] == 6 and 0.0 <= row['accuracy'] <= 100.0, row

  # Generation through t5x's decoding (our key/value cache), a few examples.
  _run(evaluate + ['--gin_file=t5x/data/mini_p3.gin',
                   '--gin.TASK_FEATURE_LENGTHS=None',
                   "--gin.utils.DatasetConfig.split='validation'",
                   '--gin.seqio.Evaluator.num_examples=8',
                   f"--gin.EVAL_OUTPUT_DIR='{eval_dir}/decode'"],
       tmp_path / 'decode.log')
  outputs = sorted((eval_dir / 'decode' / 'inference_eval').glob(
      'word_copy_first_word-*[0-9].jsonl'))
  rows = [json.loads(line) for line in outputs[0].read_text().splitlines()]
  assert len(rows) == 8 and all('prediction' in row for row in rows)
