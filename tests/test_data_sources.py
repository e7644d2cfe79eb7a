"""Real-data loaders: Omniglot (local zips / folders, TFDS), miniImageNet (zip, folder, npy, ILSVRC),
the prepared-array cache, the prepare CLI and every error path.

Real-data tests read $METADROP_DATA_DIR (omniglot/, miniimagenet/) and skip with the reason when
it is unset or lacks the files; everything else runs on tiny archives in the standard layouts
built in tmp_path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
from PIL import Image

import data_helpers as H
from metadrop_jax.data import DataError, cache, load_split, miniimagenet, omniglot, prepare

OMNI_DIR = H.REAL_DATA / 'omniglot' if H.REAL_DATA else None
MINI_ZIP = H.REAL_DATA / 'miniimagenet' / 'miniimagenet_84x84.zip' if H.REAL_DATA else None
_HOW = 'set METADROP_DATA_DIR to a folder holding omniglot/ and miniimagenet/ (docs/data.md)'
need_omniglot = pytest.mark.skipif(
    not (OMNI_DIR and (OMNI_DIR / 'images_background.zip').is_file()),
    reason=f"real Omniglot not found at {OMNI_DIR or '$METADROP_DATA_DIR (not set)'}: {_HOW}")
need_mini = pytest.mark.skipif(
    not (MINI_ZIP and MINI_ZIP.is_file()),
    reason=f"real miniImageNet not found at {MINI_ZIP or '$METADROP_DATA_DIR (not set)'}: {_HOW}")


def expected_omniglot_image(png: bytes) -> np.ndarray:
  img = Image.open(io.BytesIO(png)).convert('L').resize((28, 28), Image.LANCZOS)
  return 255 - np.asarray(img)


def check_rotations(a: np.ndarray):
  base = a[0::4]
  for k in range(4):
    np.testing.assert_array_equal(a[k::4], np.rot90(base, k, axes=(2, 3)))


# ==== real data ==================================================================================

@pytest.fixture(scope='module')
def real_omniglot(tmp_path_factory):
  c = H.data_config('omniglot', OMNI_DIR, 'local', tmp_path_factory.mktemp('cache'))
  return c, {s: load_split(c, s) for s in ('train', 'val', 'test')}


@need_omniglot
def test_real_omniglot_shapes_values_rotations(real_omniglot):
  c, a = real_omniglot
  assert a['train'].shape == (4800, 20, 28, 28, 1) and a['test'].shape == (1692, 20, 28, 28, 1)
  assert a['val'] is None
  for x in (a['train'], a['test']):
    assert x.dtype == np.uint8
    assert x.max() == 255 and x.min() == 0          # ink 255 present, background 0
    assert (x == 0).mean() > 0.5                      # background is the majority
    assert (x == 255).mean() > 0.01
    check_rotations(x)
  # First meta-train character, first image, decoded straight from the zip.
  directory, manifest = omniglot.prepare(c, log=H.quiet)
  alphabet, character = manifest['characters']['train'][0].split('/')
  for arc in ('images_background', 'images_evaluation'):
    z = zipfile.ZipFile(OMNI_DIR / f'{arc}.zip')
    names = sorted(n for n in z.namelist() if n.startswith(f'{arc}/{alphabet}/{character}/')
                   and n.endswith('.png'))
    if names:
      np.testing.assert_array_equal(a['train'][0, 0, :, :, 0], expected_omniglot_image(z.read(names[0])))
      np.testing.assert_array_equal(a['train'][0, 19, :, :, 0], expected_omniglot_image(z.read(names[19])))
      break
  else:
    pytest.fail(f'{alphabet}/{character} not in either zip')


@need_omniglot
def test_real_omniglot_split_disjoint_and_val(real_omniglot):
  c, a = real_omniglot
  _, manifest = omniglot.prepare(c, log=H.quiet)
  tr, te = manifest['characters']['train'], manifest['characters']['test']
  assert len(tr) == 1200 and len(te) == 423 and not set(tr) & set(te) and len(set(tr + te)) == 1623
  # The same by pixels: no unrotated image of a test character appears among train images.
  digest = lambda x: {hashlib.md5(i.tobytes()).hexdigest() for i in x[0::4].reshape(-1, 784)}
  assert not digest(a['train']) & digest(a['test'])
  c.val_classes = 100
  v = {s: load_split(c, s) for s in ('train', 'val', 'test')}
  assert [v[s].shape[0] for s in ('train', 'val', 'test')] == [4400, 400, 1692]
  np.testing.assert_array_equal(np.concatenate([v['train'], v['val']]), a['train'])
  np.testing.assert_array_equal(v['test'], a['test'])


def _mini_csv_rows(z, split):
  rows = z.read(f'miniimagenet/{split}.csv').decode().splitlines()[1:]
  by = {}
  for r in rows:
    f, w = r.split(',')
    by.setdefault(w, []).append(f)
  return by


def _decode_rgb(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


@need_mini
def test_real_miniimagenet_one_class_per_split_fully(tmp_path):
  """Fast: a zip holding one real class per split (all 600 images) against the CSV order."""
  z = zipfile.ZipFile(MINI_ZIP)
  files, picked = {}, {}
  for split in ('train', 'val', 'test'):
    by = _mini_csv_rows(z, split)
    w = sorted(by)[-1]
    picked[split] = (w, by[w])
    files[f'miniimagenet/{split}.csv'] = H.mini_csv((f, w) for f in by[w])
    for f in by[w]:
      files[f'miniimagenet/{split}/{w}/{f}'] = z.read(f'miniimagenet/{split}/{w}/{f}')
  sub = H.write_zip(tmp_path / 'one_class.zip', files)
  c = H.data_config('miniimagenet', sub, 'local', tmp_path / 'cache')
  counts = dict(split_classes={'train': 1, 'val': 1, 'test': 1}, n_images=600)
  for split, (w, names) in picked.items():
    a = miniimagenet.load_split(c, split, **counts)
    assert a.shape == (1, 600, 84, 84, 3) and a.dtype == np.uint8
    want = np.stack([_decode_rgb(files[f'miniimagenet/{split}/{w}/{f}']) for f in names])
    np.testing.assert_array_equal(a[0], want)


@pytest.mark.slow   # ~30-35 s on 2 cores (60,000 JPEG decodes); the test above covers one class per split
@need_mini
def test_real_miniimagenet_full(tmp_path):
  c = H.data_config('miniimagenet', MINI_ZIP.parent, 'auto', tmp_path)
  z = zipfile.ZipFile(MINI_ZIP)
  seen = set()
  for split, n in (('train', 64), ('val', 16), ('test', 20)):
    a = load_split(c, split)
    assert a.shape == (n, 600, 84, 84, 3) and a.dtype == np.uint8
    by = _mini_csv_rows(z, split)
    assert len(by) == n and all(len(f) == 600 for f in by.values())
    assert not seen & set(by)
    seen |= set(by)
    for i, w in enumerate(sorted(by)):   # class order = sorted wnid, images in CSV order
      np.testing.assert_array_equal(a[i, 0], _decode_rgb(z.read(f'miniimagenet/{split}/{w}/{by[w][0]}')))
      np.testing.assert_array_equal(a[i, -1], _decode_rgb(z.read(f'miniimagenet/{split}/{w}/{by[w][-1]}')))
    del a
  directory, manifest = miniimagenet.prepare(c, log=H.quiet)
  assert manifest['source_files'][0]['sha256'] == (
      '8fa60f1b9710eb6521750e1829e52bee2e785b859a1d9eb75c9c651fa6dcdce3')


# ==== Omniglot on tiny archives ==================================================================

def omni_load(root, cache_dir, split, source='local', **kw):
  return omniglot.load_split(H.data_config('omniglot', root, source, cache_dir, **kw), split, **H.OMNI_COUNTS)


def test_omniglot_zip_parser_matches_direct_decoding(tmp_path):
  root = H.write_omniglot(tmp_path / 'omni', 'zip')
  train = omni_load(root, tmp_path / 'c', 'train')
  test = omni_load(root, tmp_path / 'c', 'test')
  assert train.shape == (4 * 6, 4, 28, 28, 1) and test.shape == (4 * 3, 4, 28, 28, 1)
  assert omni_load(root, tmp_path / 'c', 'val') is None
  check_rotations(train)
  check_rotations(test)
  files = {**H.omniglot_files()['images_background'], **H.omniglot_files()['images_evaluation']}
  chars = sorted({tuple(n.split('/')[1:3]) for n in files})
  tr, te = omniglot.character_split(len(chars), 6)
  for arr, idx in ((train, tr), (test, te)):
    for row, ci in enumerate(idx):
      pngs = sorted(n for n in files if tuple(n.split('/')[1:3]) == chars[ci])   # by file name
      want = np.stack([expected_omniglot_image(files[n]) for n in pngs])
      np.testing.assert_array_equal(arr[4 * row, ..., 0], want)


def test_omniglot_folder_equals_zip_and_val_split(tmp_path):
  z = H.write_omniglot(tmp_path / 'z', 'zip')
  f = H.write_omniglot(tmp_path / 'f', 'folder')
  for split in ('train', 'test'):
    np.testing.assert_array_equal(omni_load(z, tmp_path / 'c', split), omni_load(f, tmp_path / 'c', split))
  full = omni_load(f, tmp_path / 'c', 'train')
  tr = omni_load(f, tmp_path / 'c', 'train', val_classes=2)
  va = omni_load(f, tmp_path / 'c', 'val', val_classes=2)
  assert tr.shape[0] == 16 and va.shape[0] == 8
  np.testing.assert_array_equal(np.concatenate([tr, va]), full)
  with pytest.raises(DataError, match='val_classes'):
    omni_load(f, tmp_path / 'c', 'val', val_classes=6)


def test_omniglot_auto_source(tmp_path):
  assert omniglot.resolve_source(H.data_config('omniglot', tmp_path)) == 'local'
  assert omniglot.resolve_source(H.data_config('omniglot', '')) == 'tfds'
  with pytest.raises(DataError, match='needs data.path'):
    omniglot.resolve_source(H.data_config('omniglot', '', 'local'))


def test_omniglot_missing_archive(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  (root / 'images_evaluation.zip').unlink()
  with pytest.raises(DataError) as e:
    omni_load(root, tmp_path / 'c', 'train')
  msg = str(e.value)
  assert 'images_evaluation.zip' in msg and 'brendenlake/omniglot' in msg
  assert 'python -m metadrop_jax.data.prepare --help' in msg and '\n' not in msg
  with pytest.raises(DataError, match='does not exist'):
    omni_load(tmp_path / 'nowhere', tmp_path / 'c', 'train')


def test_omniglot_corrupt_zip(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  (root / 'images_background.zip').write_bytes(b'PK\x03\x04 this is not a zip' * 10)
  with pytest.raises(DataError, match=r'images_background\.zip: not a readable zip'):
    omni_load(root, tmp_path / 'c', 'train')


def test_omniglot_corrupt_member_is_named(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'folder')
  victim = sorted((root / 'images_background').rglob('*.png'))[0]
  victim.write_bytes(b'not a png')
  with pytest.raises(DataError, match=f'{victim.name}: cannot decode'):
    omni_load(root, tmp_path / 'c', 'train')


def test_omniglot_wrong_image_size(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'folder')
  victim = sorted((root / 'images_evaluation').rglob('*.png'))[-1]
  victim.write_bytes(H.png_bytes(H.omniglot_image(0, size=50)))
  with pytest.raises(DataError, match=f'{victim.name}: image is 50x50, expected 105x105'):
    omni_load(root, tmp_path / 'c', 'train')


def test_omniglot_wrong_image_count(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'folder')
  victim = sorted((root / 'images_background' / 'Beta_B' / 'character02').glob('*.png'))[0]
  victim.unlink()
  with pytest.raises(DataError, match='Beta_B/character02 has 3 images, expected 4'):
    omni_load(root, tmp_path / 'c', 'train')


def test_omniglot_wrong_character_count_and_stray_file(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'folder')
  c = H.data_config('omniglot', root, 'local', tmp_path / 'c')
  with pytest.raises(DataError, match='found 9 characters .* expected 1623'):
    omniglot.load_split(c, 'train')
  import shutil
  shutil.rmtree(root / 'images_evaluation' / 'Gamma_C' / 'character04')    # a missing class
  with pytest.raises(DataError, match='found 8 characters'):
    omni_load(root, tmp_path / 'c', 'train')
  (root / 'images_background' / 'Alpha_A' / 'notes.txt').write_text('x')
  with pytest.raises(DataError, match='notes.txt: unexpected entry'):
    omni_load(root, tmp_path / 'c', 'train')


# ==== cache behaviour =============================================================================

def test_cache_reuse_rebuild_and_atomicity(tmp_path, monkeypatch):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  c = H.data_config('omniglot', root, 'local', tmp_path / 'cache')
  logs = []
  d1, m1 = omniglot.prepare(c, log=logs.append, **H.OMNI_COUNTS)
  assert len(logs) == 1 and (d1 / 'manifest.json').is_file()
  assert sorted(p.name for p in d1.iterdir()) == ['manifest.json', 'test.npy', 'train.npy']
  manifest = json.loads((d1 / 'manifest.json').read_text())
  assert manifest['key']['version'] == omniglot.PREPROCESSING_VERSION
  assert manifest['splits']['train']['shape'] == [24, 4, 28, 28, 1]
  assert {f['path'] for f in manifest['source_files']} == {
      str(root / 'images_background.zip'), str(root / 'images_evaluation.zip')}
  assert all(len(f['sha256']) == 64 for f in manifest['source_files'])
  # Reused: nothing rebuilt.
  omniglot.prepare(c, log=logs.append, **H.OMNI_COUNTS)
  assert len(logs) == 1
  # Source changed in place (new content, new size): rebuilt in the same directory.
  files = H.omniglot_files()['images_background']
  first = next(iter(files))
  files[first] = H.png_bytes(H.omniglot_image(12345))
  H.write_zip(root / 'images_background.zip', files, dirs=False)
  d2, _ = omniglot.prepare(c, log=logs.append, **H.OMNI_COUNTS)
  assert len(logs) == 2 and d2 == d1
  # Preprocessing changed: a new directory.
  monkeypatch.setattr(omniglot, 'PREPROCESSING_VERSION', 'omniglot-test-v2')
  d3, _ = omniglot.prepare(c, log=logs.append, **H.OMNI_COUNTS)
  assert len(logs) == 3 and d3 != d1
  # A build that fails leaves no manifest and no temporary files behind.
  monkeypatch.setattr(omniglot, 'PREPROCESSING_VERSION', 'omniglot-test-v3')

  def boom(*a, **k):
    raise DataError('simulated failure')
  monkeypatch.setattr(omniglot, 'build_arrays', boom)
  with pytest.raises(DataError, match='simulated'):
    omniglot.prepare(c, log=H.quiet, **H.OMNI_COUNTS)
  for d in (tmp_path / 'cache').iterdir():
    assert not [p for p in d.iterdir() if '.tmp-' in p.name]
    if (d / 'manifest.json').exists():
      assert cache.read_manifest(d)['key']['version'] != 'omniglot-test-v3'


def test_cache_detects_tampered_array(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  c = H.data_config('omniglot', root, 'local', tmp_path / 'cache')
  d, _ = omniglot.prepare(c, log=H.quiet, **H.OMNI_COUNTS)
  np.save(d / 'test.npy', np.zeros((2, 4, 28, 28, 1), np.uint8))
  with pytest.raises(DataError, match='manifest says uint8'):
    omni_load(root, tmp_path / 'cache', 'test')


# ==== miniImageNet on tiny archives ===============================================================

def mini_load(path, cache_dir, split, source='auto', **kw):
  return miniimagenet.load_split(H.data_config('miniimagenet', path, source, cache_dir, **kw), split,
                                 **H.MINI_COUNTS)


def _expected_mini(files, split, prefix='miniimagenet/'):
  rows = files[f'{prefix}{split}.csv'].decode().splitlines()[1:]
  by = {}
  for r in rows:
    f, w = r.split(',')
    by.setdefault(w, []).append(f)
  return np.stack([np.stack([_decode_rgb(files[f'{prefix}{split}/{w}/{f}']) for f in by[w]])
                   for w in sorted(by)])


def test_miniimagenet_zip_and_folder(tmp_path):
  files = H.mini_files()
  zp = H.write_zip(tmp_path / 'miniimagenet_84x84.zip', files)
  tree = H.write_tree(tmp_path / 'tree', files)
  for split, n in H.MINI_SPLITS.items():
    want = _expected_mini(files, split)
    assert want.shape == (n, 4, 84, 84, 3)
    np.testing.assert_array_equal(mini_load(zp, tmp_path / 'c', split), want)
    np.testing.assert_array_equal(mini_load(tmp_path, tmp_path / 'c', split), want)   # dir with zip
    np.testing.assert_array_equal(mini_load(tree, tmp_path / 'c', split), want)   # tree (auto)
    np.testing.assert_array_equal(mini_load(tree / 'miniimagenet', tmp_path / 'c', split, 'local'), want)


def test_miniimagenet_flat_images_layout(tmp_path):
  files = H.mini_files(prefix='')
  flat = {(k if k.endswith('.csv') else 'images/' + k.rsplit('/', 1)[-1]): v for k, v in files.items()}
  root = H.write_tree(tmp_path / 'ravi', flat)
  np.testing.assert_array_equal(mini_load(root, tmp_path / 'c', 'val'), _expected_mini(files, 'val', ''))


def test_miniimagenet_missing_data_gives_manual_instructions(tmp_path):
  for path in ('', tmp_path / 'absent', tmp_path):
    with pytest.raises(DataError) as e:
      mini_load(path, tmp_path / 'c', 'train')
    msg = str(e.value)     # one line; the whole instructions are prepare's --help
    assert 'miniimagenet_84x84.zip' in msg and '--config.data.path=' in msg and '\n' not in msg
    assert 'python -m metadrop_jax.data.prepare --help' in msg


def test_miniimagenet_corrupt_zip(tmp_path):
  zp = tmp_path / 'miniimagenet_84x84.zip'
  zp.write_bytes(b'garbage' * 100)
  with pytest.raises(DataError, match=r'miniimagenet_84x84\.zip: not a readable zip'):
    mini_load(zp, tmp_path / 'c', 'train')


@pytest.mark.parametrize('fault,match', [
    ('missing_class', r'train\.csv: lists 2 classes, expected 3'),
    ('missing_file', r'does not exist; is the copy complete'),
    ('wrong_size', r'image is 83x84, expected 84x84'),
    ('wrong_count', r'val\.csv: class n\d+ lists 3 images, expected 4'),
    ('stray_file', r'not listed in test\.csv'),
    ('corrupt_image', r'cannot decode the image'),
    ('bad_header', r'expected the header "filename,label"'),
    ('class_in_two_splits', r'is in both train\.csv and val\.csv'),
])
def test_miniimagenet_faults(tmp_path, fault, match):
  files = H.mini_files()
  rows = lambda s: files[f'miniimagenet/{s}.csv'].decode().splitlines()
  imgs = lambda s: sorted(k for k in files if k.startswith(f'miniimagenet/{s}/'))
  if fault == 'missing_class':
    w = rows('train')[1].split(',')[1]
    files['miniimagenet/train.csv'] = '\n'.join(r for r in rows('train') if not r.endswith(w)).encode()
    files = {k: v for k, v in files.items() if f'/{w}/' not in k}
  elif fault == 'missing_file':
    del files[imgs('test')[0]]
  elif fault == 'wrong_size':
    files[imgs('val')[2]] = H.jpeg_bytes(H.mini_image(1, (83, 84)))
  elif fault == 'wrong_count':
    victim = rows('val')[1]
    files['miniimagenet/val.csv'] = '\n'.join(r for r in rows('val') if r != victim).encode()
  elif fault == 'stray_file':
    files[imgs('test')[0].rsplit('/', 1)[0] + '/extra.jpg'] = files[imgs('test')[0]]
  elif fault == 'corrupt_image':
    files[imgs('train')[5]] = b'\xff\xd8 broken jpeg'
  elif fault == 'bad_header':
    files['miniimagenet/test.csv'] = b'file,class\n' + files['miniimagenet/test.csv'].split(b'\n', 1)[1]
  elif fault == 'class_in_two_splits':
    w_train = rows('train')[1].split(',')[1]
    w_val = rows('val')[1].split(',')[1]
    files = {k.replace(w_val, w_train): v.replace(w_val.encode(), w_train.encode()) if k.endswith('.csv') else v
             for k, v in files.items()}
  zp = H.write_zip(tmp_path / 'm.zip', files)
  with pytest.raises(DataError, match=match):
    mini_load(zp, tmp_path / 'c', 'train', 'local')


def test_miniimagenet_npy(tmp_path):
  rng = np.random.default_rng(0)
  x = {s: rng.integers(0, 256, (n, 4, 84, 84, 3), dtype=np.uint8) for s, n in H.MINI_SPLITS.items()}
  variants = {
      'u8_flat': lambda a: a.reshape(a.shape[0], 4, -1),                        # [C, N, 21168]
      'f32_unit': lambda a: (a.reshape(a.shape[0], 4, -1) / 255.0).astype(np.float32),
      'f64_255': lambda a: a.reshape(-1, 84, 84, 3).astype(np.float64),       # [C*N, 84, 84, 3]
      'i16': lambda a: a.astype(np.int16),
  }
  for name, f in variants.items():
    d = tmp_path / name
    d.mkdir()
    np.save(d / 'train.npy', f(x['train']))
    np.save(d / 'test.npy', f(x['test']))
    for split in ('train', 'test'):
      np.testing.assert_array_equal(mini_load(d, tmp_path / 'c', split), x[split], err_msg=name)
    assert mini_load(d, tmp_path / 'c', 'val') is None            # the authors ship no val split
  np.save(tmp_path / 'u8_flat' / 'val.npy', x['val'])
  np.testing.assert_array_equal(mini_load(tmp_path / 'u8_flat', tmp_path / 'c', 'val'), x['val'])
  bad = tmp_path / 'bad'
  bad.mkdir()
  np.save(bad / 'train.npy', x['train'][:, :3])
  np.save(bad / 'test.npy', x['test'])
  with pytest.raises(DataError, match=r'train\.npy: shape \(3, 3, 84, 84, 3\).*expected 3 classes x 4'):
    mini_load(bad, tmp_path / 'c', 'train', 'npy')
  np.save(bad / 'train.npy', x['train'].astype(np.float32) / 127.5 - 1)
  with pytest.raises(DataError, match='normalised arrays are not supported'):
    mini_load(bad, tmp_path / 'c', 'train', 'npy')
  np.save(bad / 'train.npy', x['train'])
  (bad / 'test.npy').unlink()
  with pytest.raises(DataError, match=r'test\.npy does not exist'):
    mini_load(bad, tmp_path / 'c', 'train', 'npy')


def test_miniimagenet_ilsvrc(tmp_path):
  ilsvrc = H.ilsvrc_tree(tmp_path / 'ILSVRC' / 'train', tmp_path / 'csv')
  c = dict(ilsvrc_path=str(ilsvrc))
  assert miniimagenet.resolve_source(H.data_config('miniimagenet', tmp_path / 'csv', **c))[0] == 'ilsvrc'
  for split in H.MINI_SPLITS:
    got = mini_load(tmp_path / 'csv', tmp_path / 'c', split, **c)
    rows = (tmp_path / 'csv' / f'{split}.csv').read_text().splitlines()[1:]
    by = {}
    for r in rows:
      f, w = r.split(',')
      by.setdefault(w, []).append(f)
    for i, w in enumerate(sorted(by)):
      listing = sorted(os.listdir(ilsvrc / w))
      for j, f in enumerate(by[w]):
        k = int(f[len(w):-4])
        img = Image.open(ilsvrc / w / listing[k - 1]).convert('RGB').resize((84, 84), Image.LANCZOS)
        np.testing.assert_array_equal(got[i, j], np.asarray(img))
  # Faults: a class folder missing, a CSV index past the folder's end, no ilsvrc_path.
  w = sorted(os.listdir(ilsvrc))[0]
  os.rename(ilsvrc / w, tmp_path / 'moved')
  with pytest.raises(DataError, match=f'{w}: class folder missing'):
    mini_load(tmp_path / 'csv', tmp_path / 'c2', 'train', 'ilsvrc', **c)
  os.rename(tmp_path / 'moved', ilsvrc / w)
  for p in sorted((ilsvrc / w).iterdir())[8:]:
    p.unlink()
  with pytest.raises(DataError, match='asks for image #12, but the folder holds 8 files'):
    mini_load(tmp_path / 'csv', tmp_path / 'c3', 'train', 'ilsvrc', **c)
  with pytest.raises(DataError, match='needs data.ilsvrc_path'):
    mini_load(tmp_path / 'csv', tmp_path / 'c', 'train', 'ilsvrc')


# ==== dispatcher and CLI ==========================================================================

def test_dispatcher_and_cli(tmp_path, capsys):
  zp = H.write_zip(tmp_path / 'miniimagenet_84x84.zip', H.mini_files())
  c = H.data_config('miniimagenet', zp, 'auto', tmp_path / 'c')
  with pytest.raises(DataError, match='lists 3 classes, expected 64'):   # real counts by default
    load_split(c, 'train')
  with pytest.raises(SystemExit) as e:
    prepare.main(['--help'])
  assert e.value.code == 0 and '--dataset' in capsys.readouterr().out
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  assert prepare.main(['--dataset=miniimagenet', f'--path={tmp_path / "nothing"}',
                       f'--cache_dir={tmp_path / "c"}']) == 2
  err = capsys.readouterr().err     # prepare's own flag, not training's --config.data.path
  assert 'miniImageNet: ' in err and '--path=<it>' in err and '--config.data' not in err
  assert prepare.main(['--dataset=omniglot', f'--path={root}', f'--cache_dir={tmp_path / "c"}']) == 2
  assert 'found 9 characters' in capsys.readouterr().err


@need_omniglot
def test_cli_real_omniglot(real_omniglot, capsys):
  c, _ = real_omniglot   # the fixture prepared the cache: the CLI finds and reuses it
  args = ['--dataset=omniglot', f'--path={OMNI_DIR}', f'--cache_dir={c.cache_dir}', '--val_classes=100']
  assert prepare.main(args) == 0
  out = capsys.readouterr().out
  assert 'reused the cache' in out and 'cache size: 97.' in out
  assert '[4400, 20, 28, 28, 1]' in out and '[400, 20, 28, 28, 1]' in out and '[1692, 20, 28, 28, 1]' in out


# ==== TFDS ========================================================================================

def test_omniglot_tfds_equals_local(tmp_path, monkeypatch):
  """TFDS's real omniglot builder, fed (no internet) with zips in its manual dir whose checksums
  this test registers: the 'tfds' arrays must equal the 'local' arrays of the same zips."""
  tfds = pytest.importorskip('tensorflow_datasets', reason='tensorflow-datasets not installed')
  from tensorflow_datasets.core.download import download_manager
  manual = tmp_path / 'tfds' / 'downloads' / 'manual'     # TFDS's default manual_dir
  infos = H.write_tfds_manual_dir(manual, n_images=2)
  init = download_manager.DownloadManager.__init__

  def init_with_test_checksums(self, *a, **k):
    init(self, *a, **k)
    self._url_infos.update(infos)
  monkeypatch.setattr(download_manager.DownloadManager, '__init__', init_with_test_checksums)
  counts = dict(images_per_character=2)
  t = H.data_config('omniglot', tmp_path / 'tfds', 'tfds', tmp_path / 'cache', val_classes=10)
  l = H.data_config('omniglot', manual, 'local', tmp_path / 'cache', val_classes=10)
  for split in ('train', 'val', 'test'):
    a, b = omniglot.load_split(t, split, **counts), omniglot.load_split(l, split, **counts)
    assert a.shape == b.shape == ({'train': 4760, 'val': 40, 'test': 1692}[split], 2, 28, 28, 1)
    np.testing.assert_array_equal(a, b)
  del tfds


# ==== Omniglot, Lake et al.'s background / evaluation split =====================================

# The tiny archives: background Alpha_A (3 characters) + Beta_B (2), evaluation Gamma_C (4).
LAKE_COUNTS = dict(n_characters=H.OMNI_CHARS, n_train=sum(H.OMNI_BACKGROUND.values()),
                   images_per_character=H.OMNI_IMAGES)


def lake_load(root, cache_dir, split, **kw):
  c = H.data_config('omniglot', root, 'local', cache_dir, omniglot_split='lake', **kw)
  return omniglot.load_split(c, split, **LAKE_COUNTS)


def test_omniglot_lake_split_keeps_alphabets_apart(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  train, test = lake_load(root, tmp_path / 'c', 'train'), lake_load(root, tmp_path / 'c', 'test')
  assert train.shape == (4 * 5, 4, 28, 28, 1) and test.shape == (4 * 4, 4, 28, 28, 1)
  assert lake_load(root, tmp_path / 'c', 'val') is None
  check_rotations(train)
  check_rotations(test)
  c = H.data_config('omniglot', root, 'local', tmp_path / 'c', omniglot_split='lake')
  files = H.omniglot_files()
  for split, arr, archive in (('train', train, 'images_background'),
                              ('test', test, 'images_evaluation')):
    _, manifest = omniglot.prepare_lake(c, split, n_characters=arr.shape[0] // 4,
                                        images_per_character=H.OMNI_IMAGES, log=H.quiet)
    assert manifest['omniglot_split'] == 'lake' and manifest['key']['archive'] == archive
    names = manifest['characters'][split]
    alphabets = [a for a, _ in manifest['alphabets'][split]]
    assert alphabets == omniglot.alphabet_order(alphabets)
    assert [n.split('/')[0] for n in names] == sorted((n.split('/')[0] for n in names),
                                                      key=alphabets.index)   # grouped by alphabet
    for row, name in enumerate(names):      # every row: that character's PNGs, by file name
      pngs = sorted(p for p in files[archive] if p.startswith(f'{archive}/{name}/'))
      assert len(pngs) == H.OMNI_IMAGES
      want = np.stack([expected_omniglot_image(files[archive][p]) for p in pngs])
      np.testing.assert_array_equal(arr[4 * row, ..., 0], want)
  # the default split of the same archives mixes them
  assert omni_load(root, tmp_path / 'c', 'train').shape[0] == 4 * H.OMNI_TRAIN


def test_omniglot_lake_validation_is_whole_alphabets(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'folder')
  full = lake_load(root, tmp_path / 'c', 'train')
  c = H.data_config('omniglot', root, 'local', tmp_path / 'c', omniglot_split='lake')
  _, manifest = omniglot.prepare_lake(c, 'train', n_characters=5,
                                      images_per_character=H.OMNI_IMAGES, log=H.quiet)
  last = manifest['alphabets']['train'][-1][1]          # characters of the last alphabet
  tr = lake_load(root, tmp_path / 'c', 'train', val_classes=1)
  va = lake_load(root, tmp_path / 'c', 'val', val_classes=1)
  assert va.shape[0] == 4 * last and tr.shape[0] == 4 * (5 - last)
  np.testing.assert_array_equal(np.concatenate([tr, va]), full)
  with pytest.raises(DataError, match='keep one for meta-training'):
    lake_load(root, tmp_path / 'c', 'val', val_classes=5)


def test_omniglot_lake_test_split_needs_only_the_evaluation_archive(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  (root / 'images_background.zip').unlink()
  assert lake_load(root, tmp_path / 'c', 'test').shape[0] == 4 * 4
  with pytest.raises(DataError, match='images_background'):
    lake_load(root, tmp_path / 'c', 'train')


def test_omniglot_lake_counts_are_checked(tmp_path):
  root = H.write_omniglot(tmp_path / 'o', 'zip')
  c = H.data_config('omniglot', root, 'local', tmp_path / 'c', omniglot_split='lake')
  with pytest.raises(DataError, match='expected 659'):    # the real archive's count by default
    omniglot.load_split(c, 'test', images_per_character=H.OMNI_IMAGES)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(counts=st.lists(st.integers(1, 40), min_size=1, max_size=8),
                  v=st.integers(0, 200))
def test_lake_val_characters_holds_the_fewest_whole_alphabets(counts, v):
  alphabets = [(f'a{i}', n) for i, n in enumerate(counts)]
  suffix = [sum(counts[len(counts) - k:]) for k in range(len(counts) + 1)]   # k last alphabets
  try:
    held = omniglot.lake_val_characters(alphabets, v)
  except DataError:
    k = next((k for k, s in enumerate(suffix) if s >= v), None)
    assert k is None or k == len(counts)          # only refused when no alphabet would be left
    return
  if v == 0:
    assert held == 0
    return
  k = suffix.index(held)
  assert held >= v and suffix[k - 1] < v and k < len(counts)
