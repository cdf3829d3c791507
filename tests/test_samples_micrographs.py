"""The micrograph classifier's two data families: the domain-randomised training generator and
the independent held-out generator. Both are seeded, keep the label contract (1 precipitate,
2 crack, the class's defect and only it), and vary what they claim to vary."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_gradcam.samples import (
    MICROGRAPH_TRAINING_SIZES,
    make_heldout_micrograph,
    make_heldout_micrograph_set,
    make_micrograph,
    make_randomised_ct_slice_patches,
    make_randomised_micrograph,
    make_randomised_micrograph_patches,
    micrograph_heldout,
)

# the defect labels each class may show (a crack image may also hold precipitates)
ALLOWED = {0: [set()], 1: [{1}], 2: [{2}, {1, 2}]}


def _labels_of(mask: np.ndarray) -> set[int]:
    return {int(v) for v in np.unique(mask)} - {0}


def test_randomised_micrographs_keep_the_label_contract_at_every_size() -> None:
    for size in (64, 128):
        patches = make_randomised_micrograph_patches(6, size=size, seed=3)
        assert patches.images.shape == (18, size, size) and patches.images.dtype == np.uint8
        assert np.bincount(patches.classes).tolist() == [6, 6, 6]
        for kind, mask in zip(patches.classes, patches.masks, strict=True):
            assert _labels_of(mask) in ALLOWED[int(kind)], (size, kind)
    assert MICROGRAPH_TRAINING_SIZES[0] == 64 and MICROGRAPH_TRAINING_SIZES[-1] == 256


def test_randomised_micrographs_are_seeded_and_each_size_is_its_own_draw() -> None:
    a = make_randomised_micrograph_patches(3, size=64, seed=1)
    b = make_randomised_micrograph_patches(3, size=64, seed=1)
    c = make_randomised_micrograph_patches(3, size=64, seed=2)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    # the same seed at another size is another set of images, not a crop of the same ones
    d = make_randomised_micrograph_patches(3, size=96, seed=1)
    assert not np.array_equal(a.images, d.images[:, :64, :64])


def test_randomised_micrographs_vary_contrast_noise_and_crack_width() -> None:
    patches = make_randomised_micrograph_patches(12, size=96, seed=7)
    images = patches.images.astype(np.float64)
    means = images.mean(axis=(1, 2))
    spreads = images.std(axis=(1, 2))
    # contrast windows: the mean grey level spans a wide range (one look would not)
    assert means.max() - means.min() > 60 and spreads.max() / spreads.min() > 1.8
    # crack widths: mean width (mask area over drawn length) varies by well over 1.5x
    widths = []
    for seed in range(12):
        sample = make_randomised_micrograph((96, 96), seed, 2)
        widths.append(np.count_nonzero(sample.labels == 2) / sample.info["crack"]["length"])
    assert max(widths) > 1.5 * min(widths)
    # the crack is dark against its surroundings, whatever the contrast window
    for image, mask in zip(images[patches.classes == 2], patches.masks[patches.classes == 2],
                           strict=True):
        crack = mask == 2
        ring = ndimage.binary_dilation(crack, iterations=4) & ~ndimage.binary_dilation(crack)
        assert image[crack].mean() < image[ring].mean()


def test_default_micrograph_draw_is_unchanged_by_the_new_parameters() -> None:
    # the randomised generator reuses make_micrograph with new keyword arguments; their
    # defaults must keep the shipped sample exactly as it was
    default = make_micrograph((128, 128), seed=5, dtype="uint8")
    explicit = make_micrograph((128, 128), seed=5, dtype="uint8", crack_half_width=(1.0, 1.5),
                               crack_turn=0.12, precipitate_radius=(1.6, 3.0), blur=0.6)
    np.testing.assert_array_equal(default.image, explicit.image)
    np.testing.assert_array_equal(default.labels, explicit.labels)


def test_heldout_micrographs_are_seeded_and_keep_the_label_contract() -> None:
    a = make_heldout_micrograph((96, 96), seed=11, kind=2)
    b = make_heldout_micrograph((96, 96), seed=11, kind=2)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.image.dtype == np.uint8 and a.labels.shape == (96, 96)
    images = make_heldout_micrograph_set(4, size=96, seed=500)
    assert images.classes.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for kind, image, mask in zip(images.classes, images.images, images.masks, strict=True):
        assert _labels_of(mask) in ALLOWED[int(kind)]
        image = image.astype(np.float64)
        if kind == 2:  # the crack is darker than the metal beside it
            crack = mask == 2
            ring = ndimage.binary_dilation(crack, iterations=4) & ~ndimage.binary_dilation(crack)
            assert image[crack].mean() < image[ring].mean()


def test_heldout_micrograph_data_bar_covers_no_label() -> None:
    found = 0
    for seed in range(40):
        sample = make_heldout_micrograph((64, 64), seed=seed, kind=2)
        if sample.info["data_bar"]:
            found += 1
            band = sample.image[-6:]
            assert not sample.labels[-6:].any()
            assert band.min() < 60 and band.max() > 180  # dark band with a white bar
    assert found >= 5


def test_heldout_micrograph_generator_draws_with_its_own_code() -> None:
    # independence: from the training generator it takes only the label names, the classes,
    # the containers and the shape check, none of its drawing functions
    tree = ast.parse(Path(micrograph_heldout.__file__).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module and "micrographs" in node.module for alias in node.names}
    assert imported <= {"MICROGRAPH_CLASSES", "MICROGRAPH_LABELS", "Micrograph", "PatchSet",
                        "check_shape"}


def test_surface_cracks_in_mixed_slices_keep_the_old_draw_by_default() -> None:
    # surface_kinds=(2,) is the old behaviour: the same seed gives the same slices
    old = make_randomised_ct_slice_patches(8, size=48, seed=4, extent=96, worm_share=0.3,
                                           surface_share=0.5)
    same = make_randomised_ct_slice_patches(8, size=48, seed=4, extent=96, worm_share=0.3,
                                            surface_share=0.5, surface_kinds=(2,))
    np.testing.assert_array_equal(old.images, same.images)
    # with (2, 3) the mixed slices may hold a surface crack, and the contract still holds
    mixed = make_randomised_ct_slice_patches(12, size=48, seed=4, extent=96, worm_share=0.3,
                                             surface_share=1.0, surface_kinds=(2, 3))
    for kind, mask in zip(mixed.classes, mixed.masks, strict=True):
        assert _labels_of(mask) == [set(), {1}, {2}, {1, 2}][int(kind)]
