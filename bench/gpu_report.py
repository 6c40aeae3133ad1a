"""The table of ``bench/gpu_check.py``'s results (``gpu_check.md``, for BENCHMARKS.md): one row
per measurement, each target's verdict in the notes, a failed check's last stderr line, and a
check that was still running when the run stopped."""

from __future__ import annotations

TARGETS = {"vitg_mfu": 0.40, "vitg_images_per_s": 60.0, "vitg_peak_gib": 80.0,
           "augment_share": 0.05, "data_wait_share": 0.05}


def verdict(value, target, higher: bool) -> str:
    if value is None:
        return "-"
    return "met" if (value >= target if higher else value < target) else "NOT met"


def cell(text) -> str:
    """Text for one Markdown table cell: one line, no column separators."""
    return " ".join(str(text).split()).replace("|", "\\|")


def step_label(r: dict) -> str:
    """What a train_step row measured, from the row itself (so a dry run says what it ran)."""
    name = {"base": "ViT-B/14", "giant": "ViT-g/14"}
    model = next((v for k, v in name.items() if k in r["arch"]), r["arch"])
    where = ("1 GPU, no communication" if r.get("device", "gpu") != "cpu" else
             "1 CPU process, no communication")
    how = [where + (" (FSDP in 1 process: an upper bound, not the 32-GPU figure)"
                    if r.get("fsdp") else " (data-parallel path)"), r["precision"],
           "activation checkpointing" if r.get("checkpointing") else "no activation checkpointing"]
    if r.get("fsdp") and "keep_gathered" in r:
        how.append("student gathered from forward to backward" if r["keep_gathered"] else
                   "student resharded after forward")
    if r.get("batch_source", "synthetic") != "synthetic":
        how.append("real uint8 tiles + ColorAugment on the device in the step")
    prototypes = f"{r['prototypes']:,}".replace(",", " ")
    return (f"{model} train step, {', '.join(how)}, batch {r['batch']}, crops {r['crops']}, "
            f"{prototypes} prototypes")


def probe_notes(r: dict) -> str:
    """The attention kernel and the host syncs, where the row measured them."""
    if "sdpa" not in r:
        return ""
    enabled = f" (enabled: {', '.join(r['sdpa_enabled'])})" if r.get("sdpa_enabled") else ""
    syncs = ("host syncs: n/a (cpu)" if r.get("host_syncs") is None else
             f"host syncs: {r['host_syncs']} per step, {r['host_syncs_logged']} on a step that "
             f"logs metrics")
    return f"; SDPA: {r['sdpa']}{enabled}; {syncs}"


def main_row(rows: list[dict]) -> dict:
    """The row the targets are judged on: the first one (training's default configuration)."""
    return next((r for r in rows if not r.get("oom")), {})


def step_row(r: dict, judged: bool) -> str:
    if r.get("oom"):
        return (f"| {step_label(r)} | OOM | OOM | - | - | - | out of memory: "
                f"{cell(r.get('error', ''))} |")
    notes = f"{r['tflop_per_step']} TFLOP/step"
    if r.get("checkpointing"):
        notes += f" ({r.get('tflop_per_step_recompute', '-')} with the recomputed forwards)"
    notes += f", {r['steps']} timed steps"
    if "augment_share" in r:
        notes += (f"; ColorAugment {r['augment_ms']:.1f} ms = {r['augment_share']:.1%} of the "
                  f"step (target < 5 %: "
                  f"{verdict(r['augment_share'], TARGETS['augment_share'], False)})")
    if judged:
        peak = r.get("peak_reserved_gib", r.get("peak_mem_gib"))
        notes += (f"; targets: MFU >= 40 % {verdict(r.get('mfu'), TARGETS['vitg_mfu'], True)}"
                  f", >= 60 images/s "
                  f"{verdict(r['images_per_s'], TARGETS['vitg_images_per_s'], True)}, "
                  f"< 80 GB reserved {verdict(peak, TARGETS['vitg_peak_gib'], False)}")
    notes += probe_notes(r)
    mfu = f"{r['mfu']:.1%} / {r.get('mfu_recompute', r['mfu']):.1%}" if "mfu" in r else "-"
    if "peak_mem_gib" in r:
        peak = f"{r['peak_mem_gib']} / {r.get('peak_reserved_gib', '-')}"
    else:
        peak = f"{r.get('peak_rss_gib', '-')} (RSS)"
    return (f"| {step_label(r)} | {r['step_s']:.3f} | {r['images_per_s']:.1f} | {mfu} "
            f"| {peak} | {'yes' if r['finite'] else 'NO'} | {cell(notes)} |")


