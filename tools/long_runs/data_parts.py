"""A data file copied to a GPU machine in parts, when one copy there is limited in size.

miniImageNet's zip (165 MB) is larger than what some hosts copy to a machine at once (64 MiB). It
travels in parts, each with its SHA-256 in a manifest, over several copies; the machine keeps the
parts it has verified outside the checkout (a later copy of the checkout cannot touch them), and
the zip is assembled only when every part is there and matches, its own SHA-256 checked last.
Nothing ever trains on a partial split: until the zip is whole, the job trains the runs whose
data is there and says which parts it still needs.

  here:          python -m tools.long_runs.data_parts split ZIP DIR --part_bytes=N
                 (scripts/pack_device_data.sh --mimg does this and names what to copy when)
  GPU machine:   python -m tools.long_runs.data_parts stash DIR STASH      # after each copy
                 python -m tools.long_runs.data_parts status DIR STASH     # what is still needed
                 python -m tools.long_runs.data_parts assemble STASH DEST  # at the job's start
                 (tools/long_runs/device_data.sh runs these)

``DIR/parts.json`` is the manifest: the file's name, size and SHA-256 and each part's. Every
problem a user must fix (a missing, cut or corrupted part, a manifest that does not match) is one
line, ``error: <problem>: <fix>``, exit code 2, and nothing is changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys

from metadrop_jax.data.cache import sha256_file
from tools.long_runs.procs import write_atomic

MANIFEST = 'parts.json'
CHUNK = 1 << 20


def stash_dir() -> str:
  """Where the GPU machine keeps verified parts (device_data.sh: the same default)."""
  return os.environ.get('METADROP_PARTS_DIR', '/tmp/metadrop_parts')


class PartsError(ValueError):
  """A part or manifest that cannot be used; the message says which and how to fix it."""


def part_name(i: int) -> str:
  return f'part.{i:02d}'


def split(src: str, out_dir: str, part_bytes: int) -> dict:
  """Cuts ``src`` into parts of ``part_bytes`` (the last one shorter) in ``out_dir``, with the
  manifest; parts and manifest left by an earlier split there are replaced."""
  if part_bytes < 1:
    raise PartsError(f'a part size of {part_bytes} B: give a positive --part_bytes')
  if not os.path.isfile(src):
    raise PartsError(f'{src}: no such file: give the path of the file to split')
  os.makedirs(out_dir, exist_ok=True)
  for old in os.listdir(out_dir):
    if old.startswith('part.') or old == MANIFEST:
      os.remove(os.path.join(out_dir, old))
  whole = hashlib.sha256()
  parts = []
  with open(src, 'rb') as f:
    while True:
      data = f.read(part_bytes)
      if not data:
        break
      whole.update(data)
      name = part_name(len(parts))
      write_atomic(os.path.join(out_dir, name), data)
      parts.append({'name': name, 'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()})
  manifest = {'file': os.path.basename(src), 'bytes': os.path.getsize(src),
              'sha256': whole.hexdigest(), 'part_bytes': part_bytes, 'parts': parts}
  write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(manifest, indent=1) + '\n')
  return manifest


def load_manifest(folder: str) -> dict:
  """``folder/parts.json``; PartsError when it is missing or not a manifest."""
  path = os.path.join(folder, MANIFEST)
  try:
    with open(path) as f:
      m = json.load(f)
    names = [p['name'] for p in m['parts']]
    if (not names or names != [part_name(i) for i in range(len(names))] or
        sum(p['bytes'] for p in m['parts']) != m['bytes'] or not m['file'] or
        int(m['part_bytes']) < max(p['bytes'] for p in m['parts']) or
        any(len(p['sha256']) != 64 for p in m['parts']) or len(m['sha256']) != 64):
      raise ValueError('inconsistent')
    return m
  except FileNotFoundError:
    raise PartsError(f'{path}: no manifest: copy parts.json with the parts (pack_device_data.sh '
                     '--mimg writes it)') from None
  except (OSError, ValueError, KeyError, TypeError):
    raise PartsError(f'{path}: not a readable parts manifest (cut in the copy?): copy it '
                     'again') from None


def check_part(path: str, part: dict) -> str:
  """'ok', 'missing', or what is wrong with the part at ``path`` (cut, too long, corrupted)."""
  if not os.path.isfile(path):
    return 'missing'
  size = os.path.getsize(path)
  if size < part['bytes']:
    return f"cut ({size:,} of {part['bytes']:,} B)"
  if size > part['bytes']:
    return f"too long ({size:,} B, expected {part['bytes']:,})"
  if sha256_file(path) != part['sha256']:
    return 'corrupted (SHA-256 differs)'
  return 'ok'


def status(manifest: dict, *folders: str) -> dict[str, str]:
  """Each part's state, 'ok' if a verified copy is in any of ``folders`` (else the first
  folder's verdict: 'missing', 'cut ...', ...)."""
  out = {}
  for part in manifest['parts']:
    verdicts = [check_part(os.path.join(d, part['name']), part) for d in folders]
    out[part['name']] = 'ok' if 'ok' in verdicts else next(
        (v for v in verdicts if v != 'missing'), 'missing')
  return out


