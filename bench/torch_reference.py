"""The PyTorch reference of bench/train_step.py: the same step in eager
PyTorch, on Hugging Face's T5.

    python bench/train_step.py --methods=ia3,torch:ia3,mov-10,torch:mov-10

A method `torch:<method>` in train_step.py's --methods runs here, in a worker
process that takes turns with the JAX workers of the same size, so that both
sides see the same machine load. It trains `transformers`'
`T5ForConditionalGeneration` built from the same model gin (same shapes, same
Hugging Face config as `mov-convert` writes), with the method's adapters
installed at the same sites, with the same shapes and the same math:

  * (IA)3 / MoV (`vectors`): the key and value projections' outputs, per
    head, and the activated first FFN branch are multiplied by
    `1 + probs @ (vectors - 1)`, `probs = softmax(x @ router)` in float32 on
    the tensor being scaled (IA3: by its one vector, no router);
  * LoRA / MoLoRA (`lora`): a projection's output gets
    `(alpha / r) * ((x A) * probs) B`, all experts' down-projections as one
    matmul of rank E*r, scaled by the router probabilities, then one matmul
    with B (LoRA: no router).

The loss is token cross-entropy plus the output z-loss of the run gin,
optimised with `torch.optim.Adafactor` (factored second moments, as in our
runs). Not reproduced: the router statistics our step computes for its
metrics. `tests/test_bench.py` checks that this model, given our parameters,
computes our network's logits for every method, and that it trains the same
number of parameters.

The parent (train_step.py) reads the gins and passes a JSON `spec` (the
Hugging Face config, the adapter sites, what trains, the model FLOPs) so that
this process imports neither JAX nor gin: its memory is PyTorch's alone.
Step times, tokens/s, FLOPs and `peak_fraction` are comparable with the JAX
records (the same FLOP count, the same matmul peak: the JAX workers'); the
reference's own 2048 x 2048 matmul speed is kept as
`reference_matmul_flops`.
"""

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

SCRIPT = os.path.abspath(__file__)
NAME = 'PyTorch reference'

# Our site names -> Hugging Face module attributes.
ATTENTION_PROJECTIONS = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}
FFN_PROJECTIONS = ('wi', 'wi_0', 'wi_1', 'wo')


# ------------------------------------------------------------ the parent side


def check_dtype(dtype: str) -> None:
  if dtype != 'float32':
    raise ValueError(f'{NAME}: float32 only (it runs on CPU), got '
                     f'--dtype={dtype}.')


def spec_from_config(cfg) -> Dict[str, Any]:
  """What a reference worker needs from a `train.TrainConfig` (JSON-able;
  the parent adds the model FLOPs, `flops`).

  Raises ValueError for adapters this reference does not implement (only
  soft token-level routing, the paper's best and our default)."""
  from mov_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from mov_jax.adapters import lora  # pylint: disable=g-import-not-at-top
  from mov_jax.adapters import routing  # pylint: disable=g-import-not-at-top
  from mov_jax.adapters import vectors  # pylint: disable=g-import-not-at-top
  adapters = cfg.network.adapters
  sites = {}
  for site in (adapters.active_sites() if adapters is not None else ()):
    template = adapters.template(site)
    router = template.router
    if router is not None and router != routing.RouterConfig(
        z_loss_weight=router.z_loss_weight,
        load_balance_weight=router.load_balance_weight,
        kernel_stddev=router.kernel_stddev):
      raise ValueError(f'{NAME}: site {site!r} routes with '
                       f'{router}; only soft token-level routing (top_k '
                       'None, no jitter) is implemented.')
    if isinstance(template, vectors.MixtureOfVectors):
      if template.router_input != vectors.ADAPTED:
        raise ValueError(f'{NAME}: MoV routes on the adapted '
                         'tensor only (router_input="adapted").')
      sites[site] = {'kind': 'vectors', 'num_experts': template.num_experts,
                     'router': router is not None}
    elif isinstance(template, lora.MixtureOfLoRA):
      sites[site] = {'kind': 'lora', 'num_experts': template.num_experts,
                     'router': router is not None, 'rank': template.rank,
                     'alpha': template.alpha}
    else:
      raise ValueError(f'{NAME}: no PyTorch version of '
                       f'{type(template).__name__} (site {site!r}).')
  # Whether the base trains: TRAINABLE_REGEX (fully matched, as
  # `optim.trainable_path_set` does) against a base parameter's path.
  regexes = cfg.trainable_regex
  regexes = [regexes] if isinstance(regexes, str) else regexes
  base_trainable = any(re.fullmatch(rx, 'encoder/layers_0/mlp/wo/kernel')
                       for rx in regexes)
  return {
      'hf_config': checkpoints.hf_config_from_t5(cfg.network.config),
      'sites': sites,
      'attention_blocks': (list(adapters.attention_blocks) if adapters
                           is not None else []),
      'base_trainable': base_trainable,
      'z_loss': cfg.z_loss,
      'learning_rate': cfg.optimizer.learning_rate,
  }


