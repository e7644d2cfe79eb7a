"""miniImageNet 5-way 1-shot (paper Table 1: MAML 49.58±0.65, Meta-dropout 51.93±0.67).

  python launch.py --config=configs/mimgnet_5way1shot.py --workdir=workdirs/mimg1_metadrop

Authors' final run scripts: 32 channels, inner lr 0.01, 5 steps, meta-batch 4, meta lr 1e-4
(both methods), 60k iterations. Validation uses the 16 validation classes (the authors
monitored on test classes; we do not). Data: --config.data.path=<miniimagenet_84x84.zip>.
"""

from configs import common


def get_config():
  c = common.paper_config('miniimagenet', way=5, shot=1)
  c.name = 'mimgnet_5way1shot'
  c.inner_lr = 0.01
  c.meta_lr_by_method.metadrop = 1e-4
  c.meta_lr_by_method.maml = 1e-4
  return c
