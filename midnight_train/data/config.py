"""The `data:` section of the training config: which source (shards, or slides drawn online),
how batches are cut from it, and the checks a config must pass before a run starts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from midnight_prep.plan import BuildParams, PlanError

# The keys of `data.tiles` (the rest of BuildParams is about writing shards).
TILE_KEYS = ("mpps", "tile_size", "foreground", "hsv_min_fraction", "mpp_tolerance")


@dataclass
class DataConfig:
    """The `data:` section of the training config (plain YAML types; lists work for pairs)."""

    shards: str | list[str] | None = None
    # online patching (midnight_train.data.slide_stream): slides, directories or CSV slide lists,
    # exactly the inputs midnight-prep accepts
    slides: str | list[str] | None = None
    datasets: list[dict[str, Any]] | None = None
    # slide sources: mpps, tile_size, foreground, hsv_min_fraction, mpp_tolerance, checked and
    # defaulted as midnight-prep's (midnight_prep.plan.BuildParams)
    tiles: dict[str, Any] | None = None
    slide_pool: int = 16  # slides a stream draws from at once (per dataset)
    draws_per_slide: int = 64  # tiles drawn from a pool slide, on average, before it is replaced
    # "uniform" over a dataset's slides, or "tissue": in proportion to each slide's tissue area
    # (areas above tissue_mm2_cap count as the cap; a lower cap opens fewer slides to choose one)
    slide_weighting: str = "uniform"
    tissue_mm2_cap: float = 1000.0
    mask_cache_dir: str | None = None  # tissue masks kept on disk, shared by a node's workers
    # decoded slide tiles kept per loader process, over all its open slides (README: host memory)
    tile_cache_mb: float = 128.0
    # s3:// (remote) slides are staged here for OpenSlide; the limit must hold every slide open
    # at once: processes x num_workers x slide_pool x datasets x the largest slide
    stage_dir: str | None = None
    stage_max_gb: float | None = None  # default: 50 GB or half the free disk, if less
    batch_size: int = 64  # per process
    num_workers: int = 4
    shuffle_buffer: int = 1000  # records shuffled together (one block); memory ≈ this × JPEG size
    shard_interleave: int = 4  # shards a stream reads from at once
    prefetch_factor: int = 2
    # batches in page-locked memory, so the trainer's non_blocking copy to the GPU overlaps
    # compute (null: on when CUDA is available)
    pin_memory: bool | None = None
    timeout_s: float = 600.0  # a worker silent for this long is an error, not a hang
    # storage down this long stops the run; below timeout_s (default: half of it)
    read_retry_s: float | None = None
    global_crop_size: int = 224
    global_crop_scale: tuple[float, float] | list[float] = (0.32, 1.0)
    n_local_crops: int = 8
    local_crop_size: int = 98
    local_crop_scale: tuple[float, float] | list[float] = (0.05, 0.32)
    crop_ratio: tuple[float, float] | list[float] = (3 / 4, 4 / 3)
    hflip: bool = True
    vflip_rot90: bool = False  # all 8 flips/rotations (pathology has no canonical orientation)
    patch_size: int = 14
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] | list[float] = (0.1, 0.5)
    mask_max_fraction: float = 0.5
    mask_min_patches: int = 4

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.shards, self.slides, self.datasets)) != 1:
            raise ValueError("data: give exactly one of `shards`, `slides` or `datasets`")
        for name in ("global_crop_scale", "local_crop_scale", "crop_ratio", "mask_ratio_min_max"):
            pair = getattr(self, name)
            if len(pair) != 2 or not pair[0] <= pair[1]:
                raise ValueError(f"data.{name} must be [low, high], got {pair!r}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError("data: batch_size ≥ 1, num_workers ≥ 0 and shuffle_buffer ≥ 1 required")
        if self.read_retry_s is None:
            self.read_retry_s = self.timeout_s / 2
        if not 0 <= self.read_retry_s < self.timeout_s:
            raise ValueError(f"data.read_retry_s ({self.read_retry_s:g}) must be ≥ 0 and below "
                             f"data.timeout_s ({self.timeout_s:g}), or a worker waiting for "
                             f"storage is taken for a hung one")
        kinds = set()
        for spec in self.dataset_specs():
            unknown = set(spec) - {"shards", "slides", "weight", "group", "name"}
            kind = [k for k in ("shards", "slides") if spec.get(k) is not None]
            if unknown or len(kind) != 1 or float(spec.get("weight", 1.0)) <= 0:
                raise ValueError(f"data.datasets entry {spec!r}: needs one of `shards` or "
                                 f"`slides`, a weight > 0, and only shards/slides/weight/group/name")
            kinds.update(kind)
        if len(kinds) > 1:
            raise ValueError("data.datasets: shard and slide datasets cannot be mixed in one run; "
                             "build shards of the slides (midnight-prep) or use slides for all")
        if self.source_kind() == "slides":
            self.tile_params()
            if self.slide_pool < 1 or self.draws_per_slide < 1:
                raise ValueError("data: slide_pool and draws_per_slide must be >= 1")
            if self.slide_weighting not in ("uniform", "tissue") or not self.tissue_mm2_cap > 0:
                raise ValueError(f"data.slide_weighting must be uniform or tissue (got "
                                 f"{self.slide_weighting!r}) and data.tissue_mm2_cap > 0")
            if self.stage_max_gb is not None and not self.stage_max_gb > 0:
                raise ValueError(f"data.stage_max_gb must be > 0, got {self.stage_max_gb!r}")
        elif self.tiles is not None:
            raise ValueError("data.tiles applies to slide sources (data.slides) only: shards "
                             "carry the tiles they were built with")

    def dataset_specs(self) -> list[dict[str, Any]]:
        if self.datasets is None:
            kind = "shards" if self.shards is not None else "slides"
            return [{kind: getattr(self, kind), "weight": 1.0, "group": None, "name": "default"}]
        return [dict(d) for d in self.datasets]

    def source_kind(self) -> str:
        """"shards" or "slides" (online patching)."""
        return "slides" if any(s.get("slides") is not None for s in self.dataset_specs()) else "shards"

    def tile_params(self) -> BuildParams:
        """The tile parameters of a slide source, validated and defaulted by midnight-prep's
        own rules (the same tiles as the shard builder's)."""
        if not isinstance(self.tiles, (dict, type(None))):
            raise ValueError(f"data.tiles must be a mapping such as {{tile_size: 256}}, got {self.tiles!r}")
        tiles = dict(self.tiles or {})
        unknown = sorted(set(tiles) - set(TILE_KEYS))
        if unknown:
            raise ValueError(f"unknown config key(s) {', '.join('data.tiles.' + k for k in unknown)}; "
                             f"known keys in data.tiles: {', '.join(TILE_KEYS)}")
        if "mpps" in tiles:
            mpps = tiles["mpps"] if isinstance(tiles["mpps"], (list, tuple)) else [tiles["mpps"]]
            tiles["mpps"] = tuple(float(m) if type(m) is int else m for m in mpps)
        try:
            return BuildParams(**tiles)
        except PlanError as err:  # the builder names its command-line options
            message = str(err)
            for option, key in (("--mpp", "mpps"), ("--tile-size", "tile_size"),
                                ("--foreground", "foreground"),
                                ("--hsv-min-fraction", "hsv_min_fraction"), (" (plan.json)", "")):
                message = message.replace(option, key)
            raise ValueError(f"data.tiles: {message}") from None


class DataError(RuntimeError):
    """The data cannot give batches (no readable sample, every slide unusable): one line for
    the user. Raised in a DataLoader worker, torch re-raises it with that worker's traceback."""
