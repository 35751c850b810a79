r"""Performance benchmark of the detector: compile time, training throughput, FLOPs and MFU, matcher share,
input pipeline, inference, memory, 1 -> 2 device scaling and a recompilation check.

  python scripts/benchmark.py --config=configs/NAME.py --out=FILE.json [--config.key=value ...] [--steps=N]
      [--synthetic_batches] [--skip_scaling]

Writes FILE.json and prints it. Keys (rates are per second of wall time, measured after warm-up):
  compile_s               lower + compile of the pmapped train step (alone; the scaling and inference programs
                          compile after it, side by side)
  train_images_per_s      pmapped train step on device-resident batches (global batch / step time)
  train_step_flops        FLOPs of one global step (XLA cost analysis of the per-device program x devices)
  train_flops_per_s       train_step_flops x steps/s
  matmul_peak_flops_per_s one device's measured peak (bf16 8192^2 matmul on GPU/TPU, f32 2048^2 on CPU)
  mfu                     train_flops_per_s / (matmul peak x devices; x1 on CPU, whose devices share the cores)
  matcher_fraction        Hungarian matching time per step (one assignment vmapped over the matched prediction
                          sets and the per-device batch, as in the step) / step time
  pipeline_images_per_s   input_pipeline.train_dataset as numpy on the host (null with --synthetic_batches or
                          when the dataset is not available; then the train step runs on random batches)
  infer_images_per_s_b1/_b8  jitted train.predict_step on one device
  peak_rss_gb, device_peak_memory_gb   process max RSS and device peak_bytes_in_use (GiB)
  scaling_2dev            train throughput on 2 devices / on 1 device (same per-device batch, random batches),
                          in this process; on a CPU host the script simulates 2 devices and measures everything
                          else on the first one. null with a reason in scaling_2dev_note
  recompiles_after_first_step  backend compilations of the train step after its first call, with the outputs
                          fed back and the state donated as in training; the script exits 1 unless it is 0

With --profile=FILE.txt it also traces a few steps with jax.profiler and attributes every executed XLA
operation (CPU thunks, GPU kernels) to the model component it came from, through the op_name metadata of the
compiled program: milliseconds per step by component, forward and backward apart, and the top operations.
"""

import collections
import functools
import glob
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import threading
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)



def _simulate_two_cpu_devices():
  """A CPU host gets 2 simulated devices for the scaling measurement (set before JAX is imported); GPU and TPU
  hosts ignore the flag."""
  if any(a in ('--skip_scaling', '--skip_scaling=true', '--skip_scaling=True') for a in sys.argv[1:]):
    return
  xla_flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_force_host_platform_device_count' not in xla_flags:
    os.environ['XLA_FLAGS'] = f'{xla_flags} --xla_force_host_platform_device_count=2'.strip()


_simulate_two_cpu_devices()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import numpy as np  # noqa: E402

try:  # TensorFlow feeds the real pipeline; accelerator hosts without it still benchmark on random batches.
  from lld_jax import input_pipeline  # noqa: E402  (hides the GPUs from TensorFlow)
except ImportError as _tf_error:
  input_pipeline = None
  _PIPELINE_MISSING = f'input pipeline unavailable: {_tf_error}'
from lld_jax import matching  # noqa: E402
from lld_jax import sharding  # noqa: E402
from lld_jax import train_step as train  # noqa: E402
from tfds_lld import lld_format  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('out', None, 'Where to write the JSON results.')
flags.DEFINE_integer('steps', None, 'Timed train steps (at least); default 10 on CPU, 50 on accelerators.')
flags.DEFINE_integer('warmup_steps', 2, 'Untimed train steps after the first call.')
flags.DEFINE_integer('pipeline_batches', None, 'Host batches timed for the input pipeline (default = --steps).')
flags.DEFINE_integer('infer_repeats', None, 'Timed predict calls per batch size (default 5 on CPU, 20 else).')
flags.DEFINE_bool('synthetic_batches', False, 'Random batches instead of the dataset; pipeline_images_per_s=null.')
flags.DEFINE_bool('skip_scaling', False, 'Do not measure the 1 -> 2 device scaling.')
flags.DEFINE_string('profile', None, 'Also profile a few train steps and write where the time goes (text file).')
flags.DEFINE_integer('profile_steps', 3, 'Steps traced by --profile.')
flags.mark_flags_as_required(['config', 'out'])
FLAGS = flags.FLAGS

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


