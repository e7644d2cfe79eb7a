"""Omniglot 20-way 5-shot (paper Table 1: MAML 98.38±0.07, Meta-dropout 98.73±0.06).

  python launch.py --config=configs/omniglot_20way5shot.py --workdir=workdirs/omni5_metadrop

Authors' final run scripts: inner lr 0.4, 5 steps, meta-batch 4, meta lr 1e-3 (both methods),
60k iterations.
The meta learning rate is read per method from config.AUTHORS_META_LR (so
--config.method=maml gives the authors' MAML value; other methods 1e-3); --config.meta_lr=x
sets one value for every method.
"""

from configs import common


def get_config():
  c = common.paper_config('omniglot', way=20, shot=5)
  c.name = 'omniglot_20way5shot'
  c.inner_lr = 0.4
  return c
