"""Models: the built-in models with their cards (parameters, size, baseline score and latency)."""
import streamlit as st

from services import api
from services.catalog import TASKS
from ui.format import human_bytes, human_count, ms
from ui.session import get_db, worker_banner

st.title("Models")
st.write("Pick a model to compress. Each card shows the original model as measured here: its size, "
         "its score on its task and how fast ONNX Runtime runs it on this machine.")
db = get_db()
worker_banner(db)
# The first model is trained on first use without asking: it takes seconds, and a new user
# should see a real card rather than a button. The larger siblings wait for a click.
if api.get_model(db, "digits-cnn")["status"] == "new":
    api.prepare_model(db, "digits-cnn")


@st.fragment(run_every=2.0)
def model_cards() -> None:
    db = get_db()
    models = api.list_models(db)
    active_prepare = {job["model_id"]: job for job in api.list_jobs(db, limit=50) if job["kind"] == "prepare"
                      and job["status"] in ("queued", "running")}
    for model in models:
        with st.container(border=True):
            head, action = st.columns([4, 1])
            head.subheader(f"{model['name']}  ·  `{model['id']}`")
            head.write(model["description"])
            head.caption(f"Task: **{model['task']}** — {TASKS.get(model['task'], {}).get('description', '')}")
            card = model["card"]
            if model["status"] == "ready" and card:
                cols = st.columns(5)
                cols[0].metric("Parameters", human_count(card["params"]))
                cols[1].metric("Size", human_bytes(card["size_bytes"]),
                               help=f"Zipped: {human_bytes(card['zipped_bytes'])}")
                cols[2].metric(f"Baseline {card['score_name']}", f"{100 * card['score']:.1f}%")
                cols[3].metric("Latency p50 (batch 1)", ms(card["latency_ms"]["p50"]),
                               help=f"p95 {ms(card['latency_ms']['p95'])}; ONNX Runtime, "
                                    f"{card.get('threads', 1)} thread(s), after warm-up")
                cols[4].metric("Throughput (batch 256)", f"{card['throughput_per_s']:,.0f}/s")
                action.page_link("app_pages/compress.py", label="Compress it", icon=":material/compress:",
                                 query_params={"model": model["id"]})
                action.page_link("app_pages/compare.py", label="Compare runs", icon=":material/insights:",
                                 query_params={"model": model["id"]})
            elif model["id"] in active_prepare:
                job = active_prepare[model["id"]]
                st.progress(job["progress"], text=f"Preparing: {job['message'] or job['status']}")
            else:
                if model["status"] == "failed":
                    st.error(f"Preparing this model failed: {model.get('error')}")
                else:
                    st.info("Not trained yet. Preparing it trains it with a fixed seed (a few seconds) and "
                            "measures its baseline; compressing it prepares it too.")
                if action.button("Prepare", key=f"prepare-{model['id']}", type="primary"):
                    api.prepare_model(db, model["id"])
                    st.rerun()


model_cards()
