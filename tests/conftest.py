"""Shared test setup: CPU-only JAX, quiet TensorFlow, clean gin state."""

import os
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Many tests (and the training and eval binaries they start) compile the
# same tiny programs: a persistent compilation cache shared by every
# process of the run (pytest-xdist workers, subprocesses inherit it) compiles
# each once. A size limit turns on the cache's file lock, which makes
# concurrent reads and writes safe.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    tempfile.gettempdir(), f'mov_jax_tests_jax_cache_{os.getuid()}'))
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))

import gin  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config(clear_constants=True)
  yield
  gin.clear_config(clear_constants=True)