def failed_row(name: str, r: dict) -> str | None:
    """The row of a check that failed or never finished, else None."""
    if r.get("running"):
        return (f"| {name} | - | - | - | - | - | did not finish: it was running when the run "
                f"stopped (the device's time limit?) |")
    if "error" in r:
        why = cell(r.get("error_line") or r["error"])[:300]
        return f"| {name} | - | - | - | - | - | FAILED: {why} |"
    return None


def header(results: dict) -> list[str]:
    v = results.get("versions", {})
    parts = [f"torch {v.get('torch', results.get('torch', '?'))}"]
    if v.get("cuda") and not results.get("dry_run"):
        parts.append(f"CUDA {v['cuda']}" + (f", cuDNN {v['cudnn']}" if v.get("cudnn") else ""))
    for key in ("timm", "accelerate"):
        if v.get(key):
            parts.append(f"{key} {v[key]}")
    driver = f" (driver {v['driver']})" if v.get("driver") else ""
    return [f"{results['device']}{driver}, {', '.join(parts)}, {results['when']}; "
            f"`bench/gpu_check.sh` ran {results.get('seconds', 0):.0f} s", ""]


def markdown(results: dict) -> str:
    """The table for BENCHMARKS.md: one row per measurement, the targets' verdicts in notes."""
    c = results["checks"]
    lines = [*header(results),
             "| check | step s | images/s | MFU (model / with recompute) | "
             "peak GiB (allocated / reserved) | finite | notes |",
             "|---|---:|---:|---:|---:|---|---|"]
    for key, name in (("vitg", "ViT-g/14 train steps"), ("vitb", "ViT-B/14 train steps")):
        r = c.get(key)
        if r is None:
            continue
        rows = r.get("rows", [])
        for row in rows:
            lines.append(step_row(row, judged=key == "vitg" and row is main_row(rows)))
        failed = failed_row(name, r)
        if failed:  # after the rows it measured before it failed
            lines.append(failed)
    for key, name, rows_of in (("augment", "ColorAugment on the device", augment_rows),
                               ("pipeline", "full pipeline", pipeline_rows),
                               ("preempt", "preemption", preempt_rows)):
        r = c.get(key)
        if r is not None:
            failed = failed_row(name, r)
            lines.extend([failed] if failed else rows_of(r, c))
    return "\n".join(lines) + "\n"


def augment_rows(a: dict, c: dict) -> list[str]:
    lines = []
    for key, r in a.items():
        if not key.startswith("batch"):
            continue
        model = "vitg" if key == "batch12" else "vitb"
        step = main_row(c.get(model, {}).get("rows", [])).get("step_s")
        aug_s = r["ms_per_batch"] / 1e3
        note = ""
        if step:
            share = aug_s / (step + aug_s)
            note = (f"{share:.1%} of a {'ViT-g' if model == 'vitg' else 'ViT-B'} step with "
                    f"it (target < 5 %: {verdict(share, TARGETS['augment_share'], False)})")
        lines.append(f"| ColorAugment (HED, colour, grey, blur, solarize), batch "
                     f"{key[5:]} = {r['crops']} crops | {aug_s:.4f} | "
                     f"{r['crops_per_s']:.0f} crops/s | - | - | - | {note} |")
    return lines


def pipeline_rows(p: dict, c: dict) -> list[str]:
    return [f"| `midnight_train fit` on real shards, {p['model']}, batch {p['batch']}, "
            f"{p['workers']} loader workers, {p['steps']} steps | {p['step_s']:.3f} | "
            f"{p['images_per_s_median']:.1f} | - | - | {'yes' if p['finite'] else 'NO'} "
            f"| waiting for data: {p['data_wait_share']:.1%} of the step (target < 5 %: "
            f"{verdict(p['data_wait_share'], TARGETS['data_wait_share'], False)}); "
            f"export {p['export']} |"]


def preempt_rows(q: dict, c: dict) -> list[str]:
    return [f"| `accelerate launch --use_fsdp`: SIGTERM at step {q['stopped_at']} "
            f"(exit {q['signal_exit']}), then resume=auto | - | - | - | - | - | "
            f"checkpoint {', '.join(q['sharded_files'])}; steps {q['steps'][0]}-"
            f"{q['steps'][1]} {'contiguous' if q['contiguous'] else 'NOT contiguous'}; "
            f"export {q.get('export', '-')} |"]
