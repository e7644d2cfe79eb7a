"""Exit 0 iff orbax can save and restore a small pytree here the way train.py does (used by
device_window.sh to decide between the carried orbax wheel and the image's own)."""
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

tree = {'a': jnp.arange(6.0).reshape(2, 3), 'b': {'c': jnp.ones((4,), jnp.int32)}}
with tempfile.TemporaryDirectory() as d:
  opts = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
  mgr = ocp.CheckpointManager(os.path.join(d, 'checkpoints'), options=opts)
  mgr.save(3, args=ocp.args.StandardSave(tree))
  mgr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  back = mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore(abstract))
  ok = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(back)))
print('orbax', ocp.__version__ if hasattr(ocp, '__version__') else '?', 'roundtrip', ok)
sys.exit(0 if ok else 1)
