"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle split) as uint8 ``[classes, 600, 84, 84, 3]``.

Splits: train 64, val 16, test 20 classes of 600 images each. Class order = sorted wnid; the images
of a class are in the order of the split's CSV file. Counts are checked against the CSVs.

Sources (``data.source``); miniImageNet cannot be downloaded automatically (ImageNet's terms
forbid redistribution), so like TFDS's manual-download data sets a missing copy raises
:class:`DataError` that points to :data:`MANUAL_DOWNLOAD_INSTRUCTIONS` (``prepare --help``):

* ``'local'``: ``data.path`` is ``miniimagenet_84x84.zip`` (read in place with zipfile, never
  extracted), a folder holding it, or the same tree unzipped. Layout: ``<root>/{train,val,test}.csv``
  (``filename,label``) and ``<root>/<split>/<wnid>/<filename>``, where ``<root>`` is any folder
  inside the zip/tree (``miniimagenet/`` in the standard zip). Ravi & Larochelle's original flat
  ``<root>/images/<filename>`` layout is accepted as well. Images must be 84x84 (no resize).
* ``'npy'``: the Meta-Dropout authors' arrays in the folder ``data.path``: ``train.npy`` and
  ``test.npy`` (and ``val.npy`` if present; the authors ship none, so val is then None). Each holds
  ``classes * 600 * 84*84*3`` values, shaped ``[C, 600, 21168]``, ``[C, 600, 84, 84, 3]`` or
  ``[C*600, ...]``, pixels in HWC (RGB) order, classes in the authors' order. Assumed value scale:
  uint8 as is; other integer types must lie in [0, 255]; floats with max <= 1 are scaled by 255,
  floats with max in (1, 255] are taken as 0..255, then rounded. Negative values (normalised data)
  are rejected.
* ``'ilsvrc'``: built from the ILSVRC-2012 train folder ``data.ilsvrc_path/<wnid>/<wnid>_<n>.JPEG``
  and the Ravi & Larochelle CSVs in ``data.path``. A CSV file name ``<wnid><8 digits>.jpg`` is the
  k-th (1-based) file of the sorted listing of ``<wnid>/`` (the mapping of the common
  mini-imagenet-tools script). Each image: ``convert('RGB')``, PIL LANCZOS resize to 84x84 (no
  crop). The distributed JPEGs went through one more lossy JPEG save, so pixels differ slightly.
* ``'auto'``: a ``.zip`` file or a folder with CSVs and image folders -> local; a folder with
  ``train.npy`` -> npy; a folder with CSVs only and ``data.ilsvrc_path`` set -> ilsvrc.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from metadrop_jax.data import cache
from metadrop_jax.data.cache import DataError

SPLIT_CLASSES = {'train': 64, 'val': 16, 'test': 20}
IMAGES_PER_CLASS = 600
IMAGE_SIZE = 84
PIXELS = IMAGE_SIZE * IMAGE_SIZE * 3
ZIP_NAME = 'miniimagenet_84x84.zip'
PREPROCESSING_VERSION = 'miniimagenet-v1'
PREPROCESSING = {
    'local': '84x84 JPEG decoded with PIL, convert RGB, no resize; classes sorted by wnid, '
             'images in CSV order',
    'npy': "authors' arrays: uint8 kept; float max<=1 -> *255, float max<=255 kept; rounded; "
           'reshaped to [C, 600, 84, 84, 3] (HWC)',
    'ilsvrc': 'ILSVRC-2012 train JPEG (k-th file of sorted <wnid>/ listing, k from the CSV name) '
              '-> PIL convert RGB -> LANCZOS resize 84x84; classes sorted by wnid, CSV order',
}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
miniImageNet cannot be downloaded automatically (ImageNet terms forbid redistribution). Provide one of:
  (a) miniimagenet_84x84.zip: miniimagenet/{train,val,test}.csv + miniimagenet/<split>/<wnid>/<file>.jpg
      (84x84 JPEGs; the tree may also be unzipped). Prepare with
        python -m metadrop_jax.data.prepare --dataset=miniimagenet --source=local --path=/path/to/miniimagenet_84x84.zip
  (b) the Meta-Dropout authors' arrays train.npy and test.npy in one folder:
        python -m metadrop_jax.data.prepare --dataset=miniimagenet --source=npy --path=/path/to/folder
  (c) the ILSVRC-2012 train set (image-net.org, after accepting its terms) plus Ravi & Larochelle's
      train.csv/val.csv/test.csv (github.com/twitter/meta-learning-lstm, data/miniImagenet):
        python -m metadrop_jax.data.prepare --dataset=miniimagenet --source=ilsvrc --path=/folder/with/csvs --ilsvrc_path=/path/to/ILSVRC2012/train
