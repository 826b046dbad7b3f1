"""The tools that measure the Triton ``grid_fuse`` kernels, sharing one harness
(:mod:`encoder_fusion.benchmarks.kernel.harness`: arguments, problems, timing, reports):

* ``python -m encoder_fusion.benchmarks.kernel.bench``: the kernel against the eager reference and
  ``torch.compile``;
* ``python -m encoder_fusion.benchmarks.kernel.tiles``: tilings against the default one, on a GPU;
* ``python -m encoder_fusion.benchmarks.kernel.registers``: registers, spills and occupancy, compiled for
  sm_90 without a GPU;
* ``python -m encoder_fusion.benchmarks.kernel.host``: the host time of one call, every launch stubbed out;
* ``benchmarks/src/kernel/gpu.sh OUT_DIR``: the compiled kernel tests, the tiling sweep and the
  benchmark, in that order, on a GPU machine.
"""
