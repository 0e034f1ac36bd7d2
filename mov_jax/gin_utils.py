"""Gin plumbing shared by the mov-jax binaries.

Flags follow the t5x binaries: `--gin_file` (repeatable), `--gin_bindings`
(repeatable), `--gin_search_paths` (comma separated) and the shorthand
`--gin.MACRO=value`, which becomes the binding `MACRO = value`.
The directory of the installed gin files is always on the search path, so
`--gin_file=models/t5_1_1_small.gin` works from anywhere.
"""

import argparse
import contextlib
import logging
import os
import re
import pathlib
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import gin


def gin_dir() -> pathlib.Path:
  """Directory of mov-jax's own gin files (`models/`, `methods/`, ...).

  A wheel installs them as `mov_jax/gin_files/`; a source checkout (and an
  editable install) keeps them in `<repo>/gin/`. The directory deliberately
  has no `__init__.py`: a package named `gin` would shadow gin-config for
  anything started from the repository root.
  """
  package_dir = pathlib.Path(__file__).resolve().parent
  for candidate in (package_dir / 'gin_files', package_dir.parent / 'gin'):
    if (candidate / 'models').is_dir():
      return candidate
  raise FileNotFoundError(
      f'mov-jax gin files not found next to {package_dir}; reinstall mov-jax '
      '(pip install -e .) from a complete checkout.')


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """Turns `--gin.X=V` (and `--gin.X V`) into `--gin_bindings=X = V`."""
  out = []
  it = iter(argv)
  for arg in it:
    if arg.startswith('--gin.'):
      body = arg[len('--gin.'):]
      if '=' in body:
        name, value = body.split('=', 1)
      else:
        name = body
        try:
          value = next(it)
        except StopIteration:
          raise ValueError(f'{arg} needs a value, e.g. {arg}=1000.') from None
      out.append(f'--gin_bindings={name} = {value}')
    else:
      out.append(arg)
  return out


def add_gin_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--gin_file', action='append', default=[],
                      help='Gin file to parse (repeatable; later wins).')
  parser.add_argument('--gin_bindings', action='append', default=[],
                      help='Gin binding, e.g. "TRAIN_STEPS = 10" (repeatable).')
  parser.add_argument('--gin_search_paths', default='',
                      help='Comma-separated directories to look for gin files '
                      'in, before the installed mov-jax gin directory.')