Then train with --config.data.path=<the same path> (and --config.data.cache_dir if you changed it)."""


def _missing(what: str) -> DataError:
  """One line: what is missing, and the fix (the whole instructions: prepare's --help)."""
  return DataError(f'miniImageNet: {what}: provide {ZIP_NAME}, the authors\' train.npy and '
                   'test.npy, or ILSVRC-2012 with the Ravi & Larochelle CSVs, and pass '
                   '--config.data.path=<it> (python -m metadrop_jax.data.prepare --help says how)')


# ---- CSVs -----------------------------------------------------------------------------------------

def parse_csv(text: str, name: str, n_classes: int, n_images: int):
  """CSV text -> (sorted wnids, {wnid: [file names in CSV order]}), counts checked."""
  rows = list(csv.reader(io.StringIO(text)))
  if not rows or [c.strip() for c in rows[0]] != ['filename', 'label']:
    raise DataError(f'{name}: expected the header "filename,label", got {rows[:1]}')
  by_class: dict[str, list[str]] = {}
  for i, row in enumerate(rows[1:], start=2):
    if not row:
      continue
    if len(row) != 2:
      raise DataError(f'{name}, line {i}: expected "filename,label", got {row}')
    by_class.setdefault(row[1].strip(), []).append(row[0].strip())
  if len(by_class) != n_classes:
    raise DataError(f'{name}: lists {len(by_class)} classes, expected {n_classes}')
  for wnid, files in by_class.items():
    if len(files) != n_images:
      raise DataError(f'{name}: class {wnid} lists {len(files)} images, expected {n_images}')
    if len(set(files)) != len(files):
      raise DataError(f'{name}: class {wnid} lists a file twice')
  return sorted(by_class), by_class


def _decode(data: bytes, name: str, resize: bool = False) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise DataError(f'{name}: cannot decode the image ({e})') from e
  img = img.convert('RGB')
  if resize:
    img = img.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.LANCZOS)
  elif img.size != (IMAGE_SIZE, IMAGE_SIZE):
    raise DataError(f'{name}: image is {img.size[0]}x{img.size[1]}, expected '
                    f'{IMAGE_SIZE}x{IMAGE_SIZE}')
  return np.asarray(img, dtype=np.uint8)


# ---- local: zip or folder ------------------------------------------------------------------------

