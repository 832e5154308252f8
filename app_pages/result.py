"""Result: one run, read-only, reachable by its share link /result?id=…"""
import json

import numpy as np
import streamlit as st

from services import api
from services.errors import UserError
from ui.charts import comparison_bars, label_curve_chart, tradeoff_chart
from ui.format import human_bytes, human_count, ms, per_second, ratio_delta, recipe_summary, where_it_ran
from ui.session import get_db, share_links_panel
from ui.tables import runs_frame

db = get_db()
run_id = st.query_params.get("id", "")
if not run_id:
    st.title("Result")
    st.info("This page shows one run. Open it from a share link (/result?id=…), the Jobs page or Compare.")
    st.stop()
try:
    run = api.get_run(db, run_id)
except UserError:
    st.title("Result")
    st.error("No run has this link. Check that the whole link was copied.")
    st.stop()

model = api.get_model(db, run["model_id"])
st.title(f"{model['name']}: {recipe_summary(run['recipe'])}")

if run["status"] != "succeeded":
    waiting = {"queued": "is waiting for a worker", "running": "is running", "failed": "failed",
               "cancelled": "was cancelled"}
    st.markdown(f"This run {waiting.get(run['status'], run['status'])}.")
    if run["status"] == "failed":
        st.error(run.get("error") or "The job failed.")

    @st.fragment(run_every=1.0)
    def wait_for_it() -> None:
        current = api.get_run(get_db(), run_id)
        if current["status"] != run["status"]:
            st.rerun()
        if current["status"] in ("queued", "running"):
            job = api.get_job(get_db(), current["job_id"])
            st.progress(job["progress"], text=job["message"] or current["status"])

    wait_for_it()
    st.stop()

