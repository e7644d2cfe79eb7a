"""Where the time of one meta-training step goes: a ``jax.profiler`` trace, read offline as a table.

  python benchmarks/profile_step.py --config=omniglot_20way1shot --steps=3 --out=profile.json
  python benchmarks/profile_step.py --config=tiny --set=model.conv_impl=xla
  python benchmarks/profile_step.py --parse=/path/to/trace_dir    # a trace taken elsewhere

Capturing: the step is built as training builds it (``meta.make_train_step`` on device-resident
synthetic images of the real shapes), compiled, warmed up, then ``--steps`` steps are traced and
timed. Parsing needs no UI and no TensorFlow: it reads the trace-viewer JSON
(``*.trace.json.gz``) that ``jax.profiler`` writes next to its protobuf, takes every event that
an XLA op left on a device (on a GPU: the kernels, which carry ``hlo_op``; on the CPU: the ops of
XLA's thunk executor), and prints

* the top kernels (name, calls, total and mean µs, share of kernel time, µs per step);
* kernel time (the sum of the kernels' durations), busy time (their union over streams, which
  can overlap), the span from the first kernel to the last, and the wall time per step measured
  around the traced steps: wall - busy is what the device waited for the host (launch gaps);
* the split by category: conv, dot/GEMM, reduce, elementwise, copy/transpose/layout,
  scatter/select-and-scatter, sort, other;
* achieved GB/s of every reduction kernel (bytes read and written per call, from its operand and
  output shapes in the optimised HLO, over its mean time): which reductions are slow;
* what each top kernel computes, where the optimised HLO lies beside the trace
  (``optimized_hlo.txt.gz``, written by the capture here and by ``benchmarks/formulations.py``):
  the HLO instruction it runs (XLA names its kernels after them), its output and operand shapes,
  the ops of its fused computation, the JAX operations they came from (``op_name`` metadata) and
  the lines of this repository's code that called them.

The same parser reads the traces that ``benchmarks/formulations.py --trace_dir`` writes.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import provenance  # noqa: E402  (benchmarks/provenance.py)

# (category, pattern on the kernel name or its hlo_op), first match wins.
CATEGORIES = (
    ('sort', r'sort'),
    ('scatter', r'scatter'),
    ('conv', r'conv|fprop|dgrad|wgrad|winograd|fft|implicit_gemm|flip_filter|cudnn'),
    ('dot', r'gemm|dot|cublas|cutlass|matmul'),
    ('reduce', r'reduce'),
    ('copy', r'copy|transpose|memcpy|memset|concatenate|pad|slice|reshape|bitcast|'
             r'dynamic-update|dynamic_update|gather|nhwcTo|nchwTo|iota'),
    ('elementwise', r'fusion|loop_|multiply|add|subtract|divide|select|compare|maximum|exp|log|'
                    r'tanh|rsqrt|negate|convert|and|or'),
)
# Not ops of their own: markers, and XLA:CPU's control-flow thunks (a while loop's event spans
# the ops of its body, which are events too).
SKIP_NAMES = re.compile(r'^end: |^ThunkExecutor|^ThreadpoolListener|^Wait for|'
                        r'^(while|call|conditional)(\.\d+)?$')


# A fusion of only these moves data (im2col patches, their gradients: slices, pads and sums).
_MOVE_OPS = {'pad', 'slice', 'concatenate', 'copy', 'transpose', 'dynamic-slice',
             'dynamic-update-slice', 'gather', 'reverse', 'add'}
_NOT_ARITHMETIC = {'custom-call', 'fusion', 'call', 'while', 'conditional'}


def category(name: str, hlo_op: str = '', fused_ops=()) -> str:
  """The category of a kernel: from the ops of the HLO it runs where those are known, else from
  its name. Names mislead: XLA:CPU runs its GEMMs as 'ynn_fusion's, and XLA names a fusion after
  a few of its ops ('pad_add_fusion' may be a batch-norm backward with its output padded)."""
  ops = set(fused_ops)
  for cat, present in (('sort', {'sort'}), ('scatter', {'scatter', 'select-and-scatter'}),
                       ('conv', {'convolution'}), ('dot', {'dot'}),
                       ('reduce', {'reduce', 'reduce-window'})):
    if ops & present:
      return cat
  if ops and ops <= _MOVE_OPS:
    return 'copy'
  if ops - _MOVE_OPS - _NOT_ARITHMETIC:
    return 'elementwise'      # arithmetic, with or without the pads and slices fused into it
  text = f'{name} {hlo_op}'.lower()
  for cat, pat in CATEGORIES:
    if re.search(pat.lower(), text):
      return cat
  return 'other'


def find_trace(path: str) -> str:
  """The newest ``*.trace.json.gz`` under ``path`` (or ``path`` itself)."""
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, '**', '*.trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not found:
    raise FileNotFoundError(f'no *.trace.json.gz under {path}: capture one with --config, or '
                            'point --parse at the folder jax.profiler wrote')
  return found[-1]


def device_events(trace: dict) -> list[dict]:
  """The events XLA ops left on a device: on accelerators every event of a '/device:' process
  (kernels, memcpy/memset), on the CPU the events that carry ``hlo_op``."""
  ev = trace.get('traceEvents', [])
  procs = {e['pid']: e['args']['name'] for e in ev
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  on_device = {pid for pid, name in procs.items() if name.startswith('/device:')}
  out = []
  for e in ev:
    if e.get('ph') != 'X' or SKIP_NAMES.search(e.get('name', '')):
      continue
    if on_device:
      if e['pid'] in on_device:
        out.append(e)
    elif 'hlo_op' in e.get('args', {}):
      out.append(e)
  return out


def _union(intervals) -> float:
  total, end = 0.0, None
  start = None
  for s, e in sorted(intervals):
    if end is None or s > end:
      if end is not None:
        total += end - start
      start, end = s, e
    else:
      end = max(end, e)
  if end is not None:
    total += end - start
  return total


def summarise(events: list[dict], steps: int, wall_s_per_step: float | None = None,
              top: int = 20, hlo: dict | None = None) -> dict:
  """The tables of the module docstring from the device events of ``steps`` traced steps;
  with ``hlo`` (:func:`hlo_index`) each kernel is categorised by the ops it runs and each top
  kernel says what it computes (:func:`describe`)."""
  steps = max(1, steps)
  descs: dict[tuple[str, str], dict | None] = {}

  def desc_of(name, hlo_op):
    if (name, hlo_op) not in descs:
      descs[name, hlo_op] = describe(hlo, name, hlo_op) if hlo else None
    return descs[name, hlo_op]

  def cat_of(name, hlo_op):
    d = desc_of(name, hlo_op)
    return category(name, hlo_op, d['all_ops'] if d else ())

  by_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, ''])
  by_cat = collections.Counter()
  for e in events:
    args = e.get('args', {})
    d = float(e.get('dur', 0.0))
    k = by_name[e['name']]
    k[0] += 1
    k[1] += d
    k[2] = args.get('hlo_op', k[2])
    by_cat[cat_of(e['name'], args.get('hlo_op', ''))] += d
  kernel_us = sum(v[1] for v in by_name.values())
  busy_us = _union((float(e['ts']), float(e['ts']) + float(e.get('dur', 0.0))) for e in events)
  span_us = (max(float(e['ts']) + float(e.get('dur', 0.0)) for e in events) -
             min(float(e['ts']) for e in events)) if events else 0.0
  rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
  out = {
      'steps': steps, 'events': len(events), 'kernels_per_step': len(events) / steps,
      'kernel_ms_per_step': kernel_us / steps / 1e3, 'busy_ms_per_step': busy_us / steps / 1e3,
      'span_ms_per_step': span_us / steps / 1e3,
      'wall_ms_per_step': None if wall_s_per_step is None else 1e3 * wall_s_per_step,
      'top': [{'name': n, 'hlo_op': v[2], 'calls': v[0], 'total_us': v[1],
               'mean_us': v[1] / v[0], 'share': v[1] / kernel_us if kernel_us else 0.0,
               'us_per_step': v[1] / steps, 'category': cat_of(n, v[2]),
               **({'hlo': desc_of(n, v[2])} if desc_of(n, v[2]) else {})} for n, v in rows],
      'categories': {c: {'ms_per_step': us / steps / 1e3,
                         'share': us / kernel_us if kernel_us else 0.0}
                     for c, us in by_cat.most_common()},
  }
  if out['wall_ms_per_step']:
    out['host_gap_ms_per_step'] = out['wall_ms_per_step'] - out['busy_ms_per_step']
  if hlo:
    out['reductions'] = reduction_bandwidth(
        [(n, v[0], v[1], desc_of(n, v[2])) for n, v in by_name.items()
         if cat_of(n, v[2]) == 'reduce'], steps)
  return out


# bytes per element of the HLO element types (pred and the 8-bit ones: 1)
_DTYPE_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'c64': 8, 'c128': 16, 'f32': 4, 's32': 4, 'u32': 4,
                'f16': 2, 'bf16': 2, 's16': 2, 'u16': 2}


def shape_bytes(shapes: str) -> int:
  """The bytes of every array shape in ``shapes`` ('f32[4,64] f32[4,64]': 2048)."""
  total = 0
  for dtype, dims in re.findall(r'\b(pred|[subfc]\d+|bf16|f8\w*)\[([\d,]*)\]', shapes):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 1)
  return total


def reduction_bandwidth(kernels, steps: int) -> list[dict]:
  """Achieved GB/s of each reduction kernel ``(name, calls, total_us, description)``: the bytes it
  reads and writes per call (its operands' and outputs' shapes in the optimised HLO; an operand
  read twice counts once, so this is a lower bound) over its mean time per call. Slowest first
  by time per step; kernels without a description (no HLO instruction of that name) are left
  out."""
  out = []
  for name, calls, total_us, d in kernels:
    if not d or not calls or total_us <= 0:
      continue
    moved = shape_bytes(d['shape']) + sum(shape_bytes(o) for o in d['operands'])
    mean_s = total_us / calls / 1e6
    out.append({'name': name, 'instruction': d['instruction'], 'calls': calls,
                'us_per_step': total_us / steps, 'mean_us': 1e6 * mean_s, 'bytes': moved,
                'gb_per_s': moved / mean_s / 1e9, 'shape': d['shape'], 'operands': d['operands'],
                'jax_ops': d['jax_ops'][:2], 'source': d['source'][:2]})
  return sorted(out, key=lambda r: -r['us_per_step'])


HLO_FILE = 'optimized_hlo.txt.gz'
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = ')
_SHAPE = re.compile(r'\b(?:pred|[subf]\d+|bf16|f8\w*|c64|c128|token)\[[\d,]*\]')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\) -> .* \{$')
# the ops a fused computation is described by (the rest: parameters, constants, broadcasts,
# bitcasts and reshapes, which move no data of their own)
_QUIET_OPS = {'parameter', 'constant', 'broadcast', 'bitcast', 'reshape', 'tuple',
              'get-tuple-element', 'iota'}


def _norm(name: str) -> str:
  """An HLO instruction's name as XLA names its kernel ('input_reduce_fusion.7' ->
  'input_reduce_fusion_7')."""
  return re.sub(r'[.\-]', '_', name)


def _balanced(text: str, start: int) -> int:
  """The index just past the parenthesis group that opens at ``text[start]``."""
  depth = 0
  for i in range(start, len(text)):
    depth += {'(': 1, ')': -1}.get(text[i], 0)
    if depth == 0:
      return i + 1
  return len(text)


def _instruction(line: str) -> dict | None:
  m = _INSTR.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith('('):                       # a tuple shape
    end = _balanced(rest, 0)
  else:
    end = rest.find(' ')
  shape, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r'([\w\-]+)\(', rest)
  if not op:
    return None
  args_end = _balanced(rest, op.end() - 1)
  attrs = rest[args_end:]
  get = lambda pat: (re.search(pat, attrs) or [None, None])[1]
  return {'name': m.group(1), 'shape': ' '.join(_SHAPE.findall(shape)) or shape,
          'op': op.group(1),
          'operands': re.findall(r'%?([\w.\-]+)', rest[op.end():args_end - 1]),
          'kind': get(r'kind=(\w+)'), 'calls': get(r'calls=%?([\w.\-]+)'),
          'op_name': get(r'op_name="([^"]*)"'), 'frame': get(r'stack_frame_id=(\d+)')}


def hlo_index(text: str) -> dict:
  """The optimised HLO module's text, indexed: ``instr`` (kernel-style name -> instruction, with
  the computation holding it), ``comps`` (name -> its instructions) and ``frames`` (stack frame
  id -> [(file, line, function)], innermost first) from the module's source tables."""
  tables: dict[str, dict[int, str]] = {}
  instr, comps, comp, section = {}, {}, None, None
  for line in text.splitlines():
    head = line.strip()
    if head in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      section, comp = head, None
      tables[section] = {}
      continue
    m = _COMP.match(line)
    if m:
      comp, section = m.group(1), None
      comps[comp] = []
      continue
    if section and head:
      k, _, v = head.partition(' ')
      if k.isdigit():
        tables[section][int(k)] = v
      continue
    if head == '}':
      comp = None
    if comp is None:
      continue
    ins = _instruction(line)
    if ins:
      ins['computation'] = comp
      comps[comp].append(ins)
      instr.setdefault(_norm(ins['name']), ins)
  return {'instr': instr, 'comps': comps, 'frames': _frames(tables)}


