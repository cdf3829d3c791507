"""The synthetic samples: seeded, the right shapes, and ground truth where the defect really is."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import ndimage

from napari_gradcam import _sample_data
from napari_gradcam.samples import (
    CT_VOXEL_SIZE_UM,
    PHASES,
    SPECTRA_CLASSES,
    energy_share,
    iou_per_class,
    make_ct_patches,
    make_ct_slice_patches,
    make_ct_volume,
    make_micrograph,
    make_micrograph_patches,
    make_pattern,
    make_spectra_dataset,
    make_spectra_stack,
    pointing_game,
    pointing_hits,
    two_theta_axis,
)
from napari_gradcam.samples.ct_volume import Pore, Specimen, render_ct

# ----------------------------------------------------------------------------- micrographs


def test_micrograph_is_reproducible_and_seed_dependent() -> None:
    a = make_micrograph((96, 128), seed=3)
    b = make_micrograph((96, 128), seed=3)
    c = make_micrograph((96, 128), seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == a.labels.shape == (96, 128)
    assert a.image.dtype == np.float32 and a.labels.dtype == np.uint8
    assert a.image.min() >= 0.0 and a.image.max() <= 1.0


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_micrograph_integer_dtypes_use_the_full_range(dtype: str) -> None:
    grey = make_micrograph((64, 64), seed=1, dtype=dtype)
    ref = make_micrograph((64, 64), seed=1)
    assert grey.image.dtype == np.dtype(dtype)
    top = np.iinfo(dtype).max
    np.testing.assert_allclose(grey.image / top, ref.image, atol=1.0 / top)


def test_micrograph_ground_truth_marks_dark_crack_and_bright_precipitates() -> None:
    sample = make_micrograph((256, 256), seed=2, n_precipitates=15)
    image, labels = sample.image, sample.labels
    assert set(np.unique(labels)) == {0, 1, 2}
    matrix = np.median(image[labels == 0])
    assert image[labels == 2].mean() < matrix - 0.25  # a crack is a dark gap
    assert image[labels == 1].mean() > matrix + 0.15  # carbides are bright
    # one crack, a single connected line that starts on the border and ends inside (its tip)
    crack = labels == 2
    _, n_parts = ndimage.label(crack, structure=np.ones((3, 3)))
    assert n_parts == 1
    border = np.concatenate([crack[0], crack[-1], crack[:, 0], crack[:, -1]])
    assert border.any()
    tip = np.array(sample.info["crack"]["tip"])
    assert ((tip >= 0) & (tip <= 255)).all()


def test_micrograph_without_defects_has_empty_ground_truth() -> None:
    sample = make_micrograph((64, 64), seed=0, n_precipitates=0, crack=False)
    assert not sample.labels.any()
    assert sample.info["crack"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (64,)}, "shape must be 2 integers"),
        ({"shape": (8, 64)}, ">= 16"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"pearlite_fraction": 1.5}, "pearlite_fraction"),
        ({"n_precipitates": -1}, "n_precipitates"),
        ({"grain_size": 1.0}, "grain_size"),
        ({"crack_length": 2.0}, "crack_length"),
    ],
)
def test_micrograph_rejects_bad_parameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_micrograph(**{"shape": (64, 64), **kwargs})


def test_micrograph_patches_are_balanced_and_masks_match_classes() -> None:
    patches = make_micrograph_patches(n_per_class=6, size=48, seed=5)
    assert patches.images.shape == (18, 48, 48) and patches.masks.shape == (18, 48, 48)
    assert np.bincount(patches.classes).tolist() == [6, 6, 6]
    for image_class, mask in zip(patches.classes, patches.masks, strict=True):
        present = set(np.unique(mask)) - {0}
        assert present == [set(), {1}, {2}][image_class]
    again = make_micrograph_patches(n_per_class=6, size=48, seed=5)
    np.testing.assert_array_equal(patches.images, again.images)
    grey = make_micrograph_patches(n_per_class=6, size=48, seed=5, dtype="uint8")
    assert grey.images.dtype == np.uint8
    np.testing.assert_allclose(grey.images / 255.0, patches.images, atol=1 / 255)
    with pytest.raises(ValueError, match="n_per_class"):
        make_micrograph_patches(n_per_class=0)
    with pytest.raises(ValueError, match="patch size"):
        make_micrograph_patches(n_per_class=1, size=16)


# ----------------------------------------------------------------------------- CT


@pytest.fixture(scope="module")
def ct() -> object:
    return make_ct_volume((64, 96, 96), seed=1, n_pores=6)


def test_ct_volume_shape_dtype_scale_and_reproducibility(ct) -> None:
    assert ct.volume.shape == ct.labels.shape == (64, 96, 96)
    assert ct.volume.dtype == np.uint16 and ct.labels.dtype == np.uint8
    assert ct.scale == CT_VOXEL_SIZE_UM == (1.0, 0.65, 0.65)
    again = make_ct_volume((64, 96, 96), seed=1, n_pores=6)
    np.testing.assert_array_equal(ct.volume, again.volume)
    np.testing.assert_array_equal(ct.labels, again.labels)
    assert set(np.unique(ct.labels)) == {0, 1, 2}


def test_ct_defects_are_darker_than_the_surrounding_metal(ct) -> None:
    volume = ct.volume.astype(np.float64)
    # metal: label-0 voxels well inside the specimen (not air, not the blurred surface)
    yy, xx = np.mgrid[0:96, 0:96]
    radius = np.hypot(yy - 47.5, xx - 47.5)
    metal = (ct.labels == 0) & (radius < ct.info["specimen_radius_px"] - 3)[None]
    metal_grey = np.median(volume[metal])
    assert volume[ct.labels == 1].mean() < metal_grey - 8000
    assert volume[ct.labels == 2].mean() < metal_grey - 4000


def test_ct_crack_is_one_surface_crack_with_a_tip_inside(ct) -> None:
    crack = ct.labels == 2
    _, n_parts = ndimage.label(crack, structure=np.ones((3, 3, 3)))
    assert n_parts == 1
    yy, xx = np.mgrid[0:96, 0:96]
    radius = np.broadcast_to(np.hypot(yy - 47.5, xx - 47.5), crack.shape)[crack]
    specimen_radius = ct.info["specimen_radius_px"]
    assert radius.max() > specimen_radius - 3  # it opens at the surface ...
    assert radius.min() < specimen_radius - 10  # ... and runs inwards to its tip


def test_ct_artefacts_are_constant_along_the_rotation_axis() -> None:
    # noise-free, defect-free: every slice must be the same (rings and cupping depend on r only)
    clean = make_ct_volume((16, 64, 64), seed=3, n_pores=0, crack=False, noise=0.0)
    for z in range(1, 16):
        np.testing.assert_array_equal(clean.volume[z], clean.volume[0])
    flat = make_ct_volume((16, 64, 64), seed=3, n_pores=0, crack=False, noise=0.0, rings=False)
    mid = flat.volume[0].astype(float)
    # cupping: the metal is darker at the axis than just inside the surface
    assert mid[32, 32] < mid[32, 32 + 22] - 1500
    # rings: the ring image (with minus without) is rotationally symmetric about the axis
    rings = clean.volume[0].astype(float) - flat.volume[0].astype(float)
    assert np.abs(rings).max() > 500
    np.testing.assert_allclose(rings, rings.T, atol=2)  # mirror about the diagonal
    np.testing.assert_allclose(rings, rings[::-1, ::-1], atol=2)  # point symmetry


def test_ct_pores_are_round_in_micrometres_not_in_voxels() -> None:
    specimen = Specimen(axis_yx=(31.5, 31.5), radius=40.0, rings=[])
    specimen.pores.append(Pore(centre=(20.0, 20.0, 20.0), radii=(5.0, 5.0, 5.0)))
    _, labels = render_ct(specimen, (0, 0, 0), (40, 64, 64), np.random.default_rng(0), 0.0)
    zs, ys, xs = np.nonzero(labels == 1)
    extent_um = [(a.max() - a.min() + 1) * s for a, s in zip((zs, ys, xs), CT_VOXEL_SIZE_UM,
                                                              strict=True)]
    np.testing.assert_allclose(extent_um, 10.0, atol=1.3)  # a 10 um sphere in every direction
    assert (ys.max() - ys.min()) > 1.3 * (zs.max() - zs.min())  # more voxels in y than in z


def test_ct_patches_have_the_defect_their_class_names() -> None:
    patches = make_ct_patches(n_per_class=4, size=24, seed=2, extent=64)
    assert patches.images.shape == (12, 24, 24, 24)
    assert np.bincount(patches.classes).tolist() == [4, 4, 4]
    for image_class, mask, image in zip(
        patches.classes, patches.masks, patches.images, strict=True
    ):
        present = set(np.unique(mask)) - {0}
        assert present == [set(), {1}, {2}][image_class]
        if image_class:
            defect = image[mask == image_class].mean()
            assert defect < np.median(image[mask == 0]) - 3000
    slices = make_ct_slice_patches(n=5, size=32, seed=0, extent=64)
    assert slices.images.shape == slices.masks.shape == (5, 32, 32)
    with pytest.raises(ValueError, match="twice the patch size"):
        make_ct_patches(n_per_class=1, size=32, extent=48)


def test_ct_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="shape must be 3 integers"):
        make_ct_volume((64, 64))
    with pytest.raises(ValueError, match="n_pores"):
        make_ct_volume((32, 32, 32), n_pores=-2)
    with pytest.raises(ValueError, match="noise"):
        make_ct_volume((32, 32, 32), noise=-1.0)


def test_generators_are_fast_enough_for_the_sample_menu() -> None:
    # the brief is < 2 s each on an idle machine; CI on two shared cores gets some slack
    for generate in (
        lambda: make_micrograph((256, 256)),
        lambda: make_ct_volume((128, 128, 128)),
        lambda: make_spectra_stack(64),
    ):
        start = time.perf_counter()
        generate()
        assert time.perf_counter() - start < 4.0


# ----------------------------------------------------------------------------- spectra


def test_pattern_peaks_sit_at_the_phase_positions_and_inside_the_mask() -> None:
    two_theta = two_theta_axis()
    for phase in SPECTRA_CLASSES:
        pattern, mask = make_pattern({phase: 1.0}, seed=7)
        strongest = max(PHASES[phase], key=lambda peak: peak[1])[0]
        peak_at = two_theta[int(np.argmax(pattern))]
        assert abs(peak_at - strongest) < 0.5, phase
        assert mask[int(np.argmax(pattern))]
        assert 0.01 < mask.mean() < 0.15  # a few narrow windows, not the whole axis
    a, _ = make_pattern([1.0, 0.2, 0.0], seed=1)
    b, _ = make_pattern([1.0, 0.2, 0.0], seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.float32 and a.shape == (1024,) and a.min() >= 0


def test_spectra_dataset_and_stack() -> None:
    data = make_spectra_dataset(n_per_class=5, seed=3)
    assert data.images.shape == data.masks.shape == (15, 1024)
    assert np.bincount(data.classes).tolist() == [5, 5, 5]
    stack = make_spectra_stack(30, seed=0)
    assert stack.image.shape == stack.masks.shape == (30, 1024)
    # the in-situ story: austenite, then ferrite, then magnetite dominate
    names = [SPECTRA_CLASSES[c] for c in stack.classes]
    assert names[0] == "austenite" and names[15] == "ferrite" and names[-1] == "magnetite"
    np.testing.assert_array_equal(stack.classes, np.argmax(stack.fractions, axis=1))


def test_spectra_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown phase"):
        make_pattern({"martensite": 1.0})
    with pytest.raises(ValueError, match="one weight per phase"):
        make_pattern([1.0, 0.0])
    with pytest.raises(ValueError, match="positive sum"):
        make_pattern([0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="n_spectra"):
        make_spectra_stack(2)


# ----------------------------------------------------------------------------- metrics


def test_pointing_game_by_hand() -> None:
    maps = np.zeros((3, 5, 5))
    masks = np.zeros((3, 5, 5), dtype=bool)
    masks[:, 1, 1] = True
    maps[0, 1, 1] = 1.0  # on the object: hit
    maps[1, 1, 3] = 1.0  # 2 px away: miss at tolerance 0 and 1, hit at tolerance 2
    # maps[2] is flat: points nowhere, a miss at any tolerance
    assert pointing_hits(maps, masks).tolist() == [True, False, False]
    assert pointing_game(maps, masks, tolerance=1.0) == pytest.approx(1 / 3)
    assert pointing_hits(maps, masks, tolerance=2.0).tolist() == [True, True, False]
    # with a 0.5 pixel size along x the same offset is 1.0 unit away
    assert pointing_hits(maps, masks, 1.0, spacing=(1.0, 0.5)).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="empty masks"):
        pointing_game(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="same shape"):
        pointing_game(maps, masks[:, :4])
    with pytest.raises(ValueError, match="batch"):
        pointing_game(np.zeros(4), np.ones(4, bool))


def test_energy_share_and_iou_by_hand() -> None:
    maps = np.array([[1.0, 3.0, -2.0], [0.0, 0.0, 0.0]])
    masks = np.array([[False, True, True], [True, False, False]])
    # negative values count as zero: 3 / (1 + 3); an all-zero map has no energy anywhere
    np.testing.assert_allclose(energy_share(maps, masks), [0.75, 0.0])
    prediction = np.array([0, 1, 1, 2])
    truth = np.array([0, 1, 2, 2])
    np.testing.assert_allclose(iou_per_class(prediction, truth, 4)[:3], [1.0, 0.5, 0.5])
    assert np.isnan(iou_per_class(prediction, truth, 4)[3])


# ----------------------------------------------------------------------------- napari samples


def test_sample_data_layer_tuples() -> None:
    (image, image_kw, kind), (labels, labels_kw, labels_kind) = _sample_data.ct_volume_sample()
    assert (kind, labels_kind) == ("image", "labels")
    assert image.shape == labels.shape == (128, 128, 128) and image.dtype == np.uint16
    assert image_kw["scale"] == labels_kw["scale"] == (1.0, 0.65, 0.65)
    assert "X-ray CT" in image_kw["metadata"]["description"]
    for make in (_sample_data.micrograph_sample, _sample_data.spectra_sample):
        layers = make()
        assert [layer[2] for layer in layers] == ["image", "labels"]
        assert layers[0][0].shape == layers[1][0].shape
        assert layers[0][1]["metadata"]["description"]
    spectra = _sample_data.spectra_sample()[0]
    assert spectra[1]["translate"][1] == pytest.approx(20.0)


def test_sample_data_module_imports_no_napari_or_qt() -> None:
    code = (
        "import sys, napari_gradcam._sample_data; "
        "print([m for m in ('napari', 'qtpy', 'PyQt6', 'magicgui') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- CT: other families


def test_heldout_ct_volume_is_seeded_labelled_and_varies_its_look() -> None:
    from napari_gradcam.samples.ct_heldout import make_heldout_ct_volume

    a = make_heldout_ct_volume((48, 96, 96), seed=3)
    again = make_heldout_ct_volume((48, 96, 96), seed=3)
    np.testing.assert_array_equal(a.volume, again.volume)
    np.testing.assert_array_equal(a.labels, again.labels)
    assert a.volume.dtype == np.uint16 and a.labels.dtype == np.uint8
    assert set(np.unique(a.labels)) == {0, 1, 2}
    assert a.scale == a.info["voxel_size_um"]
    # defects are darker than the metal around them
    metal = np.median(a.volume[(a.labels == 0) & (a.volume > np.median(a.volume))])
    assert a.volume[a.labels == 1].mean() < metal - 0.2 * (metal - a.info["grey_air"])
    assert a.volume[a.labels == 2].mean() < metal - 0.2 * (metal - a.info["grey_air"])
    # the family varies what the training generator keeps fixed: voxel size and grey scale
    looks = [make_heldout_ct_volume((32, 48, 48), seed=s).info for s in range(4)]
    assert len({info["voxel_size_um"] for info in looks}) == 4
    assert max(i["grey_metal"] for i in looks) - min(i["grey_metal"] for i in looks) > 2000
    with pytest.raises(ValueError, match="shape must be 3 integers"):
        make_heldout_ct_volume((16, 64, 64))


def test_heldout_pores_are_blobs_not_ellipsoids() -> None:
    # an ellipsoid fills its bounding box to pi/6 = 0.52; thresholded smooth noise makes
    # irregular blobs, and some of them fill much less of their box
    from napari_gradcam.samples.ct_heldout import make_heldout_ct_volume

    labels = make_heldout_ct_volume((64, 96, 96), seed=5).labels == 1
    parts, n = ndimage.label(labels)
    fills = [np.count_nonzero(parts[box] == i + 1) / parts[box].size
             for i, box in enumerate(ndimage.find_objects(parts))
             if np.count_nonzero(parts[box] == i + 1) >= 30]
    assert n >= 3 and len(fills) >= 2
    assert min(fills) < 0.42


def test_randomised_ct_patches_randomise_the_look_and_keep_the_labels() -> None:
    from napari_gradcam.samples.ct_randomised import (
        make_randomised_ct_patches,
        make_randomised_ct_slice_patches,
    )

    patches = make_randomised_ct_patches(n_per_class=4, size=24, seed=2, extent=64)
    assert patches.images.shape == (12, 24, 24, 24)
    assert np.bincount(patches.classes).tolist() == [4, 4, 4]
    for image_class, mask in zip(patches.classes, patches.masks, strict=True):
        assert set(np.unique(mask)) - {0} == [set(), {1}, {2}][image_class]
    slices = make_randomised_ct_slice_patches(n=16, size=32, seed=0, extent=64)
    assert np.bincount(slices.classes).tolist() == [4, 4, 4, 4]
    for kind, mask in zip(slices.classes, slices.masks, strict=True):
        assert set(np.unique(mask)) - {0} == [set(), {1}, {2}, {1, 2}][kind]
    # the grey scale differs from patch to patch (the training family has one grey scale)
    brightest = np.percentile(slices.images.reshape(16, -1), 95, axis=1)
    assert brightest.max() - brightest.min() > 8000
    again = make_randomised_ct_slice_patches(n=16, size=32, seed=0, extent=64)
    np.testing.assert_array_equal(slices.images, again.images)