def label_budget_section(labelled: dict) -> None:
    """Which samples recovery paid labels for, and the score against labels for every strategy."""
    st.markdown(f"**Labelled samples**: recovery learned from the labels of {labelled['count']:,} of "
                f"{labelled['of']:,} fitting samples, chosen by *{labelled['selection']}*.")
    left, right = st.columns([2, 3])
    with left:
        if labelled.get("images"):
            images = labelled["images"]
            columns = 12
            grid = np.ones((-(-len(images) // columns) * 9, columns * 9))
            for index, image in enumerate(images):  # 8x8 digits on a grid with a 1-pixel white gap
                row, column = divmod(index, columns)
                grid[row * 9:row * 9 + 8, column * 9:column * 9 + 8] = 1.0 - np.asarray(image)
            shown = (f"The first {len(images)} of the {labelled['count']:,} chosen images"
                     if len(images) < labelled["count"] else f"The {len(images)} chosen images")
            st.image(np.kron(grid, np.ones((4, 4))), clamp=True, caption=f"{shown} (dark = ink)")
        with st.expander("Indices of the chosen samples (in the fitting split)"):
            st.code(", ".join(map(str, labelled["indices"])), language=None, wrap_lines=True)
    with right:
        points = api.label_curve(db, run["id"])
        if len({p["selection"] for p in points}) > 1 or len(points) > 2:
            st.altair_chart(label_curve_chart(points, metrics["score_name"], this_run=run["id"]), width="stretch")
            st.caption("Each dot is a run (click it to open it); the ringed dot is this run.")
        else:
            st.caption("Score against labels: run this recipe at other budgets and strategies to draw it.")
        if st.button("Try every strategy at half, this and twice this budget",
                     help="Queues the same recipe with random, uncertainty and inconsistency selection at three "
                          "budgets, and once with every label, skipping the runs that exist; the chart fills in "
                          "as they finish."):
            submitted = api.submit_label_sweep(db, run["id"])
            st.success(f"Queued {len(submitted)} runs." if submitted else "Every run of the sweep exists already.")


metrics, baseline = run["metrics"], run["baseline"]
st.subheader(api.summary_sentence(metrics, baseline))
st.caption(f"Model `{model['id']}` · task `{run['recipe']['task']}` · created {run['created_at'][:19].replace('T', ' ')} UTC"
           f" · ran on {where_it_ran(run['runner'])}")

ratios = api.ratios(metrics, baseline)
cols = st.columns(6)
cols[0].metric("Size", human_bytes(metrics["size_bytes"]), **ratio_delta(ratios["size_x_smaller"], "smaller", "larger"),
               help=f"Original: {human_bytes(baseline['size_bytes'])}")
cols[1].metric("Zipped size", human_bytes(metrics["zipped_bytes"]),
               **ratio_delta(ratios["zipped_x_smaller"], "smaller", "larger"), help=f"Original: {human_bytes(baseline['zipped_bytes'])}")
cols[2].metric("Nonzero params", human_count(metrics["nonzero_params"]),
               **ratio_delta(ratios["nonzero_x_fewer"], "fewer", "more"),
               help=f"of {metrics['params']:,} parameters; the original has {baseline['nonzero_params']:,} nonzero")
cols[3].metric("Latency, batch 1", ms(metrics["latency_ms"]["p50"]),
               **ratio_delta(ratios["latency_x_faster"], "faster", "slower"), help=f"p50 over repeats. Original: {ms(baseline['latency_ms']['p50'])}; p95 {ms(metrics['latency_ms']['p95'])}")
cols[4].metric("Throughput", per_second(metrics["throughput_per_s"]),
               **ratio_delta(ratios["throughput_x"], "higher", "lower"),
               help=f"Inputs per second at batch {metrics['batch_latency_ms']['batch']}. Original: {per_second(baseline['throughput_per_s'])}")
cols[5].metric(metrics["score_name"].capitalize(), f"{100 * metrics['score']:.2f}%",
               f"{100 * ratios['score_delta']:+.2f} points" if abs(ratios["score_delta"]) >= 5e-5 else None, help=f"Original: {100 * baseline['score']:.2f}%; "
               f"agreement with the original: {100 * metrics['fidelity']:.1f}%")

notes = {m["name"]: m["effect_note"] for m in api.list_methods() if m["effect_note"]}
for name in dict.fromkeys(step["method"] for step in run["recipe"]["steps"]):  # each method once, in order
    if name in notes:
        st.caption(f"**{name}**: {notes[name]}")
for sentence in metrics.get("notes", []):  # what each step reported it did, and the risk it carries
    st.caption(f"• {sentence}")

labelled = api.labelled_samples(run)
if labelled:
    label_budget_section(labelled)

left, right = st.columns(2)
with left:
    st.markdown("**Compared with the original** (measured in the same job)")
    st.altair_chart(comparison_bars(metrics, baseline), width="stretch")
with right:
    st.markdown("**Among all runs of this model**")
    others = api.list_runs(db, run["model_id"], limit=500)
    same_task = [other for other in others if other["recipe"]["task"] == run["recipe"]["task"]]
    frame = runs_frame(same_task, baseline)
    st.altair_chart(tradeoff_chart(frame, "size_kb", highlight_link=run["share_path"]), width="stretch")

st.markdown("**Numbers**")
st.table({
    "": ["original", "compressed"],
    "size": [human_bytes(baseline["size_bytes"]), human_bytes(metrics["size_bytes"])],
    "zipped": [human_bytes(baseline["zipped_bytes"]), human_bytes(metrics["zipped_bytes"])],
    "params (nonzero)": [f"{baseline['params']:,} ({baseline['nonzero_params']:,})",
                         f"{metrics['params']:,} ({metrics['nonzero_params']:,})"],
    "latency p50 / p95, batch 1": [f"{ms(baseline['latency_ms']['p50'])} / {ms(baseline['latency_ms']['p95'])}",
                                   f"{ms(metrics['latency_ms']['p50'])} / {ms(metrics['latency_ms']['p95'])}"],
    f"latency p50, batch {metrics['batch_latency_ms']['batch']}": [ms(baseline["batch_latency_ms"]["p50"]),
                                                                   ms(metrics["batch_latency_ms"]["p50"])],
    "throughput": [per_second(baseline["throughput_per_s"]), per_second(metrics["throughput_per_s"])],
    metrics["score_name"]: [f"{100 * baseline['score']:.2f}%", f"{100 * metrics['score']:.2f}%"],
    "agreement with the original (mean / worst sample)": [
        "100% / 100%", f"{100 * metrics['fidelity']:.1f}% / {100 * metrics.get('fidelity_worst', metrics['fidelity']):.1f}%"],
})

recipe_col, download_col = st.columns([3, 2])
with recipe_col:
    st.markdown("**Recipe** (copy it to run the same thing again)")
    st.code(json.dumps(run["recipe"], indent=2), language="json")
    st.page_link("app_pages/compress.py", label="Start from this recipe (opens it in Compress)",
                 icon=":material/edit:", query_params={"model": run["model_id"], "recipe_of": run["id"]})
    st.caption("From the command line:")
    st.code(f"python -m services compress --model {run['model_id']} --recipe '{json.dumps(run['recipe'])}' --wait",
            language="bash", wrap_lines=True)
with download_col:
    st.markdown("**Compressed model**")
    try:
        data = api.artifact_bytes(db, run)
    except (OSError, ValueError):
        st.error("The compressed model file is missing from the data folder.")
    else:
        st.download_button(f"Download ONNX ({human_bytes(len(data))})", data, file_name=f"{model['id']}-{run['id'][:8]}.onnx",
                           mime="application/octet-stream", type="primary", on_click="ignore")
    if run.get("files", {}).get("tokenizer"):
        try:
            tokenizer = api.run_file_bytes(db, run, "tokenizer")
        except (OSError, ValueError):
            st.error("The run's tokenizer file is missing from the data folder.")
        else:
            st.download_button("Download tokenizer.json", tokenizer,
                               file_name=f"{model['id']}-{run['id'][:8]}-tokenizer.json", mime="application/json",
                               on_click="ignore", help="The model needs it: its vocabulary was trimmed, so its token "
                                                       "ids differ from the original tokenizer's.")

with download_col:
    st.markdown("**Hugging Face Hub**")
    st.download_button("Download a Hub-ready folder (.zip)", lambda: api.hub_zip(db, run["id"]),
                       file_name=f"{model['id']}-{run['id'][:8]}-hub.zip", mime="application/zip", on_click="ignore",
                       help="The ONNX file, the recipe, the metrics and a model card whose metadata carries the "
                            "measured scores (model-index), ready to upload.")
    with st.expander("Publish it to the Hub"):
        with st.form("publish"):
            repo_id = st.text_input("Repository (owner/name)", placeholder="you/" + f"{model['id']}-compressed")
            token = st.text_input("Access token (write)", type="password",
                                  help="Used once for this upload and never stored.")
            if st.form_submit_button("Publish"):
                try:
                    url = api.publish_to_hub(db, run["id"], repo_id, token)
                except UserError as problem:
                    st.error(str(problem))
                else:
                    st.success(f"Published: {url}")

st.markdown("**Link to this page** (for whoever can open this dashboard):")
page_url = (st.context.url or "").split("?")[0]
st.code(f"{page_url}?id={run['id']}" if page_url else run["share_path"], language=None, wrap_lines=True)
share_links_panel(db, "run", {"run": run["id"]}, "run", run["id"], page_url.rsplit("/", 1)[0] if page_url else "")
