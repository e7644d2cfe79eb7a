"""Omniglot (Lake et al. 2015) as uint8 arrays ``[classes, 20, 28, 28, 1]``.

Sources (``data.source``):

* ``'local'``: the standard ``images_background.zip`` and ``images_evaluation.zip`` (or the same
  two folders unzipped) in ``data.path``. Zips are read in place; no checksum is verified, so
  repackaged zips with the standard member layout work.
* ``'tfds'``: TensorFlow Datasets' ``omniglot`` builder (downloads the same two zips; needs
  ``tensorflow`` and ``tensorflow-datasets``). ``data.path``, if set, is the TFDS ``data_dir``.
  Its ``train`` (images_background) and ``test`` (images_evaluation) splits are merged; TFDS's
  split is not used.
* ``'auto'``: ``'local'`` when ``data.path`` is set, else ``'tfds'``.

Preparation (``PREPROCESSING_VERSION``; the cache is rebuilt when it changes):

1. Each 105x105 one-bit PNG (1 = white background, 0 = ink) is converted to 8-bit grayscale
   (0 / 255), resized to 28x28 with PIL LANCZOS (as in the MAML preprocessing) and inverted, so
   ink = 255 and background = 0 (the model sees ``x / 255``: ink 1, background 0).
2. The 1623 characters of both zips are sorted by (alphabet, character) folder name; the 20
   images of a character are sorted by file name (``XXXX_YY.png``: YY is the drawer).
3. ``np.random.default_rng(0).permutation(1623)``: the first 1200 characters are the meta-train
   side, the last 423 the test split. With ``data.val_classes = v > 0`` the last ``v`` of the 1200
   become ``val`` and train keeps ``1200 - v``.
4. Every character gives four classes, its images rotated by ``np.rot90(image, k)``, k = 0..3:
   array row ``4 * i + k`` is rotation k of the split's i-th character. Shapes: train
   ``[4800, 20, 28, 28, 1]``, test ``[1692, 20, 28, 28, 1]`` (val_classes=100: 4400 / 400 / 1692).

The cache holds ``train.npy`` (all 1200 meta-train characters) and ``test.npy``; ``val`` is the
tail of ``train`` cut at load time, so changing ``val_classes`` needs no re-preparation.

Splits (``data.omniglot_split``):

* ``'vinyals'`` (default; the paper's and the authors'): steps 1-4 above, 1200 / 423 characters
  drawn from both archives.
* ``'lake'``: Lake et al.'s background / evaluation split, whole alphabets apart. Meta-train: the
  964 characters of the 30 alphabets of images_background; test: the 659 characters of the 20
  alphabets of images_evaluation; rotations as classes as above. Each archive is prepared on its
  own (a cache entry each), so meta-testing needs images_evaluation only. Characters are ordered
  by alphabet, the alphabets in the order ``np.random.default_rng(0).permutation`` of their
  sorted names; ``data.val_classes = v > 0`` holds out the fewest whole alphabets from the end of
  that order that have at least ``v`` characters (:func:`lake_val_characters`). The manifest
  records the split and the alphabets with their character counts.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np

from metadrop_jax.data import cache
from metadrop_jax.data.cache import DataError

NUM_CHARACTERS = 1623           # 964 in images_background + 659 in images_evaluation
NUM_META_TRAIN = 1200           # characters on the meta-train side (train + val)
IMAGES_PER_CHARACTER = 20
ORIGINAL_SIZE = 105
IMAGE_SIZE = 28
ROTATIONS = 4
ARCHIVES = ('images_background', 'images_evaluation')
OMNIGLOT_SPLITS = ('vinyals', 'lake')
# Lake split: the archive each prepared split comes from, and its character count.
LAKE_ARCHIVE = {'train': 'images_background', 'test': 'images_evaluation'}
LAKE_CHARACTERS = {'images_background': 964, 'images_evaluation': 659}
SPLIT_SEED = 0
PREPROCESSING_VERSION = 'omniglot-v1'
PREPROCESSING = (
    '105x105 1-bit PNG -> grayscale L -> PIL LANCZOS resize 28x28 -> invert (ink 255, bg 0); '
    'characters sorted by (alphabet, character), images by file name; '
    'np.random.default_rng(0).permutation(1623): first 1200 meta-train, last 423 test; '
    'class 4*i+k = np.rot90(image, k), k=0..3; val = last val_classes characters of train.')
LAKE_PREPROCESSING = (
    '105x105 1-bit PNG -> grayscale L -> PIL LANCZOS resize 28x28 -> invert (ink 255, bg 0); '
    'one archive (images_background: train, images_evaluation: test); alphabets in the order '
    'np.random.default_rng(0).permutation of their sorted names, characters sorted within, '
    'images by file name; class 4*i+k = np.rot90(image, k), k=0..3; val = the fewest whole '
    'alphabets from the end of the train order with at least val_classes characters.')

DOWNLOAD_INSTRUCTIONS = (
    'Omniglot: get images_background.zip and images_evaluation.zip from '
    'https://github.com/brendenlake/omniglot/tree/master/python and put them (or the unzipped '
    'folders) in one folder, then run\n'
    '  python -m metadrop_jax.data.prepare --dataset=omniglot --source=local --path=/that/folder\n'
    'and train with --config.data.path=/that/folder. Alternatively --source=tfds downloads them '
    'with tensorflow-datasets (pip install tensorflow-cpu tensorflow-datasets).')
# what an error says (one line): the fix, and where the whole instructions are
_DOWNLOAD_HELP = ('put images_background.zip and images_evaluation.zip (github.com/brendenlake/'
                  'omniglot, folder python/) in one folder and pass --config.data.path=<that '
                  'folder> (python -m metadrop_jax.data.prepare --help says more)')


# ---- image processing ---------------------------------------------------------------------------

def preprocess_image(img, name: str = '<image>') -> np.ndarray:
  """PIL image (105x105, mode '1', 'L' or RGB, white background) -> uint8 [28, 28], ink 255."""
  from PIL import Image
  if img.size != (ORIGINAL_SIZE, ORIGINAL_SIZE):
    raise DataError(f'{name}: image is {img.size[0]}x{img.size[1]}, expected '
                    f'{ORIGINAL_SIZE}x{ORIGINAL_SIZE} (Omniglot original size)')
  img = img.convert('L').resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.LANCZOS)
  return 255 - np.asarray(img, dtype=np.uint8)


def _decode_png(data: bytes, name: str) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise DataError(f'{name}: cannot decode the PNG ({e})') from e
  return preprocess_image(img, name)


def with_rotations(base: np.ndarray) -> np.ndarray:
  """[n, m, 28, 28] -> [4n, m, 28, 28, 1]; row 4*i+k is np.rot90 of character i by k*90 deg."""
  rot = np.stack([np.rot90(base, k, axes=(2, 3)) for k in range(ROTATIONS)], axis=1)
  return np.ascontiguousarray(rot.reshape((-1,) + base.shape[1:] + (1,)))


def character_split(n_characters: int = NUM_CHARACTERS, n_train: int = NUM_META_TRAIN):
  """(meta-train character indices, test character indices) into the sorted character list."""
  perm = np.random.default_rng(SPLIT_SEED).permutation(n_characters)
  return perm[:n_train], perm[n_train:]


# ---- readers: each returns (sorted [(alphabet, character)], uint8 [n, m, 28, 28]) ----------------

def alphabet_order(alphabets) -> list[str]:
  """The alphabets (names) in the Lake split's fixed order: a seeded permutation of the sorted
  names; the validation alphabets are taken from its end."""
  names = sorted(alphabets)
  return [names[i] for i in np.random.default_rng(SPLIT_SEED).permutation(len(names))]


def lake_val_characters(alphabet_counts, val_classes: int) -> int:
  """How many characters the Lake split's validation holds: the fewest whole alphabets from the
  end of ``alphabet_counts`` ([(alphabet, characters)] in train order) with at least
  ``val_classes`` characters (0 for 0). At least one alphabet must stay for meta-training."""
  if val_classes <= 0:
    return 0
  held = 0
  for i, (_, n) in enumerate(reversed(alphabet_counts)):
    held += n
    if held >= val_classes:
      if i + 1 == len(alphabet_counts):
        break
      return held
  total = sum(n for _, n in alphabet_counts)
  last = alphabet_counts[0][1] if alphabet_counts else 0
  raise DataError(f'data.val_classes={val_classes}: the Lake split holds out whole background '
                  f'alphabets and must keep one for meta-training; choose at most '
                  f'{total - last} characters')


def _find_archives(path: Path, archives=ARCHIVES) -> dict[str, Path]:
  if not path.exists():
    raise DataError(f'Omniglot: data.path={str(path)!r} does not exist: {_DOWNLOAD_HELP}')
  found, missing = {}, []
  for name in archives:
    folder, zf = path / name, path / f'{name}.zip'
    if folder.is_dir():
      nested = folder / name            # some unzip tools add one more level
      found[name] = nested if nested.is_dir() and len(os.listdir(folder)) == 1 else folder
    elif zf.is_file():
      found[name] = zf
    else:
      missing.append(f'{name}.zip (or folder {name}/)')
  if missing:
    raise DataError(f'Omniglot: {path} lacks {", ".join(missing)}: {_DOWNLOAD_HELP}')
  return found


def _list_archive(name: str, src: Path):
  """{(alphabet, character): [(file name, reader)]} of one archive (zip or folder)."""
  chars: dict[tuple[str, str], list] = {}

  def add(parts, label, reader):
    if len(parts) != 3 or not parts[2].lower().endswith('.png'):
      raise DataError(f'{label}: unexpected entry; expected {name}/<alphabet>/<character>/'
                      '<XXXX_YY>.png only')
    chars.setdefault((parts[0], parts[1]), []).append((parts[2], reader))

  def junk(parts):
    return parts[0] == '__MACOSX' or parts[-1].startswith('.')

  if src.suffix == '.zip':
    try:
      zf = zipfile.ZipFile(src)
      members = [m for m in zf.infolist() if not m.is_dir()]
    except PermissionError as e:
      raise cache.read_error(e, src) from e
    except (zipfile.BadZipFile, OSError) as e:
      raise DataError(f'{src}: not a readable zip file ({e}); download {src.name} again: '
                      f'{_DOWNLOAD_HELP}') from e
    for m in members:
      parts = m.filename.split('/')
      if junk(parts):
        continue
      if parts[0] != name:
        raise DataError(f'{src}: member {m.filename!r} is not under the top folder {name}/ '
                        '(standard layout: images_background/<alphabet>/<character>/*.png)')

      def reader(zf=zf, m=m, src=src):
        try:
          return zf.read(m)
        except PermissionError as e:
          raise cache.read_error(e, src) from e
        # CRC error, truncated data, corrupt deflate stream (zlib.error), unsupported compression
        # method (NotImplementedError), encrypted member (RuntimeError)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError,
                RuntimeError) as e:
          raise DataError(f'{src}: member {m.filename} is corrupt ({cache.describe(e)}: '
                          f'{cache.one_line(e)}); get a fresh copy of {src.name}') from e
      add(parts[1:], f'{src}:{m.filename}', reader)
  else:
    for root, dirs, files in os.walk(src, onerror=cache.raise_error):
      dirs.sort()
      for f in files:
        p = Path(root) / f
        parts = p.relative_to(src).parts
        if junk(parts):
          continue
        add(parts, str(p), p.read_bytes)
  if not chars:
    raise DataError(f'{src}: holds no Omniglot PNGs (expected {name}/<alphabet>/<character>/'
                    f'*.png): {_DOWNLOAD_HELP}')
  return chars


def read_local(path, n_characters: int = NUM_CHARACTERS,
               images_per_character: int = IMAGES_PER_CHARACTER, archives=ARCHIVES):
  """Reads ``archives`` (default: both) in ``path``: (sorted character names,
  uint8 [n, m, 28, 28])."""
  path = cache.expand(path)
  chars: dict = {}
  counts = []
  for name, src in _find_archives(path, archives).items():
    listed = _list_archive(name, src)
    for key in listed:
      if key in chars:
        raise DataError(f'Omniglot: character {key[0]}/{key[1]} is in both archives ({src})')
    chars.update(listed)
    counts.append(f'{src.name}: {len(listed)}')
  if len(chars) != n_characters:
    raise DataError(f'Omniglot in {path}: found {len(chars)} characters ({", ".join(counts)}), '
                    f'expected {n_characters} (964 in images_background, 659 in '
                    f'images_evaluation); is an archive incomplete? {_DOWNLOAD_HELP}')
  names = sorted(chars)
  base = np.zeros((len(names), images_per_character, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for i, key in enumerate(names):
    files = sorted(chars[key], key=lambda t: t[0])
    if len(files) != images_per_character:
      raise DataError(f'Omniglot in {path}: character {key[0]}/{key[1]} has {len(files)} '
                      f'images, expected {images_per_character}')
    for j, (fname, reader) in enumerate(files):
      base[i, j] = _decode_png(reader(), f'{path}: {key[0]}/{key[1]}/{fname}')
  return names, base


def _tfds_read_order(split: str, alphabet: str, char_id: int, label: int, n: int) -> np.ndarray:
  """Drawer index (0-based, i.e. file-name order) of each of a character's records in TFDS order.

  TFDS writes a split sorted by md5(split name + key), key = '<alphabet>_<char id>_<file name>'
  with file name '<label+1:04d>_<drawer:02d>.png' (omniglot builder 3.0.0). TFDS keeps this order
  fixed within a dataset version; recomputing it restores the file-name order that the local
  reader uses, so both sources give identical arrays.
  """
  from tensorflow_datasets.core import hashing
  hasher = hashing.Hasher(split)
  keys = [hasher.hash_key(f'{alphabet}_{char_id}_{label + 1:04d}_{d + 1:02d}.png')
          for d in range(n)]
  return np.argsort(keys, kind='stable')


# Where TFDS's omniglot builder downloads from (github.com/brendenlake/omniglot/raw/master/python/).
TFDS_HOST = ('github.com', 443)
TFDS_FILES = ('images_background.zip', 'images_evaluation.zip', 'images_background_small1.zip',
              'images_background_small2.zip')


def network_reachable(host=TFDS_HOST, timeout: float = 2.0) -> bool:
  """Whether a TCP connection to ``host`` opens within ``timeout`` seconds (name lookup included).

  With a proxy configured (``https_proxy`` / ``all_proxy``) the answer is True: TFDS goes
  through the proxy, which this check cannot judge.
  """
  if any(os.environ.get(v) for v in ('https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY')):
    return True
  result = []

  def probe():
    try:
      with socket.create_connection(host, timeout=timeout):
        result.append(True)
    except OSError:
      result.append(False)
  t = threading.Thread(target=probe, daemon=True)   # getaddrinfo ignores the socket timeout
  t.start()
  t.join(timeout + 0.5)
  return bool(result and result[0])


def tfds_root(data_dir=None) -> Path:
  """TFDS's data_dir: ``data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return cache.expand(data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')