def _frames(t: dict) -> dict[int, list[tuple[str, int, str]]]:
  files = {k: v.strip('"') for k, v in t.get('FileNames', {}).items()}
  funcs = {k: v.strip('"') for k, v in t.get('FunctionNames', {}).items()}
  num = lambda v, key: int((re.search(rf'{key}=(\d+)', v) or [0, 0])[1])
  locs = {k: (files.get(num(v, 'file_name_id'), '?'), num(v, 'line'),
              funcs.get(num(v, 'function_name_id'), '?'))
          for k, v in t.get('FileLocations', {}).items()}
  raw = {k: (num(v, 'file_location_id'), num(v, 'parent_frame_id'))
         for k, v in t.get('StackFrames', {}).items()}
  out = {}
  for k in raw:
    chain, seen, f = [], set(), k
    while f in raw and f not in seen:
      seen.add(f)
      loc, parent = raw[f]
      if loc in locs:
        chain.append(locs[loc])
      f = parent
    out[k] = chain
  return out


def describe(hlo: dict, name: str, hlo_op: str = '', repo_dirs=('metadrop_jax',)) -> dict | None:
  """What the kernel ``name`` (or its ``hlo_op``) computes, from :func:`hlo_index`; None where
  no instruction has its name (library kernels: cuBLAS, cuDNN)."""
  ins = hlo['instr'].get(_norm(name)) or (hlo['instr'].get(_norm(hlo_op)) if hlo_op else None)
  if ins is None:
    return None
  shapes = {i['name']: i['shape'] for i in hlo['comps'].get(ins['computation'], [])}
  body = hlo['comps'].get(ins['calls'], []) if ins['calls'] else [ins]
  ops = collections.Counter(i['op'] for i in body if i['op'] not in _QUIET_OPS)
  names = collections.Counter(re.sub(r'^(?:jit\([^)]*\)/)+', '', i['op_name'])
                              for i in body if i['op_name'])
  source = collections.Counter()
  for i in body:
    for file, line, func in hlo['frames'].get(int(i['frame'] or -1), []):
      if any(f'{d}/' in file or file.startswith(d) for d in repo_dirs):
        source[f'{file.split("/")[-1]}:{line} {func}'] += 1
        break
  return {'instruction': ins['name'], 'op': ins['op'], 'kind': ins['kind'],
          'shape': ins['shape'],
          'operands': [shapes[o] for o in ins['operands'] if o in shapes],
          'ops': dict(ops.most_common(8)), 'all_ops': sorted(ops),
          'jax_ops': [n for n, _ in names.most_common(4)],
          'source': [s for s, _ in source.most_common(3)]}


