"""Analytic FLOP count of a meta-training iteration: the convolutions and dense layers only.

XLA's own count (``compiled.cost_analysis()``) cannot be used for utilisation on a GPU: there it
leaves out the cuDNN convolutions (15.9 GFLOP per Omniglot 20-way step on an H200, against ~260
on the CPU). This module counts what the step must compute, layer by layer, so that a benchmark
row can report the fraction of a card's float32 / TF32 peak it reaches.

Counting rules (a multiply-add is 2 FLOPs; a 3x3 SAME conv of ``[B, H, W, Cin] -> Cout`` costs
``2 B H W 9 Cin Cout``):

* forward: every block's theta conv, and phi's conv where the method reads phi
  (``Method.phi_input``: on the block input, or on one all-ones image); the dense head (and phi's
  one-column head where the method has input-dependent logit noise);
* backward of a loss w.r.t. the parameters that one asks for: for each conv, the input gradient
  (the same FLOPs as its forward, not for the first block, whose input is data) and the weight
  gradient of each parameter asked for (the same FLOPs as that conv's forward);
* the inner loop: ``inner_steps x train_mc_samples`` times a support forward plus the backward
  w.r.t. theta (phi and batch norm are not adapted);
* the query: one forward and the backward w.r.t. every meta-parameter (theta, phi);
* the second-order pass (``meta_gradient`` 'exact' or 'authors'): reverse mode through each inner
  step's forward + backward, each of whose convs has two inputs and so costs two convs of the
  same size: 2x the inner step. 'authors' differs from 'exact' only in the batch-norm backward
  (elementwise), so it has the same count; 'first_order' has no such pass.

Elementwise work (batch norm, noise, softplus, ReLU, pooling, Adam) is left out: it is
memory-bound and costs time, not FLOPs worth counting. On Omniglot 20-way 1-shot this model and
XLA:CPU's count of the whole step agree within the factor that tests/test_flops.py states.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """FLOPs of one meta-iteration (all tasks of the meta-batch), by part."""
  inner_forward: float
  inner_backward: float
  second_order: float
  query_forward: float
  query_backward: float

  @property
  def total(self) -> float:
    return (self.inner_forward + self.inner_backward + self.second_order + self.query_forward
            + self.query_backward)

  def as_dict(self) -> dict:
    return {**dataclasses.asdict(self), 'total': self.total}


def _layers(net):
  """[(H, W, Cin, C)] of the conv blocks of a nets.NetSpec (SAME convs; 2x2 VALID pools)."""
  h, w, cin = net.image_shape
  out = []
  for _ in range(net.num_layers):
    out.append((h, w, cin, net.channels))
    h, w, cin = h // 2, w // 2, net.channels
  return out


def _conv(batch, h, w, cin, cout):
  return 2.0 * batch * h * w * 9 * cin * cout


def pass_flops(net, batch: int, *, weight_grads: tuple[str, ...] = ()) -> tuple[float, float]:
  """(forward, backward) FLOPs of one batch through a nets.NetSpec network; the backward computes
  the gradients w.r.t. the parameter groups in ``weight_grads`` ('theta', 'phi') and the input
  gradients it needs on the way."""
  row = net.row
  phi_batch = {'features': batch, 'ones': 1, None: 0}[row.phi_input]
  fwd = bwd = 0.0
  for l, (h, w, cin, c) in enumerate(_layers(net)):
    theta_conv = _conv(batch, h, w, cin, c)
    # phi's conv reads the block input (its gradient flows into that input) or an all-ones image
    phi_conv = _conv(phi_batch, h, w, cin, c)
    fwd += theta_conv + phi_conv
    if l > 0:     # the input gradient (the first block's input is data)
      bwd += theta_conv + (phi_conv if row.phi_input == 'features' else 0.0)
    if 'theta' in weight_grads:
      bwd += theta_conv
    if 'phi' in weight_grads:
      bwd += phi_conv
  feat = net.feature_dim
  fwd += 2.0 * batch * feat * net.way
  bwd += 2.0 * batch * feat * net.way * (2 if weight_grads else 1)
  if row.logit_noise_scale is not None:
    fwd += 2.0 * batch * feat
    if 'phi' in weight_grads:
      bwd += 2.0 * batch * feat
  return fwd, bwd


def step_flops(config) -> StepFlops:
  """The analytic FLOP count of one meta-training iteration of ``config`` (module docstring)."""
  from metadrop_jax import data as data_lib
  from metadrop_jax import nets
  net = nets.spec_from_config(config, data_lib.image_shape(config.data))
  support = config.way * config.shot
  query = config.way * config.query
  tasks = config.meta_batch
  inner_passes = config.inner_steps * config.train_mc_samples
  f_s, b_s = pass_flops(net, support, weight_grads=('theta',))
  meta_params = ('theta', 'phi') if net.row.uses_phi else ('theta',)
  f_q, b_q = pass_flops(net, query, weight_grads=meta_params)
  second = 2.0 * (f_s + b_s) if config.meta_gradient in ('exact', 'authors') else 0.0
  return StepFlops(inner_forward=tasks * inner_passes * f_s,
                   inner_backward=tasks * inner_passes * b_s,
                   second_order=tasks * inner_passes * second,
                   query_forward=tasks * f_q, query_backward=tasks * b_q)


# Dense peak rates (vendor datasheets, TFLOP/s) of the cards measured so far: 'float32' on the
# CUDA cores ('highest' precision), 'tf32' on the tensor cores (float32 inputs at the default
# precision). The "989 bf16 / 495 tf32" H100 SXM figures are dense; the larger ones assume
# sparsity.
PEAK_TFLOPS = {
    'H100 PCIe': {'float32': 51.2, 'tf32': 378.0, 'bf16': 756.0},
    'H100': {'float32': 66.9, 'tf32': 494.7, 'bf16': 989.4},     # SXM5 ('NVIDIA H100 80GB HBM3')
    'H200': {'float32': 66.9, 'tf32': 494.7, 'bf16': 989.4},     # the same chip as the H100 SXM
}


def peak_tflops(device_kind: str, rate: str = 'float32'):
  """The card's dense peak for ``rate`` ('float32', 'tf32', 'bf16'), or None if unknown."""
  for name, rates in PEAK_TFLOPS.items():   # 'H100 PCIe' is tested before 'H100'
    if all(w in device_kind for w in name.split()):
      return rates[rate]
  return None


def utilisation(config, seconds_per_iter: float, device_kind: str) -> dict:
  """Analytic TFLOP/s of a measured step and its fraction of the card's float32 and TF32 peaks
  (None where the card is unknown)."""
  total = step_flops(config).total
  tflops = total / seconds_per_iter / 1e12
  out = {'analytic_gflop_per_iter': total / 1e9, 'analytic_tflop_per_s': tflops}
  for rate in ('float32', 'tf32'):
    peak = peak_tflops(device_kind, rate)
    out[f'fraction_of_{rate}_peak'] = tflops / peak if peak else None
  return out
