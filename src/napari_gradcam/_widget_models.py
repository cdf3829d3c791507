"""The explainer's model list: demo models, files loaded so far and *Browse …*, with trust.

Why a file of its own: loading is where code from a model file could run, so the rule lives in
one small place: a file is loaded only through :func:`napari_gradcam.core.models.load_model`
with the *trust model code* box's value, unticking trust drops a model loaded with it, and
*Browse …* is the dialog both widgets share (:func:`napari_gradcam._qt_common.ask_model_file`).
A loaded model fills the form (target layers, targets, mode, window) in :meth:`use_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_error, show_info

from napari_gradcam._qt_common import (
    BROWSE,
    NO_MODEL,
    chosen_model_source,
    demo_model_names,
    model_summary,
)

if TYPE_CHECKING:
    from magicgui.widgets import Container

    from napari_gradcam.core.layer_discovery import LayerInfo
    from napari_gradcam.core.models import LoadedModel


class ModelChoiceMixin:
    """The form's *Model* row and *trust model code* box, and the model they chose.

    Needs ``self.form`` (:class:`napari_gradcam._widget_form.FormMixin`), ``self._model_cache``
    (a dict), ``self._model_entries`` and ``self._restoring``, set in the widget's
    ``__init__``, and ``_save_choices`` (:mod:`napari_gradcam._widget_settings`).
    """

    form: Container
    loaded: LoadedModel | None
    _model_cache: dict[tuple[str, bool, str], LoadedModel]
    _model_entries: list[tuple[str, Any]]
    _layer_infos: list[LayerInfo]
    _loaded_with_trust: bool
    _restoring: bool

    def _model_choices(self, _widget: Any = None) -> list[tuple[str, Any]]:
        return [(NO_MODEL, None), *getattr(self, "_model_entries", []), (BROWSE, BROWSE)]

    def _fill_models(self) -> None:
        self._model_entries = [(name, name) for name in demo_model_names()]
        with self.form.model.changed.blocked():
            self.form.model.reset_choices()
            self.form.model.value = None

    def _on_model_chosen(self, source: Any = None) -> None:
        if self._restoring:
            return
        choice = self.form.model.value if source is None else source
        source = chosen_model_source(self, choice)
        if source is None:
            if choice is not None:  # the dialog was cancelled: show the model still loaded
                self._show_model_in_combo()
            return
        self.load_model_source(source)

    def _on_trust_toggled(self, *_args: object) -> None:
        """Ticking trust retries the chosen model, which may have failed for want of it;
        unticking it drops a model that was loaded with trust first, so no code the user no
        longer trusts runs at the next *Run* (the reload without trust may fail, and then no
        model is chosen)."""
        if not self.form.trust.value and self.loaded is not None and self._loaded_with_trust:
            self.loaded = None
            self._loaded_with_trust = False
        source = self.form.model.value
        if source not in (None, BROWSE):
            self.load_model_source(source)
        self._show_model_in_combo()

    def _model_cache_key(self, source: str, trust: bool) -> tuple[str, bool, str]:
        """A model is reused only for the same source, trust and device choice."""
        return (source, trust, str(self.form.device.value))

    def load_model_source(self, source: str | Path, *, quiet: bool = False
                          ) -> LoadedModel | None:
        """Load a demo model by name or a file (card, .pt2, trusted pickle); show errors.

        A loaded file is added to the model list (before *Browse …*) so it can be chosen
        again. ``quiet``: a failure is an info, not an error (restoring a remembered model).
        """
        from napari_gradcam.core.models import load_model

        trust = bool(self.form.trust.value)
        key = self._model_cache_key(str(source), trust)
        try:
            loaded = self._model_cache.get(key) or load_model(source, trust=trust)
        except Exception as error:
            (show_info if quiet else show_error)(
                f"Could not load the model {source}: {error}")
            self._show_model_in_combo()
            return None
        self._model_cache[key] = loaded
        entry = str(source)
        if entry not in [data for _text, data in self._model_entries]:
            self._model_entries.append((Path(entry).name, entry))
        self._model_source = entry
        self.use_model(loaded)
        self._loaded_with_trust = trust
        self._show_model_in_combo()
        self._save_choices()
        return loaded

    def _show_model_in_combo(self) -> None:
        """Show the loaded model's entry (or "choose a model") without loading anything."""
        combo = self.form.model
        with combo.changed.blocked():
            combo.reset_choices()
            chosen = getattr(self, "_model_source", None) if self.loaded is not None else None
            combo.value = chosen if chosen in combo.choices else None

    def use_model(self, loaded: LoadedModel) -> None:
        """Explain with an already loaded model (e.g. ``load_model(my_module)`` from Python)."""
        card = loaded.card
        self.loaded = loaded
        self._layer_infos = list(loaded.feature_layers)
        if not self._layer_infos:
            from napari_gradcam.core.layer_discovery import discover_feature_layers

            self._layer_infos = discover_feature_layers(
                loaded.model, card.spatial_dims, card.in_channels, card.input_size)
        f = self.form
        with f.target_layer.changed.blocked():
            f.target_layer.reset_choices()
            if card.target_layer in f.target_layer.choices:
                f.target_layer.value = card.target_layer
        with f.target.changed.blocked():
            f.target.reset_choices()
        self._refresh_region_values()
        if card.spatial_dims == 3:
            f.mode.value = "windows"
            for spin, size in zip(f.window, card.input_size or (32, 32, 32), strict=False):
                spin.value = int(size)
        else:
            f.mode.value = "current"
        self._enable_mode_options()
        self._refresh_channel_axes()
        f.model_info.value = model_summary(card)
        f.model_info.tooltip = model_summary(card)  # the whole text also on hover
