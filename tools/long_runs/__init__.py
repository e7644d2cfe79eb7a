"""Long runs on time-limited GPU machines without internet, outside the library.

A SLURM job with ``--time``, a preemptible VM or a Colab runtime gives a GPU for minutes at a
time and may have no network. Table 1 (8 runs x 60,000 meta-iterations in each meta-gradient)
is trained there as a campaign of sittings whose state lives in the repository
(``results/table1/``); docs/gpu_window.md is the user's guide. Run everything from the
repository's root:

  python -m tools.long_runs.campaign plan          # what the next sitting trains
  bash scripts/device_window.sh BUDGET_S           # one job on the GPU machine
  bash scripts/unpack_window.sh DIR                # back here: put its files in place
"""