class CompileCounter:
  """Counts XLA backend compilations (jax.monitoring events) while `active`."""

  def __init__(self):
    self.active = False
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if self.active and event == COMPILE_EVENT:
      self.count += 1


def block(tree):
  return jax.tree_util.tree_map(lambda x: x.block_until_ready() if hasattr(x, 'block_until_ready') else x, tree)


def total_flops(compiled):
  """Sum of 'flops' of a compiled executable's cost analysis (a dict, or a list of dicts in older JAX)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('cost_analysis failed: %s', error)
    return None
  if analysis is None:
    return None
  if isinstance(analysis, dict):
    analysis = [analysis]
  flops = [float(a.get('flops', 0.0)) for a in analysis if a]
  return sum(flops) if flops else None


def num_classes_for(config):
  """Class count from the TFDS builder's static info (no data needed), else LLD's."""
  try:
    import tensorflow_datasets as tfds
    import tfds_lld.lld  # noqa: F401
    import tfds_lld.txl_pbc  # noqa: F401
    builder = tfds.builder(f'{config.dataset.name}/{config.dataset.config}',
                           data_dir=config.dataset.data_dir or None)
    return builder.info.features['objects']['label'].num_classes
  except Exception as error:  # pylint: disable=broad-except
    logging.warning('class count from the builder failed (%s); using LLD\'s %d', error, lld_format.NUM_CLASSES)
    return lld_format.NUM_CLASSES


_CONTROL_FLOW = ('while', 'body', 'cond', 'closed_call', 'checkpoint', 'remat')


def op_names(hlo_text):
  """{instruction name: op_name} from a compiled module's text (fusions carry their root's metadata)."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"', line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def component(op_name, depth=2):
  """'jit(f)/transpose(jvp(Detector))/decoder0/cross_attention/mul' -> 'backward: decoder0/cross_attention'.

  Model scopes are the plain path parts; transformations (jvp(...), vmap(...), pmap(...)) carry parentheses, and
  the last part is the primitive itself.
  """
  parts = op_name.split('/')
  direction = 'backward' if any(p.startswith('transpose(') for p in parts) else 'forward'
  if 'while' in parts:
    return f'{direction}: matching (Hungarian loops)'
  scope = [p for p in parts[:-1] if '(' not in p and p not in _CONTROL_FLOW]
  return f'{direction}: {"/".join(scope[:depth]) or "(step: loss, optimizer, collectives)"}'


def profile_steps(p_step, replicated, batch, compiled_text, num_steps, out_path):
  """Traces `num_steps` steps and writes the per-component breakdown; returns the state after them."""
  names = op_names(compiled_text)
  trace_dir = tempfile.mkdtemp(prefix='lld_profile_')
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(num_steps):
      replicated, metrics = p_step(replicated, batch)
    block((replicated, metrics))
  traced_s = (time.perf_counter() - start) / num_steps
  with gzip.open(sorted(glob.glob(os.path.join(trace_dir, '**', '*.json.gz'), recursive=True))[-1]) as f:
    trace = json.load(f)
  by_component, by_op = collections.Counter(), collections.Counter()
  for event in trace['traceEvents'] if isinstance(trace, dict) else trace:
    name = event.get('name', '').split(':')[0]
    if event.get('ph') == 'X' and name in names:
      by_component[component(names[name])] += event.get('dur', 0)
      by_op[f'{name} <- {names[name][-100:]}'] += event.get('dur', 0)
  attributed_ms = sum(by_component.values()) / 1e3 / num_steps
  lines = [f'{jax.devices()[0].device_kind} x {jax.local_device_count()}, {config_path()} {" ".join(config_overrides())}',
           f'step under the profiler: {traced_s * 1e3:.1f} ms; operations attributed: {attributed_ms:.1f} ms per step '
           '(summed over devices; CPU operations can also overlap)', '', '  ms/step  share  component']
  for label, micros in by_component.most_common(40):
    ms = micros / 1e3 / num_steps
    lines.append(f'{ms:9.2f}  {ms / max(attributed_ms, 1e-9):5.1%}  {label}')
  lines += ['', 'top operations, ms/step:']
  lines += [f'{micros / 1e3 / num_steps:9.2f}  {label}' for label, micros in by_op.most_common(25)]
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return replicated


