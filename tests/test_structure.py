"""The repository's shape (docs/layout.md): no import circle, only entry points import the trainer,
no CLI code in library modules, the long-run tooling outside the package, a repository that stands
alone and speaks in its users' terms. Reads source files only (fast)."""

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / 'metadrop_jax'
# Entry points: they may import anything, the trainer included.
ENTRY_POINTS = {'metadrop_jax.api', 'metadrop_jax.__init__'}
# The one library module that is run as a program with its own argparse:
# python -m metadrop_jax.data.prepare.
CLI_ALLOWED = {'metadrop_jax.data.prepare'}


def _modules():
  for path in sorted(PKG.rglob('*.py')):
    name = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
    yield name, path


def _imports(path):
  """metadrop_jax modules imported by ``path``, anywhere in it (an ``if __name__ == '__main__':``
  block included: a module run as a program that imports its own CLI is still a circle)."""
  tree = ast.parse(path.read_text())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('metadrop_jax')}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('metadrop_jax'):
      for a in node.names:   # `from metadrop_jax import meta` names a module
        sub = f'{node.module}.{a.name}'
        out.add(sub if (ROOT / (sub.replace('.', '/') + '.py')).exists()
                or (ROOT / sub.replace('.', '/')).is_dir() else node.module)
  return {m for m in out if m != 'metadrop_jax'}


def _graph():
  return {name: _imports(path) for name, path in _modules()}


def test_no_import_circle():
  graph = {k: v for k, v in _graph().items() if k not in ENTRY_POINTS}
  node_of = lambda m: m if m in graph else m + '.__init__'   # a package is its __init__
  # A submodule that imports its own package is no circle: the package is initialised first.
  own_package = lambda node, dep: dep == node.rsplit('.', 1)[0] + '.__init__'
  graph = {k: {d for d in v if not own_package(k, node_of(d))} for k, v in graph.items()}
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for dep in sorted(map(node_of, graph[node])):
      if state.get(dep) == 'open':
        raise AssertionError('import circle: ' + ' -> '.join(path + [node, dep]))
      if dep in graph and dep not in state:
        visit(dep, path + [node])
    state[node] = 'done'

  for node in graph:
    if node not in state:
      visit(node, [])


def test_only_entry_points_import_the_trainer():
  importers = {m for m, deps in _graph().items() if 'metadrop_jax.train' in deps}
  assert importers <= ENTRY_POINTS, importers


def test_plotting_modules_hold_no_model_code():
  for mod in ('metadrop_jax.visualize', 'metadrop_jax.report'):
    deps = _graph()[mod]
    assert not deps & {'metadrop_jax.nets', 'metadrop_jax.meta', 'metadrop_jax.export',
                       'metadrop_jax.train', 'metadrop_jax.workdir'}, (mod, deps)
    assert 'jax.jit' not in (ROOT / (mod.replace('.', '/') + '.py')).read_text()


def test_library_modules_are_not_programs():
  """Only the CLI modules (and data.prepare) run as programs: a library module has no
  ``if __name__ == '__main__':`` block; users run ``python -m metadrop_jax.cli.<name>``."""
  for name, path in _modules():
    if name.startswith('metadrop_jax.cli') or name in CLI_ALLOWED:
      continue
    tree = ast.parse(path.read_text())
    mains = [n for n in ast.walk(tree) if isinstance(n, ast.If) and '__main__' in ast.unparse(n.test)]
    assert not mains, f'{name}: a __main__ block belongs in metadrop_jax/cli/'


def test_console_scripts_name_the_cli_mains():
  """Every [project.scripts] entry is a cli module's main(), and each cli module runs with -m."""
  scripts = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['scripts']
  clis = sorted(p.stem for p in (PKG / 'cli').glob('*.py') if p.stem != '__init__')
  assert scripts == {f'metadrop-{c}': f'metadrop_jax.cli.{c}:main' for c in clis}
  for c in clis:
    text = (PKG / 'cli' / f'{c}.py').read_text()
    assert 'def main(argv=None)' in text and "if __name__ == '__main__':" in text, c


