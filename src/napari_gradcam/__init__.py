"""napari-gradcam: where does your materials-science CNN look?

The public Python API is Qt-free; the napari dock widget lives in ``napari_gradcam._widget``
and is only imported by napari through the manifest.
"""
__version__ = "0.1.0"
