"""Tiny Omniglot / miniImageNet / ILSVRC copies in the standard layouts, made with PIL for tests."""

from __future__ import annotations

import io
import os
import shutil
import zlib
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

# Real data sets, for the tests that need them: $METADROP_DATA_DIR (with omniglot/ and
# miniimagenet/ inside), as the library looks for them; None when it is not set.
REAL_DATA = Path(os.environ['METADROP_DATA_DIR']) if os.environ.get('METADROP_DATA_DIR') else None

# Tiny Omniglot: 2 + 1 alphabets, 9 characters, 4 drawers each; 6 meta-train characters.
OMNI_BACKGROUND = {'Alpha_A': 3, 'Beta_B': 2}
OMNI_EVALUATION = {'Gamma_C': 4}
OMNI_CHARS = sum(OMNI_BACKGROUND.values()) + sum(OMNI_EVALUATION.values())
OMNI_IMAGES = 4
OMNI_TRAIN = 6
OMNI_COUNTS = dict(n_characters=OMNI_CHARS, n_train=OMNI_TRAIN, images_per_character=OMNI_IMAGES)

MINI_SPLITS = {'train': 3, 'val': 2, 'test': 2}
MINI_IMAGES = 4
MINI_COUNTS = dict(split_classes=MINI_SPLITS, n_images=MINI_IMAGES)


def png_bytes(img: Image.Image) -> bytes:
  b = io.BytesIO()
  img.save(b, format='PNG')
  return b.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
  b = io.BytesIO()
  img.save(b, format='JPEG', quality=quality)
  return b.getvalue()


def omniglot_image(seed: int, size: int = 105) -> Image.Image:
  """One-bit image, 1 = white background, a few random black (0) ink blocks."""
  rng = np.random.default_rng(seed)
  a = np.ones((size, size), bool)
  for _ in range(3):
    y, x = rng.integers(0, size - 30, 2)
    h, w = rng.integers(5, 30, 2)
    a[y:y + h, x:x + w] = False
  return Image.fromarray(a).convert('1')


# The shape TFDS's omniglot builder insists on (50 alphabets, 1623 characters; 964 + 659).
TFDS_BACKGROUND = {f'Bg_{a:02d}': 32 + (a < 4) for a in range(30)}
TFDS_EVALUATION = {f'Ev_{a:02d}': 33 - (a == 0) for a in range(20)}


def omniglot_files(n_images: int = OMNI_IMAGES, size: int = 105, background=None,
                   evaluation=None):
  """{archive: {relative path: PNG bytes}} in the standard layout; file names XXXX_YY.png."""
  out, gid = {}, 0
  for archive, alphabets in (('images_background', background or OMNI_BACKGROUND),
                             ('images_evaluation', evaluation or OMNI_EVALUATION)):
    files = {}
    for alphabet, n_chars in alphabets.items():
      for c in range(n_chars):
        gid += 1
        for d in range(1, n_images + 1):
          # Written in reverse drawer order so a reader that forgets to sort is caught.
          files[f'{archive}/{alphabet}/character{c + 1:02d}/{gid:04d}_{d:02d}.png'] = png_bytes(
              omniglot_image(gid * 100 + d, size))
      out[archive] = dict(reversed(list(files.items())))
  return out


def write_zip(path: Path, files: dict, dirs: bool = True) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:
    if dirs:
      seen = set()
      for name in files:
        parts = name.split('/')[:-1]
        for i in range(1, len(parts) + 1):
          d = '/'.join(parts[:i]) + '/'
          if d not in seen:
            seen.add(d)
            z.writestr(d, b'')
    for name, data in files.items():
      z.writestr(name, data)
  return path


def write_tree(root: Path, files: dict) -> Path:
  for name, data in files.items():
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
  return root


def write_omniglot(root: Path, layout: str = 'zip', **kw) -> Path:
  """Both archives in ``root`` as zips or folders."""
  root.mkdir(parents=True, exist_ok=True)
  for archive, files in omniglot_files(**kw).items():
    if layout == 'zip':
      write_zip(root / f'{archive}.zip', files)
    else:
      write_tree(root, files)
  return root