def load_dataset(config):
  """(builder, None) when the config's dataset is built or buildable from its manual_dir, else (None, reason)."""
  if input_pipeline is None:
    return None, _PIPELINE_MISSING
  import tensorflow_datasets as tfds
  import tfds_lld.lld  # noqa: F401
  import tfds_lld.txl_pbc  # noqa: F401
  d = config.dataset
  try:
    builder = tfds.builder(f'{d.name}/{d.config}', data_dir=d.data_dir or None)
    if not builder.is_prepared() and not (d.manual_dir and os.path.isdir(d.manual_dir)):
      return None, (f'dataset {d.name}/{d.config} is not built in {builder.data_dir} and manual_dir '
                    f'{d.manual_dir!r} does not exist')
    return input_pipeline.load_builder(d.name, d.config, d.data_dir or None, d.manual_dir or None), None
  except Exception as error:  # pylint: disable=broad-except
    return None, f'dataset not available: {type(error).__name__}: {error}'


def time_pipeline(builder, config, num_devices, num_batches):
  ds = input_pipeline.train_dataset(builder, config.dataset.train_split, config, num_devices, config.seed)
  it = ds.as_numpy_iterator()
  first = next(it)  # builds the pipeline, fills the first shuffle buffer
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  elapsed = time.perf_counter() - start
  images = num_batches * num_devices * config.per_device_batch_size
  return images / elapsed, first


def matmul_peak(platform, repeats=5):
  if platform == 'cpu':
    n, dtype = 2048, jnp.float32
  else:
    n, dtype = 8192, jnp.bfloat16
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def matcher_seconds(config, repeats):
  """Seconds of the step's Hungarian matching: one assignment vmapped over every matched prediction set and the
  per-device batch, as lld_jax.criterion runs it (random costs)."""
  shape = (matchings_per_step(config), config.per_device_batch_size, config.model.num_queries, config.max_objects)
  cost = jax.random.uniform(jax.random.PRNGKey(1), shape)
  f = jax.jit(jax.vmap(jax.vmap(matching.hungarian_match)))
  block(f(cost))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(f(cost))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matchings_per_step(config):
  """Prediction sets matched per step: the decoder layers (all with aux_loss), plus the proposals or the tokens
  when the encoder is matched one-to-one."""
  m = config.model
  encoder = m.two_stage and config.loss.encoder_loss in ('one_to_one', 'one_to_one_tokens')
  return (m.num_decoder_layers if config.loss.aux_loss else 1) + (1 if encoder else 0)


def predict_program(model, variables, config, batch_size, device):
  """(compile function, arguments) of the jitted predict step on one device."""
  size = config.image_size
  rng = np.random.default_rng(2)
  batch = {'image': jax.device_put(rng.standard_normal((batch_size, size, size, 3), dtype=np.float32), device),
           'image_mask': jax.device_put(np.ones((batch_size, size, size), np.float32), device),
           'scale': jax.device_put(np.ones((batch_size,), np.float32), device)}
  args = (jax.device_put(variables, device), batch)
  f = jax.jit(functools.partial(train.predict_step, model=model))
  return (lambda: f.lower(*args).compile()), args


