r"""Omniglot 20-way 1-shot (paper Table 1: MAML 95.23±0.17, Meta-dropout 96.63±0.13).

  python launch.py --config=configs/omniglot_20way1shot.py --workdir=workdirs/omni1_metadrop
  python launch.py --config=configs/omniglot_20way1shot.py --config.method=maml \
      --workdir=workdirs/omni1_maml

Authors' final run scripts: inner lr 0.1, 5 steps, meta-batch 4, 60k iterations; meta lr 3e-4
for Meta-dropout (changed from 1e-3 in the authors' last commit) and 1e-3 for MAML.
Data: the Omniglot zips in --config.data.path, $METADROP_DATA_DIR/omniglot or ./data/omniglot,
else a TFDS download.
The meta learning rate is read per method from config.AUTHORS_META_LR (so
--config.method=maml gives the authors' MAML value; other methods 1e-3); --config.meta_lr=x
sets one value for every method.
"""

from configs import common


def get_config():
  c = common.paper_config('omniglot', way=20, shot=1)
  c.name = 'omniglot_20way1shot'
  c.inner_lr = 0.1
  return c
