"""Decision-boundary export (shapes, consistency, CLI) and the pictures' pixel sizes.

Runs on freshly initialised parameters of the tiny config (no training): everything here is
about plumbing, not about what a trained model looks like.
"""

import os

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from metadrop_jax import data as data_lib
from metadrop_jax import export
from metadrop_jax import keys
from metadrop_jax import meta
from metadrop_jax import visualize
from metadrop_jax import workdir as workdir_lib
from metadrop_jax.cli import export as export_cli
from metadrop_jax.cli import visualize as visualize_cli
from configs import tiny as tiny_config_lib

NUM_PERTURB = 4


def tiny(method):
  c = tiny_config_lib.get_config()
  c.method = method
  c.progress_bar = False
  return c


def _params(config):
  init_key, _ = keys.run_keys(config)
  state, _ = meta.create_state(init_key, config)
  return state.params


@pytest.fixture(scope='module')
def md():
  config = tiny('metadrop')
  images = data_lib.load_split(config.data, 'test')
  params = _params(config)
  arrays = export.export_decision_boundaries(params, config, images, num_tasks=2,
                                             num_perturb=NUM_PERTURB, step=0)
  return config, params, images, arrays


def test_export_shapes_and_metadata(md):
  config, _, _, a = md
  t, k1, s2, q2 = 2, config.inner_steps + 1, 2 * config.shot, 2 * config.query
  f = 2 * 2 * config.model.channels            # 8x8 images, 2 max-pools -> 2x2 x channels
  assert a['feat_train'].shape == (t, k1, s2, f)
  assert a['feat_perturbed'].shape == (t, k1, NUM_PERTURB, s2, f)
  assert a['feat_test'].shape == (t, k1, q2, f)
  assert a['w'].shape == (t, k1, f, 2) and a['b'].shape == (t, k1, 2)
  assert a['logits_train'].shape == (t, k1, s2, 2) and a['logits_test'].shape == (t, k1, q2, 2)
  assert a['acc_test'].shape == (t, k1) and a['support_loss'].shape == (t, config.inner_steps)
  np.testing.assert_array_equal(a['classes'], [[0, 5], [1, 6]])
  np.testing.assert_array_equal(a['y_train'], np.repeat([0, 1], config.shot))
  np.testing.assert_array_equal(a['y_test'], np.repeat([0, 1], config.query))
  assert str(a['method']) == 'metadrop' and int(a['num_perturb']) == NUM_PERTURB
  assert int(a['inner_steps']) == config.inner_steps and int(a['mc_samples']) == 3
  for v in a.values():
    if v.dtype.kind == 'f':
      assert np.isfinite(v).all()


def test_export_head_and_inner_loop_consistency(md):
  _, params, _, a = md
  # step 0 is the meta-learned head cut to columns 0 and 1
  np.testing.assert_allclose(a['w'][:, 0], np.broadcast_to(
      np.asarray(params['theta']['dense']['w'])[:, :2], a['w'][:, 0].shape))
  np.testing.assert_allclose(a['b'][:, 0], np.broadcast_to(
      np.asarray(params['theta']['dense']['b'])[:2], a['b'][:, 0].shape))
  # the inner loop moves the head; the logits are the recorded features through the head
  assert not np.allclose(a['w'][:, 0], a['w'][:, -1])
  logits = np.einsum('tkqf,tkfc->tkqc', a['feat_test'], a['w']) + a['b'][:, :, None, :]
  np.testing.assert_allclose(logits, a['logits_test'], rtol=1e-4, atol=1e-5)
  # perturbed copies differ from each other and from the clean features
  assert not np.allclose(a['feat_perturbed'][:, :, 0], a['feat_perturbed'][:, :, 1])


def test_boundary_embedding_matches_logit_difference(md):
  _, _, _, a = md
  t, k = 1, -1
  emb = visualize.boundary_embedding(a['feat_train'][t, k], a['feat_test'][t, k],
                                     a['feat_perturbed'][t, k], a['w'][t, k], a['b'][t, k])
  w = a['w'][t, k].astype(np.float64)
  norm = np.linalg.norm(w[:, 0] - w[:, 1])
  diff = a['logits_test'][t, k, :, 0] - a['logits_test'][t, k, :, 1]
  # x - boundary is the logit difference / |w0 - w1|: the vertical line is where it is zero
  np.testing.assert_allclose((emb['test'][:, 0] - emb['boundary']) * norm, diff, rtol=1e-4,
                             atol=1e-4)
  assert emb['train'].shape == (2, 2) and emb['perturbed'].shape == (NUM_PERTURB, 2, 2)
  assert np.isfinite(emb['perturbed']).all()


def test_export_maml_has_no_perturbed_copies():
  config = tiny('maml')
  images = data_lib.load_split(config.data, 'test')
  a = export.export_decision_boundaries(_params(config), config, images, num_tasks=1,
                                        num_perturb=NUM_PERTURB)
  assert a['feat_perturbed'].shape == (1, config.inner_steps + 1, 0, 2, 16)
  emb = visualize.boundary_embedding(a['feat_train'][0, 0], a['feat_test'][0, 0],
                                     a['feat_perturbed'][0, 0], a['w'][0, 0], a['b'][0, 0])
  assert emb['perturbed'].shape == (0, 2, 2)


