"""Where a benchmark's numbers came from: the commit of the code that measured them.

Imports nothing heavy (no jax): parent processes that only spawn and time others use it too.
"""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def commit() -> str:
  """``METADROP_COMMIT`` where a job set it (a copy of the checkout without ``.git``), else this
  checkout's short commit, with '-dirty' when tracked files have local changes; '' outside git."""
  if os.environ.get('METADROP_COMMIT'):
    return os.environ['METADROP_COMMIT']
  try:
    git = lambda *a: subprocess.run(['git', *a], cwd=ROOT, capture_output=True, text=True,
                                    timeout=30).stdout.strip()
    head = git('rev-parse', '--short', 'HEAD')
    dirty = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return ''
  return head + ('-dirty' if head and dirty else '')
