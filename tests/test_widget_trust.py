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


def test_browse_in_either_widget_asks_one_dialog_and_runs_no_code_without_trust(
        make_napari_viewer, tmp_path, monkeypatch) -> None:
    """*Browse …* in the explainer and in the evidence widget opens the same dialog (the
    user's choice of file is the only thing stubbed: a modal dialog cannot be clicked in a
    test); the picked card's custom module is not imported until trust is ticked, and a
    cancelled dialog loads nothing and keeps the model already chosen."""
    from qtpy.QtWidgets import QFileDialog

    from napari_gradcam._evidence_widget import EvidenceWidget
    from napari_gradcam._qt_common import BROWSE, MODEL_FILE_FILTER

    card = card_with_custom_architecture(tmp_path, "browsed_lab_net")
    marker = tmp_path / "imported_marker"
    monkeypatch.syspath_prepend(str(tmp_path))
    answers: list[str] = []
    asked: list[tuple[str, str]] = []

    def pick(_parent, caption="", _folder="", file_filter="", *_args, **_kwargs):
        asked.append((caption, file_filter))
        return (answers.pop(0), file_filter)

    monkeypatch.setattr(QFileDialog, "getOpenFileName", staticmethod(pick))
    viewer = make_napari_viewer()
    explainer = GradCAMWidget(viewer)
    evidence = EvidenceWidget(viewer)

    answers.append(str(card))
    explainer.form.model.value = BROWSE
    assert explainer.loaded is None and not marker.exists()
    assert explainer.form.model.value is None  # the refused file is not shown as chosen
    evidence.model_combo.setCurrentIndex(evidence.model_combo.findData(BROWSE))
    answers.append(str(card))
    evidence.model_combo.activated.emit(evidence.model_combo.currentIndex())
    assert evidence.loaded is None and not marker.exists()
    assert len(asked) == 2 and asked[0] == asked[1]
    assert asked[0][1] == MODEL_FILE_FILTER and "model card" in asked[0][0]

    explainer.form.trust.value = True  # consent: now the card's module may run
    answers.append(str(card))
    explainer.form.model.value = BROWSE
    assert explainer.loaded is not None and explainer.loaded.trusted_code and marker.exists()
    assert explainer.form.model.value == str(card)
    answers.append("")  # cancelled: nothing new, the trusted model stays chosen
    explainer.form.model.value = BROWSE
    assert explainer.form.model.value == str(card) and explainer.loaded.trusted_code
    assert not answers