def test_too_many_tasks_warns_and_truncates(md):
  config, params, images, _ = md
  with pytest.warns(UserWarning, match='only 3 sub-tasks'):
    a = export.export_decision_boundaries(params, config, images, num_tasks=10,
                                          num_perturb=NUM_PERTURB)
  np.testing.assert_array_equal(a['classes'], [[0, 5], [1, 6], [2, 7]])
  with pytest.raises(ValueError, match='class_offset'):
    export.two_way_tasks(images, 1, 2, class_offset=8)


def test_npz_roundtrip(md, tmp_path):
  a = md[3]
  path = export.save_npz(str(tmp_path / 'sub' / 'x.npz'), a)
  b = export.load_npz(path)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not [f for f in os.listdir(tmp_path / 'sub') if 'tmp' in f]


def _size(path):
  assert os.path.getsize(path) > 1000
  with Image.open(path) as im:
    return im.size, getattr(im, 'n_frames', 1)


def test_boundary_pngs(md, tmp_path):
  a = md[3]
  p = visualize.plot_boundary(a, 0, -1, str(tmp_path / 'one.png'))
  assert _size(p) == ((500, 400), 1)
  paths = visualize.plot_all_boundaries(a, str(tmp_path / 'all'), tasks=[1], steps=[0, -1])
  assert [os.path.basename(q) for q in paths] == ['task1_step0.png', 'task1_step2.png']
  p = visualize.plot_boundary_panel([a, a], str(tmp_path / 'panel.png'), task=0, steps=[0, -1],
                                    labels=['A', 'B'], panel_size=3.0)
  assert _size(p) == ((600, 600), 1)


def test_stochastic_features(md, tmp_path):
  config, params, images, _ = md
  batch = images[:3, 0].astype(np.float32) / 255.0
  maps = export.stochastic_feature_maps(params, config, batch, index=1, num_draws=3)
  assert maps['draws'].shape == (3, 8, 8, config.model.channels)
  assert maps['mean'].shape == (8, 8, config.model.channels)
  np.testing.assert_allclose(maps['image'], batch[1])
  assert not np.allclose(maps['draws'][0], maps['draws'][1])
  ch = visualize.pick_channels(maps, 2)
  assert len(set(ch)) == 2
  gif = visualize.write_feature_gif(maps, str(tmp_path / 'f.gif'), channels=ch, tile=40, gap=4)
  assert _size(gif) == ((3 * 40 + 2 * 4, 40), 3)
  png = visualize.plot_feature_grid(maps, str(tmp_path / 'f.png'), channels=ch)
  assert _size(png) == ((450, 640), 1)      # 1.5 in x (1 + 2) cols; 1.5 in x (1 + 3) rows + 0.4
  with pytest.raises(ValueError, match='no feature noise'):
    export.stochastic_feature_maps(params, tiny('maml'), batch)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A workdir with an untrained checkpoint at step 0 (as train.train would lay it out)."""
  config = tiny('metadrop')
  wd = str(tmp_path_factory.mktemp('wd'))
  workdir_lib.check_or_write_run_config(wd, config)
  init_key, _ = keys.run_keys(config)
  state, _ = meta.create_state(init_key, config)
  mgr = workdir_lib.checkpoint_manager(wd, config)
  mgr.save(0, args=ocp.args.StandardSave(state))
  mgr.wait_until_finished()
  return wd


def test_export_and_visualize_clis(workdir, tmp_path, capsys):
  out = tmp_path / 'db.npz'
  assert export_cli.main([f'--workdir={workdir}', f'--out={out}', f'--plot_dir={tmp_path / "png"}',
                      '--num_tasks=1', f'--num_perturb={NUM_PERTURB}']) == 0
  a = export.load_npz(str(out))
  assert a['feat_train'].shape[:2] == (1, 3) and int(a['checkpoint_step']) == 0
  assert sorted(os.listdir(tmp_path / 'png')) == [f'task0_step{k}.png' for k in range(3)]
  assert visualize_cli.main(['panel', f'--npz={out},{out}', f'--out={tmp_path / "p.png"}',
                         '--steps=0,-1']) == 0
  assert _size(str(tmp_path / 'p.png')) == ((800, 800), 1)
  assert visualize_cli.main(['boundaries', f'--npz={out}', f'--out_dir={tmp_path / "b"}',
                         '--steps=-1']) == 0
  assert os.listdir(tmp_path / 'b') == ['task0_step2.png']
  assert visualize_cli.main(['features', f'--workdir={workdir}', f'--out_png={tmp_path / "f.png"}',
                         f'--out_gif={tmp_path / "f.gif"}', '--draws=4', '--channels=0,1,2']) == 0
  assert _size(str(tmp_path / 'f.gif')) == ((4 * 84 + 3 * 4, 84), 4)
  assert _size(str(tmp_path / 'f.png')) == ((600, 790), 1)
  capsys.readouterr()


@pytest.mark.parametrize('mod', [export_cli, visualize_cli])
def test_help(mod, capsys):
  with pytest.raises(SystemExit) as e:
    mod.main(['--help'])
  assert e.value.code == 0
  assert 'usage' in capsys.readouterr().out
