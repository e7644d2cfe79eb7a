"""Every method is one row of :data:`METHODS`; every module reads what a method does from here.

Adding a method = one row here (plus its perturbation function, if it perturbs the features in
a new way). Nothing else tests method names: the network (:mod:`metadrop_jax.nets`) reads
``phi_input``, ``perturb`` and ``logit_noise_scale``; the meta-learner (:mod:`metadrop_jax.meta`)
reads ``support``, ``kl``, ``per_param_lr``, ``query_attack`` and ``uses_phi``; the export, the
pictures and the tables read ``feature_noise`` and ``label``.

Where every noise acts (docs/methods.md): on the pre-batch-norm conv output ``mu`` of every block,
``u = perturb(mu, a)`` with ``a`` phi's conv output; and, for some methods, additive noise
``sigma * eps`` on the logits. Noise is drawn only when sampling (the support set in the inner
loop); the query set takes the deterministic path. The paper's own baseline details were not
retrievable (docs/paper.md); these are our documented choices, with the references below.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


# ------------------------------------------------------------------------------------------------
# perturbations of the conv features: (spec, mu, a, key, sample) -> (u, kl)
# ------------------------------------------------------------------------------------------------
# ``mu``: theta's conv output ``[B, H, W, C]``; ``a``: phi's conv output (``[B, H, W, C]``, or
# ``[1, H, W, C]`` for input-independent noise); ``spec``: the nets.NetSpec (hyperparameters);
# ``sample``: draw the noise (support set) or take the deterministic path (query set). The KL
# term is per example (summed over units), averaged over the batch; 0 for plain noise.

_ZERO = lambda: jnp.zeros((), jnp.float32)


def multiplicative_noise(spec, mu, a, key, sample):
  """Meta-dropout (Lee et al. 2020): ``u = mu * softplus(a + eps)``, ``eps ~ N(0, 1)``; query
  ``mu * softplus(a)``. With ``a`` from an all-ones input it is input-independent noise."""
  eps = jax.random.normal(key, mu.shape, mu.dtype) if sample else 0.0
  return mu * jax.nn.softplus(a + eps), _ZERO()


def fixed_multiplicative_noise(spec, mu, a, key, sample):
  """Non-learned: ``u = mu * softplus(m + eps)``, ``m = methods.fixed_noise_mean``; query
  ``mu * softplus(m)`` (a constant factor). phi is never read."""
  eps = jax.random.normal(key, mu.shape, mu.dtype) if sample else 0.0
  return mu * jax.nn.softplus(spec.fixed_noise_mean + eps), _ZERO()


def additive_noise(spec, mu, a, key, sample):
  """Learned, input-dependent, additive: ``u = mu + softplus(a(x)) * eps``; query ``u = mu``."""
  if not sample:
    return mu, _ZERO()
  return mu + jax.nn.softplus(a) * jax.random.normal(key, mu.shape, mu.dtype), _ZERO()


def variational_bottleneck(spec, mu, a, key, sample):
  """VIB (Alemi et al. 2017): ``q(z|x) = N(mu, sigma^2)``, ``sigma = softplus(a(x))``, sample
  ``z = mu + sigma * eps``; KL to ``N(0, I)``: ``0.5 * sum(mu^2 + sigma^2 - 1 - log sigma^2)``;
  query ``z = mu``."""
  std = jax.nn.softplus(a) + 1e-6
  z = mu + std * jax.random.normal(key, mu.shape, mu.dtype) if sample else mu
  kl = 0.5 * jnp.sum(jnp.square(mu) + jnp.square(std) - 1.0 - 2.0 * jnp.log(std), axis=(1, 2, 3))
  return z, jnp.mean(kl)


def information_dropout(spec, mu, a, key, sample):
  """Information dropout (Achille & Soatto 2018): ``z = mu * exp(alpha(x) * eps)`` (log-normal),
  ``alpha = max_alpha * sigmoid(a(x)) + 1e-3`` (their bound ``max_alpha = 0.7``); KL to the
  log-uniform prior (their ReLU case; the noise keeps the sign) is ``-log alpha + const`` per
  unit, with the constant chosen so that it is 0 at ``alpha = max_alpha``:
  ``sum(-log(alpha / (max_alpha + 1e-3)))``. Query ``z = mu``."""
  alpha = spec.infodrop_max_alpha * jax.nn.sigmoid(a) + 1e-3
  z = mu * jnp.exp(alpha * jax.random.normal(key, mu.shape, mu.dtype)) if sample else mu
  kl = -jnp.sum(jnp.log(alpha / (spec.infodrop_max_alpha + 1e-3)), axis=(1, 2, 3))
  return z, jnp.mean(kl)


# ------------------------------------------------------------------------------------------------
# scale of the additive logit noise: (spec, phi_dense, feat) -> sigma [B, 1]
# ------------------------------------------------------------------------------------------------
# The authors' head: ``logits + sigma * eps``, ``eps ~ N(0, I_way)``, one scale per example shared
# by all classes (they tile a single column), support set only.

def input_dependent_scale(spec, phi_dense, feat):
  """``sigma = softplus(feat w_phi + b_phi)`` (meta-dropout)."""
  return jax.nn.softplus(feat @ phi_dense['w'] + phi_dense['b'])


def constant_scale(spec, phi_dense, feat):
  """``sigma = softplus(1^T w_phi + b_phi)``: learned, the same for every input."""
  s = jnp.ones((1, feat.shape[1]), feat.dtype) @ phi_dense['w'] + phi_dense['b']   # [1, 1]
  return jnp.broadcast_to(jax.nn.softplus(s), (feat.shape[0], 1))


def fixed_scale(spec, phi_dense, feat):
  """``sigma = softplus(fixed_noise_mean)``: not learned."""
  return jax.nn.softplus(jnp.full((feat.shape[0], 1), spec.fixed_noise_mean, feat.dtype))


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Method:
  """What a method does, read by every module (see the module docstring)."""
  label: str                              # its name in tables, legends and titles
  phi_input: str | None = None            # what phi's convs read: 'features' (the block input,
                                          # input-dependent), 'ones' (input-independent), None
  perturb: Callable | None = None         # conv-feature perturbation; None: u = mu
  logit_noise_scale: Callable | None = None   # sigma of the logit noise; None: no logit noise
  support: str = 'noise'                  # support loss: 'noise' (MC mean over perturbed passes),
                                          # 'mixup' (manifold mixup), 'clean' (one plain pass)
  kl: bool = False                        # the support loss adds methods.vib_beta * KL
  per_param_lr: bool = False              # Meta-SGD: meta-learned per-parameter inner step sizes
  query_attack: bool = False              # adversarial querying: PGD on the query set in training

  @property
  def uses_phi(self) -> bool:
    """phi is read by the forward pass and trained (frozen in the optimizer otherwise)."""
    return self.phi_input is not None

  @property
  def feature_noise(self) -> bool:
    """Sampling perturbs the conv features (the export's perturbed copies exist)."""
    return self.perturb is not None

  @property
  def stochastic_support(self) -> bool:
    """The support loss draws random numbers (MC samples apply)."""
    return self.support != 'clean'


METHODS: dict[str, Method] = {
    # the paper: MAML + learned input-dependent multiplicative noise
    'metadrop': Method('Meta-dropout', phi_input='features', perturb=multiplicative_noise,
                       logit_noise_scale=input_dependent_scale),
    # the noise path removed, phi frozen
    'maml': Method('MAML', support='clean'),
    # noise-type study: non-learned multiplicative noise softplus(m + eps)
    'fixed_noise': Method('Fixed multiplicative noise', perturb=fixed_multiplicative_noise,
                          logit_noise_scale=fixed_scale),
    # learned input-independent multiplicative noise
    'indep_noise': Method('Input-independent noise', phi_input='ones', perturb=multiplicative_noise,
                          logit_noise_scale=constant_scale),
    # learned input-dependent additive noise
    'additive_noise': Method('Additive noise', phi_input='features', perturb=additive_noise,
                             logit_noise_scale=input_dependent_scale),
    # variational information bottleneck on the conv features
    'vib': Method('VIB', phi_input='features', perturb=variational_bottleneck, kl=True),
    # information dropout
    'infodrop': Method('Information dropout', phi_input='features', perturb=information_dropout,
                       kl=True),
    # manifold mixup of the support features in the inner loop (Verma et al. 2019)
    'mixup': Method('Manifold mixup', support='mixup'),
    # meta-learned per-parameter inner step sizes (Li et al. 2017)
    'metasgd': Method('Meta-SGD', support='clean', per_param_lr=True),
    # Meta-SGD + meta-dropout
    'metasgd_metadrop': Method('Meta-SGD + Meta-dropout', phi_input='features',
                               perturb=multiplicative_noise,
                               logit_noise_scale=input_dependent_scale, per_param_lr=True),
    # MAML + adversarial querying: PGD on the query inputs (Goldblum et al. 2020)
    'adv': Method('MAML + adv. training', support='clean', query_attack=True),
}

PHI_INPUTS = (None, 'features', 'ones')
SUPPORTS = ('noise', 'mixup', 'clean')


def get(name: str) -> Method:
  """The row of ``name``; a ValueError listing the known methods otherwise."""
  if name not in METHODS:
    raise ValueError(f'method={name!r}: choose one of {tuple(METHODS)}')
  return METHODS[name]


def label(name: str) -> str:
  """Display name of a method (the name itself for one this table does not know)."""
  return METHODS[name].label if name in METHODS else name
