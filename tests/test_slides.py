import numpy as np
import openslide
import pytest
from PIL import Image

from midnight_prep import slides
from midnight_prep.slides import Slide, SlideError, TileCache, downscale, resolve_mpp


def test_mpp_sources(slide_dir, cmu_slide):
    with Slide(slide_dir / "generic40x.tiff") as s:
        assert (s.mpp, s.mpp_source) == (pytest.approx(0.25), "openslide.mpp")
        assert [round(lv.mpp, 6) for lv in s.levels] == [0.25, 1.0, 4.0]
    with Slide(slide_dir / "aperio40x.svs") as s:
        assert s.mpp == pytest.approx(0.25)
    with Slide(cmu_slide) as s:
        assert s.mpp == pytest.approx(0.499)


def test_resolution_tags_then_override():
    assert resolve_mpp({"tiff.XResolution": "40000", "tiff.ResolutionUnit": "centimeter"}) == (pytest.approx(0.25), "tiff.resolution")
    assert resolve_mpp({"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"})[0] == pytest.approx(0.25)
    # 72 dpi is a default, not a magnification: fall through to the override.
    assert resolve_mpp({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}, 0.5) == (0.5, "override")
    # Metadata wins over the override when it is usable.
    assert resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, 0.5)[0] == 0.25
    with pytest.raises(SlideError, match="mpp"):
        resolve_mpp({"tiff.XResolution": "1", "tiff.ResolutionUnit": "none"})


def test_slide_without_mpp_is_refused_unless_overridden(slide_dir):
    with pytest.raises(SlideError, match="µm/px"):
        Slide(slide_dir / "nompp.tiff")
    with Slide(slide_dir / "nompp.tiff", mpp_override=0.25) as s:
        assert (s.mpp, s.mpp_source) == (0.25, "override")


@pytest.mark.parametrize("name", ["corrupt.svs", "notaslide.tiff", "missing.svs"])
def test_unreadable_files_raise_slide_error(slide_dir, name):
    with pytest.raises(SlideError):
        Slide(slide_dir / name)


def test_level_choice_never_upsamples(slide_dir):
    with Slide(slide_dir / "generic40x.tiff") as s:  # levels 0.25, 1, 4
        assert s.level_for(0.25).index == 0
        assert s.level_for(0.5).index == 0  # 1 µm/px would upsample
        assert s.level_for(1.0).index == 1
        assert s.level_for(2.0).index == 1
        assert s.level_for(1.04).index == 1
        assert s.level_for(0.97).index == 1  # within 5 % tolerance
        assert s.level_for(0.9).index == 0
    with Slide(slide_dir / "scan20x.tiff") as s:
        assert s.level_for(0.25) is None


@pytest.mark.parametrize("name", ["generic40x.tiff", "aperio40x.svs", "scan20x.tiff"])
def test_fast_reader_equals_openslide(slide_dir, name):
    with Slide(slide_dir / name) as fast, openslide.OpenSlide(str(slide_dir / name)) as osr:
        assert fast._fast is not None and all(fast._fast.can_read(lv.index) for lv in fast.levels)
        rng = np.random.default_rng(0)
        for lv in fast.levels:
            for _ in range(5):
                w, h = rng.integers(1, min(300, lv.width)), rng.integers(1, min(300, lv.height))
                x, y = rng.integers(0, lv.width - w + 1), rng.integers(0, lv.height - h + 1)
                ours = fast.read_level(lv.index, int(x), int(y), int(w), int(h))
                ds = lv.downsample
                ref = np.asarray(osr.read_region((int(x * ds), int(y * ds)), lv.index, (int(w), int(h))))[..., :3]
                assert np.array_equal(ours, ref)


def test_fast_reader_on_real_aperio(cmu_slide):
    with Slide(cmu_slide) as fast, openslide.OpenSlide(str(cmu_slide)) as osr:
        assert fast._fast is not None
        ours = fast.read_level(0, 1000, 1500, 512, 300)
        ref = np.asarray(osr.read_region((1000, 1500), 0, (512, 300)))[..., :3]
        assert np.array_equal(ours, ref)