def parse(path: str, steps: int, wall_s_per_step: float | None = None, top: int = 20) -> dict:
  trace_path = find_trace(path)
  with gzip.open(trace_path, 'rt') as f:
    trace = json.load(f)
  hlo = None
  hlo_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), HLO_FILE)
  if os.path.exists(hlo_path):
    with gzip.open(hlo_path, 'rt') as f:
      hlo = hlo_index(f.read())
  out = summarise(device_events(trace), steps, wall_s_per_step, top, hlo)
  out['trace'] = trace_path
  return out


def format_profile(p: dict) -> str:
  wall = p.get('wall_ms_per_step')
  lines = [f"{p['kernels_per_step']:.0f} device ops per step; per step: kernels "
           f"{p['kernel_ms_per_step']:.2f} ms, busy (union over streams) "
           f"{p['busy_ms_per_step']:.2f} ms, span {p['span_ms_per_step']:.2f} ms"
           + (f", wall {wall:.2f} ms (host/launch gap {p['host_gap_ms_per_step']:.2f} ms)"
              if wall else ''),
           f"{'category':<14}{'ms/step':>9}{'share':>8}"]
  for c, v in p['categories'].items():
    lines.append(f"{c:<14}{v['ms_per_step']:9.3f}{v['share']:8.1%}")
  lines.append(f"{'us/step':>9}{'calls':>7}{'mean us':>9}{'share':>7}  {'category':<12}kernel")
  for r in p['top']:
    lines.append(f"{r['us_per_step']:9.1f}{r['calls']:7d}{r['mean_us']:9.1f}{r['share']:7.1%}  "
                 f"{r['category']:<12}{r['name'][:90]}")
    if r.get('hlo'):
      lines.append(' ' * 34 + format_hlo(r['hlo']))
  if p.get('reductions'):
    lines.append('reductions: achieved GB/s = bytes read + written per call (operand and output '
                 'shapes of the optimised HLO) / mean time')
    lines.append(f"{'us/step':>9}{'calls':>7}{'mean us':>9}{'MB':>9}{'GB/s':>8}  kernel")
    for r in p['reductions'][:15]:
      where = '; '.join(r['source'] or r['jax_ops'])
      lines.append(f"{r['us_per_step']:9.1f}{r['calls']:7d}{r['mean_us']:9.1f}"
                   f"{r['bytes'] / 1e6:9.1f}{r['gb_per_s']:8.1f}  {r['name'][:48]} "
                   f"{r['shape'][:30]} {where}"[:200])
  return '\n'.join(lines)


