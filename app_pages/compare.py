"""Compare: every run of a model in one table beside the baseline, and the trade-off charts."""
import streamlit as st

from services import api
from services.catalog import architecture_of, family_of
from ui.charts import rate_chart, tradeoff_chart
from ui.format import recipe_summary
from ui.session import get_db, share_links_panel
from ui.tables import COLUMN_ORDER, column_config, runs_frame

RUNS_PER_PAGE = 1000

st.title("Compare")
db = get_db()
models = [m for m in api.list_models(db)]
model_ids = [m["id"] for m in models]
wanted = st.query_params.get("model")
model_id = st.selectbox("Model", model_ids, index=model_ids.index(wanted) if wanted in model_ids else 0)
if st.query_params.get("model") != model_id:
    st.query_params["model"] = model_id
model = api.get_model(db, model_id)

# A bounded page of runs, newest first: a model with 10,000 runs never loads them all (the table, the
# charts and the Pareto front cover the page shown).
total = api.count_runs(db, model_id)
page = 0
if total > RUNS_PER_PAGE:
    page = st.selectbox("Runs shown", range((total + RUNS_PER_PAGE - 1) // RUNS_PER_PAGE), key="compare-page",
                        format_func=lambda p: f"{p * RUNS_PER_PAGE + 1:,}–{min(total, (p + 1) * RUNS_PER_PAGE):,} of "
                                              f"{total:,}, newest first")
runs = api.list_runs(db, model_id, limit=RUNS_PER_PAGE, offset=page * RUNS_PER_PAGE)
if not runs:
    st.info("No runs of this model yet. Submit one on the Compress page.")
    st.page_link("app_pages/compress.py", label="Compress it", icon=":material/compress:", query_params={"model": model_id})
    st.stop()

# A once-for-all model scored at many rates: each task's tolerance, drawn before the per-task table.
curves = api.rate_curves(runs)
if curves:
    st.subheader("Score against the sequence rate, per task")
    architecture = architecture_of(model)
    if architecture == "text-transformer":
        st.caption("Runs whose only step is sequence.pool: similar tokens merged inside the encoder (Token "
                   "Merging), no training. Each point is one rate; hover for its latency against rate 1.")
    else:
        st.caption("Runs whose only step is sequence.pool: one once-for-all model scored at each rate without "
                   "retraining. A task that reads every frame (spoken digits) breaks sooner than one about the "
                   "whole clip (who speaks). Large diamonds: runs that learned their rate (`learn_rate`), beside "
                   "the rates chosen by hand.")
    st.altair_chart(rate_chart(curves, architecture), width="stretch")

# Scores on different tasks do not share an axis: compare the runs of one task at a time.
run_tasks = list(dict.fromkeys(run["recipe"]["task"] for run in runs))
task = run_tasks[0]
if len(run_tasks) > 1:
    wanted_task = st.query_params.get("task")
    task = st.segmented_control("Task", run_tasks, default=wanted_task if wanted_task in run_tasks else run_tasks[0],
                                key="compare-task") or run_tasks[0]
runs = [run for run in runs if run["recipe"]["task"] == task]
# The baseline row: the original model as measured in the most recent job.
frame = runs_frame(runs, runs[0]["baseline"])
if st.query_params.get("task") != task and len(run_tasks) > 1:
    st.query_params["task"] = task
st.caption(f"{len(runs)} run(s). Ratios compare each run with the original model measured in the same job "
           "(×: higher is better). Latency: ONNX Runtime, fixed threads, after warm-up; p50/p95 over repeats.")
st.dataframe(frame, column_config=column_config(st), column_order=COLUMN_ORDER, hide_index=True, width="stretch")

notes = {m["name"]: m["effect_note"] for m in api.list_methods() if m["effect_note"]}
used = {step["method"] for run in runs for step in run["recipe"]["steps"]}
for name in sorted(used & set(notes)):
    st.caption(f"**{name}**: {notes[name]}")

st.download_button("Download this table (CSV)", frame.drop(columns=["is_baseline"]).to_csv(index=False),
                   file_name=f"{model_id}-{task}-runs.csv", mime="text/csv")

# ---- side by side: the runs the user picks, each in one sentence (the pick is in the link)
labels = {run["id"]: f"{recipe_summary(run['recipe'])} ({run['created_at'][:16].replace('T', ' ')})" for run in runs}
picked_ids = [i for i in st.query_params.get("runs", "").split(",") if i in labels]
picked = st.multiselect("Side by side: pick runs to compare", list(labels), default=picked_ids,
                        format_func=labels.get, key="side-by-side")
if picked != picked_ids:
    st.query_params["runs"] = ",".join(picked)
if picked:
    chosen = [run for run in runs if run["id"] in picked]
    st.dataframe(runs_frame(chosen, chosen[0]["baseline"]), column_config=column_config(st),
                 column_order=COLUMN_ORDER, hide_index=True, width="stretch")
    for run in chosen:
        st.markdown(f"- [{recipe_summary(run['recipe'])}]({run['share_path']}): "
                    f"{api.summary_sentence(run['metrics'], run['baseline'])}")
    st.caption("This page's link keeps the model, the task and the picked runs: share it to share the comparison.")
    site = (st.context.url or "").split("?")[0].rsplit("/", 1)[0]
    share_links_panel(db, "comparison", {"model": model_id, "task": task, "runs": picked}, "model", model_id, site)

# ---- the trade-off, with the Pareto front; optionally the whole model family on one chart
family = family_of(model_id)
together = len(family) > 1 and st.toggle(f"Show the whole family ({', '.join(family)}) on the charts",
                                         key="family", help="Runs of every width on one chart, scored on "
                                         "the same task: is a large model compressed hard better than a small "
                                         "one compressed lightly?")
if together:
    chart_frame = []
    for member in family:
        member_runs = [r for r in api.list_runs(db, member, limit=RUNS_PER_PAGE) if r["recipe"]["task"] == task]
        if member_runs:
            chart_frame.append(runs_frame(member_runs, member_runs[0]["baseline"]).assign(model=member))
    import pandas as pd

    chart_frame = pd.concat(chart_frame, ignore_index=True)
else:
    chart_frame = frame
left, right = st.columns(2)
with left:
    st.subheader("Score against size")
    x = st.radio("Size", ["size_kb", "zipped_kb"], horizontal=True, key="size-axis",
                 format_func={"size_kb": "file size", "zipped_kb": "zipped size"}.get)
    st.altair_chart(tradeoff_chart(chart_frame, x, color_by_model=together), width="stretch")
with right:
    st.subheader("Score against latency")
    if together:
        st.caption("Latency in microseconds at batch 1 (the family's models are timed in different jobs, so "
                   "small differences are noise).")
    else:
        st.caption("Each run's latency relative to the original timed in the same job (100% = as fast; "
                   "lower is faster), so noise between jobs does not move the points.")
    st.altair_chart(tradeoff_chart(chart_frame, "p50_us" if together else "latency_pct", color_by_model=together),
                    width="stretch")
st.caption("Click a point to open that run's result page. Diamonds are the original models; the dashed step "
           "line is the Pareto front: the runs that no other run beats on both score and cost.")
