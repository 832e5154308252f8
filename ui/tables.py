"""The run table of the Compare page: every run beside the baseline, with ratios."""
from __future__ import annotations

import pandas as pd

from services import api
from ui.format import recipe_summary


def runs_frame(runs: list[dict], baseline: dict | None) -> pd.DataFrame:
    """One row per run plus the baseline row. Ratios use each run's own baseline, measured in
    the same job, so machine noise between jobs does not leak into them."""
    rows = []
    if baseline:
        rows.append(_row("baseline (original model)", "", baseline, baseline, None))
    for run in runs:
        rows.append(_row(recipe_summary(run["recipe"]), run["share_path"], run["metrics"], run["baseline"], run))
    return pd.DataFrame(rows)


def _row(label: str, link: str, m: dict, b: dict, run: dict | None) -> dict:
    r = api.ratios(m, b)
    return {
        "run": label,
        "link": link,
        "created": run["created_at"][:19].replace("T", " ") if run else "",
        "size_kb": m["size_bytes"] / 1024,
        "size_x": r["size_x_smaller"],
        "zipped_kb": m["zipped_bytes"] / 1024,
        "zipped_x": r["zipped_x_smaller"],
        "params": m["params"],
        "nonzero_params": m["nonzero_params"],
        "nonzero_x": r["nonzero_x_fewer"],
        "p50_ms": m["latency_ms"]["p50"],
        "p95_ms": m["latency_ms"]["p95"],
        "p50_us": 1000 * m["latency_ms"]["p50"],
        # relative to the original timed in the same job: comparable across jobs on a noisy machine
        "latency_pct": 100.0 * m["latency_ms"]["p50"] / b["latency_ms"]["p50"],
        "speed_x": r["latency_x_faster"],
        "throughput": m["throughput_per_s"],
        "throughput_x": r["throughput_x"],
        "score": m["score"],
        "score_delta_points": 100 * r["score_delta"],
        "score_name": m["score_name"],
        "is_baseline": run is None,
    }


# Most telling first: what it is, what it scores, how much smaller and faster; raw numbers after.
COLUMN_ORDER = ("run", "score", "score_delta_points", "size_x", "zipped_x", "speed_x", "throughput_x",
                "size_kb", "zipped_kb", "params", "nonzero_params", "nonzero_x", "p50_ms", "p95_ms",
                "throughput", "created", "link")


def column_config(st) -> dict:
    cc = st.column_config
    return {
        "run": cc.TextColumn("Recipe", width="medium", pinned=True),
        "link": cc.LinkColumn("Result", display_text="open ↗"),
        "created": cc.TextColumn("Created"),
        "size_kb": cc.NumberColumn("Size (KB)", format="%.1f"),
        "size_x": cc.NumberColumn("× smaller", format="%.2f×"),
        "zipped_kb": cc.NumberColumn("Zipped (KB)", format="%.1f"),
        "zipped_x": cc.NumberColumn("× smaller zipped", format="%.2f×"),
        "params": cc.NumberColumn("Params", format="%d"),
        "nonzero_params": cc.NumberColumn("Nonzero params", format="%d"),
        "nonzero_x": cc.NumberColumn("× fewer nonzero", format="%.2f×"),
        "p50_ms": cc.NumberColumn("Latency p50 (ms, batch 1)", format="%.4f"),
        "p95_ms": cc.NumberColumn("Latency p95 (ms)", format="%.4f"),
        "p50_us": None,
        "latency_pct": None,
        "speed_x": cc.NumberColumn("× faster", format="%.2f×"),
        "throughput": cc.NumberColumn("Throughput (/s, batch 256)", format="%.0f"),
        "throughput_x": cc.NumberColumn("× throughput", format="%.2f×"),
        "score": cc.NumberColumn("Score", format="percent"),
        "score_delta_points": cc.NumberColumn("Δ score (points)", format="%+.2f"),
        "score_name": None,
        "is_baseline": None,
    }
