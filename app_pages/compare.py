"""Compare: every run of a model in one table beside the baseline, and the trade-off charts."""
import streamlit as st

from services import api
from ui.charts import tradeoff_chart
from ui.session import get_db
from ui.tables import COLUMN_ORDER, column_config, runs_frame

st.title("Compare")
db = get_db()
models = [m for m in api.list_models(db)]
model_ids = [m["id"] for m in models]
wanted = st.query_params.get("model")
model_id = st.selectbox("Model", model_ids, index=model_ids.index(wanted) if wanted in model_ids else 0)
if st.query_params.get("model") != model_id:
    st.query_params["model"] = model_id
model = api.get_model(db, model_id)

runs = api.list_runs(db, model_id, limit=1000)
if not runs:
    st.info("No runs of this model yet. Submit one on the Compress page.")
    st.page_link("app_pages/compress.py", label="Compress it", icon=":material/compress:", query_params={"model": model_id})
    st.stop()

# The baseline row: the original model as measured in the most recent job.
frame = runs_frame(runs, runs[0]["baseline"])
st.caption(f"{len(runs)} run(s). Ratios compare each run with the original model measured in the same job "
           "(×: higher is better). Latency: ONNX Runtime, fixed threads, after warm-up; p50/p95 over repeats.")
st.dataframe(frame, column_config=column_config(st), column_order=COLUMN_ORDER, hide_index=True, width="stretch")

notes = {m["name"]: m["effect_note"] for m in api.list_methods() if m["effect_note"]}
used = {step["method"] for run in runs for step in run["recipe"]["steps"]}
for name in sorted(used & set(notes)):
    st.caption(f"**{name}**: {notes[name]}")

left, right = st.columns(2)
with left:
    st.subheader("Score against size")
    x = st.radio("Size", ["size_kb", "zipped_kb"], horizontal=True, key="size-axis",
                 format_func={"size_kb": "file size", "zipped_kb": "zipped size"}.get)
    st.altair_chart(tradeoff_chart(frame, x), width="stretch")
with right:
    st.subheader("Score against latency")
    st.caption("Latency at batch 1, median over repeats (ONNX Runtime, fixed threads).")
    st.altair_chart(tradeoff_chart(frame, "p50_us"), width="stretch")
st.caption("Click a point to open that run's result page. The red diamond is the original model.")