def needed(states: dict[str, str]) -> list[str]:
  """The parts still to copy (every one that is not 'ok')."""
  return [n for n, s in states.items() if s != 'ok']


def describe(manifest: dict, states: dict[str, str]) -> str:
  """One line: how many parts are here, and which are still needed and why."""
  todo = needed(states)
  head = f"{manifest['file']}: {len(states) - len(todo)} of {len(states)} parts here"
  if not todo:
    return head + ' (each SHA-256 verified)'
  bad = [f'{n} {states[n]}' for n in todo if states[n] != 'missing']
  ok = [n for n in states if states[n] == 'ok']
  return (head + f"; still needed: {','.join(todo)}" +
          (f" ({'; '.join(bad)}: copy them again)" if bad else '') +
          (f" (to stage only these: bash scripts/pack_device_data.sh --mimg "
           f"--part_bytes={manifest['part_bytes']} --have={','.join(ok)})" if ok else ''))


def stash(src_dir: str, stash_dir: str) -> dict[str, str]:
  """Moves the verified parts of ``src_dir`` (and its manifest) into ``stash_dir``, out of the
  checkout; a part that fails its check stays where it is and is reported. Returns the states
  of all parts, counting those stashed before."""
  manifest = load_manifest(src_dir)
  os.makedirs(stash_dir, exist_ok=True)
  old = os.path.join(stash_dir, MANIFEST)
  if os.path.exists(old):
    try:
      prev = load_manifest(stash_dir)
    except PartsError:
      prev = None
    if prev is None or prev['sha256'] != manifest['sha256'] or prev['parts'] != manifest['parts']:
      # parts of another file or another cut: they can never be assembled with these
      for n in os.listdir(stash_dir):
        if n.startswith('part.'):
          os.remove(os.path.join(stash_dir, n))
  write_atomic(old, json.dumps(manifest, indent=1) + '\n')
  for part in manifest['parts']:
    src = os.path.join(src_dir, part['name'])
    if check_part(src, part) == 'ok':
      dst = os.path.join(stash_dir, part['name'])
      tmp = dst + '.tmp'
      shutil.copyfile(src, tmp)
      os.replace(tmp, dst)
      os.remove(src)
  return status(manifest, stash_dir, src_dir)


