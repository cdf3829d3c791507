"""The spine every shell drains: what to explain, how it is cut, the job that runs it.

* :mod:`~napari_gradcam.core.run.tiles`: the one slice loop and the one window loop (with a
  plane range, so a dask chunk reuses it), the window grid, the blending weights, the mirrored
  read, and how a layer's samples are cut (``read_slab`` / ``to_model_input``).

Nothing here imports Qt or napari.
"""
