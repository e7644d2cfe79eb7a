"""notebooks/table1_colab.ipynb: the committed file, and executions in fresh python3 kernels
(nbclient) with the tiny config, as CI runs it (off Colab: no install, no Drive).

The execution follows a user through a disconnect: kernel 1 runs all cells (training stops at the
sitting's step limit, the meta-test cell waits), then the training cell once more (it continues);
kernel 2, fresh, with the same workdir, runs all cells again (training resumes from the last
checkpoint and finishes, then meta-test, report table and curves). Both kernels take about a
minute together on a 2-core CPU.
"""

import copy
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tests.conftest import kernel_available as _kernel_available

nbformat = pytest.importorskip('nbformat', reason='nbformat not installed (pip install nbformat)')
nbclient = pytest.importorskip('nbclient', reason='nbclient not installed (pip install nbclient)')

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / 'notebooks' / 'table1_colab.ipynb'
TRAIN_CALL = 'train.train(config, WORKDIR)'
SETTINGS = ('omniglot_20way1shot', 'omniglot_20way5shot', 'mimgnet_5way1shot', 'mimgnet_5way5shot')
# Addresses the notebook may name: the paper and the authors' code, never one for this project.
ALLOWED_URLS = ('https://openreview.net/', 'https://arxiv.org/', 'https://github.com/haebeom-lee/')


def _read():
  return nbformat.read(NOTEBOOK, as_version=4)


def _params_cell(nb):
  cells = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(cells) == 1, 'one code cell tagged "parameters"'
  return cells[0]


def _with_params(nb, **params):
  """The notebook with assignments appended to its parameters cell (each name must exist there)."""
  nb = copy.deepcopy(nb)
  cell = _params_cell(nb)
  for name in params:
    assert re.search(rf'^{name} = ', cell.source, re.M), f'no parameter {name}'
  cell.source += '\n# test overrides\n' + '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  return nb


def _outputs(cell):
  return list(cell.get('outputs', []))


def _text(outputs):
  errors = [o for o in outputs if o.get('output_type') == 'error']
  assert not errors, errors
  return ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')


def _markdown(outputs):
  return ''.join(o['data']['text/markdown'] for o in outputs
                 if o.get('output_type') == 'display_data' and 'text/markdown' in o.get('data', {}))


def _pngs(outputs):
  return [o for o in outputs
          if o.get('output_type') == 'display_data' and 'image/png' in o.get('data', {})]


def _repo_state():
  r = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=all'], cwd=ROOT,
                     capture_output=True, text=True)
  listing = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob('*')
                   if '.git' not in p.parts and '__pycache__' not in p.parts
                   and '.venv' not in p.parts and '.pytest_cache' not in p.parts
                   and '.hypothesis' not in p.parts)
  return r.stdout if r.returncode == 0 else None, listing


# ---- the committed file -------------------------------------------------------------------------

def test_committed_notebook_is_valid_and_clean():
  nb = _read()
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert all(not c.outputs and c.execution_count is None for c in code), 'clear the outputs'
  assert NOTEBOOK.stat().st_size < 40_000


def test_parameters_and_no_project_url():
  """The defaults are a paper setting with the authors' meta-gradient; REPO_URL is an empty
  placeholder, and no cell names an address for this project (there is no published one)."""
  nb = _read()
  params = _params_cell(nb).source
  ns = {}
  exec(params, ns)  # pylint: disable=exec-used
  assert ns['SETTING'] in SETTINGS and ns['METHOD'] in ('metadrop', 'maml')
  assert ns['META_GRADIENT'] == 'authors' and ns['NUM_STEPS'] is None
  assert ns['REPO_URL'] == '' and ns['WORKDIR'] is None and ns['MINUTES_PER_SITTING'] > 0
  for cell in nb.cells:
    for url in re.findall(r'https?://[^\s)\'"\]>]+', cell.source):
      assert url.startswith(ALLOWED_URLS), url
    assert 'OWNER' not in cell.source


def _install_cell(nb):
  cells = [c.source for c in nb.cells if c.cell_type == 'code' and "'clone'" in c.source]
  assert len(cells) == 1
  return cells[0]


def test_install_cell_without_url_says_what_to_do(tmp_path):
  """On Colab (a stand-in google.colab module) with REPO_URL empty, the install cell installs
  nothing and says what to set; off Colab it says there is nothing to install."""
  if os.path.exists('/content/metadrop_jax'):
    pytest.skip('/content/metadrop_jax exists here: the cell would install from it')
  nb = _read()
  code = _params_cell(nb).source + '\n' + _install_cell(nb) + '\nprint("IN_COLAB", IN_COLAB)'
  fake = tmp_path / 'fake'
  (fake / 'google' / 'colab').mkdir(parents=True)          # a namespace portion: google.colab
  (fake / 'google' / 'colab' / '__init__.py').write_text('')
  for pythonpath, expect in ((str(fake), 'REPO_URL is empty, so nothing was installed'),
                             ('', 'not on Colab: nothing to install')):
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    if pythonpath:
      env['PYTHONPATH'] = pythonpath
    r = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout and f'IN_COLAB {bool(pythonpath)}' in r.stdout, r.stdout
  assert not os.path.exists('/content/metadrop_jax')


def test_notebooks_readme_has_a_badge_per_notebook():
  text = (ROOT / 'notebooks' / 'README.md').read_text()
  for nb in sorted((ROOT / 'notebooks').glob('*.ipynb')):
    assert re.search(rf'\[!\[Open In Colab\]\([^)]*\)\]\([^)]*/notebooks/{re.escape(nb.name)}\)',
                     text), f'no Colab badge for {nb.name}'