# ------------------------------------------------------------- the adapters


class MixtureOfVectors(nn.Module):
  """`x * (1 + probs @ (vectors - 1))`, per head for `[b, l, heads, kv]`
  (IA3 without a router: `x * vector`). Parameters as ours: `scaling`
  `[heads, E, kv]` or `[E, features]`, `router` weight `[E, kv or
  features]` (our kernel transposed)."""

  def __init__(self, features: int, heads: Optional[int], num_experts: int,
               router: bool):
    super().__init__()
    self.per_head = heads is not None
    shape = ((heads, num_experts, features) if self.per_head else
             (num_experts, features))
    self.scaling = nn.Parameter(torch.ones(shape))
    self.router = None
    if router:
      self.router = nn.Linear(features, num_experts, bias=False)
      nn.init.normal_(self.router.weight, std=0.02)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.router is None:
      return x * (self.scaling[:, 0] if self.per_head else self.scaling[0])
    probs = torch.softmax(self.router(x.float()), dim=-1)
    if self.per_head:
      merged = torch.einsum('blhe,hek->blhk', probs, self.scaling - 1.0)
    else:
      merged = probs @ (self.scaling - 1.0)
    return x * (1.0 + merged).to(x.dtype)


class MixtureOfLoRA(nn.Module):
  """`y + (alpha / r) * ((x A) * probs) B` (LoRA without a router).
  Parameters as ours: `lora_a [d_in, E, r]`, `lora_b [E, r, d_out]`."""

  def __init__(self, d_in: int, d_out: int, num_experts: int, rank: int,
               alpha: float, router: bool):
    super().__init__()
    self.num_experts, self.rank, self.scale = num_experts, rank, alpha / rank
    self.lora_a = nn.Parameter(0.02 * torch.randn(d_in, num_experts, rank))
    self.lora_b = nn.Parameter(torch.zeros(num_experts, rank, d_out))
    self.router = None
    if router:
      self.router = nn.Linear(d_in, num_experts, bias=False)
      nn.init.normal_(self.router.weight, std=0.02)

  def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    rows = self.num_experts * self.rank
    hidden = x @ self.lora_a.reshape(-1, rows)
    if self.router is not None:
      probs = torch.softmax(self.router(x.float()), dim=-1).to(x.dtype)
      hidden = (hidden.unflatten(-1, (self.num_experts, self.rank)) *
                probs[..., None]).flatten(-2)
    delta = hidden @ self.lora_b.reshape(rows, -1)
    return y + self.scale * delta


class AdaptedLinear(nn.Module):
  """A projection (`nn.Linear`) followed by its site's adapter."""

  def __init__(self, linear: nn.Linear, adapter: nn.Module,
               head_dim: Optional[int] = None):
    super().__init__()
    self.linear, self.adapter, self.head_dim = linear, adapter, head_dim

  @property
  def weight(self) -> torch.Tensor:
    """The projection's weight (Hugging Face's T5 reads `wo.weight`)."""
    return self.linear.weight

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.linear(x)
    if isinstance(self.adapter, MixtureOfLoRA):
      return self.adapter(x, y)
    if self.head_dim is None:
      return self.adapter(y)
    # Per head: [b, l, heads * kv] -> [b, l, heads, kv] and back.
    return self.adapter(y.unflatten(-1, (-1, self.head_dim))).flatten(-2)


class AdaptedActivation(nn.Module):
  """The FFN activation followed by the `mlp_hidden` adapter."""

  def __init__(self, act: nn.Module, adapter: nn.Module):
    super().__init__()
    self.act, self.adapter = act, adapter

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.adapter(self.act(x))


