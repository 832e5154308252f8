"""Altair charts: score against size and against latency, the baseline marked."""
from __future__ import annotations

import altair as alt
import pandas as pd

AXES = {
    "size_kb": "Size of the ONNX file (KB)",
    "zipped_kb": "Zipped size (KB)",
    "p50_us": "Latency p50, batch 1 (µs)",
    "latency_pct": "Latency p50, batch 1 (% of the original's, timed in the same job)",
}


def pareto_mask(costs, scores) -> list[bool]:
    """True for the points no other point beats: none is at least as cheap and as good, and better
    on one of the two (lower cost, higher score)."""
    points = list(zip(costs, scores))
    return [not any(c <= cost and s >= score and (c < cost or s > score) for c, s in points)
            for cost, score in points]


def tradeoff_chart(frame: pd.DataFrame, x: str, highlight_link: str | None = None, color_by_model: bool = False) -> alt.Chart:
    """Score (y) against a cost (x); the baseline is a red diamond, the highlighted run a larger dot,
    and the Pareto front (the runs nothing else beats on both) a grey step line."""
    data = frame.assign(
        kind=frame["is_baseline"].map({True: "baseline", False: "compressed run"}),
        score_pct=frame["score"] * 100,
    )
    data["on_front"] = pareto_mask(data[x].tolist(), data["score"].tolist())
    if highlight_link:
        data.loc[data["link"] == highlight_link, "kind"] = "this run"
    score_name = str(frame["score_name"].iloc[0]) if len(frame) else "score"
    style = {"baseline": ("#d62728", "diamond", 220), "compressed run": ("#1f77b4", "circle", 70),
             "this run": ("#ff7f0e", "circle", 220)}
    kinds = [k for k in style if k in set(data["kind"])]  # the legend names only what is drawn
    colors = alt.Scale(domain=kinds, range=[style[k][0] for k in kinds])
    shapes = alt.Scale(domain=kinds, range=[style[k][1] for k in kinds])
    sizes = alt.Scale(domain=kinds, range=[style[k][2] for k in kinds])
    low, high = float(data[x].min()), float(data[x].max())
    # Runs that barely differ on this axis (token merging keeps the size) would be spread over a
    # zoomed axis whose ticks repeat: show them against a range of ±5 % instead.
    x_scale = (alt.Scale(domain=[low * 0.95, high * 1.05], nice=False) if high > 0 and high - low < 0.01 * high
               else alt.Scale(zero=False, nice=True, padding=20))
    front = (alt.Chart(data[data["on_front"]].sort_values(x))
             .mark_line(interpolate="step-after", color="#888888", strokeDash=[5, 3], opacity=0.8)
             .encode(x=alt.X(x, scale=x_scale), y="score_pct"))
    color = (alt.Color("model", legend=alt.Legend(title=None, orient="bottom")) if color_by_model
             else alt.Color("kind", scale=colors, legend=alt.Legend(title=None, orient="bottom")))
    points = (
        alt.Chart(data)
        .mark_point(filled=True, opacity=0.85)
        .encode(
            x=alt.X(x, title=AXES[x], scale=x_scale,
                    axis=alt.Axis(format=",.4~r", tickCount=6)),
            y=alt.Y("score_pct", title=f"{score_name} (%)", scale=alt.Scale(zero=False, nice=True, padding=20),
                    axis=alt.Axis(format=",.4~r", tickCount=5)),
            color=color,
            shape=alt.Shape("kind", scale=shapes, legend=None),
            size=alt.Size("kind", scale=sizes, legend=None),
            tooltip=[
                alt.Tooltip("run", title="recipe"),
                alt.Tooltip(x, title=AXES[x], format=".3f"),
                alt.Tooltip("score_pct", title=f"{score_name} (%)", format=".2f"),
                alt.Tooltip("score_delta_points", title="Δ points", format="+.2f"),
                alt.Tooltip("on_front", title="on the Pareto front"),
            ],
            href="link",
        )
    )
    return (front + points).properties(height=320)


def comparison_bars(metrics: dict, baseline: dict) -> alt.Chart:
    """Original vs compressed, each metric relative to the original (original = 100%)."""
    rows = []
    for label, key in (("Size", "size_bytes"), ("Zipped size", "zipped_bytes"), ("Nonzero params", "nonzero_params")):
        rows.append({"metric": label, "model": "original", "percent": 100.0})
        rows.append({"metric": label, "model": "compressed", "percent": 100.0 * metrics[key] / baseline[key]})
    large_batch = metrics["batch_latency_ms"].get("batch", 256)
    for label, key in (("Latency p50 (batch 1)", "latency_ms"), (f"Latency p50 (batch {large_batch})", "batch_latency_ms")):
        rows.append({"metric": label, "model": "original", "percent": 100.0})
        rows.append({"metric": label, "model": "compressed",
                     "percent": 100.0 * metrics[key]["p50"] / baseline[key]["p50"]})
    frame = pd.DataFrame(rows)
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y("metric", title=None, sort=None, axis=alt.Axis(labelLimit=220)),
            yOffset=alt.YOffset("model", sort=["original", "compressed"]),
            x=alt.X("percent", title="% of the original (lower is better)"),
            color=alt.Color("model", scale=alt.Scale(domain=["original", "compressed"], range=["#bbbbbb", "#1f77b4"]),
                            legend=alt.Legend(title=None, orient="bottom")),
            tooltip=["metric", "model", alt.Tooltip("percent", format=".1f")],
        )
        .properties(height=260)
    )