# ---- executed -----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def executed(tmp_path_factory):
  """Runs the notebook as a user would across a disconnect; returns what each step showed."""
  if not _kernel_available():
    pytest.skip('no python3 Jupyter kernel (pip install ipykernel)')
  runs_dir = tmp_path_factory.mktemp('colab_runs')
  # the tiny config made cheaper to compile (one block, one inner step, no validation): what is
  # tested is the notebook's flow, and OVERRIDES is one of its parameters
  nb0 = _with_params(_read(), SETTING='tiny', METHOD='metadrop', META_GRADIENT='authors',
                     STEPS_PER_SITTING=8, RUNS_DIR=str(runs_dir),
                     OVERRIDES={'model.num_layers': 1, 'inner_steps': 1, 'val_every': 0})
  train_idx = [i for i, c in enumerate(nb0.cells) if TRAIN_CALL in c.source]
  assert len(train_idx) == 1
  train_idx = train_idx[0]
  before = _repo_state()
  shown = {}

  def client(nb):
    return nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})

  # Both kernels share a jax compilation cache (each program compiles once; the kernels inherit
  # this environment), kept in the temporary directory.
  env = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('jax_cache')),
         'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    nb1 = copy.deepcopy(nb0)        # kernel 1: all cells, then the training cell again
    c1 = client(nb1)
    with c1.setup_kernel():
      for i, cell in enumerate(nb1.cells):
        c1.execute_cell(cell, i)
      shown['first'] = copy.deepcopy(nb1.cells)
      c1.execute_cell(nb1.cells[train_idx], train_idx)
      shown['rerun'] = _outputs(nb1.cells[train_idx])
    nb2 = copy.deepcopy(nb0)        # kernel 2 (after a disconnect): all cells again
    client(nb2).execute()
    shown['second'] = nb2.cells
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  return {'shown': shown, 'before': before, 'after': _repo_state(), 'train_idx': train_idx, 'runs_dir': runs_dir}


def _all(cells):
  return [o for c in cells if c.cell_type == 'code' for o in c.get('outputs', [])]


def test_colab_notebook_runs_to_a_result_and_curves(executed):
  cells = executed['shown']['second']
  outputs = _all(cells)
  text = _text(outputs)
  assert 'not on Colab: nothing to install' in text
  assert 'not on Colab: Google Drive not mounted' in text
  workdir = pathlib.Path(re.search(r'workdir: (\S+)', text).group(1))
  assert workdir == executed['runs_dir'] / 'workdirs' / 'tiny_metadrop_authors_seed0'
  assert not workdir.resolve().is_relative_to(ROOT)
  m = re.search(r'metadrop on synthetic 3-way 1-shot: (\d+\.\d\d) ± (\d+\.\d\d) % over 20 '
                r'episodes \(step 20/20\)', text)
  assert m, text
  result = json.loads((workdir / 'results.json').read_text())
  assert f"{result['accuracy']:.2f}" == m.group(1) and result['step'] == 20
  config = json.loads((workdir / 'config.json').read_text())
  assert (config['meta_gradient'], config['method'], config['model']['num_layers']) == \
      ('authors', 'metadrop', 1)
  assert 'reduced budget' in text
  md = _markdown(outputs)
  assert f"**{m.group(1)} ± {m.group(2)}**" in md     # the result beside the paper's rows
  assert 'Table 1' in md                                # report.build_table
  report_cell = cells[-1]
  assert len(_pngs(_outputs(report_cell))) == 1        # the learning curves
  assert (workdir / 'curves.png').stat().st_size > 1000
  assert executed['after'] == executed['before'], 'the notebook wrote into the repository'


def test_colab_notebook_trains_in_sittings_that_resume(executed):
  """Sitting 1 stops at the step limit and the meta-test waits; rerunning the training cell
  continues from its checkpoint; after a fresh kernel, all cells continue from the second's and
  finish. No sitting starts over: runs.jsonl chains the steps, metrics rows are not repeated."""
  idx = executed['train_idx']
  first = executed['shown']['first']
  t1 = _text(_outputs(first[idx]))
  assert 'this sitting: steps 0 -> 8 of 20' in t1 and '(stopped: step limit)' in t1
  assert re.search(r'12 steps left: ETA \d+\.\d (min|h) of training at this pace, about \d+ '
                   r'more sitting\(s\) of 20 min', t1) and 'Run this cell again' in t1
  assert 'training not finished (8 / 20)' in _text(_outputs(first[idx + 2]))
  assert 'no meta-test result yet' in _text(_outputs(first[-1]))
  assert len(_pngs(_outputs(first[-1]))) == 1          # curves of the unfinished run
  t2 = _text(executed['shown']['rerun'])
  assert 'this sitting: steps 8 -> 16 of 20' in t2
  t3 = _text(_outputs(executed['shown']['second'][idx]))
  assert 'this sitting: steps 16 -> 20 of 20' in t3 and 'training done: 20 / 20' in t3
  workdir = executed['runs_dir'] / 'workdirs' / 'tiny_metadrop_authors_seed0'
  rows = [json.loads(l) for l in (workdir / 'runs.jsonl').read_text().splitlines()]
  assert [(r['start_step'], r['step']) for r in rows] == [(0, 8), (8, 16), (16, 20)]
  steps = [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert steps == [5, 10, 15, 20]                 # log_every 5, no validation: each row once