def _blocks(model):
  """(our block path, its Hugging Face attention or FFN module, kind) for
  every attention and FFN block."""
  for i, block in enumerate(model.encoder.block):
    yield f'encoder/layers_{i}/attention', block.layer[0].SelfAttention, \
        'encoder_self'
    yield f'encoder/layers_{i}/mlp', block.layer[1].DenseReluDense, 'mlp'
  for i, block in enumerate(model.decoder.block):
    yield f'decoder/layers_{i}/self_attention', \
        block.layer[0].SelfAttention, 'decoder_self'
    yield f'decoder/layers_{i}/encoder_decoder_attention', \
        block.layer[1].EncDecAttention, 'decoder_cross'
    yield f'decoder/layers_{i}/mlp', block.layer[2].DenseReluDense, 'mlp'


def _adapter(site: Mapping[str, Any], d_in: int, d_out: int,
             heads: Optional[int]) -> nn.Module:
  if site['kind'] == 'vectors':
    return MixtureOfVectors(d_out // (heads or 1), heads, site['num_experts'],
                            site['router'])
  return MixtureOfLoRA(d_in, d_out, site['num_experts'], site['rank'],
                       site['alpha'], site['router'])


def build_model(spec: Mapping[str, Any]):
  """`T5ForConditionalGeneration` (random weights) with the spec's adapters;
  returns (model, {our adapter path: adapter module})."""
  import transformers  # pylint: disable=g-import-not-at-top
  hf = dict(spec['hf_config'])
  config = transformers.T5Config(**hf)
  model = transformers.T5ForConditionalGeneration(config)
  if not hf['tie_word_embeddings'] and (
      model.lm_head.weight is model.shared.weight):
    # Recent transformers tie lm_head to the embedding even when asked not
    # to; T5 v1.1 has its own (it trains, and costs Adafactor state).
    model.lm_head.weight = nn.Parameter(
        model.lm_head.weight.detach().clone().normal_(std=1.0))
  sites = spec['sites']
  installed = {}
  for path, module, kind in _blocks(model):
    if kind == 'mlp':
      for name in FFN_PROJECTIONS:
        if name in sites and hasattr(module, name):
          linear = getattr(module, name)
          adapter = _adapter(sites[name], linear.in_features,
                             linear.out_features, None)
          setattr(module, name, AdaptedLinear(linear, adapter))
          installed[f'{path}/{name}_adapter'] = adapter
      if 'mlp_hidden' in sites:
        first = module.wi_0 if hasattr(module, 'wi_0') else module.wi
        if isinstance(first, AdaptedLinear):
          first = first.linear
        adapter = _adapter(sites['mlp_hidden'], first.out_features,
                           first.out_features, None)
        module.act = AdaptedActivation(module.act, adapter)
        installed[f'{path}/mlp_hidden_adapter'] = adapter
      continue
    if kind not in spec['attention_blocks']:
      continue
    for name, attr in ATTENTION_PROJECTIONS.items():
      if name not in sites:
        continue
      linear = getattr(module, attr)
      # Adapters of q, k, v see [b, l, heads, kv] outputs (per-head MoV).
      heads = hf['num_heads'] if name != 'out' else None
      adapter = _adapter(sites[name], linear.in_features,
                         linear.out_features, heads)
      setattr(module, attr, AdaptedLinear(
          linear, adapter, hf['d_kv'] if heads else None))
      installed[f'{path}/{name}_adapter'] = adapter
  for name, param in model.named_parameters():
    param.requires_grad_(spec['base_trainable'] or '.adapter.' in name)
  return model, installed


def load_params(model, installed: Mapping[str, nn.Module],
                params: Mapping[str, np.ndarray], config) -> None:
  """Copies our parameters (flat, '/'-joined paths) into `build_model`'s
  model: the base through the Hugging Face converter, the adapters by path.
  `config` is our `network.T5Config`."""
  from mov_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  base = checkpoints.hf_state_dict_from_params(
      traverse_util.unflatten_dict(dict(params), sep='/'), config)
  state = {k: v for k, v in model.state_dict().items()}
  with torch.no_grad():
    for hf_name, value in base.items():
      # Adapted projections moved under `.linear`.
      target = hf_name if hf_name in state else re.sub(
          r'\.weight$', '.linear.weight', hf_name)
      state[target].copy_(torch.from_numpy(np.asarray(value)))
    for path, adapter in installed.items():
      mine = {k[len(path) + 1:]: np.asarray(v) for k, v in params.items()
              if k.startswith(path + '/')}
      if isinstance(adapter, MixtureOfVectors):
        adapter.scaling.copy_(torch.from_numpy(mine.pop('mov_scaling')))
      else:
        adapter.lora_a.copy_(torch.from_numpy(mine.pop('lora_a')))
        adapter.lora_b.copy_(torch.from_numpy(mine.pop('lora_b')))
      if adapter.router is not None:
        adapter.router.weight.copy_(
            torch.from_numpy(mine.pop('router/kernel').T.copy()))
      if mine:
        raise ValueError(f'{path}: parameters the reference has no place '
                         f'for: {sorted(mine)}')
  model.load_state_dict(state)