class _Tree:
  """The standard tree inside a zip or a folder: CSVs at ``root``, images below it."""

  def __init__(self, path: Path):
    self.path = path
    if path.is_file():
      try:
        self.zip = zipfile.ZipFile(path)
        names = self.zip.namelist()
      except PermissionError as e:
        raise cache.read_error(e, path) from e
      except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f'{path}: not a readable zip file ({e}); get a fresh copy '
                        '(python -m metadrop_jax.data.prepare --help says how)') from e
      csvs = sorted((n for n in names if n.rsplit('/', 1)[-1] == 'train.csv'
                     and not n.startswith('__MACOSX')), key=len)
      if not csvs:
        raise _missing(f'{path} holds no train.csv (expected miniimagenet/train.csv)')
      self.root = csvs[0][:-len('train.csv')]
      self.members = {n for n in names if not n.endswith('/')}
    else:
      self.zip = None
      root = path if (path / 'train.csv').is_file() else path / 'miniimagenet'
      if not (root / 'train.csv').is_file():
        raise _missing(f'{path} holds no train.csv (nor miniimagenet/train.csv)')
      self.root = root

  def label(self, rel: str) -> str:
    return f'{self.path}:{self.root}{rel}' if self.zip else str(self.root / rel)

  def exists(self, rel: str) -> bool:
    return (self.root + rel) in self.members if self.zip else (self.root / rel).is_file()

  def read(self, rel: str) -> bytes:
    try:
      return self.zip.read(self.root + rel) if self.zip else (self.root / rel).read_bytes()
    except PermissionError as e:
      raise cache.read_error(e, self.label(rel)) from e
    # zlib.error: a corrupt deflate stream; NotImplementedError: unsupported compression method;
    # RuntimeError: an encrypted member
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, zlib.error, NotImplementedError,
            RuntimeError) as e:
      what = f'member {self.root + rel} of {self.path}' if self.zip else str(self.root / rel)
      raise DataError(f'{what} is corrupt or unreadable ({cache.describe(e)}: '
                      f'{cache.one_line(e)}); get a fresh copy of {self.path.name}') from e

  def images_under(self, split: str) -> set[str]:
    """Relative paths of all files under ``<split>/`` (to catch files no CSV lists)."""
    if self.zip:
      pre = self.root + split + '/'
      return {m[len(self.root):] for m in self.members if m.startswith(pre)
              and not m.rsplit('/', 1)[-1].startswith('.')}
    base = self.root / split
    if not base.is_dir():
      return set()
    return {str(Path(r, f).relative_to(self.root)).replace(os.sep, '/')
            for r, _, fs in os.walk(base, onerror=cache.raise_error) for f in fs
            if not f.startswith('.')}


