"""The step's profile parser (benchmarks/profile_step.py) and the analytic FLOP count
(metadrop_jax/flops.py)."""

import gzip
import importlib.util
import json
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from metadrop_jax import flops
from tests.conftest import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _gpu_trace(kernels):
  """A trace-viewer JSON as jax.profiler writes it on a GPU: (stream, name, hlo_op, ts, dur)."""
  ev = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
        {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
        {'ph': 'X', 'pid': 2, 'tid': 1, 'ts': 0.0, 'dur': 500.0, 'name': 'python3'}]
  ev += [{'ph': 'X', 'pid': 1, 'tid': s, 'ts': ts, 'dur': d, 'name': n, 'args': {'hlo_op': op}}
         for s, n, op, ts, d in kernels]
  return {'traceEvents': ev}


def test_parser_tables_on_a_known_gpu_trace(tmp_path):
  """Kernel time sums durations, busy time is their union over streams, categories and the top
  table add up, the host gap is wall - busy; host events are not kernels."""
  ps = _module('profile_step')
  kernels = [(14, 'sm80_xmma_gemm_f32f32_nt', 'dot.1', 0.0, 40.0),
             (14, 'sm80_xmma_gemm_f32f32_nt', 'dot.2', 50.0, 40.0),
             (15, 'input_add_reduce_fusion_1', 'fusion.3', 60.0, 40.0),   # overlaps 60..90
             (14, 'loop_pad_fusion_2', 'fusion.4', 100.0, 10.0),
             (14, 'sm80_xmma_fprop_implicit_gemm', 'custom-call.5', 150.0, 30.0),
             (14, 'sort_kernel', 'sort.6', 190.0, 10.0)]
  path = tmp_path / 'x.trace.json.gz'
  with gzip.open(path, 'wt') as f:
    json.dump(_gpu_trace(kernels), f)
  p = ps.parse(str(tmp_path), steps=2, wall_s_per_step=0.0001)
  assert p['events'] == 6 and p['kernels_per_step'] == 3
  assert p['kernel_ms_per_step'] == pytest.approx(170.0 / 2 / 1e3)
  assert p['busy_ms_per_step'] == pytest.approx((40 + 60 + 30 + 10) / 2 / 1e3)  # 50..110 merged
  assert p['span_ms_per_step'] == pytest.approx(200.0 / 2 / 1e3)
  assert p['host_gap_ms_per_step'] == pytest.approx(0.1 - 0.07)
  cats = p['categories']
  assert cats['dot']['ms_per_step'] == pytest.approx(0.04)
  assert cats['reduce']['ms_per_step'] == pytest.approx(0.02)
  assert cats['copy']['ms_per_step'] == pytest.approx(0.005)
  assert cats['conv']['ms_per_step'] == pytest.approx(0.015)
  assert cats['sort']['ms_per_step'] == pytest.approx(0.005)
  assert sum(c['share'] for c in cats.values()) == pytest.approx(1.0)
  top = p['top']
  assert top[0]['name'] == 'sm80_xmma_gemm_f32f32_nt' and top[0]['calls'] == 2
  assert [r['total_us'] for r in top] == sorted((r['total_us'] for r in top), reverse=True)
  assert 'gemm' in ps.format_profile(p)


def test_parser_on_a_real_cpu_trace(tmp_path):
  """A trace captured here (XLA:CPU, tiny config) parses: the ops carry hlo_op, their time is
  below the wall time, and the GEMMs of the im2col convolutions are found."""
  ps = _module('profile_step')
  wall = ps.capture('tiny', 'metadrop', {'inner_steps': 1, 'model.num_layers': 1}, steps=2,
                    warmup=1, trace_dir=str(tmp_path))
  p = ps.parse(str(tmp_path), steps=2, wall_s_per_step=wall)
  assert p['events'] > 0 and p['top']
  assert 0 < p['busy_ms_per_step'] <= p['span_ms_per_step'] + 1e-9
  assert p['categories'].get('dot', {}).get('ms_per_step', 0) > 0
  # the capture kept the optimised HLO: the top ops say what they compute and where it comes from
  described = [r for r in p['top'] if 'hlo' in r]
  assert len(described) >= len(p['top']) // 2
  dots = [r['hlo'] for r in described if r['hlo']['ops'].get('dot')]
  assert dots and all(len(d['operands']) == 2 for d in dots)
  assert any(s.startswith('nets.py:') and 'conv3x3' in s for d in dots for s in d['source'])
  assert ps.format_hlo(dots[0]) in ps.format_profile(p)
  # every op that runs a GEMM counts as one, whatever XLA:CPU named its fusion
  assert all(r['category'] == 'dot' for r in described if r['hlo']['ops'].get('dot'))
  # the batch-norm statistics and the other reductions, each with its bytes and bandwidth
  assert p['reductions'] and all(r['bytes'] > 0 and r['gb_per_s'] > 0 for r in p['reductions'])
  assert any(s.startswith('nets.py:') for r in p['reductions'] for s in r['source'])


