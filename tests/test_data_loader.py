"""The shard → multi-crop batch pipeline on real shards (CMU tissue), with real DataLoader workers."""

from __future__ import annotations

import json
from collections import Counter

import fsspec
import pytest
import shardkit
import torch

from midnight_train.data.config import DataConfig
from midnight_train.data.loader import make_loader
from midnight_train.data.sources import assign_shards, list_shards
from midnight_train.typed_yaml import build_dataclass

SMALL = dict(global_crop_size=56, local_crop_size=28, n_local_crops=4, patch_size=14, timeout_s=60)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, cmu_slide):
    """A shard-builder-like output: 4 finished shards (manifests) + one unfinished shard."""
    out = tmp_path_factory.mktemp("out")
    paths = shardkit.make_shards(out / "shards", cmu_slide, n_shards=5, per_shard=12, tile_size=64, prefix="job")
    shardkit.write_manifest(out, 0, paths[:2], [12, 12])
    shardkit.write_manifest(out, 1, paths[2:4], [12, 12])
    return out


def cfg(source, **kw) -> DataConfig:
    return DataConfig(shards=source, **{**SMALL, "batch_size": 4, "num_workers": 2, "shuffle_buffer": 10, **kw})


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def keys_of(batches):
    return [k for b in batches for k in b["keys"]]


def test_listing_manifests_braces_prefix_and_urls(shard_dir):
    finished = list_shards(str(shard_dir))
    assert [p.rsplit("/", 1)[1] for p in finished] == [f"job-{i:06d}.tar" for i in range(4)]
    assert len(list_shards(str(shard_dir / "shards"))) == 5  # no manifests there: every .tar
    assert list_shards(str(shard_dir / "shards" / "job-{000001..000003}.tar"))[0].endswith("job-000001.tar")
    assert len(list_shards(str(shard_dir / "shards" / "job-"))) == 5  # a prefix
    assert list_shards("file://" + str(shard_dir))[0].startswith("file://")
    with pytest.raises(FileNotFoundError):
        list_shards(str(shard_dir / "shards" / "nothing-"))


