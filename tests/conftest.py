"""Test-wide settings, applied before JAX is imported.

- Two simulated CPU devices, so the pmap paths run as on a multi-device host.
- XLA's CPU backend at optimization level 0: the tests run tiny models for a few steps, where compile time
  dominates; level 0 compiles about 4x faster.
- A persistent compilation cache shared by the tests of one process (and the trainer processes they start), so
  a step compiled once (for example by the uninterrupted and the resumed training runs) is not compiled again.
- Under pytest-xdist (`scripts/test.sh` runs two workers), each test module runs whole in one worker, so its
  module fixtures are built once. The modules that share the session's uninterrupted training run form one group,
  scheduled first because it is the longest.
"""

import os
import tempfile

os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  (after the XLA flags)
import pytest  # noqa: E402

# One cache per xdist worker: JAX writes cache entries without a lock, so two workers must not share one.
jax.config.update('jax_compilation_cache_dir', os.path.join(
    tempfile.gettempdir(), 'lld_jax_test_jit_cache_' + os.environ.get('PYTEST_XDIST_WORKER', 'main')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)

from tiny_training import tiny_download, uninterrupted_run  # noqa: E402,F401  (session fixtures)

SHARED_RUN_MODULES = ('test_reliability', 'test_train')


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
  def group(item):
    module = item.module.__name__
    return 'shared_uninterrupted_run' if module in SHARED_RUN_MODULES else module

  for item in items:
    item.add_marker(pytest.mark.xdist_group(group(item)))
  items.sort(key=lambda item: group(item) != 'shared_uninterrupted_run')  # stable: the rest keep their order
