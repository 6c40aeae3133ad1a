"""Online patching (`data.slides`) on real slide files with real OpenSlide: tiles identical to the
shard builder's, exact resume across DataLoader workers, bad slides dropped and counted, dataset
mixing, bounded open slides, and a real `fit` that resumes exactly."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from midnight_prep import shards
from midnight_prep.job import TileReader, encode_jpeg, run_job, tile_target
from midnight_prep.plan import BuildParams, make_plan
from midnight_prep.slides import Slide
from midnight_train.config import load_config
from midnight_train.data.config import DataConfig
from midnight_train.data.loader import make_loader
from midnight_train.data.open_slides import SlideDataset, slide_datasets
from midnight_train.data.slide_stream import TileSampler, read_tile, tile_sampler
from midnight_train.typed_yaml import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(batch_size=4, global_crop_size=56, local_crop_size=28, n_local_crops=2, timeout_s=60)


def cfg(slides, tile_size: int = 64, **kw) -> DataConfig:
    kw = {"num_workers": 0, "slide_pool": 2, "draws_per_slide": 2, **SMALL, **kw}
    return DataConfig(slides=slides, tiles={"tile_size": tile_size}, **kw)


def parse_key(key: str) -> tuple[str, float, int, int]:
    slide_id, mpp, x, y = key.rsplit("_", 3)
    return slide_id, int(mpp) / 1000, int(x), int(y)


def test_tiles_are_the_shard_builders_pixels(slide_dir, cmu_slide, tmp_path):
    params = BuildParams(tile_size=128)
    inputs = [str(slide_dir / "generic40x.tiff"), str(slide_dir / "scan20x.tiff"), str(cmu_slide)]
    plan = make_plan(inputs, str(tmp_path), params, tiles_per_slide=8)
    for job in plan.jobs:
        run_job(job, params, str(tmp_path), plan.sha256())
    samples = [s for tar in sorted((tmp_path / "shards").glob("*.tar")) for s in shards.iter_tiles(str(tar))]
    assert len(samples) == 8 + 6 + 6  # the 20x slides give no 0.25 µm/px
    assert {m["mpp"] for _, _, m in samples} == {2.0, 1.0, 0.5, 0.25}
    for key, jpg, meta in samples:
        with Slide(meta["source"]) as slide:
            tile = read_tile(slide, params, meta["mpp"], meta["x"], meta["y"])
        assert encode_jpeg(tile, 90) == jpg, key

    # What the online stream emits: its key names a position where the builder's reader cuts
    # the same pixels, and that tile passes the builder's filters.
    paths = {s.slide_id: s.path for s in plan.slides}
    with tile_sampler(cfg(inputs, tile_size=128)) as sampler:
        tiles = [sampler.draw() for _ in range(24)]
    assert len({t.slide_id for t in tiles}) == 3 and len({t.mpp for t in tiles}) == 4
    for t in tiles:
        slide_id, mpp, x, y = parse_key(t.key)
        assert (slide_id, mpp, x, y) == (t.slide_id, t.mpp, t.x, t.y)
        with Slide(paths[slide_id]) as slide:
            target = tile_target(slide, params, mpp)
            [(rgb, hsv)] = TileReader(slide, params).read(target, [(*target.from_level0(x, y), 0.0)])
        assert encode_jpeg(rgb, 90) == encode_jpeg(t.rgb, 90) and (rgb == t.rgb).all()
        assert hsv >= params.hsv_min_fraction and t.foreground >= params.foreground
        assert t.meta()["extent"] == pytest.approx(128 * mpp / slide.mpp, rel=0.02)


def test_exact_resume_across_workers_and_disjoint_streams(slide_dir, cmu_slide):
    slides = [str(cmu_slide), str(slide_dir / "corrupt.svs"), str(slide_dir / "generic40x.tiff"),
              str(slide_dir / "scan20x.tiff")]
    c = cfg(slides, num_workers=2)
    it = iter(make_loader(c, seed=3, rank=0, world_size=1))
    straight = [next(it) for _ in range(6)]
    del it

    first = make_loader(c, seed=3, rank=0, world_size=1)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    assert sum(len(w["dropped"]) for w in state["workers"]) >= 1  # the corrupt slide, in the state
    resumed = make_loader(c, seed=3, rank=0, world_size=1, state=state)
    it = iter(resumed)
    rest = [next(it) for _ in range(3)]
    del it
    for a, b in zip(straight[3:], rest, strict=True):
        assert a["keys"] == b["keys"]
        for k in ("global_crops", "local_crops", "masks"):
            assert torch.equal(a[k], b[k])
    assert resumed.counters()["slide_error"] >= 1

    # tile_sampler (previews, statistics) draws what the loader's stream does
    with tile_sampler(c, seed=3, stream=1, n_streams=2) as sampler:
        assert [sampler.draw().key for _ in range(4)] == straight[1]["keys"]
    # worker streams and rank streams draw different tiles
    assert set(straight[0]["keys"]).isdisjoint(straight[1]["keys"])
    other = next(iter(make_loader(cfg(slides), seed=3, rank=1, world_size=2)))
    assert set(other["keys"]).isdisjoint(straight[0]["keys"])


def test_bad_slides_are_dropped_counted_and_named(slide_dir, caplog):
    bad = {"corrupt": "OpenSlide", "nompp": "µm/px", "damaged": "", "notaslide": "", "glass": "no tissue"}
    slides = [str(slide_dir / "generic40x.tiff")] + [
        str(next(slide_dir.glob(f"{name}.*"))) for name in bad]
    with caplog.at_level(logging.WARNING), \
            tile_sampler(cfg(slides, slide_pool=1, draws_per_slide=1)) as sampler:
        tiles = [sampler.draw() for _ in range(40)]
        state = sampler.state()
    assert {t.slide_id for t in tiles} == {"generic40x"}
    assert state["counters"]["slide_error"] == len(bad)
    reasons = {slide_id: reason for _, slide_id, reason in state["dropped"]}
    assert reasons.keys() == bad.keys()
    for name, words in bad.items():
        assert words in reasons[name]
        assert sum(name in r.getMessage() and "dropped slide" in r.getMessage()
                   for r in caplog.records) == 1  # one warning naming the file

    # every slide of a dataset bad: one clear error (at start, or when the last one goes)
    all_bad = [str(slide_dir / f) for f in ("corrupt.svs", "nompp.tiff", "notaslide.tiff")]
    with pytest.raises(ValueError, match=r"dataset 'default'\): none of its first 3 slides opens: .*corrupt.svs"):
        make_loader(cfg(all_bad), seed=0, rank=0, world_size=1)
    datasets = [SlideDataset("scanner-b", 1.0, slide_datasets(cfg(all_bad))[0].slides)]
    with TileSampler(datasets, BuildParams(tile_size=64), seed=[0, 1, 0]) as sampler, \
            pytest.raises(RuntimeError, match=r"dataset 'scanner-b': all 3 slides were dropped.*corrupt.svs"):
        sampler.draw()


def test_datasets_are_mixed_by_weight(slide_dir):
    c = DataConfig(datasets=[{"slides": str(slide_dir / "generic40x.tiff"), "weight": 0.75, "name": "a"},
                             {"slides": str(slide_dir / "scan20x.tiff"), "weight": 0.25, "name": "b"}],
                   tiles={"tile_size": 32, "mpps": [2, 1]}, **SMALL)
    with tile_sampler(c, seed=5) as sampler:
        tiles = [sampler.draw() for _ in range(400)]
        rows = sampler.acceptance()
    by = Counter((t.dataset, t.slide_id) for t in tiles)
    assert set(by) == {("a", "generic40x"), ("b", "scan20x")}
    assert 0.20 <= by["b", "scan20x"] / 400 <= 0.30
    assert sum(r["accepted"] for r in rows) == 400 and {r["mpp"] for r in rows} == {2.0, 1.0}


def slide_fds(folder: Path) -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            out.add(target)
    return out


def test_open_slides_are_bounded_and_closed_and_masks_cached(slide_dir, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a.tiff", "b.tiff", "c.tiff", "d.tiff"):  # more slides than may be open
        shutil.copy(slide_dir / "generic40x.tiff", folder / name)
    shutil.copy(slide_dir / "glass.tiff", folder / "glass.tiff")
    c = cfg(str(folder), slide_pool=1, draws_per_slide=1, mask_cache_dir=str(tmp_path / "masks"))
    with tile_sampler(c) as sampler:
        seen, keys = set(), []
        for _ in range(30):
            keys.append(sampler.draw().key)
            assert len(sampler.open.entries) <= 3  # pool 1 × 1 dataset + 2
            assert len(slide_fds(folder)) <= 3
            seen |= slide_fds(folder)
        assert sampler.masks.computed == 5
        assert sampler.state()["dropped"] == [[0, "glass", sampler.dropped[0, "glass"]]]
    assert len(seen) == 4 and slide_fds(folder) == set()  # evicted ones and the rest: closed
    assert len(list((tmp_path / "masks").glob("*.npz"))) == 5
    # a second stream (another worker or rank of the node) reads the masks back, same tiles
    with tile_sampler(c) as again:
        assert [again.draw().key for _ in range(30)] == keys and again.masks.computed == 0


def test_loader_process_keeps_decoded_tiles_within_data_tile_cache_mb(slide_dir, monkeypatch):
    from midnight_prep import slides as slide_io

    cache = slide_io.TileCache(2**30)
    monkeypatch.setattr(slide_io, "TILE_CACHE", cache)
    c = cfg([str(slide_dir / "generic40x.tiff"), str(slide_dir / "scan20x.tiff")],
            slide_pool=2, draws_per_slide=50, tile_cache_mb=0.5)
    it = iter(make_loader(c, seed=0, rank=0, world_size=1))  # workers 0: this process's cache
    for _ in range(3):
        next(it)
    assert cache.max_bytes == 2**19 and 0 < cache.bytes <= 2**19


def test_config_keys(slide_dir, tmp_path):
    one = str(slide_dir / "scan20x.tiff")
    with pytest.raises(ValueError, match="data.tiles.shard_size"):
        DataConfig(slides=one, tiles={"shard_size": 10})
    with pytest.raises(ValueError, match=r"data.tiles: tile_size must be a whole number"):
        DataConfig(slides=one, tiles={"tile_size": 8})
    with pytest.raises(ValueError, match="cannot be mixed"):
        DataConfig(datasets=[{"shards": "x"}, {"slides": one}])
    with pytest.raises(ValueError, match="data.tiles applies to slide sources"):
        DataConfig(shards="x", tiles={"tile_size": 64})
    assert DataConfig(slides=one).tile_params() == BuildParams()  # the builder's defaults
    tiny = ROOT / "examples" / "tiny-cpu.yaml"
    c = load_config(tiny, [f"data.slides={one}", "data.tiles.mpps=[1, 0.5]"])
    assert c.data.shards is None and c.data.tile_params().mpps == (1.0, 0.5)
    with pytest.raises(ConfigError, match="slide_pol"):
        load_config(tiny, [f"data.slides={one}", "data.slide_pol=3"])
    with pytest.raises(ValueError, match="no such file"):
        make_loader(cfg(str(tmp_path / "missing.svs")), seed=0, rank=0, world_size=1)
    # a CSV slide list as midnight-prep reads it: ids, groups (spelt as the builder spells
    # them), µm/px overrides
    (tmp_path / "list.csv").write_text(f"path,slide_id,group,mpp\n{one},s20,tcga.brca,\n"
                                       f"{slide_dir / 'nompp.tiff'},n1,other,0.25\n")
    [brca] = slide_datasets(DataConfig(datasets=[{"slides": str(tmp_path / "list.csv"),
                                                  "group": "tcga.brca"}]))
    assert [(s.slide_id, s.group, s.path) for s in brca.slides] == [("s20", "tcga-brca", one)]
    [both] = slide_datasets(DataConfig(slides=str(tmp_path / "list.csv")))
    assert [(s.slide_id, s.mpp) for s in both.slides] == [("n1", 0.25), ("s20", None)]
    with tile_sampler(DataConfig(slides=str(tmp_path / "list.csv"), tiles={"tile_size": 64})) as sampler:
        assert {sampler.draw().slide_id for _ in range(20)} == {"n1", "s20"}  # n1: by its override


def test_fit_from_slides_resumes_exactly(cmu_slide, tmp_path):
    from midnight_train.loop.step import TIMING_METRICS
    from midnight_train.loop.trainer import Trainer

    def overrides(out):
        return [f"data.slides={cmu_slide}", "data.tiles.tile_size=128", "data.num_workers=1",
                "data.batch_size=4", f"output_dir={out}", "train.max_steps=3",
                "train.checkpoint_every=2", "train.tensorboard=false", "train.progress=false"]

    def metrics(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in rows]

    tiny = ROOT / "examples" / "tiny-cpu.yaml"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(tiny, overrides(tmp_path / "full"))).fit()
        Trainer(load_config(tiny, overrides(tmp_path / "cut"))).fit(stop_after=2)
        Trainer(load_config(tiny, [*overrides(tmp_path / "cut"), "resume=auto"])).fit()
    finally:
        torch.set_num_threads(threads)
    full = metrics(tmp_path / "full")
    assert [r["step"] for r in full] == [1, 2, 3] and full[0]["skipped_slide_error"] == 0
    assert metrics(tmp_path / "cut") == full


def test_slides_on_object_storage_give_the_local_tiles(slide_dir, s3_env, tmp_path):
    """s3:// slides are staged (bounded cache, held while open) and draw exactly the local tiles;
    a missing object is a dropped slide, not a crash."""
    import fsspec

    names = ["generic40x.tiff", "scan20x.tiff"]
    fs = fsspec.filesystem("s3")
    for name in names:
        fs.put_file(str(slide_dir / name), f"midnight/online/{name}")
    local, remote = tmp_path / "local", "s3://midnight/online/"
    local.mkdir()
    for name in names:
        (local / name).symlink_to(slide_dir / name)
    stage = tmp_path / "stage"

    def draws(slides, **kw):
        with tile_sampler(cfg(slides, stage_dir=str(stage), **kw), seed=5) as sampler:
            tiles = [sampler.draw() for _ in range(12)]
            held = sampler.stage.used_bytes()
        return tiles, held

    here, _ = draws(str(local))
    there, held = draws(remote)
    assert [t.key for t in there] == [t.key for t in here]
    assert all((a.rgb == b.rgb).all() for a, b in zip(here, there))
    assert {t.source for t in there} == {remote + n for n in names}
    assert held == sum((slide_dir / n).stat().st_size for n in names)  # each staged once

    # A listed object that is gone by the time it is drawn: dropped with its reason.
    csv = tmp_path / "list.csv"
    csv.write_text(f"path\n{remote}{names[0]}\n{remote}gone.tiff\n")
    with tile_sampler(cfg(str(csv), stage_dir=str(stage), slide_pool=2), seed=1) as sampler:
        tiles = [sampler.draw() for _ in range(8)]
        assert {t.slide_id for t in tiles} == {"generic40x"}
        assert sampler.counts["slide_error"] == 1
        [reason] = sampler.dropped.values()
        assert "gone.tiff" in reason


def test_slides_weighted_by_tissue_area(slide_dir, tmp_path):
    """slide_weighting: tissue picks each slide in proportion to its tissue area (mm², so µm/px
    counts), and the draws still resume exactly."""
    csv = tmp_path / "list.csv"  # the whole tissue, and a 1024² corner of it given 0.25 µm/px
    csv.write_text(f"path,mpp\n{slide_dir / 'generic40x.tiff'},\n{slide_dir / 'nompp.tiff'},0.25\n")
    c = cfg(str(csv), slide_pool=1, draws_per_slide=1, slide_weighting="tissue", tissue_mm2_cap=1.0)
    with tile_sampler(c, seed=2) as sampler:
        tiles = [sampler.draw() for _ in range(400)]
        areas = {sid: a for (_, sid), a in sampler.areas.items()}
        state = sampler.state()
    assert 0.1 < areas["nompp"] / areas["generic40x"] < 0.5 and max(areas.values()) < 1.0
    share = Counter(t.slide_id for t in tiles)["generic40x"] / len(tiles)
    assert share == pytest.approx(areas["generic40x"] / sum(areas.values()), abs=0.07)
    with tile_sampler(c, seed=2) as straight:
        keys = [straight.draw().key for _ in range(450)]
    with tile_sampler(c, seed=2, state=state) as resumed:
        assert [resumed.draw().key for _ in range(50)] == keys[400:]
    with pytest.raises(ValueError, match="slide_weighting"):
        cfg(str(csv), slide_weighting="area")


def test_tissue_weighted_pool_resumes_exactly_when_slides_drop_while_choosing(slide_dir, tmp_path):
    """Weighted by tissue, choosing a pool slide opens candidates, and some fail and are dropped
    then: the slot must still be what the dropped set gives (what a resumed run computes), also
    when a candidate hits the every-64th-try fallback to the slides left."""
    junk = (slide_dir / "notaslide.tiff").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in range(300):  # 300 unopenable slides and 3 good ones: choosing takes 100s of tries
        (bad / f"bad{n:03d}.tiff").write_bytes(junk)
    slides = [str(slide_dir / f) for f in ("generic40x.tiff", "aperio40x.svs", "scan20x.tiff")] + [str(bad)]
    c = cfg(slides, slide_pool=1, draws_per_slide=8, slide_weighting="tissue", tissue_mm2_cap=1.0)
    logging.getLogger("midnight_train.data.slide_stream").setLevel(logging.ERROR)  # 300 warnings
    try:
        for seed in (6, 7):  # 7 chose differently on resume before the fix
            with tile_sampler(c, seed=seed) as straight:
                keys = [straight.draw().key for _ in range(8)]
            with tile_sampler(c, seed=seed) as first:  # stopped mid-epoch of the pool slot
                assert [first.draw().key for _ in range(4)] == keys[:4]
                state = first.state()
            with tile_sampler(c, seed=seed, state=state) as resumed:
                assert [resumed.draw().key for _ in range(4)] == keys[4:], seed
    finally:
        logging.getLogger("midnight_train.data.slide_stream").setLevel(logging.NOTSET)