def parse_args(parser: argparse.ArgumentParser,
               argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  """Parses `argv` (default sys.argv[1:]) after rewriting `--gin.X=V`."""
  import sys  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    argv = rewrite_gin_args(argv)
  except ValueError as e:
    parser.error(str(e))
  return parser.parse_args(argv)


def _resolve(path: str, search_paths: Iterable[str]) -> str:
  if os.path.isabs(path) or os.path.exists(path):
    return path
  for root in search_paths:
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  raise FileNotFoundError(
      f'Gin file {path!r} not found in the working directory nor in the gin '
      f'search paths {list(search_paths)}. Pass an existing path or add its '
      'directory with --gin_search_paths=DIR.')


def parse_gin(gin_files: Sequence[str],
              bindings: Sequence[str] = (),
              search_paths: Sequence[str] = (),
              finalize: bool = True,
              allow_unused_macros: bool = False) -> List[str]:
  """Parses gin files and bindings with clear errors.

  The installed gin directory is searched last, so a user's own
  `models/foo.gin` wins over ours. Raises ValueError naming the file or
  binding that failed, with gin's own message, and for a binding of a macro
  that no file defines or uses (gin would create it and nothing would read
  it: a misspelt `--gin.TRAIN_STEPZ=10` would change nothing), unless
  `allow_unused_macros`. Returns those macros' names.
  """
  paths = [p for p in search_paths if p] + [str(gin_dir())]
  for path in paths:
    gin.add_config_file_search_path(path)
  resolved = [_resolve(f, paths) for f in gin_files]
  with _quiet_include_search():
    unused, known = _parse_all(resolved, bindings)
  if unused and not allow_unused_macros:
    raise ValueError(
        'No gin file given defines or uses the macro(s) ' + ', '.join(
            _with_suggestion(name, known) for name in unused) +
        ', so the binding would have no effect. Check the spelling, or '
        'include the gin file that uses it (e.g. runs/finetune.gin for the '
        'training macros, methods/mov.gin for NUM_EXPERTS).')
  if finalize:
    try:
      gin.finalize()
    except Exception as e:  # pylint: disable=broad-except
      required = re.findall(r'(\w+)/macro\.value set to `%gin\.REQUIRED`',
                            str(e))
      if required:
        raise ValueError(
            'Missing required gin macro(s): ' + ', '.join(
                f'{name} (set it with --gin.{name}=...)' for name in required)
            + '.') from None
      raise ValueError(f'Invalid gin configuration: {e}') from e
  return unused


class _IncludeSearchFilter(logging.Filter):
  """Drops gin's 'Path not found' log for search paths that lack an include
  (it tries each path in turn; a real miss still raises an error)."""

  def filter(self, record):
    return not str(record.msg).startswith('Path not found')


@contextlib.contextmanager
def _quiet_include_search():
  flt = _IncludeSearchFilter()
  root = logging.getLogger()
  root.addFilter(flt)
  try:
    yield
  finally:
    root.removeFilter(flt)


_MACRO_BINDING = re.compile(r'\s*([A-Za-z_]\w*)\s*=')
_MACRO_REFERENCE = re.compile(r'%([A-Za-z_]\w*)')
_MACRO_DEFINITION = re.compile(r'(?m)^([A-Za-z_]\w*) = ')


def _parse_all(resolved: Sequence[str], bindings: Sequence[str]
               ) -> Tuple[List[str], set]:
  """Parses; returns the macros `bindings` bind that no file defines or
  uses, and the macros known (defined or used)."""
  for f in resolved:
    try:
      gin.parse_config_file(f, skip_unknown=False)
    except Exception as e:  # gin raises several types; name the file.
      raise ValueError(f'Could not parse gin file {f}: {e}') from e
  parsed = gin.config_str()
  known = set(_MACRO_DEFINITION.findall(parsed)) | set(
      _MACRO_REFERENCE.findall(parsed))
  for binding in bindings:
    try:
      gin.parse_config(binding, skip_unknown=False)
    except Exception as e:
      raise ValueError(
          f'Could not parse gin binding {binding!r}: {e}. Bindings look like '
          '--gin.MACRO=value or --gin_bindings="module.fn.arg = value".'
      ) from e
  for binding in bindings:  # A binding may define a macro another uses.
    known.update(_MACRO_REFERENCE.findall(binding))
  unused = [m.group(1) for m in map(_MACRO_BINDING.match, bindings)
            if m and m.group(1) not in known]
  return unused, known


def _with_suggestion(name: str, known: Iterable[str]) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  close = difflib.get_close_matches(name, sorted(known), n=1)
  return f'{name} (did you mean {close[0]}?)' if close else name


def macro_value(name: str, hint: str = '') -> Any:
  """Evaluates macro `%name` of the parsed config (calling `@fn()` refs)."""
  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError:
    raise ValueError(
        f'Gin macro {name} is not defined. {hint}'.rstrip()) from None
  if isinstance(value, gin.config.ConfigurableReference):
    if value.evaluate:
      return value.scoped_configurable_fn()
    return value.scoped_configurable_fn
  return value


def setup_from_args(args: argparse.Namespace,
                    extra_bindings: Tuple[str, ...] = ()) -> None:
  search = [p for p in args.gin_search_paths.split(',') if p]
  parse_gin(args.gin_file, list(extra_bindings) + list(args.gin_bindings),
            search)


def require_macros(required: Mapping[str, str]) -> None:
  """Fails naming every `required` macro (name -> how to set it) that is
  undefined, None or still %gin.REQUIRED."""
  missing = []
  for name in required:
    try:
      value = gin.query_parameter(f'%{name}')
    except ValueError:
      value = None
    if value is None or value is gin.REQUIRED or (
        isinstance(value, gin.config.ConfigurableReference) and
        'REQUIRED' in str(value)):
      missing.append(f'{name} (set it with {required[name]})')
  if missing:
    raise ValueError(f'Missing required gin macro(s): {"; ".join(missing)}.')


def setup_binary(args: argparse.Namespace) -> None:
  """A binary's start: TensorFlow kept off the accelerators (tf.data only
  reads files), the multi-host job joined, a note on CPU when glibc's malloc
  is not set up for XLA (`host_memory`), gin parsed, tasks registered
  (P3_DATA_DIR)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mov_jax import host_memory  # pylint: disable=g-import-not-at-top
  from mov_jax import partitioning  # pylint: disable=g-import-not-at-top
  partitioning.hide_accelerators_from_tensorflow()
  partitioning.initialize_distributed(args)
  if jax.process_index() == 0:
    host_memory.print_advice(jax.default_backend())
  setup_from_args(args)
  from mov_jax import tasks  # pylint: disable=g-import-not-at-top
  tasks.setup_from_gin()
