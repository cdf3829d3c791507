"""The Qt-free core of napari-gradcam: everything that computes.

Nothing under ``napari_gradcam.core`` imports napari, magicgui or qtpy, so the engine runs in
scripts, on a cluster and in tests without a display.
"""
