"""Executes notebooks/quickstart.ipynb top to bottom in a fresh python3 kernel (nbclient).

Takes about two minutes on a laptop CPU (meta-trains the tiny config). The notebook must not
write into the repository: it works in a temporary directory and removes it at the end.
"""

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
NOTEBOOK = ROOT / 'notebooks' / 'quickstart.ipynb'




def _setup_cell():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return next(c for c in nb.cells if c.cell_type == 'code').source


def test_setup_cell_needs_no_url():
  """No install from a repository URL (there is no published one): the first cell imports the
  package from the checkout the notebook sits in, or the installed one."""
  assert not re.search(r'https?://|OWNER|^\s*[!%]pip', _setup_cell(), re.M)


@pytest.mark.parametrize('where', ['checkout', 'installed'])
def test_setup_cell_finds_the_package(where, tmp_path):
  """From notebooks/ of a checkout it imports that checkout's metadrop_jax (even when another
  copy is installed); from any other folder, the installed package (PYTHONPATH stands in)."""
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  if where == 'checkout':
    cwd = NOTEBOOK.parent
  else:
    cwd, env['PYTHONPATH'] = tmp_path, str(ROOT)
  r = subprocess.run([sys.executable, '-c', _setup_cell()], cwd=cwd, env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == f'metadrop_jax from {ROOT / "metadrop_jax"}'


def test_quickstart_notebook_runs(tmp_path):
  if not _kernel_available():
    pytest.skip('no python3 Jupyter kernel (pip install ipykernel)')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  before = sorted(p.name for p in NOTEBOOK.parent.iterdir())
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                                   resources={'metadata': {'path': str(NOTEBOOK.parent)}})
  client.execute()
  assert sorted(p.name for p in NOTEBOOK.parent.iterdir()) == before, 'notebook wrote files'
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
  assert not [o for o in outputs if o.get('output_type') == 'error']
  text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
  workdir = re.search(r'workdir: (\S+)', text).group(1)
  assert not pathlib.Path(workdir).resolve().is_relative_to(ROOT)
  assert not pathlib.Path(workdir).exists()           # the last cell cleans up
  assert re.search(r'metadrop on synthetic 3-way 1-shot: \d+\.\d\d ± \d+\.\d\d %', text)
  images = [o for o in outputs if o.get('output_type') == 'display_data'
            and ('image/png' in o.get('data', {}) or 'image/gif' in o.get('data', {}))]
  assert len(images) >= 4      # curves, decision boundary, feature grid, feature GIF
  assert any('text/markdown' in o.get('data', {}) and 'Table 1' in o['data']['text/markdown']
             for o in outputs if o.get('output_type') == 'display_data')
