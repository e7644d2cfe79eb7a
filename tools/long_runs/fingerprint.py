"""The numerics fingerprint: which code a GPU smoke check (:mod:`tools.long_runs.gpu_check`)
vouches for. A passed check stays valid for a card kind and jax version while the code of the
library's numerics files is unchanged; comments, docstrings and layout do not count.

  python -m tools.long_runs.fingerprint --jax=0.11.2            # this checkout's fingerprint
  python -m tools.long_runs.fingerprint --add_code_fingerprints  # older records, once (git)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The library files whose code the smoke test exercises: a passed check stays valid for a card
# kind and jax version while their code is unchanged (numerics_fingerprint; comments, docstrings
# and layout do not count). A file that a version of the library does not have (the Pallas conv
# came later than the first checks on record) is left out of that version's digest.
NUMERICS_FILES = ('nets.py', 'meta.py', 'methods.py', 'episodes.py', 'keys.py',
                  'kernels/conv3x3.py')


def code_digest_text(source: str) -> str:
  """What a file's code is, without its comments, docstrings and layout: its syntax tree with
  every docstring removed, written out field by field without the empty ones (``ast.dump``'s own
  text differs between Python versions: 3.12 adds ``type_params=[]``), so that the GPU machine's
  Python and this one agree."""
  import ast
  tree = ast.parse(source)
  for node in ast.walk(tree):
    body = getattr(node, 'body', None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and
        body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and
        isinstance(body[0].value.value, str)):
      node.body = body[1:] or [ast.Pass()]

  def canon(x) -> str:
    if isinstance(x, ast.AST):
      fields = ((f, getattr(x, f, None)) for f in x._fields)
      inner = ', '.join(f'{f}={canon(v)}' for f, v in fields if v not in (None, []))
      return f'{type(x).__name__}({inner})'
    if isinstance(x, list):
      return '[' + ', '.join(canon(v) for v in x) + ']'
    return repr(x)
  return canon(tree)


def _fingerprint(jax_version: str, read, code_only: bool = True) -> str:
  import hashlib
  h = hashlib.sha256(jax_version.encode())
  for name in NUMERICS_FILES:
    text = read(name)
    if text is None:     # not in this version
      continue
    body = code_digest_text(text).encode() if code_only else text.encode()
    h.update(name.encode() + b'\0' + body)
  return h.hexdigest()[:16]


def numerics_fingerprint(jax_version: str) -> str:
  """A digest of the smoke test's subject: the code of the library's numerics files and the jax
  version that runs them (imports no jax: the job's parent process calls it)."""
  pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__)))), 'metadrop_jax')

  def read(name):
    path = os.path.join(pkg, name)
    if not os.path.exists(path):
      return None
    with open(path, encoding='utf-8') as f:
      return f.read()
  return _fingerprint(jax_version, read)


def fingerprint_at(commit: str, jax_version: str, repo: str, code_only: bool = True) -> str | None:
  """:func:`numerics_fingerprint` of the numerics files at ``commit`` of the git checkout
  ``repo`` (``code_only=False``: the digest of their bytes, the scheme of the records made before
  2026-12-05); None where git cannot show them."""
  import subprocess

  def git(*args):
    r = subprocess.run(['git', *args], cwd=repo, capture_output=True, timeout=60)
    if r.returncode:
      raise LookupError(r.stderr.decode(errors='replace').strip())
    return r.stdout.decode('utf-8')

  def read(name):
    if not git('ls-tree', '--name-only', commit, '--', f'metadrop_jax/{name}').strip():
      return None     # not in this commit
    return git('show', f'{commit}:metadrop_jax/{name}')
  try:
    return _fingerprint(jax_version, read, code_only)
  except (LookupError, OSError, UnicodeDecodeError):
    return None


def add_code_fingerprints(repo: str, log=print) -> list[str]:
  """Gives the smoke results of committed job records made before fingerprints read code only
  (docs/bench/windows/*.json) a ``code_fingerprint``: that of the numerics code at the job's
  commit, once the record's own fingerprint is verified to be the bytes-digest of the files at
  that commit (so the check ran that code). A check on record then stays valid across edits of
  comments and docstrings. Returns the records changed."""
  import glob
  changed = []
  for path in sorted(glob.glob(os.path.join(repo, 'docs', 'bench', 'windows', '*.json'))):
    try:
      with open(path) as f:
        rec = json.load(f)
    except (OSError, ValueError):
      continue
    sm = (rec.get('phases', {}).get('smoke', {}).get('result') or {}) if isinstance(rec, dict) \
        else {}
    commit = ((rec.get('phases', {}).get('info', {}).get('result') or {}).get('commit') or '')
    if not sm.get('fingerprint') or 'code_fingerprint' in sm or not commit or \
        commit.endswith('-dirty') or not sm.get('jax'):
      continue
    if fingerprint_at(commit, sm['jax'], repo, code_only=False) != sm['fingerprint']:
      log(f'{os.path.relpath(path, repo)}: its fingerprint is not that of commit {commit}: left '
          'as it is')
      continue
    sm['code_fingerprint'] = fingerprint_at(commit, sm['jax'], repo)
    with open(path + '.tmp', 'w') as f:
      json.dump(rec, f, indent=1)
    os.replace(path + '.tmp', path)
    changed.append(path)
    log(f"{os.path.relpath(path, repo)}: code_fingerprint {sm['code_fingerprint']} (commit "
        f'{commit})')
  return changed


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--jax', default=None, help='the jax version to fingerprint for (default: '
                  "this environment's)")
  ap.add_argument('--add_code_fingerprints', action='store_true',
                  help='give the committed job records made before fingerprints read code only '
                       'their code_fingerprint (verified against git)')
  a = ap.parse_args(argv)
  if a.add_code_fingerprints:
    add_code_fingerprints(ROOT)
    return 0
  if a.jax is None:
    import importlib.metadata
    a.jax = importlib.metadata.version('jax')
  print(numerics_fingerprint(a.jax))
  return 0


if __name__ == '__main__':
  sys.exit(main())
