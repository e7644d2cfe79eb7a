"""miniImageNet 5-way 5-shot (paper Table 1: MAML 64.55±0.52, Meta-dropout 67.42±0.52).

  python launch.py --config=configs/mimgnet_5way5shot.py --workdir=workdirs/mimg5_metadrop

Authors' final run scripts: 32 channels, inner lr 0.01, 5 steps, meta-batch 4, meta lr 1e-4
(both methods), 60k iterations. Validation uses the 16 validation classes (the authors
monitored on test classes; we do not). Data: --config.data.path=<miniimagenet_84x84.zip>.
The meta learning rate is read per method from config.AUTHORS_META_LR (so
--config.method=maml gives the authors' MAML value; other methods 1e-3); --config.meta_lr=x
sets one value for every method.
"""

from configs import common


def get_config():
  c = common.paper_config('miniimagenet', way=5, shot=5)
  c.name = 'mimgnet_5way5shot'
  c.inner_lr = 0.01
  return c
