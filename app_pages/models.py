"""Models: the built-in models and the user's own, with their cards (parameters, size, baseline
score and latency), and the form to import a model."""
import streamlit as st

from services import api
from services.catalog import TASKS
from services.errors import UserError
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


# ---- the user's own models -------------------------------------------------------------------

def import_form() -> None:
    """Upload an ONNX file or a zipped Hugging Face folder, or name a Hub model; the import runs as a job."""
    st.write("An **ONNX file**, a **zip of a Hugging Face model folder** (config.json, model.safetensors and "
             "its tokenizer files), or a model on the **Hugging Face Hub**. Nothing in an upload runs as code: "
             "weights are read as safetensors, and models that need their own code are refused.")
    upload = st.file_uploader("Model file (.onnx or .zip)", type=["onnx", "zip"], key="import-file",
                              max_upload_size=api.max_upload_mb())
    hub = st.text_input("…or a Hugging Face model", key="import-hub", placeholder="hf:OWNER/NAME")
    name = st.text_input("Name (optional)", key="import-name")
    if upload is not None and upload.name.lower().endswith(".onnx"):
        try:
            inputs = api.onnx_inputs(upload.getvalue(), upload.name)
        except UserError as problem:
            st.error(str(problem))
            inputs = []
        for item in inputs:
            shape = ", ".join("?" if d is None else str(d) for d in (item["shape"] or []))
            st.caption(f"Input `{item['name']}`: {item['type']} [{shape}]")
    shapes = st.text_input(
        "Input shapes (ONNX models with dynamic dimensions)", key="import-shapes",
        placeholder="input_ids=batch,128; attention_mask=batch,128",
        help="One NAME=D1,D2,… per input, separated by ';'. The first dimension is the batch; every other "
             "dynamic dimension needs a size.")
    datasets = {d["id"]: d for d in api.list_datasets(db)} if hasattr(api, "list_datasets") else {}
    kinds = {"csv": "CSV text", "npz": "NPZ arrays", "wav": "WAV audio"}
    dataset_id = st.selectbox(
        "Score it on your data (optional)", [None, *datasets], key="import-dataset",
        format_func=lambda i: "built-in inputs, scored on fidelity" if i is None else
        f"{datasets[i]['name']} ({kinds.get(datasets[i]['kind'], datasets[i]['kind'])}, "
        f"{'labelled' if datasets[i]['has_labels'] else 'no labels'})",
        help="A CSV (text,label) scores a Hugging Face text model: its texts are tokenized with the model's own "
             "tokenizer. An NPZ (X, y) feeds an ONNX model's one input. A zip of WAV files feeds an ONNX audio model "
             "whose input is a waveform (batch, samples) or log-mel frames (batch, frames, 80). With labels and a "
             "model that gives one score per label, it is scored on accuracy; otherwise on fidelity. Every 5th row "
             "of a CSV or WAV set of 50 or more is kept apart for calibration and never scored.")
    if st.button("Import", type="primary", key="import-submit", disabled=upload is None and not hub.strip()):
        try:
            if upload is not None:
                queued = api.import_model(db, upload.getvalue(), upload.name, name=name or None, input_shapes=shapes,
                                          dataset_id=dataset_id)
            else:
                queued = api.import_model(db, hub.strip() if hub.strip().startswith("hf:") else f"hf:{hub.strip()}",
                                          name=name or None, input_shapes=shapes, dataset_id=dataset_id)
        except UserError as problem:
            st.error(str(problem))
        else:
            st.success(f"Importing `{queued['model_id']}`: its card appears below when the import job is done "
                       f"(the ONNX checker, ONNX Runtime and the baseline measurement run in the background).")


def upload_details(model: dict, card: dict) -> None:
    with st.expander("Inputs, outputs, parameters by layer type and methods"):
        io = card.get("io", {})
        for side in ("inputs", "outputs"):
            for item in io.get(side, []):
                st.markdown(f"{side[:-1].capitalize()} `{item['name']}`: {item['type']} "
                            f"[{', '.join(map(str, item['shape']))}]")
        if card.get("params_by_op"):
            st.markdown("Parameters by layer type: " + ", ".join(
                f"{op} {human_count(n)}" for op, n in card["params_by_op"].items()))
        st.caption(f"Scored on {card.get('eval_data', 'its task')}; output read as "
                   f"{card.get('output_kind', 'logits')}.")
        if card.get("note"):
            st.caption(card["note"])
        for method in card.get("methods", []):
            mark = "applies" if method["applies"] else f"not applicable: {method['reason']}"
            st.markdown(f"- `{method['name']}` ({method['title']}): {mark}")


with st.expander("Import your own model", icon=":material/upload:"):
    import_form()


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
                cols[4].metric(f"Throughput (batch {card['batch_latency_ms']['batch']})",
                               f"{card['throughput_per_s']:,.0f}/s")
                if model["source"] == "upload":
                    upload_details(model, card)
                action.page_link("app_pages/compress.py", label="Compress it", icon=":material/compress:",
                                 query_params={"model": model["id"]})
                action.page_link("app_pages/compare.py", label="Compare runs", icon=":material/insights:",
                                 query_params={"model": model["id"]})
            elif model["id"] in active_prepare:
                job = active_prepare[model["id"]]
                st.progress(job["progress"], text=f"Preparing: {job['message'] or job['status']}")
            else:
                if model["status"] == "failed" and model["source"] == "upload":
                    st.error(f"Importing this model failed: {model.get('error')}")
                elif model["status"] == "failed":
                    st.error(f"Preparing this model failed: {model.get('error')}")
                elif model["source"] == "upload":
                    st.info("Not imported yet: the import job checks the model and measures its baseline.")
                else:
                    st.info("Not prepared yet. Preparing it trains the model with a fixed seed (or loads it from its "
                            "package) and measures its baseline; compressing it prepares it too.")
                label = "Import again" if model["source"] == "upload" else "Prepare"
                if action.button(label, key=f"prepare-{model['id']}", type="primary"):
                    api.prepare_model(db, model["id"])
                    st.rerun()


model_cards()
