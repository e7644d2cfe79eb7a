"""miniImageNet in parts (tools/long_runs/data_parts.py, device_data.sh, pack_device_data.sh):
every part verified where it lands and where it is assembled; a machine holding some parts gets
only the rest; a missing, cut or corrupted part is one line and nothing trains on a partial file.
Fake files and small part sizes: no real data, seconds in all."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import pytest

from tools.long_runs import data_parts as dp

ROOT = pathlib.Path(__file__).resolve().parents[1]
ZIP = 'miniimagenet_84x84.zip'


def _fake(path: pathlib.Path, n: int, seed: int = 0) -> bytes:
  data = hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1)
  data = bytes((b + i) % 256 for i, b in enumerate(data[:n]))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return data


@hypothesis.given(size=st.integers(1, 3000), part=st.integers(1, 1200))
@hypothesis.settings(max_examples=20)
def test_split_then_assemble_gives_the_file_back(tmp_path_factory, size, part):
  tmp = tmp_path_factory.mktemp('p')
  data = _fake(tmp / ZIP, size, seed=size)
  m = dp.split(str(tmp / ZIP), str(tmp / 'parts'), part)
  assert len(m['parts']) == -(-size // part)
  assert all(p['bytes'] <= part for p in m['parts'])
  dp.assemble(str(tmp / 'parts'), str(tmp / 'out' / ZIP))
  assert (tmp / 'out' / ZIP).read_bytes() == data


def test_stash_moves_verified_parts_and_names_the_rest(tmp_path):
  _fake(tmp_path / ZIP, 1000)
  full = tmp_path / 'full'
  m = dp.split(str(tmp_path / ZIP), str(full), 300)
  assert [p['name'] for p in m['parts']] == ['part.00', 'part.01', 'part.02', 'part.03']
  # the first copy brings the manifest and one part
  arrive, keep = tmp_path / 'arrive', tmp_path / 'keep'
  arrive.mkdir()
  shutil.copy(full / 'parts.json', arrive)
  shutil.copy(full / 'part.00', arrive)
  states = dp.stash(str(arrive), str(keep))
  assert not (arrive / 'part.00').exists() and (keep / 'part.00').exists()
  assert dp.needed(states) == ['part.01', 'part.02', 'part.03']
  line = dp.describe(m, states)
  assert '1 of 4 parts here; still needed: part.01,part.02,part.03' in line
  assert '--part_bytes=300 --have=part.00' in line
  # a cut part is named, kept out of the stash, and the zip is not assembled
  (arrive / 'part.01').write_bytes((full / 'part.01').read_bytes()[:100])
  states = dp.stash(str(arrive), str(keep))
  assert states['part.01'] == 'cut (100 of 300 B)' and not (keep / 'part.01').exists()
  assert 'copy them again' in dp.describe(m, states)
  with pytest.raises(dp.PartsError, match='1 of 4 parts here'):
    dp.assemble(str(keep), str(tmp_path / 'data' / ZIP))
  assert not (tmp_path / 'data' / ZIP).exists()
  assert not list((tmp_path / 'data').glob('*.tmp*'))
  # the rest arrives: whole, verified
  for n in ('part.01', 'part.02', 'part.03'):
    shutil.copy(full / n, arrive)
  assert dp.needed(dp.stash(str(arrive), str(keep))) == []
  dp.assemble(str(keep), str(tmp_path / 'data' / ZIP))
  assert (tmp_path / 'data' / ZIP).read_bytes() == (tmp_path / ZIP).read_bytes()


def test_a_corrupted_part_is_caught_where_it_is_assembled(tmp_path):
  _fake(tmp_path / ZIP, 900)
  parts = tmp_path / 'parts'
  dp.split(str(tmp_path / ZIP), str(parts), 400)
  b = bytearray((parts / 'part.01').read_bytes())
  b[7] ^= 1                                  # same size, one bit flipped after it was stashed
  (parts / 'part.01').write_bytes(bytes(b))
  with pytest.raises(dp.PartsError, match=r'part\.01: corrupted \(SHA-256 differs\)'):
    dp.assemble(str(parts), str(tmp_path / 'data' / ZIP))
  assert not (tmp_path / 'data' / ZIP).exists()
  assert dp.status(dp.load_manifest(str(parts)), str(parts))['part.01'] == \
      'corrupted (SHA-256 differs)'


def test_parts_of_another_cut_are_never_mixed(tmp_path):
  """A new split (another part size) makes the stashed parts of the old one useless: they go."""
  _fake(tmp_path / ZIP, 1000)
  dp.split(str(tmp_path / ZIP), str(tmp_path / 'a'), 300)
  dp.stash(str(tmp_path / 'a'), str(tmp_path / 'keep'))
  dp.split(str(tmp_path / ZIP), str(tmp_path / 'b'), 500)
  shutil.copy(tmp_path / 'b' / 'parts.json', tmp_path / 'c')
  (tmp_path / 'c').unlink()
  (tmp_path / 'c').mkdir()
  shutil.copy(tmp_path / 'b' / 'parts.json', tmp_path / 'c')
  shutil.copy(tmp_path / 'b' / 'part.00', tmp_path / 'c')
  states = dp.stash(str(tmp_path / 'c'), str(tmp_path / 'keep'))
  assert states == {'part.00': 'ok', 'part.01': 'missing'}
  assert sorted(os.listdir(tmp_path / 'keep')) == ['part.00', 'parts.json']


def test_bad_manifests_and_the_command_line_are_one_line(tmp_path, capsys):
  (tmp_path / 'm').mkdir()
  (tmp_path / 'm' / 'parts.json').write_text('{"file": "x", "parts": [')   # cut in the copy
  with pytest.raises(dp.PartsError, match='not a readable parts manifest'):
    dp.load_manifest(str(tmp_path / 'm'))
  assert dp.main(['assemble', str(tmp_path / 'm'), str(tmp_path / 'out.zip')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1
  assert dp.main(['status', str(tmp_path / 'none'), str(tmp_path / 'none2')]) == 2
  assert 'no manifest' in capsys.readouterr().err
  assert dp.main(['split', str(tmp_path / 'absent.zip'), str(tmp_path / 'o'),
                  '--part_bytes=10']) == 2
  assert 'no such file' in capsys.readouterr().err


def _mini_tree(tmp_path: pathlib.Path) -> pathlib.Path:
  """The files device_data.sh / pack_device_data.sh need, in a git checkout of their own."""
  tree = tmp_path / 'tree'
  for f in ('tools/__init__.py', 'tools/long_runs/__init__.py', 'tools/long_runs/data_parts.py',
            'tools/long_runs/procs.py', 'tools/long_runs/device_data.sh',
            'tools/long_runs/pack_device_data.sh', 'metadrop_jax/__init__.py',
            'metadrop_jax/data/__init__.py', 'metadrop_jax/data/cache.py',
            'metadrop_jax/metrics.py'):
    (tree / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / f, tree / f)
  (tree / '.gitignore').write_text('/.gpu_data/\n')
  git = ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', '-C', str(tree)]
  subprocess.run(git + ['init', '-q'], check=True)
  subprocess.run(git + ['add', '.'], check=True)
  subprocess.run(git + ['commit', '-qm', 'tree'], check=True)
  return tree


def _sh(tree, *args, **env):
  return subprocess.run(['bash', *args], cwd=tree, capture_output=True, text=True, timeout=60,
                        env={**os.environ, 'PYTHON': sys.executable, **env})


def test_the_scripts_stage_parts_and_never_lay_out_a_partial_zip(tmp_path):
  """pack_device_data.sh --mimg here, then on the 'GPU machine' (another folder) the copies
  arrive one by one: device_data.sh stash after each, assemble at the job's start."""
  tree = _mini_tree(tmp_path)
  src = tmp_path / 'data'
  _fake(src / 'omniglot' / 'images_background.zip', 50, 1)
  _fake(src / 'omniglot' / 'images_evaluation.zip', 50, 2)
  data = _fake(src / 'miniimagenet' / ZIP, 2500, 3)
  r = _sh(tree, 'tools/long_runs/pack_device_data.sh', '--mimg', '--part_bytes=1000',
          METADROP_DATA_DIR=str(src))
  assert r.returncode == 0, r.stderr
  assert 'miniImageNet: 3 part(s) of <= 1000 B' in r.stdout
  assert 'copy .gpu_data/mimg/parts.json and .gpu_data/mimg/part.00 there' in r.stdout
  # the machine holds part.00 and part.01 already: only part.02 is listed
  r = _sh(tree, 'tools/long_runs/pack_device_data.sh', '--mimg', '--part_bytes=1000',
          '--have=part.00,part.01', METADROP_DATA_DIR=str(src))
  assert r.returncode == 0, r.stderr
  assert 'the machine holds part.00,part.01' in r.stdout
  copy = [line for line in r.stdout.splitlines() if ' there' in line and 'copy' in line]
  assert len(copy) == 1 and copy[0].endswith('.gpu_data/mimg/parts.json .gpu_data/mimg/part.02')
  r = _sh(tree, 'tools/long_runs/pack_device_data.sh', '--mimg', '--have=part.00',
          METADROP_DATA_DIR=str(src))
  assert r.returncode == 2 and r.stderr.count('\n') == 1 and '--part_bytes' in r.stderr
  # the GPU machine: a checkout of its own, copies arriving one part at a time
  gpu = _mini_tree(tmp_path / 'gpu')
  env = {'METADROP_PARTS_DIR': str(tmp_path / 'stash'), 'METADROP_DATA_DIR': str(tmp_path / 'gd')}
  arrive = gpu / '.gpu_data' / 'mimg'
  arrive.mkdir(parents=True)
  staged = tree / '.gpu_data' / 'mimg'
  for i in range(2):
    shutil.copy(staged / 'parts.json', arrive)
    shutil.copy(staged / f'part.0{i}', arrive)
    r = _sh(gpu, 'tools/long_runs/device_data.sh', 'stash', **env)
    assert r.returncode == 0, r.stderr
  assert f'{ZIP}: 2 of 3 parts here; still needed: part.02' in r.stdout
  assert '--part_bytes=1000 --have=part.00,part.01' in r.stdout
  r = _sh(gpu, 'tools/long_runs/device_data.sh', 'assemble', **env)
  assert 'not here this job' in r.stdout and 'still needed: part.02' in r.stderr
  assert not (tmp_path / 'gd' / 'miniimagenet').exists()    # no folder, so no run sees data
  # the last part comes cut: still refused
  (arrive / 'part.02').write_bytes((staged / 'part.02').read_bytes()[:10])
  r = _sh(gpu, 'tools/long_runs/device_data.sh', 'assemble', **env)
  assert 'part.02 cut (10 of 500 B)' in r.stderr and not (tmp_path / 'gd' / 'miniimagenet').exists()
  shutil.copy(staged / 'part.02', arrive)
  r = _sh(gpu, 'tools/long_runs/device_data.sh', 'status', **env)
  assert '3 of 3 parts here' in r.stdout
  r = _sh(gpu, 'tools/long_runs/device_data.sh', 'assemble', **env)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / 'gd' / 'miniimagenet' / ZIP).read_bytes() == data
  assert sorted(os.listdir(tmp_path / 'gd')) == ['miniimagenet']
  m = json.loads((tmp_path / 'stash' / 'parts.json').read_text())
  assert m['sha256'] == hashlib.sha256(data).hexdigest()
  # a later job on the same machine finds it assembled
  assert 'assembled earlier' in _sh(gpu, 'tools/long_runs/device_data.sh', 'assemble',
                                    **env).stdout
  assert dp.machine_status(str(arrive), str(tmp_path / 'stash'),
                           str(tmp_path / 'gd' / 'miniimagenet' / ZIP)) == f'{ZIP} here'