GPU_HLO = """HloModule jit_train_step

FileNames
1 "/work/repo/metadrop_jax/nets.py"
2 "/work/repo/metadrop_jax/meta.py"

FunctionNames
1 "batch_norm"
2 "task_loss"

FileLocations
1 {file_name_id=1 function_name_id=1 line=196 end_line=196 column=9 end_column=40}
2 {file_name_id=2 function_name_id=2 line=211 end_line=211 column=3 end_column=30}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}

%fused_reduce.7 (param_0.1: f32[4,300,28,28,64]) -> (f32[4,64], f32[4,64]) {
  %param_0.1 = f32[4,300,28,28,64]{4,3,2,1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  %mul.2 = f32[4,300,28,28,64]{4,3,2,1,0} multiply(%param_0.1, %param_0.1), metadata={op_name="jit(train_step)/jvp(batch_norm)/square" stack_frame_id=2}
  %reduce.3 = f32[4,64]{1,0} reduce(%param_0.1, %constant.1), dimensions={1,2,3}, to_apply=%add, metadata={op_name="jit(train_step)/jvp(batch_norm)/reduce_sum" stack_frame_id=2}
  %reduce.4 = f32[4,64]{1,0} reduce(%mul.2, %constant.1), dimensions={1,2,3}, to_apply=%add, metadata={op_name="jit(train_step)/jvp(batch_norm)/reduce_sum" stack_frame_id=2}
  ROOT %tuple.5 = (f32[4,64]{1,0}, f32[4,64]{1,0}) tuple(%reduce.3, %reduce.4)
}

ENTRY %main.9 (Arg_0.1: f32[4,300,28,28,64]) -> (f32[4,64], f32[4,64]) {
  %Arg_0.1 = f32[4,300,28,28,64]{4,3,2,1,0} parameter(0)
  ROOT %input_reduce_fusion.7 = (f32[4,64]{1,0}, f32[4,64]{1,0}) fusion(%Arg_0.1), kind=kInput, calls=%fused_reduce.7, metadata={op_name="jit(train_step)/reduce_sum"}
}
"""


def test_kernels_are_named_by_the_optimised_hlo(tmp_path):
  """XLA:GPU names a kernel after its HLO instruction ('input_reduce_fusion.7' runs as
  'input_reduce_fusion_7'): the profile gives its shapes, its fused ops, the JAX ops and the
  line of our code they came from; library kernels (cuBLAS) stay undescribed."""
  ps = _module('profile_step')
  with gzip.open(tmp_path / 'x.trace.json.gz', 'wt') as f:
    json.dump(_gpu_trace([(7, 'input_reduce_fusion_7', 'command_buffer_1', 0.0, 900.0),
                          (7, 'sm80_xmma_gemm_f32f32', 'command_buffer_1', 900.0, 50.0)]), f)
  with gzip.open(tmp_path / ps.HLO_FILE, 'wt') as f:
    f.write(GPU_HLO)
  top = {r['name']: r for r in ps.parse(str(tmp_path), steps=1)['top']}
  d = top['input_reduce_fusion_7']['hlo']
  assert d['instruction'] == 'input_reduce_fusion.7' and d['kind'] == 'kInput'
  assert d['shape'] == 'f32[4,64] f32[4,64]' and d['operands'] == ['f32[4,300,28,28,64]']
  assert d['ops'] == {'reduce': 2, 'multiply': 1}
  assert d['jax_ops'][0] == 'jvp(batch_norm)/reduce_sum'
  assert d['source'] == ['nets.py:196 batch_norm']
  assert 'hlo' not in top['sm80_xmma_gemm_f32f32']


