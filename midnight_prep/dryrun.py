"""`midnight-prep plan --dry-run`: check a whole recipe on its slide list (or a stand-in list)
before anything runs: every slide is there and readable, its µm/px is known (the header is
opened, no pixel is read) and it can give each magnification asked, and the output storage
takes a write (a small probe object, deleted again). What fails is listed; nothing else is
written."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import fsspec

from .plan import Plan
from .shards import PLAN_NAME, is_local, join, local_path, read_json
from .slides import Slide, SlideError
from .storage import storage_message


def _check_local_slide(spec, plan: Plan, problems: list[str], notes: list[str]) -> None:
    path = local_path(spec.path)
    if not os.path.exists(path):
        problems.append(f"slide {spec.slide_id}: file not found: {spec.path}")
        return
    if not os.access(path, os.R_OK):
        problems.append(f"slide {spec.slide_id}: not readable (permissions): {spec.path}")
        return
    try:
        with Slide(path, mpp_override=spec.mpp, fast=False) as slide:
            for mpp in plan.params.mpps:
                if spec.quotas.get(f"{mpp:g}", 0) and slide.level_for(mpp, plan.params.mpp_tolerance) is None:
                    notes.append(f"slide {spec.slide_id}: finest level is {slide.mpp:.3g} µm/px, so its "
                                 f"{spec.quotas[f'{mpp:g}']} tiles at {mpp:g} µm/px will be skipped")
    except SlideError as e:
        problems.append(f"slide {spec.slide_id} ({spec.path}): {e}")


def check_slides(plan: Plan) -> tuple[list[str], list[str]]:
    """(problems, notes) of the plan's slides. Remote slides are looked up (present, sized);
    their µm/px is read when `run` stages them, since OpenSlide needs a local file."""
    problems: list[str] = []
    notes: list[str] = []
    remote = 0
    for spec in plan.slides:
        if is_local(spec.path):
            _check_local_slide(spec, plan, problems, notes)
            continue
        remote += 1
        fs, path = fsspec.core.url_to_fs(spec.path)
        try:
            fs.info(path)
        except FileNotFoundError:
            problems.append(f"slide {spec.slide_id}: not found: {spec.path}")
        except Exception as e:  # storage down, refused credentials: the storage message says what to check
            problems.append(f"slide {spec.slide_id}: {storage_message(spec.path, e)}")
    if remote:
        notes.append(f"{remote} slide(s) on object storage were looked up but not opened: their µm/px "
                     "is read when `run` stages them (OpenSlide needs a local copy)")
    return problems, notes


def check_output(plan: Plan) -> tuple[list[str], list[str]]:
    """(problems, notes) of the output: writable (a probe object is written, read back and
    deleted), and not holding another plan."""
    problems: list[str] = []
    notes: list[str] = []
    probe = join(plan.output, f".midnight-probe-{secrets.token_hex(6)}")
    made: list[Path] = []
    try:
        if is_local(probe):  # folders the probe needs, removed again afterwards
            parent = Path(local_path(probe)).parent
            while not parent.exists():
                made.append(parent)
                parent = parent.parent
            Path(local_path(probe)).parent.mkdir(parents=True, exist_ok=True)
        fs, path = fsspec.core.url_to_fs(probe)
        if not is_local(probe):  # some servers make a missing bucket on a write: never do that
            bucket = path.split("/", 1)[0]
            try:
                fs.info(bucket)
            except FileNotFoundError:
                raise FileNotFoundError(f"there is no bucket {bucket!r}") from None
        fs.pipe_file(path, b"midnight-prep dry run\n")
        try:
            if fs.cat_file(path) != b"midnight-prep dry run\n":
                problems.append(f"output {plan.output}: a probe object read back differently")
        finally:  # written means removed, even when reading it back fails (write-only keys)
            fs.rm_file(path)
    except Exception as e:
        problems.append(f"output: {storage_message(probe, e, 'write')}")
    finally:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                pass
    if not problems:
        try:
            there = Plan.from_dict(read_json(join(plan.output, PLAN_NAME)))
        except FileNotFoundError:
            there = None
        except Exception as e:
            problems.append(f"output: {join(plan.output, PLAN_NAME)} cannot be read: {e}")
            there = None
        if there is not None:
            same = there.sha256() == plan.sha256()
            (notes if same else problems).append(
                f"output {plan.output} already holds " + ("this plan: `run` continues it" if same else
                                                          "a different plan: use a new --output"))
    return problems, notes


def dry_run(plan: Plan) -> dict:
    slide_problems, slide_notes = check_slides(plan)
    out_problems, out_notes = check_output(plan)
    return {"problems": slide_problems + out_problems, "notes": slide_notes + out_notes,
            "slides_checked": len(plan.slides)}
