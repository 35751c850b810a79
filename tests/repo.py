"""The repository as the tests see it: its root, and its scripts as modules (they are run by path, not installed)."""

import importlib.util
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
  """The module `scripts/<name>.py`, executed once."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, 'scripts', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
