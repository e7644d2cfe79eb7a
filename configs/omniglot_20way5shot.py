"""Omniglot 20-way 5-shot (paper Table 1: MAML 98.38±0.07, Meta-dropout 98.73±0.06).

  python launch.py --config=configs/omniglot_20way5shot.py --workdir=workdirs/omni5_metadrop

Authors' final run scripts: inner lr 0.4, 5 steps, meta-batch 4, meta lr 1e-3 (both methods),
60k iterations.
"""

from configs import common


def get_config():
  c = common.paper_config('omniglot', way=20, shot=5)
  c.name = 'omniglot_20way5shot'
  c.inner_lr = 0.4
  c.meta_lr_by_method.metadrop = 1e-3
  c.meta_lr_by_method.maml = 1e-3
  return c
