"""TCGA slide list for `midnight-prep` from a GDC manifest: FFPE diagnostic slides only.

    python examples/tcga-100M/gdc_slides.py gdc_manifest.txt --root /data/tcga > slides.csv
    python examples/tcga-100M/gdc_slides.py gdc_manifest.txt --root s3://bucket/tcga > slides.csv

The GDC manifest (from the GDC portal's "Manifest" button or the API) is tab-separated with the
columns id, filename, md5, size (and state). gdc-client downloads file `id` to
`ROOT/id/filename`; that is the path written. The Midnight paper trains on TCGA's FFPE
slides: their barcodes carry the slide type `DX` (diagnostic, formalin-fixed and
paraffin-embedded), e.g. `TCGA-A1-A0SB-01Z-00-DX1.<uuid>.svs`; frozen-section slides carry
`TS`, `BS` or `MS` (top, bottom, middle slide) and are left out. The cancer project (e.g.
`BRCA`) goes into the `group` column when the manifest has a `project` column; otherwise the
group is `tcga`.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys

# TCGA-{TSS}-{participant}-{sample}{vial}-{portion}-{slide type}{order}: DX = FFPE diagnostic
SLIDE_BARCODE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}[A-Z]-\d{2}-(DX|TS|BS|MS)[0-9A-Z]*)\.")


def ffpe_rows(manifest: list[dict[str, str]], root: str) -> tuple[list[dict[str, str]], dict[str, int]]:
    """(slide rows for midnight-prep, counts of what was kept and left out by reason)."""
    rows, counts = [], {"ffpe": 0, "frozen": 0, "not_a_slide": 0}
    for entry in manifest:
        name = entry["filename"]
        match = SLIDE_BARCODE.match(name)
        if not name.lower().endswith(".svs") or match is None:
            counts["not_a_slide"] += 1
            continue
        if match.group(2) != "DX":
            counts["frozen"] += 1
            continue
        counts["ffpe"] += 1
        rows.append({"path": f"{root.rstrip('/')}/{entry['id']}/{name}",
                     "slide_id": f"{match.group(1)}-{entry['id'][:8]}",
                     "group": (entry.get("project") or "tcga").removeprefix("TCGA-").lower()})
    return rows, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("manifest", help="GDC manifest (tab-separated: id, filename, md5, size)")
    parser.add_argument("--root", required=True, help="where gdc-client put the files (ROOT/id/filename)")
    args = parser.parse_args()
    with open(args.manifest, newline="") as f:
        manifest = list(csv.DictReader(f, delimiter="\t"))
    if not manifest or not {"id", "filename"} <= set(manifest[0]):
        sys.exit(f"{args.manifest}: not a GDC manifest (needs tab-separated id and filename columns)")
    rows, counts = ffpe_rows(manifest, args.root)
    writer = csv.DictWriter(sys.stdout, fieldnames=["path", "slide_id", "group"])
    writer.writeheader()
    writer.writerows(rows)
    print(f"kept {counts['ffpe']} FFPE diagnostic slides; left out {counts['frozen']} frozen "
          f"sections and {counts['not_a_slide']} other files", file=sys.stderr)


if __name__ == "__main__":
    main()
