"""The package's shape: no import circle, only entry points import the trainer, no CLI code in
library modules, and a repository that stands alone. Reads source files only (fast)."""

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


def test_the_repository_stands_alone():
  """No reference to documents outside the repository (the paper and the authors' code are
  cited by their public addresses instead; docs/paper.md holds what users need)."""
  files = subprocess.run(['git', 'ls-files'], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  this = pathlib.Path(__file__).name
  bad = []
  for f in files:
    p = ROOT / f
    if f.endswith(this) or not p.is_file() or p.suffix in ('.png', '.gif', '.npz', '.npy'):
      continue
    text = p.read_text(errors='ignore')
    if re.search(r'paper_facts|shared/docs', text):
      bad.append(f)
  assert not bad, bad
  assert (ROOT / 'docs' / 'paper.md').exists()


def test_tensorflow_cannot_take_the_accelerator():
  """TensorFlow comes only with the tfds extra, as tensorflow-cpu (no GPU support), and
  launch.py says what it really does about TF (quiet its logs), nothing more."""
  extras = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']
  tf = [d for deps in extras.values() for d in deps if d.startswith('tensorflow')]
  assert tf and all(re.match(r'tensorflow(-cpu|-datasets)\b', d) for d in tf), tf
  launch = (ROOT / 'launch.py').read_text()
  assert 'off the accelerator' not in launch and 'tensorflow-cpu' in launch