def time_predict(compiled, args, batch_size, repeats):
  block(compiled(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled(*args)
  block(out)
  return batch_size * repeats / (time.perf_counter() - start)


def train_program(model, tx, config, host_state, host_batch, devices):
  """(compile function, (state, batch) on `devices`, pmapped step) of the train step on `devices`."""
  p_step = jax.pmap(functools.partial(train.train_step, model=model, tx=tx, config=config), axis_name=train.AXIS,
                    devices=devices, donate_argnums=(0,))
  batch = jax.tree_util.tree_map(lambda x: x[:len(devices)], host_batch)
  args = (sharding.replicate(host_state, devices), sharding.shard(batch, devices))
  return (lambda: p_step.lower(*args).compile()), args, p_step


def compile_all(programs):
  """Compiles {name: compile function} in parallel threads (JAX releases the GIL while XLA compiles); returns
  {name: (compiled, seconds)}."""
  results, errors = {}, []

  def run(name, compile_fn):
    start = time.perf_counter()
    try:
      results[name] = (compile_fn(), time.perf_counter() - start)
    except Exception as error:  # pylint: disable=broad-except
      errors.append(error)

  threads = [threading.Thread(target=run, args=item) for item in programs.items()]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise errors[0]
  return results


def time_train(p_step, state, batch, steps, warmup_steps, counter=None):
  """Seconds per step after the first call and `warmup_steps`, outputs fed back; returns (seconds, state,
  metrics). Counts compilations during the warm-up and timed steps when a counter is given."""
  state, metrics = p_step(state, batch)
  block((state, metrics))
  if counter is not None:
    counter.active = True
  for _ in range(warmup_steps):
    state, metrics = p_step(state, batch)
  block((state, metrics))
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = p_step(state, batch)
  block((state, metrics))
  seconds = (time.perf_counter() - start) / steps
  if counter is not None:
    counter.active = False
  return seconds, state, metrics


def config_path():
  return config_flags.get_config_filename(FLAGS['config'])


def config_overrides():
  """The --config.key=value arguments of this invocation, for the JSON."""
  out = []
  args = sys.argv[1:]
  i = 0
  while i < len(args):
    a = args[i]
    if a.startswith('--config.'):
      if '=' in a:
        out.append(a)
      elif i + 1 < len(args):
        out.extend([a, args[i + 1]])
        i += 1
    i += 1
  return out


def main(argv):
  del argv
  config = FLAGS.config
  platform = jax.default_backend()
  steps = FLAGS.steps or (10 if platform == 'cpu' else 50)
  devices = jax.local_devices()
  # Simulated CPU devices share the same cores: everything but the scaling is measured on one of them.
  primary = devices[:1] if platform == 'cpu' else devices
  num_devices = len(primary)
  global_batch = num_devices * config.per_device_batch_size
  counter = CompileCounter()
  results = {
      'config': os.path.splitext(os.path.basename(config_path()))[0],
      'config_overrides': config_overrides(),
      'device': devices[0].device_kind, 'platform': platform, 'num_devices': num_devices,
      'jax_version': jax.__version__, 'image_size': config.image_size,
      'per_device_batch': config.per_device_batch_size, 'global_batch': global_batch, 'steps': steps,
      'dtype': config.model.dtype, 'host_cpu_count': os.cpu_count(),
      'host_load_avg_at_start': list(os.getloadavg()),
  }
  scaling = not FLAGS.skip_scaling and len(devices) >= 2 and platform in ('cpu', 'gpu')

  # Data: the real pipeline if available (and not --synthetic_batches), else random batches.
  builder, reason = (None, '--synthetic_batches') if FLAGS.synthetic_batches else load_dataset(config)
  if builder is not None:
    num_classes = input_pipeline.dataset_info(builder).num_classes
    pipeline_rate, host_batch = time_pipeline(builder, config, num_devices, FLAGS.pipeline_batches or steps)
    results['pipeline_images_per_s'] = pipeline_rate
    results['batches'] = 'dataset'
  else:
    num_classes = num_classes_for(config)
    host_batch = train.random_batch(config, num_devices, num_classes)
    results['pipeline_images_per_s'] = None
    results['pipeline_note'] = reason
    results['batches'] = 'random'
  results['num_classes'] = num_classes
  keys = ('image', 'image_mask', 'scale', 'boxes', 'labels', 'attributes', 'weight', 'annotation_mask',
          'num_truncated', 'cell_crops', 'cell_crop_labels')
  # The true-cell crops (config.cell_crop_batch_size) come from the trainer's pool, not the pipeline: random
  # ones of the same shape cost the step the same.
  host_batch = {**train.random_batch(config, num_devices, num_classes), **host_batch}
  host_batch = {k: v for k, v in host_batch.items() if k in keys}

  model = train.create_model(config, num_classes)
  state, tx = train.create_train_state(model, config, jax.random.PRNGKey(config.seed),
                                       load_pretrained=False)  # speed does not depend on the weights
  host_state = jax.device_get(state)
  host_variables = jax.device_get(train.model_variables(state, False))
  del state

  programs, arguments, steppers = {}, {}, {}
  programs['train'], arguments['train'], steppers['train'] = train_program(
      model, tx, config, host_state, host_batch, primary)
  for batch_size in (1, 8):
    programs[f'predict_b{batch_size}'], arguments[f'predict_b{batch_size}'] = predict_program(
        model, host_variables, config, batch_size, primary[0])
  if scaling:
    random_batches = train.random_batch(config, 2, num_classes)
    random_batches = {k: v for k, v in random_batches.items() if k in keys}
    for n in (1, 2):
      if n == num_devices:  # the main program, run again on random batches
        steppers[f'train_{n}dev'] = steppers['train']
        arguments[f'train_{n}dev'] = (sharding.replicate(host_state, primary), sharding.shard(
            jax.tree_util.tree_map(lambda x, n=n: x[:n], random_batches), primary))
      else:
        programs[f'train_{n}dev'], arguments[f'train_{n}dev'], steppers[f'train_{n}dev'] = train_program(
            model, tx, config, host_state, random_batches, devices[:n])

  # The train step compiles alone, so that compile_s is its own; the other programs then compile side by side.
  start = time.perf_counter()
  compiled = compile_all({'train': programs.pop('train')})
  compiled.update(compile_all(programs))
  results['compile_all_s'] = time.perf_counter() - start
  results['compile_s'] = compiled['train'][1]
  results['compile_note'] = (f'lower + compile of the train step alone; then {", ".join(programs)} in parallel '
                             'threads; compile_all_s covers both')
  per_device_flops = total_flops(compiled['train'][0])
  compiled_text = compiled['train'][0].as_text() if FLAGS.profile else None

  replicated, batch = arguments.pop('train')
  step_s, replicated, metrics = time_train(steppers['train'], replicated, batch, steps, FLAGS.warmup_steps, counter)
  results['train_step_s'] = step_s
  results['train_images_per_s'] = global_batch / step_s
  results['recompiles_after_first_step'] = counter.count
  results['final_loss'] = float(jax.device_get(metrics['loss'])[0])
  if FLAGS.profile:
    replicated = profile_steps(steppers['train'], replicated, batch, compiled_text, FLAGS.profile_steps,
                               FLAGS.profile)
  del replicated, metrics, batch

  results['train_step_flops'] = None if per_device_flops is None else per_device_flops * num_devices
  results['train_flops_per_s'] = None if per_device_flops is None else per_device_flops * num_devices / step_s
  peak = matmul_peak(platform)
  results['matmul_peak_flops_per_s'] = peak
  peak_total = peak if platform == 'cpu' else peak * num_devices
  results['mfu'] = None if per_device_flops is None else results['train_flops_per_s'] / peak_total
  results['mfu_note'] = ('FLOPs from XLA cost_analysis (while-loop bodies such as the Hungarian solver are '
                         'counted once); peak = measured matmul' + ('' if platform == 'cpu' or num_devices == 1
                                                                    else ' x devices'))

  match_s = matcher_seconds(config, repeats=5 if platform == 'cpu' else 20)
  results['matcher_s'] = match_s
  results['matchings_per_step'] = matchings_per_step(config)
  results['matcher_fraction'] = match_s / step_s

  repeats = FLAGS.infer_repeats or (5 if platform == 'cpu' else 20)
  for batch_size in (1, 8):
    name = f'predict_b{batch_size}'
    results[f'infer_images_per_s_b{batch_size}'] = time_predict(compiled[name][0], arguments.pop(name),
                                                                batch_size, repeats)

  if scaling:
    rates = {}
    for n in (1, 2):
      name = f'train_{n}dev'
      seconds, *_ = time_train(steppers[name], *arguments.pop(name), steps, FLAGS.warmup_steps)
      rates[n] = n * config.per_device_batch_size / seconds
    results['train_images_per_s_1dev'] = rates[1]
    results['train_images_per_s_2dev'] = rates[2]
    results['scaling_2dev'] = rates[2] / rates[1]
    results['scaling_2dev_note'] = ('same per-device batch, random batches' +
                                    ('; 2 CPU devices simulated with --xla_force_host_platform_device_count share '
                                     'the same cores' if platform == 'cpu' else ''))
  else:
    results['scaling_2dev'] = None
    results['scaling_2dev_note'] = ('--skip_scaling' if FLAGS.skip_scaling else
                                    f'{len(devices)} {platform} device(s) on this host: a 2-device run needs at '
                                    'least 2 devices')

  results['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
  try:
    stats = primary[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
      results['device_peak_memory_gb'] = stats['peak_bytes_in_use'] / 2 ** 30
  except Exception:  # pylint: disable=broad-except
    pass
  results['host_load_avg_at_end'] = list(os.getloadavg())
  write(results)
  if counter.count != 0:
    print(f'FAILED: the train step compiled {counter.count} more time(s) after its first call (outputs fed back, '
          'state donated)', file=sys.stderr)
    sys.exit(1)


def write(results):
  text = json.dumps(results, indent=2)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, 'w') as f:
    f.write(text + '\n')
  print(text)


if __name__ == '__main__':
  app.run(main)