def tfds_has_local_copy(data_dir=None, manual_dir=None) -> bool:
  """Whether TFDS can build omniglot without the network: prepared already, the zips in its
  manual dir, or earlier downloads present (then TFDS itself decides)."""
  root = tfds_root(data_dir)
  if any(root.glob('omniglot/3.*/dataset_info.json')):
    return True
  manual = cache.expand(manual_dir) if manual_dir else root / 'downloads' / 'manual'
  if all((manual / f).is_file() for f in TFDS_FILES[:2]):
    return True
  downloads = root / 'downloads'
  return downloads.is_dir() and any(p.name != 'manual' for p in downloads.iterdir())


def offline_error(data_dir=None) -> DataError:
  """The one-line error for TFDS without network and without a local copy."""
  manual = tfds_root(data_dir) / 'downloads' / 'manual'
  if data_dir:
    return DataError(
        f'Omniglot via TFDS: {data_dir} holds no prepared omniglot and there is no network to '
        f'download it ({TFDS_HOST[0]} unreachable): use --config.data.source=local '
        '--config.data.path=<folder with images_background.zip and images_evaluation.zip>, or '
        f'put the four TFDS zips in {manual}')
  from metadrop_jax.data import default_search_dirs
  where = ', '.join(default_search_dirs('omniglot'))
  return DataError(
      f'Omniglot: no local copy (data.path is empty; nothing in {where}) and no network to '
      f'download it through TFDS ({TFDS_HOST[0]} unreachable): put images_background.zip and '
      'images_evaluation.zip in ./data/omniglot (or $METADROP_DATA_DIR/omniglot), or pass '
      '--config.data.path=<folder with them>')