def read_local(path, split_classes=None, n_images: int = IMAGES_PER_CLASS, log=None):
  """Zip or unzipped tree -> {split: uint8 [C, n_images, 84, 84, 3]}."""
  split_classes = split_classes or SPLIT_CLASSES
  tree = _Tree(cache.expand(path))
  out, seen = {}, {}
  for split, n_classes in split_classes.items():
    if not tree.exists(f'{split}.csv'):
      raise _missing(f'{tree.label(split + ".csv")} does not exist')
    wnids, files = parse_csv(tree.read(f'{split}.csv').decode('utf-8-sig'),
                             tree.label(f'{split}.csv'), n_classes, n_images)
    for w in wnids:
      if w in seen:
        raise DataError(f'miniImageNet: class {w} is in both {seen[w]}.csv and {split}.csv')
      seen[w] = split
    listed = set()
    a = np.empty((len(wnids), n_images, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for c, w in enumerate(wnids):
      rels = []
      for f in files[w]:
        rel = f'{split}/{w}/{f}'
        if not tree.exists(rel):
          flat = f'images/{f}'          # Ravi & Larochelle's original flat layout
          if not tree.exists(flat):
            raise DataError(f'miniImageNet: {tree.label(rel)} (listed in {split}.csv for class '
                            f'{w}) does not exist; is the copy complete?')
          rel = flat
        rels.append(rel)
      listed.update(rels)
      for j, rel in enumerate(rels):
        a[c, j] = _decode(tree.read(rel), tree.label(rel))
      if log and c % 16 == 15:
        log(f'  {split}: {c + 1}/{len(wnids)} classes')
    extra = tree.images_under(split) - listed
    if extra:
      raise DataError(f'miniImageNet: {len(extra)} files under {tree.label(split + "/")} are not '
                      f'listed in {split}.csv, e.g. {sorted(extra)[:3]}; wrong CSV or tree?')
    out[split] = a
  return out


# ---- npy (the authors' arrays) ---------------------------------------------------------------------

def convert_npy(x: np.ndarray, n_classes: int, n_images: int, name: str) -> np.ndarray:
  """One authors' array -> uint8 [n_classes, n_images, 84, 84, 3] (see module doc for scales)."""
  want = n_classes * n_images * PIXELS
  if x.size != want or x.shape[0] not in (n_classes, n_classes * n_images):
    raise DataError(f'{name}: shape {x.shape} ({x.size} values); expected {n_classes} classes x '
                    f'{n_images} images x 84*84*3, e.g. [{n_classes}, {n_images}, {PIXELS}]')
  x = x.reshape(n_classes, n_images, IMAGE_SIZE, IMAGE_SIZE, 3)
  if x.dtype == np.uint8:
    return np.ascontiguousarray(x)
  lo = min(float(x[c].min()) for c in range(n_classes))
  hi = max(float(x[c].max()) for c in range(n_classes))
  if lo < 0 or hi > 255:
    raise DataError(f'{name}: values in [{lo}, {hi}]; expected pixels in [0, 1] or [0, 255] '
                    '(normalised arrays are not supported)')
  if np.issubdtype(x.dtype, np.floating):
    scale = 255.0 if hi <= 1.0 else 1.0
  elif np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
    scale = 1.0
  else:
    raise DataError(f'{name}: dtype {x.dtype}; expected uint8, another integer type or float')
  out = np.empty(x.shape, np.uint8)
  for c in range(n_classes):   # per class: a float32 train.npy is 3.3 GB
    out[c] = np.clip(np.rint(np.asarray(x[c], np.float64) * scale), 0, 255)
  return out


def read_npy(path, split_classes=None, n_images: int = IMAGES_PER_CLASS, log=None):
  """Folder with train.npy / test.npy [/ val.npy] -> {split: uint8 array}; no val.npy, no val."""
  split_classes = split_classes or SPLIT_CLASSES
  path = cache.expand(path)
  out = {}
  for split, n_classes in split_classes.items():
    f = path / f'{split}.npy'
    if not f.is_file():
      if split == 'val':
        continue
      raise _missing(f'{f} does not exist (source=npy expects train.npy and test.npy)')
    try:
      x = np.load(f, mmap_mode='r', allow_pickle=False)
    except (OSError, ValueError) as e:
      raise DataError(f'{f}: not a readable .npy array ({e})') from e
    out[split] = convert_npy(x, n_classes, n_images, str(f))
  return out


# ---- ILSVRC-2012 + CSVs -----------------------------------------------------------------------------

def ilsvrc_file(ilsvrc: Path, wnid: str, csv_name: str, listing: list[str]) -> Path:
  """ILSVRC file behind a Ravi & Larochelle CSV name ``<wnid><8-digit k>.jpg``: k-th sorted file."""
  stem = csv_name.rsplit('.', 1)[0]
  if not stem.startswith(wnid) or not stem[len(wnid):].isdigit():
    raise DataError(f'CSV name {csv_name!r}: expected <wnid><8 digits>.jpg for class {wnid}')
  k = int(stem[len(wnid):])
  if not 1 <= k <= len(listing):
    raise DataError(f'{ilsvrc / wnid}: CSV file {csv_name} asks for image #{k}, but the folder '
                    f'holds {len(listing)} files; is this the ILSVRC-2012 train set?')
  return ilsvrc / wnid / listing[k - 1]


def read_ilsvrc(csv_dir, ilsvrc_path, split_classes=None, n_images: int = IMAGES_PER_CLASS,
                log=None):
  split_classes = split_classes or SPLIT_CLASSES
  csv_dir, ilsvrc = cache.expand(csv_dir), cache.expand(ilsvrc_path)
  if not ilsvrc.is_dir():
    raise _missing(f'data.ilsvrc_path={str(ilsvrc)!r} is not a folder (expected the ILSVRC-2012 '
                   'train folder with one <wnid>/ subfolder per class)')
  out = {}
  for split, n_classes in split_classes.items():
    f = csv_dir / f'{split}.csv'
    if not f.is_file():
      raise _missing(f'{f} does not exist (source=ilsvrc expects the Ravi & Larochelle CSVs)')
    wnids, files = parse_csv(f.read_text('utf-8-sig'), str(f), n_classes, n_images)
    a = np.empty((len(wnids), n_images, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for c, w in enumerate(wnids):
      if not (ilsvrc / w).is_dir():
        raise DataError(f'{ilsvrc / w}: class folder missing (class {w} of {f.name})')
      listing = sorted(p for p in os.listdir(ilsvrc / w) if not p.startswith('.'))
      for j, name in enumerate(files[w]):
        src = ilsvrc_file(ilsvrc, w, name, listing)
        a[c, j] = _decode(src.read_bytes(), str(src), resize=True)
      if log and c % 16 == 15:
        log(f'  {split}: {c + 1}/{len(wnids)} classes')
    out[split] = a
  return out


# ---- source resolution, caching, loading --------------------------------------------------------

def resolve_source(data_config) -> tuple[str, Path]:
  """(source kind, path of the zip / tree / npy folder / CSV folder)."""
  source = data_config.source
  if source not in ('auto', 'local', 'npy', 'ilsvrc'):
    raise DataError(f"data.source={source!r}: miniImageNet sources are 'local', 'npy', 'ilsvrc' "
                    "or 'auto'")
  if not data_config.path:
    from metadrop_jax.data import default_search_dirs
    raise _missing('data.path is empty and nothing is in '
                   + ' or '.join(default_search_dirs('miniimagenet')))
  path = cache.expand(data_config.path)
  if not path.exists():
    raise _missing(f'data.path={str(path)!r} does not exist')
  if path.is_dir() and (path / ZIP_NAME).is_file() and source in ('auto', 'local'):
    path = path / ZIP_NAME
  if source != 'auto':
    return source, path
  if path.is_file():
    return 'local', path
  if (path / 'train.npy').is_file():
    return 'npy', path
  for root in (path, path / 'miniimagenet'):
    if (root / 'train.csv').is_file():
      if any((root / d).is_dir() for d in ('train', 'images')):
        return 'local', path
      if data_config.get('ilsvrc_path'):
        return 'ilsvrc', path
      raise _missing(f'{root} has CSVs but no image folders and data.ilsvrc_path is not set')
  raise _missing(f'{path} holds neither {ZIP_NAME}, train.csv, nor train.npy')


def prepare(data_config, *, force: bool = False, log=print, split_classes=None,
            n_images: int = IMAGES_PER_CLASS):
  """Makes sure the prepared arrays exist; returns (cache directory, manifest).

  ``split_classes`` / ``n_images`` exist for tests and subsets; the defaults are the real counts.
  """
  split_classes = dict(split_classes or SPLIT_CLASSES)
  source, path = resolve_source(data_config)
  key = {'source': source, 'path': str(path), 'version': PREPROCESSING_VERSION,
         'split_classes': split_classes, 'n_images': n_images}
  if source == 'local':
    files = lambda: cache.fingerprint([path])
    read = lambda: read_local(path, split_classes, n_images, log)
  elif source == 'npy':
    files = lambda: cache.fingerprint([path / f'{s}.npy' for s in split_classes
                                       if (path / f'{s}.npy').is_file()])
    read = lambda: read_npy(path, split_classes, n_images, log)
  else:
    ilsvrc = cache.expand(data_config.get('ilsvrc_path') or '')
    if not data_config.get('ilsvrc_path'):
      raise _missing('source=ilsvrc needs data.ilsvrc_path (the ILSVRC-2012 train folder)')
    key['ilsvrc_path'] = str(ilsvrc)
    files = lambda: cache.fingerprint([path / f'{s}.csv' for s in split_classes])
    read = lambda: read_ilsvrc(path, ilsvrc, split_classes, n_images, log)
  return cache.prepare(dataset='miniimagenet', cache_dir=data_config.cache_dir, key=key,
                       source_files=files, build=lambda: (read(), {}),
                       description=PREPROCESSING[source], force=force, log=log)


def load_split(data_config, split: str, **counts):
  """uint8 ``[classes, 600, 84, 84, 3]``; None for a split the source lacks (npy without val)."""
  directory, manifest = prepare(data_config, **counts)
  if split not in manifest['splits']:
    return None
  return cache.load(directory, manifest, split)
