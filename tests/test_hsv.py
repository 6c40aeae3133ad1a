import cv2
import numpy as np
import pytest

from midnight_prep.hsv import HsvBounds, _in_bounds, hsv_fraction, hsv_mask, rgb_to_hsv_opencv


@pytest.fixture(scope="module")
def all_colours():
    g = np.arange(256, dtype=np.uint8)
    r, gg, b = np.meshgrid(g, g, g, indexing="ij")
    return np.stack([r, gg, b], axis=-1).reshape(4096, 4096, 3)


def test_hsv_equals_opencv_for_every_colour(all_colours):
    ours = rgb_to_hsv_opencv(all_colours)
    ref = cv2.cvtColor(all_colours, cv2.COLOR_RGB2HSV)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("bounds", [HsvBounds(), HsvBounds(h=(100, 170), s=(20, 200), v=(50, 240))])
def test_mask_equals_opencv_inrange(all_colours, bounds):
    hsv = cv2.cvtColor(all_colours, cv2.COLOR_RGB2HSV)
    lo = (bounds.h[0], bounds.s[0], bounds.v[0])
    hi = (bounds.h[1], bounds.s[1], bounds.v[1])
    ref = cv2.inRange(hsv, lo, hi) > 0
    assert np.array_equal(_in_bounds(all_colours, bounds), ref)  # what the lookup table holds
    assert np.array_equal(hsv_mask(all_colours, bounds), ref)  # the (possibly disk-cached) table


def test_fraction_on_real_tissue(cmu_slide):
    import openslide

    with openslide.OpenSlide(str(cmu_slide)) as osr:
        tile = np.asarray(osr.read_region((800, 1200), 0, (256, 256)).convert("RGB"))
    hsv = cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)
    ref = (cv2.inRange(hsv, (90, 8, 103), (180, 255, 255)) > 0).mean()
    assert hsv_fraction(tile) == pytest.approx(ref, abs=0)
    assert 0.3 < ref <= 1.0  # real tissue: the filter keeps a good share of it


def test_known_colours():
    # Eosin pink and haematoxylin purple pass; white glass, black pen and green do not.
    pink, purple = [230, 150, 200], [120, 80, 160]
    white, black, green = [245, 245, 245], [10, 10, 10], [60, 160, 60]
    tile = np.array([[pink, purple, white, black, green]], np.uint8)
    assert hsv_mask(tile).tolist() == [[True, True, False, False, False]]