def assemble(stash_dir: str, dest: str, arrive: str | None = None) -> dict:
  """Writes ``dest`` from the parts in ``stash_dir`` if every part is there and verified (each
  part's SHA-256 is checked again as it is read, then the whole file's): through a temp file, so
  ``dest`` is either the whole verified file or absent. PartsError (nothing written) when a part
  is missing or does not match (its message also names what is wrong with the copies still in
  ``arrive``, where they land). Returns the manifest."""
  manifest = load_manifest(stash_dir)
  folders = [stash_dir] + ([arrive] if arrive else [])
  whole = hashlib.sha256()
  tmp = f'{dest}.tmp.{os.getpid()}'
  os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
  try:
    with open(tmp, 'wb') as out:
      for part in manifest['parts']:
        path = os.path.join(stash_dir, part['name'])
        if not os.path.isfile(path) or os.path.getsize(path) != part['bytes']:
          raise PartsError(describe(manifest, status(manifest, *folders)) +
                           f': {os.path.basename(dest)} not assembled')
        h = hashlib.sha256()
        with open(path, 'rb') as f:
          for block in iter(lambda: f.read(CHUNK), b''):
            h.update(block)
            whole.update(block)
            out.write(block)
        if h.hexdigest() != part['sha256']:
          raise PartsError(f"{part['name']}: corrupted (SHA-256 differs) in {stash_dir}: copy it "
                           f'again; {os.path.basename(dest)} not assembled')
      out.flush()
      os.fsync(out.fileno())
    if whole.hexdigest() != manifest['sha256']:
      raise PartsError(f"{manifest['file']}: the assembled file's SHA-256 differs from the "
                       "manifest's (parts of another cut?): split and copy it again")
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return manifest


def machine_status(arrive: str, stash_dir: str, dest: str) -> str:
  """One line for a job's record: the assembled file is here, or how many parts are and which
  are still needed, or that no part came."""
  if os.path.isfile(dest):
    return f'{os.path.basename(dest)} here'
  try:
    m = _manifest_of(stash_dir, arrive)
  except PartsError as e:
    return 'no parts here' if not (os.path.isdir(arrive) or os.path.isdir(stash_dir)) else str(e)
  return describe(m, status(m, stash_dir, arrive))


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog='python -m tools.long_runs.data_parts',
                               description=__doc__.split('\n')[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter,
                               epilog=__doc__.split('\n', 2)[2])
  sub = ap.add_subparsers(dest='cmd', required=True)
  s = sub.add_parser('split', help='cut a file into parts with their manifest')
  s.add_argument('file')
  s.add_argument('out_dir')
  s.add_argument('--part_bytes', type=int, required=True)
  for name, hlp in (('stash', 'move the verified parts of DIR into STASH'),
                    ('status', 'which parts are here (in DIR or STASH) and which are needed')):
    p = sub.add_parser(name, help=hlp)
    p.add_argument('dir', help='where the copies arrive (.gpu_data/mimg)')
    p.add_argument('stash', help='where verified parts are kept')
  p = sub.add_parser('assemble', help='the whole file from the verified parts in STASH')
  p.add_argument('stash')
  p.add_argument('dest')
  p.add_argument('--arrive', default=None, help='where copies land (named in the error)')
  a = ap.parse_args(argv)
  try:
    if a.cmd == 'split':
      m = split(a.file, a.out_dir, a.part_bytes)
      print(f"{m['file']}: {len(m['parts'])} part(s) of <= {a.part_bytes:,} B in {a.out_dir}")
    elif a.cmd in ('stash', 'status'):
      states = (stash(a.dir, a.stash) if a.cmd == 'stash' else
                status(_manifest_of(a.dir, a.stash), a.stash, a.dir))
      print(describe(_manifest_of(a.stash, a.dir), states))
      return 0
    else:
      m = assemble(a.stash, a.dest, a.arrive)
      print(f"{m['file']}: assembled from {len(m['parts'])} verified parts into {a.dest}")
  except PartsError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  return 0


def _manifest_of(*folders: str) -> dict:
  """The manifest of the first folder that holds one."""
  for d in folders:
    if os.path.exists(os.path.join(d, MANIFEST)):
      return load_manifest(d)
  return load_manifest(folders[0])


if __name__ == '__main__':
  sys.exit(main())