OMNIGLOT_URL = 'https://github.com/brendenlake/omniglot/raw/master/python/'
TFDS_FILES = ('images_background.zip', 'images_evaluation.zip', 'images_background_small1.zip',
              'images_background_small2.zip')


def write_tfds_manual_dir(manual: Path, n_images: int = 2) -> dict:
  """The four zips TFDS's omniglot builder downloads, in the full 50-alphabet / 1623-character
  shape but with ``n_images`` drawers per character; small1/small2 are subsets of background.
  Returns the url_infos (size, sha256, file name) to register for them."""
  from tensorflow_datasets.core.download import checksums
  files = omniglot_files(n_images, background=TFDS_BACKGROUND, evaluation=TFDS_EVALUATION)
  write_zip(manual / 'images_background.zip', files['images_background'])
  write_zip(manual / 'images_evaluation.zip', files['images_evaluation'])
  for k, alphabet in ((1, 'Bg_00'), (2, 'Bg_01')):
    small = {n.replace('images_background/', f'images_background_small{k}/', 1): b
             for n, b in files['images_background'].items() if n.split('/')[1] == alphabet}
    write_zip(manual / f'images_background_small{k}.zip', small)
  infos = {}
  for f in TFDS_FILES:
    ui = checksums.compute_url_info(manual / f)
    infos[OMNIGLOT_URL + f] = checksums.UrlInfo(size=ui.size, checksum=ui.checksum, filename=f)
  return infos


def mini_image(seed: int, size=(84, 84)) -> Image.Image:
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)   # smooth blocks survive JPEG well
  return Image.fromarray(base).resize(size, Image.NEAREST)


def mini_wnids():
  wnids, k = {}, 0
  for split, n in MINI_SPLITS.items():
    wnids[split] = []
    for _ in range(n):
      k += 1
      wnids[split].append(f'n{9000000 - k * 1111:08d}')   # not created in sorted order
  return wnids


def mini_csv(rows) -> bytes:
  return ('filename,label\n' + ''.join(f'{f},{w}\n' for f, w in rows)).encode()


def mini_files(n_images: int = MINI_IMAGES, size=(84, 84), prefix: str = 'miniimagenet/'):
  """{relative path: bytes} of the standard miniImageNet tree; CSV order != file-name order."""
  files, csvs = {}, {}
  for split, wnids in mini_wnids().items():
    rows = []
    for w in wnids:
      for i in reversed(range(n_images)):
        name = f'{w}{i * 7 + 1:08d}.jpg'
        rows.append((name, w))
        files[f'{prefix}{split}/{w}/{name}'] = jpeg_bytes(mini_image(zlib.crc32(f"{w}{i}".encode()), size))
    csvs[f'{prefix}{split}.csv'] = mini_csv(rows)
  return {**csvs, **files}


def ilsvrc_tree(root: Path, csv_dir: Path, n_images: int = MINI_IMAGES, per_class: int = 12):
  """ILSVRC-like folders <wnid>/<wnid>_<n>.JPEG (various sizes) and the CSVs that pick from them."""
  csv_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(5)
  for split, wnids in mini_wnids().items():
    rows = []
    for w in wnids:
      (root / w).mkdir(parents=True, exist_ok=True)
      for n in range(per_class):
        size = (int(rng.integers(90, 200)), int(rng.integers(90, 200)))
        img = mini_image(int(rng.integers(2**31)), size)
        if n % 5 == 0:
          img = img.convert('L')      # ILSVRC has grayscale (and CMYK) JPEGs
        (root / w / f'{w}_{n * 13 + 1}.JPEG').write_bytes(jpeg_bytes(img))
      for k in (3, 1, 7, 12)[:n_images]:
        rows.append((f'{w}{k:08d}.jpg', w))
    (csv_dir / f'{split}.csv').write_bytes(mini_csv(rows))
  return root


def copy_tree(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


def data_config(name, path='', source='auto', cache_dir='', **kw):
  """A ``config.data`` for ``name`` reading ``path`` (the other fields: base_config's)."""
  from metadrop_jax.config import base_config
  c = base_config().data
  c.name, c.path, c.source, c.cache_dir = name, str(path), source, str(cache_dir)
  for k, v in kw.items():
    c[k] = v
  return c


def quiet(*_):
  """A ``log`` callback that prints nothing."""
