"""Which jobs of a plan are done, read from the output (local path or fsspec URL).

A job is done when its manifest (written last, the commit marker) belongs to this plan and every
shard it lists is there with the recorded size (and, when asked, the recorded sha256). The
manifest records the plan's hash (`Plan.sha256`), and its `slides` list the job's slides. A
manifest of another plan (other slides or options, or written before plans were recorded) is
"foreign": never taken as done, never mixed into this plan's output. A job whose manifest cannot
be read, or whose shards are missing, truncated or changed, is "damaged": `build`/`run` redo it.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

import fsspec

from .shards import MANIFEST_DIR, SHARD_DIR, join, manifest_name

# What every slide entry of a manifest holds (job.SlideReport), read by the summaries.
SLIDE_FIELDS = {"slide_id", "source", "status", "error", "asked", "written", "rejected", "skipped_mpps"}

# Up to this many shards are looked up one by one; more are sized from one listing of shards/.
LOOKUPS = 200


@dataclass
class JobState:
    job_id: str
    kind: str  # done | left | damaged | foreign
    manifest: dict | None = None
    why: str = ""  # for damaged and foreign: what is wrong

    @property
    def failed_slides(self) -> list[dict]:
        if self.manifest is None:
            return []
        return [s for s in self.manifest["slides"] if s.get("status") == "failed"]


def _slide_ids(manifest: dict) -> str:
    ids = [str(s.get("slide_id")) for s in manifest.get("slides", [])]
    return ", ".join(ids[:4]) + (f" and {len(ids) - 4} more" if len(ids) > 4 else "")


def _judge(job_id: str, blob: bytes, plan_sha256: str) -> JobState:
    """The manifest's own verdict (shards not looked at yet)."""
    try:
        manifest = json.loads(blob)
        int(manifest["samples"])
        for shard in manifest["shards"]:
            if not (isinstance(shard["name"], str) and isinstance(shard["sha256"], str)):
                raise TypeError("a shard entry's name and sha256 must be text")
            int(shard["bytes"])
        for slide in manifest["slides"]:
            missing = SLIDE_FIELDS - slide.keys()
            if missing:
                raise KeyError(f"a slide entry lacks {sorted(missing)}")
    except (ValueError, KeyError, TypeError) as e:
        return JobState(job_id, "damaged", None, f"its manifest cannot be read ({type(e).__name__}: {e})")
    theirs = manifest.get("plan_sha256")
    if theirs is None:
        why = "was written by an older midnight-prep that did not record its plan"
    elif theirs != plan_sha256:
        why = f"belongs to another plan ({theirs[:12]}, slides {_slide_ids(manifest)})"
    elif manifest.get("job_id") != job_id:
        why = f"names job {manifest.get('job_id')!r}"
    else:
        return JobState(job_id, "done", manifest)
    return JobState(job_id, "foreign", manifest, why)


def _sizes(fs, base: str, names: list[str]) -> dict[str, int]:
    """name -> size in bytes of the shards ``names`` that exist."""
    if len(names) <= LOOKUPS:
        sizes = {}
        for name in names:
            try:
                sizes[name] = int(fs.info(posixpath.join(base, name))["size"])
            except (FileNotFoundError, NotADirectoryError):
                pass
        return sizes
    try:
        listing = fs.ls(posixpath.join(base, SHARD_DIR), detail=True)
    except FileNotFoundError:
        return {}
    return {f"{SHARD_DIR}/{posixpath.basename(e['name'])}": int(e["size"]) for e in listing}


def _sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_shards(fs, base: str, state: JobState, sizes: dict[str, int], verify: bool) -> JobState:
    for entry in state.manifest["shards"]:
        name, size = entry["name"], int(entry["bytes"])
        if name not in sizes:
            problem = f"shard {name} is missing"
        elif sizes[name] != size:
            problem = f"shard {name} has {sizes[name]} bytes, its manifest says {size} (truncated?)"
        elif verify and _sha256(fs, posixpath.join(base, name)) != entry["sha256"]:
            problem = f"shard {name} does not match the sha256 in its manifest"
        else:
            continue
        return JobState(state.job_id, "damaged", state.manifest, problem)
    return state


def check_jobs(output: str, plan_sha256: str, job_ids: list[str],
               verify: bool = False) -> dict[str, JobState]:
    """job_id -> JobState for ``job_ids``, reading only their manifests (a SLURM task reads its
    own jobs, not the whole output) and sizing their shards; ``verify`` also reads every shard
    to compare its sha256. Storage errors other than a missing file propagate."""
    fs, base = fsspec.core.url_to_fs(output)
    fs.invalidate_cache()
    paths = {job_id: posixpath.join(base, manifest_name(job_id)) for job_id in job_ids}
    blobs = fs.cat(list(paths.values()), on_error="return") if paths else {}
    states = {}
    for job_id, path in paths.items():
        blob = blobs.get(path, FileNotFoundError(path))
        if isinstance(blob, (FileNotFoundError, NotADirectoryError)):  # no manifest there
            states[job_id] = JobState(job_id, "left")
        elif isinstance(blob, BaseException):
            raise blob
        else:
            states[job_id] = _judge(job_id, blob, plan_sha256)
    done = [s for s in states.values() if s.kind == "done"]
    sizes = _sizes(fs, base, [e["name"] for s in done for e in s.manifest["shards"]])
    for state in done:
        states[state.job_id] = _check_shards(fs, base, state, sizes, verify)
    return states


def other_manifests(output: str, job_ids: set[str]) -> list[str]:
    """Manifest files under ``output`` that name no job of the plan (left by another plan): a
    trainer reading the output would take their shards too."""
    fs, base = fsspec.core.url_to_fs(join(output, MANIFEST_DIR))
    fs.invalidate_cache()
    if not fs.exists(base):
        return []
    names = [posixpath.basename(p) for p in fs.ls(base, detail=False)]
    return sorted(f"{MANIFEST_DIR}/{n}" for n in names
                  if n.endswith(".json") and n[:-len(".json")] not in job_ids)


def foreign_message(output: str, states: list[JobState], others: list[str]) -> str:
    """The refusal: which manifests do not belong to the plan, and what to do."""
    lines = [f"{output} holds results that do not belong to this plan, so nothing was run:"]
    lines += [f"  {manifest_name(s.job_id)} {s.why}" for s in states[:5]]
    if len(states) > 5:
        lines.append(f"  ... and {len(states) - 5} more")
    if others:
        lines.append(f"  {len(others)} manifests name jobs this plan does not have (first: {others[0]})")
    lines.append(f"Use a new --output, or delete {join(output, 'manifests')} and "
                 f"{join(output, 'shards')} to start that output afresh.")
    return "\n".join(lines)
