"""Trust in the explainer widget: unticking "trust model code" never leaves code the user no
longer trusts ready to run (a real viewer, a real card with a custom architecture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_gradcam._widget import GradCAMWidget
from test_model_safety import card_with_custom_architecture

pytestmark = pytest.mark.gui


@pytest.fixture(autouse=True)
def own_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAPARI_GRADCAM_CONFIG_DIR", str(tmp_path / "config"))


def test_unticking_trust_drops_a_model_loaded_with_trust(make_napari_viewer, tmp_path,
                                                         monkeypatch) -> None:
    card = card_with_custom_architecture(tmp_path, "widget_trusted_net")
    monkeypatch.syspath_prepend(str(tmp_path))
    viewer = make_napari_viewer()
    widget = GradCAMWidget(viewer)
    viewer.add_image(np.zeros((16, 16), np.float32), name="img")
    widget.form.trust.value = True
    assert widget.load_model_source(card) is not None
    assert widget.loaded is not None and widget.loaded.trusted_code
    widget.form.trust.value = False  # the reload without trust is refused
    assert widget.loaded is None
    assert widget.run() is None  # nothing runs: "choose a model first"
    assert widget.worker is None
