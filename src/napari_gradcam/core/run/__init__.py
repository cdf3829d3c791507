"""The spine every shell drains: what to explain, how it is cut, the job that runs it.

* :mod:`~napari_gradcam.core.run.request`: what to explain and how (``ImageSource``,
  ``TargetChoice``, ``ExplainRequest``), the checks made once, the one explainer builder and
  the one provenance record;
* :mod:`~napari_gradcam.core.run.plan`: the one ``Plan`` (axes, box, window, chunking) and
  ``plan_explanation``;
* :mod:`~napari_gradcam.core.run.tiles`: **where tiling happens**: the one slice loop and the
  one window loop (with a plane range, so a dask chunk reuses it), the window grid, the
  blending weights, the mirrored read, and how a layer's samples are cut;
* :mod:`~napari_gradcam.core.run.job`: ``explain_job``, the generator the widget and the
  scripts drain (``Progress`` items, out-of-memory back-off in the loops, ``Cancelled``);
* :mod:`~napari_gradcam.core.run.output`: maps written to an OME-Zarr (with its pyramid) while
  they are made.

The shells: :mod:`napari_gradcam.jobs` (the widget's imports), :mod:`napari_gradcam.core.volume`
(arrays), :mod:`napari_gradcam.distributed` (files, the command line, dask workers). The widget
and the command line (``napari-gradcam explain``, :func:`napari_gradcam.distributed.explain_file`)
both build an ``ExplainRequest`` and drain ``explain_job``; the dask runner cuts the same plan
into chunks and runs each through the same loops. Nothing here imports Qt or napari.
"""
