"""Step 5 of an unpack (:mod:`tools.long_runs.unpack`): the returned run folders swapped into the
campaign folder without ever losing one.

Each run taken is renamed into place after the folder it replaces was moved aside into the
staging folder (``.<campaign>.unpack/old``). An unpack that fails puts everything back; one that
is killed leaves folders aside, and the next unpack finishes it (:func:`finish_cut_swap`): a
folder aside goes back, or, if a folder of that run was started here again meanwhile, the newer of
the two stays and the other is kept beside the campaign folder (``.<campaign>.superseded``). A
sitting refuses to start while folders are aside (:func:`unfinished`), and no run is replaced
while a process trains it (:func:`in_use`).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time

from tools.long_runs import state


def staging_dir(cdir: str) -> str:
  """Where an unpack extracts and moves folders aside: beside the campaign folder."""
  return os.path.join(os.path.dirname(cdir), f'.{os.path.basename(cdir)}.unpack')


def superseded_dir(cdir: str) -> str:
  """Where the older of two states of a run is kept after a cut unpack (git-ignored, like the
  staging folder; neither packed nor unpacked)."""
  return os.path.join(os.path.dirname(cdir), f'.{os.path.basename(cdir)}.superseded')


def in_use(wd: str) -> bool:
  """Whether a process holds ``wd``'s lock now (metadrop_jax.workdir.locked: a run training)."""
  path = os.path.join(wd, '.lock')
  if not os.path.isfile(path):
    return False
  with open(path, 'rb') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
      return True
    fcntl.flock(f, fcntl.LOCK_UN)
  return False



def finish_cut_swap(cdir: str, stage: str, log, replaced=()) -> None:
  """Ends a swap and removes the staging. A run folder moved aside is dropped only when this
  unpack replaced it (``replaced``); one left by a cut unpack is put back, or, if a folder of
  that run is here again (a sitting started it anew meanwhile), the newer of the two stays and
  the other goes to :func:`superseded_dir`: never deleted."""
  old = os.path.join(stage, 'old')
  for name in sorted(os.listdir(old)) if os.path.isdir(old) else []:
    aside, here = os.path.join(old, name), os.path.join(cdir, name)
    if name in replaced:
      continue
    if not os.path.exists(here):
      os.rename(aside, here)
      log(f'{name}: put back (an unpack was cut while replacing it)')
      continue
    keep_aside = state.rank(state.read_run(aside)) > state.rank(state.read_run(here))
    dest = os.path.join(superseded_dir(cdir), f'{name}.{time.strftime("%Y%m%dT%H%M%S")}')
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if keep_aside:
      os.rename(here, dest)
      os.rename(aside, here)
    else:
      os.rename(aside, dest)
    log(f'{name}: an unpack was cut while replacing it and the run was started here again; '
        f'kept the newer state, the other is in {dest}')
  shutil.rmtree(stage, ignore_errors=True)


def unfinished(cdir: str) -> str | None:
  """Why a sitting must not start: an unpack of this campaign was cut with run folders still
  moved aside (a sitting would start them anew); None when there is none."""
  old = os.path.join(staging_dir(cdir), 'old')
  names = sorted(os.listdir(old)) if os.path.isdir(old) else []
  if not names:
    return None
  return (f'an unpack of {cdir} was cut with {", ".join(names)} moved aside to {old}: unpack '
          'the same job again (scripts/unpack_window.sh), which finishes it, before a sitting')


def swap_runs(cdir: str, stage: str, take: list[str], swapped: list[str]) -> None:
  """Puts each returned run of ``take`` in place, the folder it replaces moved aside first;
  ``swapped`` collects the runs whose swap completed."""
  old = os.path.join(stage, 'old')
  os.makedirs(old, exist_ok=True)
  for name in take:
    dst = os.path.join(cdir, name)
    if os.path.exists(dst):
      os.rename(dst, os.path.join(old, name))
    os.rename(os.path.join(stage, 'new', name), dst)
    swapped.append(name)


def undo_swaps(cdir: str, stage: str, swapped: list[str]) -> None:
  """Takes back the swaps that completed (``swapped``, emptied): each returned run goes back to
  the staging, the folder it replaced back into place."""
  for name in reversed(swapped):
    os.rename(os.path.join(cdir, name), os.path.join(stage, 'new', name))
    if os.path.exists(os.path.join(stage, 'old', name)):
      os.rename(os.path.join(stage, 'old', name), os.path.join(cdir, name))
  swapped.clear()