def count_trainable(model) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------ worker


def synthetic_batch(batch_size: int, input_length: int, target_length: int,
                    vocab_size: int, seed: int) -> Dict[str, torch.Tensor]:
  """`common.synthetic_batch`'s tokens as tensors."""
  batch = common.synthetic_batch(batch_size, input_length, target_length,
                                 vocab_size, seed)
  return {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}


class ReferenceWorker(common.TimedStepWorker):
  """The child process of one `torch:` configuration (the protocol of
  `common.TimedStepWorker`, as train_step.StepWorker)."""

  def __init__(self, args):
    super().__init__(jax_devices=False)
    check_dtype(args.dtype)
    rss_at_start = common.rss_mb()
    torch.manual_seed(args.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    spec = json.loads(args.spec)
    start = time.perf_counter()
    self.model, _ = build_model(spec)
    self.model.train()
    self.z_loss = spec['z_loss']
    trainable = [p for p in self.model.parameters() if p.requires_grad]
    self.optimizer = torch.optim.Adafactor(trainable,
                                           lr=spec['learning_rate'])
    self.batch = synthetic_batch(args.batch_size, args.input_length,
                                 args.target_length,
                                 spec['hf_config']['vocab_size'], args.seed)
    first = self._step()
    common.progress(f'built and ran a first step in '
                    f'{time.perf_counter() - start:.1f}s')
    for i in range(args.warmup):
      common.progress(f'warm-up step {i + 1}/{args.warmup}: '
                      f'{self._step():.3f}s')
    memory = self.measure_memory()
    n = args.matmul_size or 2048
    self.matmul_n = n
    self.matmul_operands = (torch.randn(n, n), torch.randn(n, n))
    total = sum(p.numel() for p in self.model.parameters())
    machine = {**common.host_info(), 'backend': 'cpu', 'device_kind': 'cpu',
               'device_count': 1, 'torch_version': torch.__version__,
               'torch_threads': torch.get_num_threads()}
    self.ready = {
        'compile_s': first, 'xla_flops_per_step': None,
        'memory': memory, 'flops_per_step': spec['flops']['total'],
        'flops_forward': spec['flops']['forward'],
        'rss_at_start_mb': rss_at_start,
        'trainable_params': count_trainable(self.model),
        'total_params': total, 'matmul_size': n, 'machine': machine,
        'rss_before_steps_mb': common.rss_mb()}

  def _run_step(self) -> torch.Tensor:
    b = self.batch
    logits = self.model(
        input_ids=b['encoder_input_tokens'],
        decoder_input_ids=b['decoder_input_tokens']).logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    targets = b['decoder_target_tokens']
    target_logits = logits.gather(-1, targets[..., None])[..., 0]
    token_loss = log_z - target_logits + self.z_loss * log_z ** 2
    loss = token_loss.mean()
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss.detach()

  def _matmul_times(self, count: int) -> Dict[str, List[float]]:
    # The peak stays the JAX matmul's (the ceiling); torch's own is
    # kept as the reference's.
    a, b = self.matmul_operands
    out = []
    for _ in range(count):
      start = time.perf_counter()
      torch.mm(a, b)
      out.append(time.perf_counter() - start)
    return {'matmul_s': [], 'reference_matmul_s': out}


def worker_args(args, size: str, method: str, spec: Dict[str, Any]):
  return [*common.step_worker_flags(args, size, method),
          f'--spec={json.dumps(spec)}']


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--worker', action='store_true', required=True,
                      help='Run as train_step.py\'s worker (the only use).')
  for flag in ('size', 'method', 'dtype', 'spec'):
    parser.add_argument(f'--{flag}', required=True)
  for flag in ('batch_size', 'input_length', 'target_length', 'warmup',
               'seed', 'matmul_size'):
    parser.add_argument(f'--{flag}', type=int, required=True)
  args = parser.parse_args(argv)
  worker = ReferenceWorker(args)
  common.serve(worker.handle, worker.ready)
  return 0


if __name__ == '__main__':
  sys.exit(main())