def sensitivity_chart(layers: list[dict], top: int = 20) -> alt.Chart:
    """The layers that cost most when compressed alone (most sensitive at the top)."""
    frame = pd.DataFrame(layers[:top])
    frame["lost"] = 100.0 * (1.0 - frame["fidelity"])
    return (
        alt.Chart(frame)
        .mark_bar(color="#d62728")
        .encode(
            y=alt.Y("layer", title=None, sort=None, axis=alt.Axis(labelLimit=260, labelOverlap=False)),
            x=alt.X("lost", title="Agreement with the original lost when only this layer is compressed (%)"),
            tooltip=["layer", alt.Tooltip("fidelity", format=".4f"), alt.Tooltip("output_error", format=".4f")],
        )
        .properties(height=max(100, 26 * len(frame)))
    )


RATE_AXES = {
    "speech-transformer": "Pooling rate (frames averaged into one; 20 ms × rate per frame)",
    "text-transformer": "Merging rate (the last layer runs on 1 / rate of the tokens)",
}


def rate_chart(points: list[dict], architecture: str = "speech-transformer") -> alt.Chart:
    """Each task's score against the sequence-pooling rate (one once-for-all model, no retraining)."""
    frame = pd.DataFrame(points).sort_values("rate")
    frame["score_pct"] = 100.0 * frame["score"]
    frame["label"] = frame["task"] + " (" + frame["score_name"] + ")"
    base = alt.Chart(frame).encode(
        x=alt.X("rate", title=RATE_AXES.get(architecture, "Sequence rate"),
                scale=alt.Scale(zero=False)),
        y=alt.Y("score_pct", title="Score (%)", scale=alt.Scale(zero=False, nice=True)),
        color=alt.Color("label", legend=alt.Legend(title=None, orient="bottom", labelLimit=400)),
        tooltip=["task", alt.Tooltip("rate", format=".2f"), alt.Tooltip("score_pct", title="score (%)", format=".2f"),
                 alt.Tooltip("latency_pct", title="latency (% of rate 1)", format=".0f")],
    )
    # the runs that learned their rate are drawn as large diamonds beside the curve of chosen rates
    chosen = base.transform_filter(alt.datum.how == "rate chosen")
    learned = base.transform_filter(alt.datum.how == "learned rate")
    return (chosen.mark_line() + chosen.mark_point(filled=True, size=70).encode(href="link")
            + learned.mark_point(filled=True, size=260, shape="diamond").encode(href="link")).properties(height=300)


STRATEGY_COLORS = {"random": "#4c78a8", "uncertainty": "#f58518", "inconsistency": "#54a24b"}


def label_curve_chart(points: list[dict], score_name: str, this_run: str | None = None) -> alt.Chart:
    """Score against the number of labels bought, one line per selection strategy; the score with every
    label as a grey rule and 95 % of it dashed (the share the active-learning study aims for), both named
    in the legend; `this_run` (a run id) is ringed."""
    frame = pd.DataFrame(points)
    frame["score_pct"] = 100.0 * frame["score"]
    frame["link"] = "/result?id=" + frame["run_id"]
    budgeted = frame[frame["selection"] != "all labels"]
    full = frame[frame["selection"] == "all labels"]
    counts = sorted(budgeted["labels"].unique().tolist())
    # a log axis ticked at the budgets that were run (not at 10, 30, 50, …), a little room either side
    x_scale = alt.Scale(type="log", domain=[counts[0] / 1.25, counts[-1] * 1.25], nice=False)
    reference = float(full["score_pct"].max()) if len(full) else None
    shown = budgeted["score_pct"].tolist() + ([reference, 0.95 * reference] if reference is not None else [])
    y_scale = alt.Scale(domain=[min(shown) - 1, max(shown) + 1], nice=False)  # no rule on the frame
    strategies = sorted(budgeted["selection"].unique().tolist())
    colors = alt.Scale(domain=strategies, range=[STRATEGY_COLORS.get(s, "#b279a2") for s in strategies])
    base = alt.Chart(budgeted).encode(
        x=alt.X("labels", title="Labelled samples (log scale)", scale=x_scale,
                axis=alt.Axis(values=counts, format="d", grid=True)),
        y=alt.Y("score_pct", title=f"{score_name} (%)", scale=y_scale),
        color=alt.Color("selection", title="Which samples", scale=colors, legend=alt.Legend(orient="bottom")),
        tooltip=["selection", "labels", alt.Tooltip("score_pct", title=f"{score_name} (%)", format=".2f")])
    chart = base.mark_line() + base.mark_point(filled=True, size=80).encode(href="link")
    if this_run is not None and (budgeted["run_id"] == this_run).any():
        ring = budgeted[budgeted["run_id"] == this_run].assign(what="this run")
        chart = chart + alt.Chart(ring).mark_point(size=320, strokeWidth=2, color="black").encode(
            x="labels", y="score_pct", tooltip=["what", "selection", "labels"])
    if reference is not None:
        rules = pd.DataFrame({"score_pct": [reference, 0.95 * reference],
                              "what": [f"every label ({int(full['labels'].max()):,}): {reference:.1f}%",
                                       f"95% of that: {0.95 * reference:.1f}%"]})
        chart = chart + alt.Chart(rules).mark_rule(color="grey").encode(
            y=alt.Y("score_pct", scale=y_scale),
            strokeDash=alt.StrokeDash("what", title="Reference", scale=alt.Scale(
                domain=rules["what"].tolist(), range=[[1, 0], [5, 4]]),
                legend=alt.Legend(orient="bottom", direction="vertical", symbolType="stroke", symbolSize=400,
                                  symbolStrokeColor="grey", symbolStrokeWidth=1.5, labelLimit=300)),
            tooltip=["what"])
    return chart.properties(height=380)  # the legends below take about 150 px of it
