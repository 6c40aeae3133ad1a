"""Loader benchmark: our pipeline vs a DINOv2-style per-image reference, same shards, one core.

Run:  .venv/bin/python bench/loader.py [--tiles 256] [--samples 384] [--repeats 5]
      .venv/bin/python bench/loader.py --source slides [--repeats 3]

Measured side by side in one process, single-threaded (samples/s per core):
- ours, CPU side: shard read + JPEG decode + 2 global + N local random-resized crops (+ flips)
  + iBOT masks + collation (`make_loader(num_workers=0)`; DataLoader workers add no work);
- ours, colour side: `ColorAugment` (HED + jitter + grey + blur + solarize + normalise) per batch
  on the CPU, timed separately (it runs on the GPU in training);
- reference: DINOv2's augmentation done per image in PIL/torchvision on the CPU (decode,
  RandomResizedCrop, flip, ColorJitter, RandomGrayscale, GaussianBlur, RandomSolarize,
  ToTensor, Normalize) plus HED per crop with scikit-image (rgb2hed → jitter → hed2rgb);
- HED alone: batched `hed_jitter` on [n, 3, 224, 224] (uint8 and float input; plain torch
  ops, no compilation) vs scikit-image per crop.
With --source slides: online patching (`data.slides`, `midnight_train.data.slide_stream`) next to the
shard loader on shards the builder cut from the same slides, in one run, one core, the same
crops: the real CMU slide (20x) and a TCGA-like synthetic 40x pyramid (bench/prep.py's). Per
slide: shards; online from one slide (its set-up amortised away: the per-tile cost); online
over --links symbolic links to the slide (distinct slides to the sampler, each set up when its
pool slot turns over, masks already in the on-disk cache) with the config's slide_pool and
draws_per_slide, and with slide_pool 1 / draws_per_slide 1 (the paper's independent draw per
tile); and the sampler alone (read + filters, no crops). Each rate gives the CPU cores per GPU
at the paper's ~60 images/s per GPU.
Prints first what runs (torch, threads, the SIMD level torch's CPU kernels dispatch to against
the best the CPU has, PIL or pillow-simd), then markdown tables of medians over the repeats:
per-core rates from the process's CPU time (the figure that matters on a shared machine) and
wall-clock rates alongside. Exits with status 2 before timing anything when a fast path is
missing (torch's kernels below the CPU's SIMD level, e.g. ATEN_CPU_CAPABILITY set; plain
pillow instead of pillow-simd), unless --allow-fallback is given.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from skimage.color import hed2rgb, rgb2hed
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import shardkit  # noqa: E402

from midnight_prep.samples import cmu_small_region  # noqa: E402
from midnight_prep.shards import iter_tiles  # noqa: E402
from midnight_prep.versions import pil_flavour  # noqa: E402
from midnight_train.data.config import DataConfig  # noqa: E402
from midnight_train.data.loader import make_loader  # noqa: E402
from midnight_train.method.augment import (  # noqa: E402
    AugmentConfig,
    ColorAugment,
    hed_jitter,
    sample_hed_params,
)

SIMD_LEVELS = ("DEFAULT", "AVX2", "AVX512")  # torch.backends.cpu.get_cpu_capability() on x86-64


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def best_x86_simd() -> str | None:
    """The widest SIMD level torch could use on this CPU (None off x86-64)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    if torch.cpu._is_avx512_supported():
        return "AVX512"
    return "AVX2" if torch.cpu._is_avx2_supported() else "DEFAULT"