def format_hlo(d: dict) -> str:
  """One line: shape <- operand shapes, the fused ops, the JAX ops and our source lines."""
  ops = ' '.join(f'{k}x{v}' for k, v in d['ops'].items())
  where = '; '.join(d['source'] or d['jax_ops'][:2])
  return (f"{d['shape'][:40]} <- {', '.join(x[:28] for x in d['operands'][:3])} "
          f"[{ops}] {where}")[:200]


def capture(config_name: str, method: str, overrides: dict, steps: int, warmup: int,
            trace_dir: str) -> float:
  """Traces ``steps`` train steps of a config into ``trace_dir``; returns wall s per step."""
  import jax
  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import configs
  import meta_step
  from metadrop_jax import keys as keys_lib
  from metadrop_jax import meta
  config = configs.get(config_name, **{'method': method, **overrides})
  images = jax.device_put(meta_step._synthetic_images(config))
  init_key, train_key = keys_lib.run_keys(config)
  state, tx = meta.create_state(init_key, config)
  step = meta.make_train_step(config, tx).lower(state, images, train_key).compile()
  os.makedirs(trace_dir, exist_ok=True)
  with gzip.open(os.path.join(trace_dir, HLO_FILE), 'wt') as f:
    f.write(step.as_text())        # what parse() names the kernels by
  for _ in range(warmup):
    state, _ = step(state, images, train_key)
  jax.block_until_ready(state)
  jax.profiler.start_trace(trace_dir)
  t = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, images, train_key)
  jax.block_until_ready(state)
  wall = (time.perf_counter() - t) / steps
  jax.profiler.stop_trace()
  return wall


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--config', default='omniglot_20way1shot', help="paper config name or 'tiny'")
  ap.add_argument('--method', default='metadrop')
  ap.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                  help='config override, e.g. model.conv_impl=xla')
  ap.add_argument('--precision', default='highest', choices=['highest', 'default'])
  ap.add_argument('--steps', type=int, default=3, help='traced steps')
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--top', type=int, default=20)
  ap.add_argument('--trace_dir', default='', help='keep the trace here (default: a temp folder)')
  ap.add_argument('--parse', default='', help='only parse this trace (file or folder)')
  ap.add_argument('--wall_ms', type=float, default=None,
                  help='with --parse: the measured wall ms per step, for the host-gap column')
  ap.add_argument('--out', default='', help='write the tables as JSON here')
  a = ap.parse_args(argv)
  if a.steps < 1:
    ap.error('--steps must be >= 1')
  if a.parse:
    p = parse(a.parse, a.steps, None if a.wall_ms is None else a.wall_ms / 1e3, a.top)
  else:
    import jax
    sys.path.insert(0, ROOT)
    from metadrop_jax.cli import parse_overrides
    jax.config.update('jax_default_matmul_precision', a.precision)
    trace_dir = a.trace_dir or tempfile.mkdtemp(prefix='profile_step_')
    wall = capture(a.config, a.method, parse_overrides(a.set), a.steps, a.warmup, trace_dir)
    p = parse(trace_dir, a.steps, wall, a.top)
    dev = jax.devices()[0]
    p.update(config=a.config, method=a.method, overrides=parse_overrides(a.set),
             device=f'{dev.platform}:{dev.device_kind}', jax=jax.__version__,
             precision=a.precision, xla_flags=os.environ.get('XLA_FLAGS', ''),
             commit=provenance.commit())
  print(format_profile(p))
  if a.out:
    tmp = a.out + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(p, f, indent=1)
    os.replace(tmp, a.out)
    print(f'wrote {a.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
