"""Parses a command line's config flags exactly as `python -m lld_jax.train` does (config file locked), in a
fresh process, so that the tests see what the trainer would see."""

import json
import subprocess
import sys

from repo import REPO_ROOT

_PARSE_SCRIPT = """
import sys
from absl import flags
from ml_collections import config_flags
config_flags.DEFINE_config_file('config', None, 'config', lock_config=True)
flags.DEFINE_string('workdir', None, 'workdir')
flags.FLAGS(['prog'] + sys.argv[1:])
print(flags.FLAGS.config.to_json())
"""


def parse_train_config(argv):
  """The config (as a dict) that `--config=FILE [--workdir=DIR] --config.key=value ...` gives. Raises ValueError
  with the parser's message if the flags are refused."""
  result = subprocess.run([sys.executable, '-c', _PARSE_SCRIPT] + list(argv), capture_output=True, text=True,
                          cwd=REPO_ROOT, check=False)
  if result.returncode:
    raise ValueError(result.stderr)
  return json.loads(result.stdout)