def test_a_cli_module_runs_as_a_program():
  r = subprocess.run([sys.executable, '-m', 'metadrop_jax.cli.report', '--help'], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and 'python -m metadrop_jax.cli.report' in r.stdout, r.stderr


def test_library_modules_hold_no_cli():
  for name, path in _modules():
    if name.startswith('metadrop_jax.cli') or name in CLI_ALLOWED:
      continue
    assert 'argparse' not in path.read_text(), f'{name}: argparse belongs in metadrop_jax/cli/'


def _tracked(*patterns):
  return subprocess.run(['git', 'ls-files', '--', *patterns], cwd=ROOT, capture_output=True,
                        text=True, check=True).stdout.split()


def test_the_library_runs_no_process_and_packs_no_archive():
  """metadrop_jax/ is the research library (docs/layout.md): it spawns no process, packs no
  archive and imports nothing from the long-run tooling (tools/), the benchmarks or configs/."""
  banned = {'subprocess', 'multiprocessing', 'tarfile', 'tools', 'benchmarks', 'configs'}
  for name, path in _modules():
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        mods = [node.module or '']
      else:
        continue
      assert not {m.split('.')[0] for m in mods} & banned, (name, mods)
    for call in ('os.system', 'os.popen', 'os.fork', 'os.exec', 'make_archive', 'Popen'):
      assert call not in text, (name, call)


def test_long_run_tooling_is_in_small_modules():
  """tools/long_runs/: the GPU job, the campaign and the smoke check, each module short."""
  mods = sorted((ROOT / 'tools' / 'long_runs').glob('*.py'))
  assert {'window.py', 'campaign.py', 'gpu_check.py'} <= {p.name for p in mods}
  long = {p.name: n for p in mods if (n := len(p.read_text().splitlines())) > 350}
  assert not long, long
  # the operators' commands stay where they are: thin wrappers around the moved scripts
  for name in ('device_window', 'pack_device_data', 'pack_device_wheels', 'unpack_window'):
    wrapper = (ROOT / 'scripts' / f'{name}.sh').read_text()
    assert f'tools/long_runs/{name}.sh' in wrapper and len(wrapper.splitlines()) <= 6, name


def test_docs_hold_text_images_and_records():
  """Programs live in scripts/ and tools/, not docs/."""
  programs = [f for f in _tracked('docs') if f.endswith(('.sh', '.py'))]
  assert programs == [], programs


def test_nothing_refers_to_folders_beside_the_repository():
  """Data is found through $METADROP_DATA_DIR, --config.data.path or ./data; the paper and the
  authors' code are cited by their public addresses (docs/paper.md holds what users need). Only
  CI may know where its machine keeps the data."""
  bad = []
  for f in _tracked():
    p = ROOT / f
    if (f.startswith(('.ci/', 'results/', 'docs/bench/')) or f.endswith(pathlib.Path(__file__).name)
        or not p.is_file() or p.suffix in ('.png', '.gif', '.npz', '.npy')):
      continue
    if re.search(r'paper_facts|shared/docs|shared/data|\.\./shared', p.read_text(errors='ignore')):
      bad.append(f)
  assert not bad, bad
  assert (ROOT / 'docs' / 'paper.md').exists()


# Words of the machines this project happens to be developed on, which a user does not have.
_DEV_WORDS = re.compile('|'.join([
    'give' + '_back', 'files' + '_at', 'carry' + '=', 'device ' + 'tool', r'\bsess' + r'ions?\b',
    'sess' + "ion's", r'\ble' + r'ase\b', r'\ble' + r'nt\b', 'iss' + r'ue ?#?[0-9]',
    '15 min' + 'utes']), re.I)


def test_code_speaks_in_users_terms():
  """No line of code, script or test names the development machines (a user's time-limited GPU
  job is "a SLURM job with --time, a preemptible VM, a Colab runtime") or a tracker number;
  nor does any doc or notebook."""
  bad = []
  for f in _tracked('*.py', '*.sh', '*.toml', '.ci/*', '*.md', '*.ipynb'):
    if f.startswith(('results/', 'docs/bench/')):
      continue
    for i, line in enumerate((ROOT / f).read_text(errors='ignore').splitlines(), 1):
      if _DEV_WORDS.search(line.replace('tf.Session', '').replace('start_new_session', '')):
        bad.append(f'{f}:{i}: {line.strip()}')
  assert not bad, '\n'.join(bad)


def test_git_commit_is_read_without_git(tmp_path):
  """workdir.git_commit reads .git itself (the library spawns no git): loose and packed refs,
  a detached HEAD, and '' outside a checkout."""
  from metadrop_jax import workdir
  git = lambda *a, cwd=ROOT: subprocess.run(['git', *a], cwd=cwd, capture_output=True,
                                            text=True, check=True).stdout.strip()
  assert git('rev-parse', 'HEAD').startswith(workdir.git_commit(str(ROOT))) and \
      len(workdir.git_commit(str(ROOT))) == 7
  repo = tmp_path / 'r'
  repo.mkdir()
  git('init', '-q', cwd=repo)
  (repo / 'a').write_text('a')
  git('add', 'a', cwd=repo)
  git('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'a', cwd=repo)
  head = git('rev-parse', 'HEAD', cwd=repo)
  (repo / 'sub').mkdir()
  assert workdir.git_commit(str(repo / 'sub')) == head[:7]
  git('pack-refs', '--all', cwd=repo)
  assert workdir.git_commit(str(repo)) == head[:7]
  git('checkout', '-q', '--detach', cwd=repo)
  assert workdir.git_commit(str(repo)) == head[:7]
  assert workdir.git_commit(str(tmp_path)) == ''


def test_tensorflow_cannot_take_the_accelerator():
  """TensorFlow comes only with the tfds extra, as tensorflow-cpu (no GPU support), and
  launch.py says what it really does about TF (quiet its logs), nothing more."""
  extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']
  tf = [d for deps in extras.values() for d in deps if d.startswith('tensorflow')]
  assert tf and all(re.match(r'tensorflow(-cpu|-datasets)\b', d) for d in tf), tf
  launch = (ROOT / 'launch.py').read_text()
  assert 'off the accelerator' not in launch and 'tensorflow-cpu' in launch


def test_every_documented_program_runs():
  """Every ``-m metadrop_jax.X`` / ``-m tools.X`` / ``-m benchmarks.X`` that a script, a doc, a
  notebook or a module's docstring tells a user to run names a module with a ``__main__``
  block (a library module run with -m does nothing and exits 0)."""
  texts = [p for pat in ('scripts/*.sh', 'docs/*.md', '*.md', 'notebooks/*.ipynb', 'notebooks/*.md',
                         'metadrop_jax/**/*.py', 'tools/**/*.py', 'benchmarks/**/*.py',
                         'launch.py', '.ci/run')
           for p in ROOT.glob(pat)]
  bad = []
  for p in texts:
    text = p.read_text()
    for m in re.finditer(r'-m ((?:metadrop_jax|tools|benchmarks)(?:\.\w+)+)', text):
      if text[m.end():m.end() + 2] == '.<':      # python -m metadrop_jax.cli.<name>
        continue
      mod = ROOT / m.group(1).replace('.', '/')
      path = mod.with_suffix('.py') if mod.with_suffix('.py').exists() else mod / '__main__.py'
      if not path.exists() or '__main__' not in path.read_text():
        bad.append(f'{p.relative_to(ROOT)}: -m {m.group(1)}')
  assert not bad, bad