def environment() -> tuple[list[str], list[str]]:
    """(lines saying what runs, problems: fast paths that are missing)."""
    used, best = torch.backends.cpu.get_cpu_capability(), best_x86_simd()
    pil, simd = pil_flavour()
    problems = []
    if best and used in SIMD_LEVELS and SIMD_LEVELS.index(used) < SIMD_LEVELS.index(best):
        forced = os.environ.get("ATEN_CPU_CAPABILITY")
        problems.append(f"torch's CPU kernels run at {used} on a CPU with {best}"
                        + (f" (ATEN_CPU_CAPABILITY={forced} is set: unset it)" if forced else ""))
    if not simd:
        problems.append(f"{pil}: the CPU-side figures in BENCHMARKS.md's first column need "
                        "pillow-simd (the pillow column is for this case)")
    lines = [f"CPU: {cpu_model()} ({platform.machine()}); torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s); torch CPU kernels dispatch to {used}"
             + (f" (CPU's best: {best})" if best else ""),
             f"PIL: {pil}",
             "HED: hed_jitter as plain torch ops (no compilation), the same code as on the GPU"]
    return lines, problems


def median_rates(runs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (items per CPU-second, items per wall-second) of each {name: (fn, n_items)}.
    Everything runs in this one thread (num_workers=0, torch on 1 thread), so CPU time is the
    time of the one core doing the work: on a machine shared with other jobs it is the per-core
    figure, while wall time also counts the time slices other processes took. Rounds interleave
    the contenders so that such load hits all of them alike."""
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (fn, n_items) in runs.items():
            c, t = time.process_time(), time.perf_counter()
            fn()
            rates[name].append((n_items / (time.process_time() - c), n_items / (time.perf_counter() - t)))
    return {name: (statistics.median(x for x, _ in r), statistics.median(y for _, y in r))
            for name, r in rates.items()}


class PilRandomApply:
    """DINOv2-style PIL blur / solarize with the intended probabilities (not 1 − p)."""

    def __init__(self, p: float, fn) -> None:
        self.p, self.fn = p, fn

    def __call__(self, img):
        return self.fn(img) if np.random.random() < self.p else img


def skimage_hed(img: Image.Image, sigma_a: float, sigma_b: float) -> Image.Image:
    rgb = np.asarray(img) / 255.0
    hed = rgb2hed(rgb)
    alpha = np.random.uniform(1 - sigma_a, 1 + sigma_a, 3)
    beta = np.random.uniform(-sigma_b, sigma_b, 3)
    out = hed2rgb(hed * alpha + beta)
    return Image.fromarray((np.clip(out, 0, 1) * 255).astype(np.uint8))


def reference_transforms(g: int, loc: int, aug: AugmentConfig):
    """DINOv2's DataAugmentationDINO, per image, with HED per crop in front of the colour chain."""
    jitter = T.RandomApply([T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue)], p=aug.jitter_p)
    norm = T.Compose([T.ToTensor(), T.Normalize(aug.mean, aug.std)])

    def blur(p):
        return PilRandomApply(p, lambda im: im.filter(ImageFilter.GaussianBlur(np.random.uniform(*aug.blur_sigma))))

    def hed(im):
        return skimage_hed(im, aug.hed_sigma_alpha, aug.hed_sigma_beta)

    geo_g = T.Compose([T.RandomResizedCrop(g, (0.32, 1.0), interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()])
    geo_l = T.Compose([T.RandomResizedCrop(loc, (0.05, 0.32), interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip()])
    colour = T.Compose([hed, jitter, T.RandomGrayscale(aug.grayscale_p)])
    g1 = T.Compose([geo_g, colour, blur(aug.blur_p_global1), norm])
    g2 = T.Compose([geo_g, colour, blur(aug.blur_p_global2),
                    PilRandomApply(aug.solarize_p_global2, lambda im: ImageOps.solarize(im, 128)), norm])
    lo = T.Compose([geo_l, colour, blur(aug.blur_p_local), norm])
    return g1, g2, lo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=256, help="tile size in the shards")
    ap.add_argument("--global-size", type=int, default=224)
    ap.add_argument("--local-size", type=int, default=98)
    ap.add_argument("--n-local", type=int, default=8)
    ap.add_argument("--samples", type=int, default=384, help="samples per timed run (ours)")
    ap.add_argument("--ref-samples", type=int, default=48, help="samples per timed run (reference)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--source", choices=("shards", "slides"), default="shards",
                    help="shards: ours vs the per-image reference (default); slides: online "
                         "patching next to the shard loader")
    ap.add_argument("--slide-pool", type=int, default=DataConfig.slide_pool,
                    help="--source slides: data.slide_pool of the pool rows")
    ap.add_argument("--draws-per-slide", type=int, default=DataConfig.draws_per_slide,
                    help="--source slides: data.draws_per_slide of the pool rows")
    ap.add_argument("--links", type=int, default=64,
                    help="--source slides: links to each slide, seen as distinct slides")
    ap.add_argument("--allow-fallback", action="store_true",
                    help="time anyway when a fast path is missing (the output says which)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-core figures
    lines, problems = environment()
    print("\n".join(lines))
    if problems:
        print("\n".join(f"FAST PATH MISSING: {p}" for p in problems), file=sys.stderr)
        if not args.allow_fallback:
            print("Not timing: these figures would not be comparable with BENCHMARKS.md. Fix the "
                  "above, or pass --allow-fallback to time anyway.", file=sys.stderr)
            sys.exit(2)
    np.random.seed(0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="midnight-bench-") as tmp:
        (run_slides if args.source == "slides" else run)(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    shard_paths = shardkit.make_shards(tmp / "shards", cmu_small_region(), n_shards=4, per_shard=128,
                                       tile_size=args.tiles)
    g, loc, nl, b = args.global_size, args.local_size, args.n_local, args.batch
    cfg = DataConfig(shards=str(tmp / "shards"), batch_size=b, num_workers=0, shuffle_buffer=256,
                     global_crop_size=g, local_crop_size=loc, n_local_crops=nl)
    aug = AugmentConfig()

    # ours, CPU side (decode + geometry + masks + collation), endless loader, one process
    it = iter(make_loader(cfg, seed=0, rank=0, world_size=1))
    next(it)  # warm-up: first block read
    n_batches = max(1, args.samples // b)

    # ours, colour side, per batch on the CPU
    batch = next(it)
    colour = ColorAugment(aug)
    gen = torch.Generator().manual_seed(0)

    # reference: everything per image in PIL/torchvision + skimage HED per crop
    jpgs = [jpg for _key, jpg, _meta in iter_tiles(str(shard_paths[0]))]
    g1, g2, lo = reference_transforms(g, loc, aug)

    def reference():
        for i in range(args.ref_samples):
            img = Image.open(io.BytesIO(jpgs[i % len(jpgs)])).convert("RGB")
            crops = [g1(img), g2(img)] + [lo(img) for _ in range(nl)]
            torch.stack(crops[:2]), torch.stack(crops[2:])


    # HED alone: batched torch vs scikit-image per crop, 224 px crops
    crops_u8 = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(j)).convert("RGB").resize((g, g))))
                            for j in jpgs[:b]]).permute(0, 3, 1, 2).contiguous()
    crops = crops_u8.float() / 255
    alpha, beta = sample_hed_params(b, aug.hed_sigma_alpha, aug.hed_sigma_beta, gen)
    pil_crops = [Image.fromarray((c.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for c in crops[:16]]
    hed_jitter(crops_u8, alpha, beta), hed_jitter(crops, alpha, beta), colour(batch, gen)  # warm-up
    rates = median_rates({
        "ref": (reference, args.ref_samples),
        "ours": (lambda: [next(it) for _ in range(n_batches)], n_batches * b),
        "colour": (lambda: colour(batch, gen), b),
    }, args.repeats)
    # HED: each round times a steady stretch of work per contender (several calls in a row), so
    # that the first call after another contender's large allocations does not dominate.
    calls = 4
    rates |= median_rates({  # more rounds: these are short and the ratio is the headline
        "hed_ref": (lambda: [skimage_hed(c, aug.hed_sigma_alpha, aug.hed_sigma_beta)
                             for _ in range(calls) for c in pil_crops], calls * len(pil_crops)),
        "hed": (lambda: [hed_jitter(crops, alpha, beta) for _ in range(calls)], calls * b),
        "hed_u8": (lambda: [hed_jitter(crops_u8, alpha, beta) for _ in range(calls)], calls * b),
    }, 3 * args.repeats)
    cpu = {k: v[0] for k, v in rates.items()}
    wall = {k: v[1] for k, v in rates.items()}
    ref, ours, colour_rate = cpu["ref"], cpu["ours"], cpu["colour"]

    print(f"\n{torch.get_num_threads()} torch thread; "
          f"tiles {args.tiles} px, crops 2x{g} + {nl}x{loc}, batch {b}, medians of {args.repeats}\n")
    print("samples/s per core = samples per CPU-second of the one thread doing the work; wall-clock "
          "samples/s (includes time other processes took on a shared machine) in the last column\n")
    print("| pipeline (one core) | samples/s per core | vs reference | wall samples/s |")
    print("|---|---:|---:|---:|")
    print(f"| reference: per-image PIL/torchvision + per-crop skimage HED | {ref:.1f} | 1.0x | {wall['ref']:.1f} |")
    print(f"| ours, CPU side: read + decode + {2 + nl} crops + masks + collate | {ours:.1f} | {ours / ref:.1f}x "
          f"| {wall['ours']:.1f} |")
    print(f"| ours, colour side on CPU (HED + DINOv2 colour chain, batched) | {colour_rate:.1f} | "
          f"| {wall['colour']:.1f} |")
    both = 1 / (1 / ours + 1 / colour_rate)
    print(f"| ours, both sides on one CPU core | {both:.1f} | {both / ref:.1f}x | |")
    print("\n| HED on 224 px crops (one core) | crops/s per core | ratio | wall crops/s |")
    print("|---|---:|---:|---:|")
    print(f"| scikit-image rgb2hed → jitter → hed2rgb, per crop (uint8 in/out) | {cpu['hed_ref']:.1f} | 1.0x "
          f"| {wall['hed_ref']:.1f} |")
    for key, what in (("hed", "float32 input"), ("hed_u8", "uint8 input: what ColorAugment runs")):
        print(f"| `hed_jitter`, batched torch (batch {b}), {what} | {cpu[key]:.1f} | "
              f"{cpu[key] / cpu['hed_ref']:.1f}x | {wall[key]:.1f} |")
    print(f"\nHED medians of {3 * args.repeats} rounds of {calls} batches (scikit-image: {calls} × "
          f"{len(pil_crops)} crops) each.")


def take(it, n: int) -> list:
    return [next(it) for _ in range(n)]


GPU_IMAGES_PER_S = 60  # the paper's ViT-g/14 rate per GPU (BENCHMARKS.md, GPU targets)
SLIDE_TARGET = 150  # samples/s per core, reads included (issue 11)


def run_slides(args: argparse.Namespace, tmp: Path) -> None:
    """Online patching vs shards cut from the same slides (see the module docstring)."""
    from prep import big_pyramid

    from midnight_prep.job import run_job
    from midnight_prep.plan import BuildParams, make_plan
    from midnight_prep.slides import Slide
    from midnight_train.data.open_slides import MaskStore
    from midnight_train.data.slide_stream import tile_sampler

    slides = {"CMU-1-Small-Region (real, 20x, 1 level)": cmu_small_region(),
              "synthetic 40x 16k x 12k (levels 1/4/16)": big_pyramid()}
    params = BuildParams(tile_size=args.tiles)
    b = args.batch
    crops = dict(batch_size=b, num_workers=0, global_crop_size=args.global_size,
                 local_crop_size=args.local_size, n_local_crops=args.n_local)
    tiles = {"tile_size": args.tiles}
    print(f"online patching: {args.links} links per slide; pool rows: slide_pool "
          f"{args.slide_pool}, draws_per_slide {args.draws_per_slide}; independent rows: 1, 1; "
          f"tissue masks in a warm mask_cache_dir; tiles {args.tiles} px at "
          f"{', '.join(f'{m:g}' for m in params.mpps)} µm/px")
    n_batches = max(1, args.samples // b)
    n_slow = max(1, n_batches // 4)  # batches per run of the slow independent-draw row
    table = []
    for name, path in slides.items():
        d = tmp / path.stem
        out = d / "shards-out"  # the builder's shards of this slide (tiles_per_slide 512)
        plan = make_plan([str(path)], str(out), params, tiles_per_slide=512)
        for job in plan.jobs:
            run_job(job, params, str(out), plan.sha256())
        links = []
        for i in range(args.links):
            link = d / f"{path.stem}-{i:03d}{path.suffix}"
            link.symlink_to(path)
            links.append(str(link))
        mask_dir = str(d / "masks")
        masks = MaskStore(mask_dir)
        for link in links:  # warm cache: as after the first visit of each slide on a node
            with Slide(link) as slide:
                masks.get(link, slide, params)
        configs = {
            "shards": DataConfig(shards=str(out), shuffle_buffer=256, **crops),
            "one slide": DataConfig(slides=str(path), tiles=tiles, mask_cache_dir=mask_dir, **crops),
            "pool": DataConfig(slides=links, tiles=tiles, mask_cache_dir=mask_dir,
                               slide_pool=args.slide_pool, draws_per_slide=args.draws_per_slide, **crops),
            "independent": DataConfig(slides=links, tiles=tiles, mask_cache_dir=mask_dir,
                                      slide_pool=1, draws_per_slide=1, **crops),
        }
        iters = {}
        for key, cfg in configs.items():
            iters[key] = iter(make_loader(cfg, seed=0, rank=0, world_size=1))
            next(iters[key])  # warm-up: first block / first slides

        sampler = tile_sampler(configs["pool"], seed=1)
        take(iter(sampler.draw, None), b)  # warm-up, as a loader's first batch
        runs = {key: (partial(take, iters[key], n_batches), n_batches * b)
                for key in ("shards", "one slide", "pool")}
        runs["independent"] = (partial(take, iters["independent"], n_slow), n_slow * b)
        runs["sampler"] = (lambda s=sampler: [s.draw() for _ in range(n_batches * b)], n_batches * b)
        rates = median_rates(runs, args.repeats)
        sampler.close()
        table.append((name, rates))

    what = {
        "shards": "shards (builder's, same slide): read + decode + crops",
        "one slide": "online, one slide: read + filters + crops",
        "pool": f"online, {args.links} slides, pool {args.slide_pool} x {args.draws_per_slide} draws: read + filters + crops",
        "independent": f"online, {args.links} slides, pool 1 x 1 draw (a slide set-up per tile) + crops",
        "sampler": f"online sampler alone (pool {args.slide_pool} x {args.draws_per_slide}): read + filters, no crops",
    }
    print(f"\n{torch.get_num_threads()} torch thread; tiles {args.tiles} px, crops 2x{args.global_size} + "
          f"{args.n_local}x{args.local_size}, batch {b}, medians of {args.repeats}; samples/s per core = "
          f"samples per CPU-second of the one thread doing the work (num_workers=0)\n")
    print(f"| slide | loader | samples/s per core | vs shards | wall samples/s | CPU cores per GPU at "
          f"{GPU_IMAGES_PER_S} images/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, rates in table:
        shards = rates["shards"][0]
        for key, (cpu, wall) in rates.items():
            print(f"| {name} | {what[key]} | {cpu:.1f} | {cpu / shards:.2f}x | {wall:.1f} | "
                  f"{GPU_IMAGES_PER_S / cpu:.2f} |")
    pool = [rates["pool"][0] for _, rates in table]
    print(f"\ntarget (issue 11): >= {SLIDE_TARGET} samples/s per core with reads (pool rows): "
          + ", ".join(f"{r:.0f}" for r in pool) + (" - met" if min(pool) >= SLIDE_TARGET else " - MISSED"))


if __name__ == "__main__":
    main()