def test_tile_cache_is_one_byte_budget_for_every_open_slide(slide_dir, monkeypatch):
    """Decoded tiles of all the slides a process holds open share one bounded cache; a closed
    slide's tiles leave it; the pixels are the same at any budget, down to no cache at all."""
    names = ["generic40x.tiff", "aperio40x.svs", "scan20x.tiff"]
    cache = TileCache(2**30)
    monkeypatch.setattr(slides, "TILE_CACHE", cache)
    monkeypatch.setattr(slides, "_OPENSLIDE_CACHE", [])
    with Slide(slide_dir / names[0]) as probe:
        region = probe.read_level(0, 0, 0, 300, 300)
    assert not cache._tiles  # closing dropped them
    # OpenSlide's own tile cache (formats without the fast path): one for the process, too
    assert isinstance(slides._OPENSLIDE_CACHE[0], openslide.OpenSlideCache)
    opened = [Slide(slide_dir / name) for name in names]
    try:
        reads = [s.read_level(0, 0, 0, 300, 300) for s in opened]
        owners = [s._fast._id for s in opened]
        assert {k[0] for k in cache._tiles} == set(owners)
        assert np.array_equal(reads[0], region)
        one_slide = sum(t.nbytes for k, t in cache._tiles.items() if k[0] == owners[0])
        slides.set_tile_cache_mb(one_slide / 2**20)  # room for one slide's tiles of three
        assert 0 < cache.bytes <= one_slide
        assert {k[0] for k in cache._tiles} == {owners[-1]}  # the least recently used went first
        opened[-1].close()
        assert cache.bytes == 0 and not cache._tiles
        slides.set_tile_cache_mb(0)  # no cache: every tile decoded again, the same pixels
        assert np.array_equal(opened[1].read_level(0, 0, 0, 300, 300), reads[1])
        assert not cache._tiles
    finally:
        for s in opened:
            s.close()


def test_half_mpp_tile_equals_independent_downscale(slide_dir):
    """A 256 px tile at 0.5 µm/px from a 0.25 µm/px pyramid is the 512 px level-0 region
    downscaled with an antialiasing filter, computed here independently with PIL."""
    path = slide_dir / "generic40x.tiff"
    with Slide(path) as s, openslide.OpenSlide(str(path)) as osr:
        lv = s.level_for(0.5)
        read = round(256 * 0.5 / lv.mpp)
        assert (lv.index, read) == (0, 512)
        # Somewhere with tissue: the most textured of a few places.
        x, y = max(((x, y) for x in range(0, 2500, 400) for y in range(0, 2000, 400)),
                   key=lambda p: s.read_level(2, p[0] // 16, p[1] // 16, 32, 32).std())
        tile = downscale(s.read_level(0, x, y, read, read), 256)
        region = osr.read_region((x, y), 0, (512, 512)).convert("RGB")
        ref = np.asarray(region.resize((256, 256), Image.Resampling.BOX))
        assert tile.shape == (256, 256, 3)
        assert np.abs(tile.astype(int) - ref).max() <= 1
        # And not what snapping to the nearest level (1 µm/px, field of view 256 µm) would give.
        snapped = np.asarray(osr.read_region((x, y), 1, (256, 256)).convert("RGB"))
        assert np.abs(tile.astype(int) - snapped).mean() > 10


def test_non_integer_downscale_is_lanczos():
    rng = np.random.default_rng(0)
    region = rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(region).resize((256, 256), Image.Resampling.LANCZOS))
    assert np.array_equal(downscale(region, 256), ref)


def test_thumbnail_strips_cover_the_slide(slide_dir):
    with Slide(slide_dir / "generic40x.tiff") as s:
        strips = list(s.thumbnail_strips(16.0, rows_per_strip=64))
        assert len(strips) > 1
        rgb = np.concatenate(strips)
        assert rgb.shape == (s.height * 0.25 // 16, s.width * 0.25 // 16, 3)


def test_read_size_snaps_only_within_one_percent():
    from midnight_prep.slides import read_size_for

    assert read_size_for(256, 0.5, 0.25) == 512
    assert read_size_for(256, 0.5, 0.499) == 256  # 256.5: a copy, not a 0.2 % Lanczos resize
    assert read_size_for(256, 2.0, 0.499) == 1024  # 1026: an exact 4x box reduction
    assert read_size_for(256, 1.0, 0.253) == 1012  # 1.2 % off 1024: not snapped
    assert read_size_for(256, 0.25, 0.26) == 246  # within the level tolerance: a slight upsample
    assert read_size_for(512, 0.125, 0.125) == 512