def test_reductions_report_their_achieved_bandwidth(tmp_path):
  """Per reduction kernel: the bytes its HLO instruction reads and writes per call (operand and
  output shapes) over its mean time. The batch-norm statistics fusion of GPU_HLO reads
  f32[4,300,28,28,64] and writes two f32[4,64]: 240,846,848 bytes in 900 us per call."""
  ps = _module('profile_step')
  with gzip.open(tmp_path / 'x.trace.json.gz', 'wt') as f:
    json.dump(_gpu_trace([(7, 'input_reduce_fusion_7', 'command_buffer_1', 0.0, 800.0),
                          (7, 'input_reduce_fusion_7', 'command_buffer_1', 900.0, 1000.0),
                          (7, 'sm80_xmma_gemm_f32f32', 'command_buffer_1', 2000.0, 50.0)]), f)
  with gzip.open(tmp_path / ps.HLO_FILE, 'wt') as f:
    f.write(GPU_HLO)
  p = ps.parse(str(tmp_path), steps=2)
  (r,) = p['reductions']                              # the GEMM is no reduction
  assert r['instruction'] == 'input_reduce_fusion.7' and r['calls'] == 2
  assert r['bytes'] == 4 * 300 * 28 * 28 * 64 * 4 + 2 * 4 * 64 * 4 == 240_846_848
  assert r['mean_us'] == pytest.approx(900.0) and r['us_per_step'] == pytest.approx(900.0)
  assert r['gb_per_s'] == pytest.approx(240_846_848 / 900e-6 / 1e9)
  assert 'GB/s' in ps.format_profile(p) and f"{r['gb_per_s']:8.1f}" in ps.format_profile(p)
  assert ps.shape_bytes('(bf16[2,3], pred[5], s8[0])') == 12 + 5
  # without the optimised HLO there is nothing to measure bytes by
  (tmp_path / ps.HLO_FILE).unlink()
  assert 'reductions' not in ps.parse(str(tmp_path), steps=2)


CPU_HLO = """HloModule jit_train_step

%fused_dot.3 (p0: f32[4,58800,128], p1: f32[4,576,128]) -> f32[4,58800,576] {
  %p0 = f32[4,58800,128]{2,1,0} parameter(0)
  %p1 = f32[4,576,128]{2,1,0} parameter(1)
  ROOT %dot.1 = f32[4,58800,576]{2,1,0} dot(%p0, %p1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}
}

ENTRY %main.9 (a: f32[4,58800,128], b: f32[4,576,128]) -> f32[4,58800,576] {
  %a = f32[4,58800,128]{2,1,0} parameter(0)
  %b = f32[4,576,128]{2,1,0} parameter(1)
  ROOT %ynn_fusion.3 = f32[4,58800,576]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot.3
}
"""


def test_categories_follow_what_a_kernel_computes(tmp_path):
  """XLA:CPU runs its GEMMs as library fusions named like 'ynn_fusion.3': with the optimised
  HLO beside the trace they count as dot, not as the elementwise work their name suggests."""
  ps = _module('profile_step')
  ev = [{'ph': 'X', 'pid': 1, 'tid': 1, 'ts': 0.0, 'dur': 90.0, 'name': 'ynn_fusion.3',
         'args': {'hlo_op': 'ynn_fusion.3'}},
        {'ph': 'X', 'pid': 1, 'tid': 1, 'ts': 90.0, 'dur': 10.0, 'name': 'add_select_fusion.4',
         'args': {'hlo_op': 'add_select_fusion.4'}}]
  with gzip.open(tmp_path / 'x.trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': ev}, f)
  by_name = {r['name']: r['category'] for r in ps.parse(str(tmp_path), steps=1)['top']}
  assert by_name == {'ynn_fusion.3': 'elementwise', 'add_select_fusion.4': 'elementwise'}
  with gzip.open(tmp_path / ps.HLO_FILE, 'wt') as f:
    f.write(CPU_HLO)
  p = ps.parse(str(tmp_path), steps=1)
  assert {r['name']: r['category'] for r in p['top']} == {
      'ynn_fusion.3': 'dot', 'add_select_fusion.4': 'elementwise'}
  assert p['categories']['dot']['share'] == pytest.approx(0.9)
  assert ps.category('input_reduce_fusion_7', '', ('multiply', 'reduce')) == 'reduce'
  assert ps.category('loop_fusion', '', ('scatter', 'add')) == 'scatter'
  assert ps.category('pad_add_fusion.5', '', ('add', 'multiply', 'pad', 'slice')) == 'elementwise'
  assert ps.category('add_slice_fusion.2', '', ('add', 'pad', 'slice')) == 'copy'
  assert ps.category('wrapped_iota.3', '', ()) == 'copy'


