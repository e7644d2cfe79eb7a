"""The README tells one story: short, and every measured number in it appears once and is found
in docs/results.md, docs/performance.md or a benchmark record (docs/bench/), so that nothing in
the README is a number without a source."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
# Measured numbers: an accuracy with its CI, and times, ratios and percentages.
MEASURED = re.compile(r'[+−-]?\d+(?:[.,]\d+)* ± \d+\.\d+|\d+(?:\.\d+)?(?= ?(?:ms|s|min|x|×|%)\b)')
SOURCES = ('docs/results.md', 'docs/performance.md', 'docs/paper.md', 'docs/authors_gradient.md',
           'docs/gpu_window.md')


def _prose(text: str) -> str:
  """The README without its code blocks (commands hold flags, not results)."""
  return re.sub(r'```.*?```', '', text, flags=re.S)


def _sources() -> str:
  texts = [(ROOT / p).read_text() for p in SOURCES]
  texts += [p.read_text(errors='replace') for p in (ROOT / 'docs' / 'bench').rglob('*')
            if p.is_file() and p.suffix in ('.json', '.md', '.txt')]
  return '\n'.join(texts).replace('−', '-')


def measured_numbers(text: str) -> list[str]:
  return [m.group(0) for m in MEASURED.finditer(_prose(text))
          if not re.fullmatch(r'\d', m.group(0))]


def test_readme_is_short():
  assert len(README.read_text().splitlines()) <= 250


def test_every_measured_number_has_a_source_and_appears_once():
  text = README.read_text()
  numbers = measured_numbers(text)
  assert numbers, 'no measured number found: the pattern is broken'
  sources = _sources()
  missing = [n for n in numbers if n.replace('−', '-').lstrip('+') not in sources]
  assert not missing, f'README numbers without a source in {SOURCES} or docs/bench/: {missing}'
  repeated = sorted({n for n in numbers if ' ± ' in n and numbers.count(n) > 1})
  assert not repeated, f'README numbers given more than once: {repeated}'


def test_the_check_catches_a_number_without_a_source():
  fake = 'MAML reaches 12.34 ± 0.56 in 7.89 ms per step.'
  found = measured_numbers(fake)
  assert found == ['12.34 ± 0.56', '7.89']
  assert not any(n in _sources() for n in ('12.34 ± 0.56',))


def test_the_python_example_runs(monkeypatch):
  """The README's API example is code a user pastes: it runs as written (tiny config, CPU)."""
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
  assert len(blocks) == 1, 'one python example expected'
  monkeypatch.chdir(ROOT)                        # it names configs/tiny.py relative to the root
  from metadrop_jax import api, config as config_lib
  load = api.get_config
  # the example as written, on a smaller tiny (1 block, 5 test episodes): CI time, not coverage
  monkeypatch.setattr(api, 'get_config', lambda path: config_lib.override(
      load(path), {'model.num_layers': 1, 'eval.num_episodes': 5, 'eval.batch_tasks': 5}))
  exec(compile(blocks[0], 'README.md', 'exec'), {})   # pylint: disable=exec-used
