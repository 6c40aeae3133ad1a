"""The one reader of the shard format (`midnight_prep.shards.read_shard`): streams local files
and fsspec URLs, keeps what comes before damage, and tells an unopenable shard apart."""

from __future__ import annotations

import io
import tarfile

import fsspec
import pytest
import shardkit

from midnight_prep.shards import ShardOpenError, iter_tiles, read_shard


@pytest.fixture(scope="module")
def shard(tmp_path_factory, cmu_slide):
    out = tmp_path_factory.mktemp("reader")
    return shardkit.make_shards(out, cmu_slide, n_shards=1, per_shard=6, tile_size=32)[0]


def plain_tarfile_samples(path) -> list[tuple[str, dict[str, bytes]]]:
    """An independent reading with tarfile's random-access mode, grouped by key."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return list(samples.items())


def test_reads_local_and_fsspec_urls_identically(shard):
    want = plain_tarfile_samples(shard)
    assert len(want) == 6 and all(set(files) == {"jpg", "json"} for _, files in want)
    assert list(read_shard(str(shard))) == want
    fsspec.filesystem("memory").pipe("/reader/s.tar", shard.read_bytes())
    assert list(read_shard("memory://reader/s.tar")) == want
    tiles = list(iter_tiles("memory://reader/s.tar"))
    assert [k for k, _, _ in tiles] == [k for k, _ in want]
    assert all(meta["tile_size"] == 32 for _, _, meta in tiles)


def test_damage_keeps_the_samples_before_it(shard, tmp_path):
    damaged = tmp_path / "cut.tar"
    damaged.write_bytes(shard.read_bytes())
    shardkit.truncate(damaged, 0.5)
    got = []
    with pytest.raises(Exception) as err:
        for sample in read_shard(str(damaged)):
            got.append(sample)
    assert not isinstance(err.value, ShardOpenError)
    want = plain_tarfile_samples(shard)
    assert 1 <= len(got) < 6 and got == want[: len(got)]


def test_missing_shard_is_an_open_error(tmp_path):
    with pytest.raises(ShardOpenError, match="nothing.tar"):
        list(read_shard(str(tmp_path / "nothing.tar")))


def test_repeated_member_is_dropped_and_reported(tmp_path):
    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.jpg", b"1"), ("a.json", b"{}"), ("a.jpg", b"2"), ("b.jpg", b"3"),
                           ("dir/c.x.y", b"4")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    reported: list[str] = []
    got = list(read_shard(str(path), on_duplicate=reported.append))
    assert got == [("a", {"jpg": b"1", "json": b"{}"}), ("b", {"jpg": b"3"}), ("dir/c", {"x.y": b"4"})]
    assert len(reported) == 1 and "a.jpg" in reported[0]
    with pytest.raises(ValueError, match="repeats"):
        list(read_shard(str(path)))