def test_batches_have_the_contracted_layout(shard_dir, cmu_slide):
    loader = make_loader(cfg(str(shard_dir)), seed=0, rank=0, world_size=1)
    batches = take(loader, 3)
    b = batches[0]
    assert b["global_crops"].shape == (2, 4, 3, 56, 56) and b["global_crops"].dtype == torch.uint8
    assert b["local_crops"].shape == (4, 4, 3, 28, 28) and b["local_crops"].dtype == torch.uint8
    assert b["global_crops"].permute(0, 1, 3, 4, 2).is_contiguous()  # channels-last memory
    assert b["masks"].shape == (8, 16) and b["masks"].dtype == torch.bool
    # the masked patches' flat indices and iBOT weights come with the masks (no device sync)
    flat = b["masks"].flatten()
    assert torch.equal(b["mask_indices"], flat.nonzero().flatten())
    per_image = b["masks"].sum(1).float()
    assert torch.equal(b["mask_weights"], 1 / per_image[b["mask_indices"] // 16])
    # pinned for the GPU copy where there is a GPU, as data.pin_memory says otherwise
    assert loader.pin_memory == torch.cuda.is_available()
    assert make_loader(cfg(str(shard_dir), pin_memory=False), seed=0, rank=0,
                       world_size=1).pin_memory is False
    assert len(b["keys"]) == 4 and all(k.startswith("cmu_00499_") for k in b["keys"])
    # two crops of one tile differ (random geometry), and the crops hold tissue, not zeros
    assert not torch.equal(b["global_crops"][0, 0], b["global_crops"][1, 0])
    assert b["local_crops"].float().std() > 10
    # the unfinished shard (no manifest) is never read
    unfinished = {f"cmu_00499_{x:07d}_{y:07d}" for x, y in
                  shardkit.tissue_positions(cmu_slide, 60, 64)[48:]}
    assert not unfinished & set(keys_of(batches))
    assert loader.counters() == {"decode_error": 0, "malformed": 0, "shard_error": 0, "shard_truncated": 0}


def test_config_rejects_unknown_keys_and_accepts_yaml_lists(shard_dir):
    with pytest.raises(ValueError, match="bogus"):
        build_dataclass(DataConfig, {"shards": str(shard_dir), "bogus": 1}, "data")
    c = build_dataclass(DataConfig, {"shards": str(shard_dir), "global_crop_scale": [0.4, 1.0],
                                     "datasets": None}, "data")
    assert list(c.global_crop_scale) == [0.4, 1.0]


def test_one_epoch_visits_every_sample_once(shard_dir):
    """4 finished shards x 12 samples, 2 workers: the first 48 samples are all distinct."""
    loader = make_loader(cfg(str(shard_dir), shard_interleave=2), seed=3, rank=0, world_size=1)
    keys = keys_of(take(loader, 10))
    assert len(set(keys[:40])) == 40  # 40 of 48 (each worker's first block is a full epoch slice)


def test_rank_split_is_disjoint(shard_dir):
    got = [set(keys_of(take(make_loader(cfg(str(shard_dir)), seed=0, rank=r, world_size=2), 6)))
           for r in range(2)]
    assert got[0] and got[1] and not got[0] & got[1]


def test_fewer_shards_than_streams_shares_samples_without_overlap(shard_dir):
    one = str(shard_dir / "shards" / "job-000000.tar")  # 1 shard, 2 ranks x 2 workers = 4 streams
    assert [assign_shards([one], s, 4)[0][1:] for s in range(4)] == [(4, 0), (4, 1), (4, 2), (4, 3)]
    got = [keys_of(take(make_loader(cfg(one, batch_size=3, shuffle_buffer=3), seed=0, rank=r, world_size=2), 2))
           for r in range(2)]
    assert len(set(got[0])) == 6 and len(set(got[1])) == 6 and not set(got[0]) & set(got[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_bit_identically(shard_dir, num_workers):
    c = cfg(str(shard_dir), num_workers=num_workers, batch_size=3, shuffle_buffer=7)
    full = take(make_loader(c, seed=5, rank=1, world_size=2), 7)
    first = make_loader(c, seed=5, rank=1, world_size=2)
    head = take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    tail = take(make_loader(c, seed=5, rank=1, world_size=2, state=state), 4)
    for a, b in zip(full, head + tail, strict=True):
        assert a["keys"] == b["keys"]
        for name in ("global_crops", "local_crops", "masks"):
            assert torch.equal(a[name], b[name]), name
    # and a resumed loader can itself be resumed
    again = make_loader(c, seed=5, rank=1, world_size=2, state=state)
    take(again, 2)
    last = take(make_loader(c, seed=5, rank=1, world_size=2, state=again.state_dict()), 2)
    assert [b["keys"] for b in last] == [b["keys"] for b in full[5:7]]


def test_resume_with_other_worker_count_does_not_replay(shard_dir):
    c = cfg(str(shard_dir), num_workers=2)
    first = make_loader(c, seed=0, rank=0, world_size=1)
    take(first, 2)
    moved = make_loader(cfg(str(shard_dir), num_workers=1), seed=0, rank=0, world_size=1, state=first.state_dict())
    fresh = make_loader(cfg(str(shard_dir), num_workers=1), seed=0, rank=0, world_size=1)
    assert keys_of(take(moved, 2)) != keys_of(take(fresh, 2))


def test_damaged_data_is_skipped_and_counted(tmp_path, shard_dir):
    good = shardkit.read_tar(shard_dir / "shards" / "job-000000.tar")
    damaged = [
        ("bad_garbage", {"jpg": b"not a jpeg at all", "json": b"{}"}),
        ("bad_truncjpeg", {"jpg": good[0][1]["jpg"][:300], "json": b"{}"}),
        ("bad_nojpg", {"json": b"{}"}),
    ] + good[1:6]
    shardkit.write_tar(tmp_path / "damaged.tar", damaged)
    cut = shardkit.write_tar(tmp_path / "cut.tar", shardkit.read_tar(shard_dir / "shards" / "job-000001.tar"))
    shardkit.truncate(cut, 0.5)
    sources = [str(tmp_path / "damaged.tar"), str(cut), str(tmp_path / "missing.tar")]
    loader = make_loader(cfg(sources, num_workers=2, shuffle_buffer=8), seed=0, rank=0, world_size=1)
    keys = keys_of(take(loader, 8))
    assert not any(k.startswith("bad_") for k in keys)
    assert {k for k, _ in good[1:6]} <= set(keys)
    cut_keys = {k for k, _ in shardkit.read_tar(shard_dir / "shards" / "job-000001.tar")}
    assert 0 < len(cut_keys & set(keys)) < len(cut_keys)  # samples before the damage are used
    counts = loader.counters()
    assert counts["decode_error"] >= 2 and counts["malformed"] >= 1
    assert counts["shard_truncated"] >= 1 and counts["shard_error"] >= 1


def test_no_readable_shard_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\0garbage" * 100)
    loader = make_loader(cfg([str(tmp_path / "junk.tar"), str(tmp_path / "gone.tar")], num_workers=0),
                         seed=0, rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="no readable samples"):
        take(loader, 1)


def test_mixing_by_weight_and_by_group(tmp_path, cmu_slide):
    a = shardkit.make_shards(tmp_path / "mix", cmu_slide, n_shards=2, per_shard=20, tile_size=48, group="tcga", prefix="a")
    shardkit.make_shards(tmp_path / "mix", cmu_slide, n_shards=2, per_shard=20, tile_size=48, group="nki", prefix="b", seed=1)
    common = dict(**SMALL, batch_size=20, num_workers=2, shuffle_buffer=50)
    by_list = DataConfig(datasets=[{"shards": [str(p) for p in a], "weight": 3},
                                   {"shards": str(tmp_path / "mix" / "b-"), "weight": 1}], **common)
    by_group = DataConfig(datasets=[{"shards": str(tmp_path / "mix"), "group": "tcga", "weight": 1},
                                    {"shards": str(tmp_path / "mix"), "group": "nki", "weight": 1}], **common)
    for c, expected in ((by_list, 0.75), (by_group, 0.5)):
        groups = Counter(k.split("_")[0] for k in keys_of(take(make_loader(c, seed=0, rank=0, world_size=1), 20)))
        assert abs(groups["tcga"] / 400 - expected) < 0.08, groups


def test_reads_through_fsspec_urls(shard_dir):
    """Shards on a non-local fsspec filesystem (memory://) stream the same way."""
    fs = fsspec.filesystem("memory")
    for i in range(2):
        fs.pipe(f"/shards/job-{i:06d}.tar", (shard_dir / "shards" / f"job-{i:06d}.tar").read_bytes())
    urls = list_shards("memory://shards/job-")
    assert urls == ["memory:///shards/job-000000.tar", "memory:///shards/job-000001.tar"]
    keys = keys_of(take(make_loader(cfg(urls, num_workers=0), seed=0, rank=0, world_size=1), 2))
    assert len(set(keys)) == 8


def test_loader_leaves_global_rngs_alone(shard_dir):
    """The trainer restores torch/numpy/random states on resume; the loader must not draw from them."""
    import random

    import numpy as np
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    take(make_loader(cfg(str(shard_dir)), seed=0, rank=0, world_size=1), 2)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1]) and random.getstate() == before[2]


def test_crop_matches_pil_reference_for_every_flip_and_rotation():
    """`crop` (raw-encoder bytes straight into a channels-last buffer, hflip by reading BGR
    bottom-up rows backwards) equals the plain PIL resize → flip → rotate, byte for byte."""
    import numpy as np
    from PIL import Image

    from midnight_train.data.crops import crop

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    box = np.array([0.13, 0.21, 0.77, 0.92])
    ref = img.resize((17, 17), Image.Resampling.BICUBIC, box=(0.13 * 40, 0.21 * 40, 0.77 * 40, 0.92 * 40))
    for hflip in (False, True):
        for rot in range(4):
            want = np.asarray(ref.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if hflip else ref)
            want = np.asarray(Image.fromarray(want).rotate(90 * rot, expand=True)) if rot else want
            out = np.zeros((2, 17, 17, 3), dtype=np.uint8)
            crop(img, box, 17, hflip, rot, out=out[1])
            assert np.array_equal(out[1], want) and not out[0].any()
            assert np.array_equal(crop(img, box, 17, hflip, rot), want)
    with pytest.raises(ValueError, match="C-contiguous"):
        crop(img, box, 17, False, 0, out=np.zeros((3, 17, 17), dtype=np.uint8).transpose(1, 2, 0))


def test_warns_about_mixed_tile_sizes_and_a_dataset_smaller_than_a_batch(tmp_path, cmu_slide, caplog):
    """Crops are fractions of the tile, so 64 px and 32 px tiles in one stream mean two fields of
    view; and a dataset smaller than one global batch repeats tiles in every batch. Both are
    accepted, but said."""
    shardkit.make_shards(tmp_path / "shards", cmu_slide, n_shards=1, per_shard=3, tile_size=64, prefix="a")
    shardkit.make_shards(tmp_path / "shards", cmu_slide, n_shards=1, per_shard=3, tile_size=32, prefix="b")
    with caplog.at_level("WARNING", logger="midnight_train.data.loader"):
        take(make_loader(cfg(str(tmp_path / "shards"), num_workers=0), seed=0, rank=0, world_size=1), 2)
    assert "tiles of different sizes" in caplog.text and "fewer than one global batch" not in caplog.text
    paths = sorted((tmp_path / "shards").glob("*.tar"))
    shardkit.write_manifest(tmp_path, 0, paths[:1], [3])
    caplog.clear()
    with caplog.at_level("WARNING", logger="midnight_train.data.loader"):
        take(make_loader(cfg(str(tmp_path), num_workers=0), seed=0, rank=0, world_size=1), 1)
    assert "has 3 samples, fewer than one global batch (4 × 1 processes)" in caplog.text
    assert "tiles of different sizes" not in caplog.text
