"""The procedural dead-leaves images: pure functions of their seed, no stack needed."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.demo_data import LEAVES_IMAGES, dead_leaves, leaves_images


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.integers(16, 80))
def test_dead_leaves_cover_the_plane_in_range_and_repeat_with_the_seed(seed, size):
    image = dead_leaves(np.random.default_rng(seed), size)
    assert image.shape == (size, size, 3) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert np.array_equal(image, dead_leaves(np.random.default_rng(seed), size))
    assert not np.array_equal(image, dead_leaves(np.random.default_rng(seed + 1), size))


def edge_shares(image: np.ndarray) -> tuple[float, float]:
    """Shares of pixels whose largest step to a neighbour is under 2% (smooth) and over 10% (an edge)."""
    step = np.maximum(np.abs(np.diff(image, axis=0)).max(axis=2)[:, :-1],
                      np.abs(np.diff(image, axis=1)).max(axis=2)[:-1, :])
    return float((step < 0.02).mean()), float((step > 0.1).mean())


def test_dead_leaves_have_large_smooth_regions_and_sharp_edges():
    fine = np.mean([edge_shares(dead_leaves(np.random.default_rng(s), 128)) for s in range(4)], axis=0)
    assert fine[0] > 0.4 and fine[1] > 0.02   # mostly flat or gently shaded, with the disks' edges
    # A larger smallest radius, fewer and larger disks: more of the plane smooth, fewer edges.
    coarse = np.mean([edge_shares(dead_leaves(np.random.default_rng(s), 128, min_radius=32.0)) for s in range(4)],
                     axis=0)
    assert coarse[0] > fine[0] and coarse[1] < fine[1]


def test_leaves_images_are_fixed_every_second_gray_and_independent_of_the_count():
    images = leaves_images(count=4, size=48)
    assert [key for key, _ in images] == ["leaves_00", "leaves_01", "leaves_02", "leaves_03"]
    for index, (_, image) in enumerate(images):
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8
        gray = np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])
        assert gray == bool(index % 2)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(leaves_images(count=2, size=48), images))
    assert not np.array_equal(leaves_images(seed=1, count=1, size=48)[0][1], images[0][1])
    assert LEAVES_IMAGES >= 2
