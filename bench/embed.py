"""Embedding throughput: `midnight-train embed`'s Embedder vs a straightforward per-image loop,
same exported model, same real tissue tiles (256 px JPEG in shards, resized to 224), one run.

Run:  .venv/bin/python bench/embed.py [--model tiny|small|base] [--tiles 192] [--repeats 3]

Rows (medians of the repeats, tiles/s by the wall clock):
- per-image loop: decode a JPEG, resize, normalise, model(x[None]) — one tile at a time;
- Embedder, batch 64, no workers: the same work with the model batched;
- Embedder, batch 64, 1 worker: decode/resize in a DataLoader worker beside the model (2 cores).
Torch uses one thread in every row, so the first two rows are one core each.
On a GPU (`--device cuda`), bf16 autocast as `embed` runs it.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import shardkit  # noqa: E402
import timm  # noqa: E402

from midnight_prep.samples import cmu_small_region  # noqa: E402
from midnight_prep.shards import iter_tiles  # noqa: E402
from midnight_prep.versions import pil_flavour  # noqa: E402
from midnight_train.data.crops import decode_tile  # noqa: E402
from midnight_train.outputs.embed import Embedder, to_tensor  # noqa: E402
from midnight_train.outputs.export import save_model_folder  # noqa: E402

# name: (timm architecture, its size); "tiny" is the demo's model, where per-tile overhead counts
MODELS = {"tiny": ("vit_small_patch14_dinov2", dict(embed_dim=64, depth=2, num_heads=2)),
          "small": ("vit_small_patch14_dinov2", dict(embed_dim=384, depth=12, num_heads=6)),
          "base": ("vit_base_patch14_dinov2", dict(embed_dim=768, depth=12, num_heads=12))}


def write_export(model_name: str, path: Path) -> Path:
    """A randomly initialised backbone as an export folder."""
    arch, size = MODELS[model_name]
    kwargs = {"img_size": 224, "num_classes": 0, **size}
    model = timm.create_model(arch, pretrained=False, **kwargs)
    return save_model_folder(path, model.state_dict(), arch, kwargs, [0.5] * 3, [0.5] * 3,
                             which="random init", step=0, config={})


def per_image(embedder: Embedder, jpegs: list[bytes]) -> np.ndarray:
    out = []
    for jpg in jpegs:
        x = to_tensor(decode_tile(jpg), embedder.size, embedder.mean, embedder.std)
        out.append(embedder.embed_batch(x[None]))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", choices=sorted(MODELS))
    parser.add_argument("--tiles", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    shards = shardkit.make_shards(tmp / "shards", cmu_small_region(), n_shards=4,
                                  per_shard=args.tiles // 4, tile_size=256)
    jpegs = [jpg for p in shards for _k, jpg, _m in iter_tiles(str(p))]
    weights = write_export(args.model, tmp / "model")
    rows = {"per-image loop (1 core)": [], "Embedder, batch 64, no workers (1 core)": [],
            "Embedder, batch 64, 1 worker (2 cores)": []}
    reference = None
    for _ in range(args.repeats):
        for name in rows:
            if name.startswith("per-image"):
                embedder = Embedder(weights, device=args.device)
                start = time.perf_counter()
                got = per_image(embedder, jpegs)
            else:
                workers = 1 if "1 worker" in name else 0
                embedder = Embedder(weights, batch_size=64, num_workers=workers, device=args.device)
                start = time.perf_counter()
                _keys, got, _meta = embedder([str(p) for p in shards], print)
            rows[name].append(len(jpegs) / (time.perf_counter() - start))
            if reference is None:
                reference = got
            elif not np.allclose(got, reference, atol=2e-3 if args.device == "cuda" else 1e-4):
                raise SystemExit(f"{name}: embeddings differ from the per-image loop's")
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"\n{platform.processor() or platform.machine()}, CPU capability {cpu}, torch "
          f"{torch.__version__}, 1 torch thread, {pil_flavour()[0]}, model {args.model} "
          f"({MODELS[args.model][0]}, {MODELS[args.model][1]}) at 224 px, "
          f"{len(jpegs)} tiles of 256 px, device {args.device}, {args.repeats} repeats\n")
    base = statistics.median(rows["per-image loop (1 core)"])
    print("| embedding | tiles/s (median) | vs per-image loop |")
    print("|---|---:|---:|")
    for name, rates in rows.items():
        rate = statistics.median(rates)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