def read_tfds(data_dir=None, n_characters: int = NUM_CHARACTERS,
              images_per_character: int = IMAGES_PER_CHARACTER, download_config=None,
              archives=ARCHIVES):
  """Builds TFDS's omniglot and returns the same as :func:`read_local` for ``archives`` (TFDS's
  ``train`` split is images_background, its ``test`` split images_evaluation).

  Offline without a local copy it fails at once (:func:`network_reachable`, 2 s) instead of
  letting TFDS retry its downloads for minutes.
  """
  manual_dir = getattr(download_config, 'manual_dir', None)
  if not tfds_has_local_copy(data_dir, manual_dir) and not network_reachable():
    raise offline_error(data_dir)
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DataError('Omniglot source=tfds needs tensorflow and tensorflow-datasets '
                    f'(pip install tensorflow-cpu tensorflow-datasets): {e}; or '
                    f'{_DOWNLOAD_HELP}') from e
  try:
    builder = tfds.builder('omniglot:3.*.*', data_dir=data_dir)
    builder.download_and_prepare(download_config=download_config)
  except Exception as e:  # network, checksum, extraction: TFDS raises many types
    raise DataError(f'Omniglot via TFDS (data_dir={data_dir}) failed: {type(e).__name__}: '
                    f'{" ".join(str(e).split())}; without internet use the local source instead: '
                    + _DOWNLOAD_HELP) from e
  alphabets = builder.info.features['alphabet'].names
  per_char: dict[tuple[str, str], list] = {}
  tfds_split = {'images_background': 'train', 'images_evaluation': 'test'}
  for split in (tfds_split[a] for a in archives):
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for ex in tfds.as_numpy(ds):
      alphabet = alphabets[int(ex['alphabet'])]
      char_id = int(ex['alphabet_char_id'])
      key = (alphabet, f'character{char_id + 1:02d}')
      entry = per_char.setdefault(key, [split, int(ex['label']), []])
      entry[2].append(preprocess_image(_pil_from_array(ex['image']),
                                       f'tfds omniglot/{split} {key[0]}/{key[1]}'))
  if len(per_char) != n_characters:
    raise DataError(f'Omniglot via TFDS: found {len(per_char)} characters, expected {n_characters}')
  names = sorted(per_char)
  base = np.zeros((len(names), images_per_character, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
  for i, key in enumerate(names):
    split, label, images = per_char[key]
    if len(images) != images_per_character:
      raise DataError(f'Omniglot via TFDS: character {key[0]}/{key[1]} has {len(images)} '
                      f'images, expected {images_per_character}')
    order = _tfds_read_order(split, key[0], int(key[1][len('character'):]) - 1, label,
                             images_per_character)
    base[i, order] = np.stack(images)
  return names, base


def _pil_from_array(a: np.ndarray):
  from PIL import Image
  return Image.fromarray(np.ascontiguousarray(a[..., 0] if a.ndim == 3 else a), mode='L')


# ---- assembling, caching, loading ---------------------------------------------------------------

def build_arrays(names, base: np.ndarray, n_train: int = NUM_META_TRAIN):
  """(sorted names, [n, m, 28, 28]) -> ({'train', 'test'} arrays, {'train', 'test'} names)."""
  tr, te = character_split(len(names), n_train)
  arrays = {'train': with_rotations(base[tr]), 'test': with_rotations(base[te])}
  split_names = {'train': ['/'.join(names[i]) for i in tr],
                 'test': ['/'.join(names[i]) for i in te]}
  return arrays, split_names


def build_lake_array(names, base: np.ndarray, split: str):
  """(sorted names, [n, m, 28, 28]) of one archive -> ({split: array}, manifest fields): the
  characters ordered by :func:`alphabet_order`, with rotations."""
  alphabets = alphabet_order({a for a, _ in names})
  rank = {a: i for i, a in enumerate(alphabets)}
  order = sorted(range(len(names)), key=lambda i: (rank[names[i][0]], names[i][1]))
  counts = [[a, sum(1 for n in names if n[0] == a)] for a in alphabets]
  return ({split: with_rotations(base[order])},
          {'omniglot_split': 'lake', 'characters': {split: ['/'.join(names[i]) for i in order]},
           'alphabets': {split: counts}})


def resolve_source(data_config) -> str:
  source = data_config.source
  if source == 'auto':
    return 'local' if data_config.path else 'tfds'
  if source not in ('local', 'tfds'):
    raise DataError(f"data.source={source!r}: Omniglot sources are 'local', 'tfds' or 'auto'")
  if source == 'local' and not data_config.path:
    raise DataError(f'Omniglot source=local needs data.path: {_DOWNLOAD_HELP}')
  return source


def prepare(data_config, *, force: bool = False, log=print, n_characters: int = NUM_CHARACTERS,
            n_train: int = NUM_META_TRAIN, images_per_character: int = IMAGES_PER_CHARACTER,
            download_config=None):
  """Makes sure the prepared arrays exist; returns (cache directory, manifest).

  The count arguments exist for tests and subsets; the defaults are the full data set.
  """
  source = resolve_source(data_config)
  counts = {'n_characters': n_characters, 'n_train': n_train,
            'images_per_character': images_per_character}
  if source == 'local':
    path = cache.expand(data_config.path)
    _find_archives(path)   # fails early, naming the missing files
    key = {'source': 'local', 'path': str(path), 'version': PREPROCESSING_VERSION, **counts}
    source_files = lambda: cache.fingerprint(_find_archives(path).values())
    read = lambda: read_local(path, n_characters, images_per_character)
  else:
    data_dir = str(cache.expand(data_config.path)) if data_config.path else None
    key = {'source': 'tfds', 'builder': 'omniglot:3.*.*', 'data_dir': data_dir,
           'version': PREPROCESSING_VERSION, **counts}
    source_files = lambda: []    # TFDS data of one version is immutable
    read = lambda: read_tfds(data_dir, n_characters, images_per_character, download_config)
  if n_train >= n_characters:
    raise DataError(f'n_train={n_train} must be < n_characters={n_characters}')

  def build():
    names, base = read()
    arrays, names_by_split = build_arrays(names, base, n_train)
    # character names kept in the manifest
    return arrays, {'omniglot_split': 'vinyals', 'characters': names_by_split}

  return cache.prepare(
      dataset='omniglot', cache_dir=data_config.cache_dir, key=key, source_files=source_files,
      build=build, description=PREPROCESSING, force=force, log=log)


def prepare_lake(data_config, split: str, *, force: bool = False, log=print,
                 n_characters: int | None = None,
                 images_per_character: int = IMAGES_PER_CHARACTER, download_config=None):
  """The Lake split's ``split`` ('train': images_background, 'test': images_evaluation),
  prepared from that archive alone; returns (cache directory, manifest). ``n_characters``: the
  archive's character count (default :data:`LAKE_CHARACTERS`; tests use small archives)."""
  source = resolve_source(data_config)
  archive = LAKE_ARCHIVE[split]
  n = LAKE_CHARACTERS[archive] if n_characters is None else n_characters
  counts = {'n_characters': n, 'images_per_character': images_per_character}
  if source == 'local':
    path = cache.expand(data_config.path)
    _find_archives(path, (archive,))
    key = {'source': 'local', 'path': str(path), 'version': PREPROCESSING_VERSION,
           'split': 'lake', 'archive': archive, **counts}
    source_files = lambda: cache.fingerprint(_find_archives(path, (archive,)).values())
    read = lambda: read_local(path, n, images_per_character, (archive,))
  else:
    data_dir = str(cache.expand(data_config.path)) if data_config.path else None
    key = {'source': 'tfds', 'builder': 'omniglot:3.*.*', 'data_dir': data_dir,
           'version': PREPROCESSING_VERSION, 'split': 'lake', 'archive': archive, **counts}
    source_files = lambda: []
    read = lambda: read_tfds(data_dir, n, images_per_character, download_config, (archive,))
  return cache.prepare(
      dataset='omniglot', cache_dir=data_config.cache_dir, key=key, source_files=source_files,
      build=lambda: build_lake_array(*read(), split), description=LAKE_PREPROCESSING,
      force=force, log=log)


def split_of(data_config) -> str:
  """``data.omniglot_split``, checked (configs without the field: 'vinyals')."""
  name = data_config.get('omniglot_split', 'vinyals') or 'vinyals'
  if name not in OMNIGLOT_SPLITS:
    raise DataError(f'data.omniglot_split={name!r}: choose one of {OMNIGLOT_SPLITS}')
  return name


def _load_lake(data_config, split: str, v: int, n_characters=None, n_train=None,
               images_per_character: int = IMAGES_PER_CHARACTER):
  """:func:`load_split` of the Lake split; ``n_characters`` / ``n_train``: both archives' / the
  background archive's character counts (default: the real ones)."""
  n_bg = LAKE_CHARACTERS['images_background'] if n_train is None else n_train
  total = NUM_CHARACTERS if n_characters is None else n_characters
  if split == 'val' and v == 0:
    return None
  if split == 'test':
    directory, manifest = prepare_lake(data_config, 'test', n_characters=total - n_bg,
                                       images_per_character=images_per_character)
    return cache.load(directory, manifest, 'test')
  directory, manifest = prepare_lake(data_config, 'train', n_characters=n_bg,
                                     images_per_character=images_per_character)
  held = lake_val_characters(manifest['alphabets']['train'], v)
  if split == 'val' and held == 0:
    return None
  train = cache.load(directory, manifest, 'train')
  cut = ROTATIONS * (n_bg - held)
  return train[:cut] if split == 'train' else train[cut:]


def load_split(data_config, split: str, **counts):
  """uint8 ``[4 * characters, 20, 28, 28, 1]`` for split; None for 'val' when val_classes == 0.

  ``counts`` (tests: small archives): ``n_characters`` (both archives), ``n_train`` (the
  meta-train side: Vinyals' 1200, or Lake's images_background), ``images_per_character``."""
  v = int(data_config.get('val_classes', 0) or 0)
  if split_of(data_config) == 'lake':
    if v < 0:
      raise DataError(f'data.val_classes={v}: must be >= 0')
    return _load_lake(data_config, split, v, **counts)
  n_train = counts.get('n_train', NUM_META_TRAIN)
  if not 0 <= v < n_train:
    raise DataError(f'data.val_classes={v}: must be in [0, {n_train}) Omniglot characters')
  if split == 'val' and v == 0:
    return None
  directory, manifest = prepare(data_config, **counts)
  if split == 'test':
    return cache.load(directory, manifest, 'test')
  train = cache.load(directory, manifest, 'train')
  cut = ROTATIONS * (n_train - v)
  return train[:cut] if split == 'train' else train[cut:]