def test_parser_says_what_is_missing(tmp_path):
  ps = _module('profile_step')
  with pytest.raises(FileNotFoundError, match='trace.json.gz'):
    ps.find_trace(str(tmp_path))


def test_flop_count_by_hand_for_one_block():
  """One block of C channels on H x W x 1 images, MAML, first order: the forward convs and head,
  and the backward (weight gradient only: the first block's input is data), by hand."""
  c = tiny('maml', **{'model.num_layers': 1, 'model.channels': 4, 'data.image_size': 8,
                      'meta_gradient': 'first_order', 'inner_steps': 1, 'meta_batch': 1})
  f = flops.step_flops(c)
  s, q, feat = c.way * c.shot, c.way * c.query, 4 * 4 * 4
  conv = lambda b: 2 * b * 8 * 8 * 9 * 1 * 4
  assert f.inner_forward == conv(s) + 2 * s * feat * c.way
  assert f.inner_backward == conv(s) + 2 * 2 * s * feat * c.way
  assert f.query_forward == conv(q) + 2 * q * feat * c.way
  assert f.second_order == 0


@settings(max_examples=20, deadline=None)
@given(method=st.sampled_from(['metadrop', 'maml', 'indep_noise', 'vib']),
       steps=st.integers(0, 3), batch=st.integers(1, 4))
def test_flop_count_properties(method, steps, batch):
  """Linear in the meta-batch and in the inner steps; 'authors' counts as 'exact'; first order
  drops exactly the second-order pass; a method that reads phi costs more than MAML."""
  base = dict(inner_steps=steps, meta_batch=batch)
  ex = flops.step_flops(tiny(method, meta_gradient='exact', **base))
  au = flops.step_flops(tiny(method, meta_gradient='authors', **base))
  fo = flops.step_flops(tiny(method, meta_gradient='first_order', **base))
  one = flops.step_flops(tiny(method, meta_gradient='exact', inner_steps=steps, meta_batch=1))
  assert au == ex
  assert ex.total == pytest.approx(batch * one.total)
  assert fo.total == pytest.approx(ex.total - ex.second_order)
  assert ex.second_order == pytest.approx(2 * (ex.inner_forward + ex.inner_backward))
  if method != 'maml':
    assert ex.total > flops.step_flops(tiny('maml', meta_gradient='exact', **base)).total


def test_flop_count_against_xla_cpu():
  """XLA:CPU's cost analysis counts the whole compiled step (elementwise work too); on a
  conv-dominated variant of the tiny config it is within [0.8, 1.5] of the analytic count
  (measured 1.22 for Meta-dropout; on Omniglot 20-way 1-shot 260-291 GFLOP vs 255)."""
  import jax
  from metadrop_jax import keys as keys_lib
  from metadrop_jax import meta
  c = tiny('metadrop', meta_gradient='authors', **{'model.channels': 16, 'data.image_size': 16})
  images = jax.random.randint(jax.random.key(0), (10, 5, 16, 16, 1), 0, 256).astype(np.uint8)
  init_key, train_key = keys_lib.run_keys(c)
  state, tx = meta.create_state(init_key, c)
  compiled = meta.make_train_step(c, tx).lower(state, images, train_key).compile()
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  ratio = float(ca['flops']) / flops.step_flops(c).total
  assert 0.8 <= ratio <= 1.5, ratio


def test_utilisation_uses_the_cards_peaks():
  c = tiny('metadrop')
  u = flops.utilisation(c, 1e-3, 'NVIDIA H200')
  total = flops.step_flops(c).total
  assert u['analytic_tflop_per_s'] == pytest.approx(total / 1e-3 / 1e12)
  assert u['fraction_of_float32_peak'] == pytest.approx(u['analytic_tflop_per_s'] / 66.9)
  assert u['fraction_of_tf32_peak'] == pytest.approx(u['analytic_tflop_per_s'] / 494.7)
  assert flops.utilisation(c, 1e-3, 'cpu')['fraction_of_float32_peak'] is None
  assert flops.peak_tflops('NVIDIA H100 PCIe') == 51.2
