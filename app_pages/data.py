"""Data: bring your own data (texts in a CSV, arrays in an NPZ, WAV files in a zip) and see what each can do."""
from pathlib import Path

import streamlit as st

from services import api
from services.errors import UserError
from ui.session import get_db

KIND_NAMES = {"csv": "Texts (CSV)", "npz": "Arrays (NPZ)", "wav": "Audio (WAV)"}

st.title("Data")
st.write("Bring your own data to score models on. It is checked when you import it: a problem is named "
         "by its row, column or file, and nothing is stored until the whole file is fine.")
db = get_db()

with st.expander("Which files are accepted", icon=":material/help:"):
    st.markdown(
        "- **CSV** of texts: a header row `text,label` (or `text` alone), one sample per row, saved as UTF-8.\n"
        "- **NPZ** of arrays, saved with `numpy.savez(file, X=X, y=y)`: `X` has one row per sample; `y`, "
        "optional, holds one class per sample (numbers or names).\n"
        "- **ZIP** of WAV files: one folder per label (`dog/1.wav`, `cat/7.wav`), or every file at the top "
        "level when there are no labels. Stereo files and other sample rates are converted to 16 kHz mono.\n\n"
        "With labels, a model's accuracy can be measured. Without labels, a compressed model is scored by "
        "how closely it agrees with the original (fidelity).")

# A new key after each import empties the uploader, so the same file is not imported twice.
generation = st.session_state.setdefault("data-upload-generation", 0)
with st.container(border=True):
    uploaded = st.file_uploader("Data file", type=["csv", "npz", "zip"], key=f"data-file-{generation}")
    name = st.text_input("Name (optional)", key=f"data-name-{generation}",
                         placeholder=Path(uploaded.name).stem if uploaded else "the file name")
    if st.button("Import", type="primary", disabled=uploaded is None, icon=":material/upload:"):
        try:
            record = api.import_dataset(db, uploaded.name, uploaded.getvalue(), name or None)
        except UserError as error:
            st.error(str(error), icon=":material/error:")
        else:
            st.session_state["data-imported"] = record["id"]
            st.session_state["data-upload-generation"] = generation + 1
            st.rerun()


def class_line(classes: dict, limit: int = 12) -> str:
    ordered = sorted(classes.items(), key=lambda kv: (-kv[1], kv[0]))
    line = " · ".join(f"{label} **{count:,}**" for label, count in ordered[:limit])
    return line + (f" · and {len(ordered) - limit} more" if len(ordered) > limit else "")


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def details(dataset: dict) -> str:
    summary = dataset["summary"]
    if dataset["kind"] == "csv":
        chars = summary["text_chars"]
        return f"Texts of {chars['min']:,} to {chars['max']:,} characters (mean {chars['mean']:,.0f})."
    if dataset["kind"] == "npz":
        x = summary["X"]
        shape = " × ".join(str(d) for d in x["shape"])
        converted = f", converted from {x['source_dtype']}" if x["source_dtype"] != "float32" else ""
        return f"`X` is {shape} ({x['dtype']}{converted})."
    seconds = summary["duration_s"]
    text = (f"16 kHz mono clips of {seconds['min']:.2f} to {seconds['max']:.2f} s, "
            f"{duration(seconds['total'])} in all.")
    if summary["converted"]:
        text += f" {summary['converted']} file(s) converted to 16 kHz mono."
    return text


st.subheader("Your datasets")
datasets = api.list_datasets(db)
imported = st.session_state.pop("data-imported", None)
if not datasets:
    st.info("No datasets yet. Import one above.")
for dataset in datasets:
    if dataset["id"] == imported:
        st.success(f"Imported **{dataset['name']}**.", icon=":material/check_circle:")
for dataset in datasets:
    summary = dataset["summary"]
    labeled = dataset["has_labels"]
    with st.container(border=True):
        st.markdown(f"#### {dataset['name']}")
        st.markdown(f":blue-badge[{KIND_NAMES[dataset['kind']]}] "
                    + (":green-badge[labeled]" if labeled else ":gray-badge[no labels]"))
        samples = f"**{dataset['n_samples']:,} samples**"
        if labeled:
            st.markdown(f"{samples} in **{len(summary['classes'])} classes**: {class_line(summary['classes'])}")
            st.markdown(":green[:material/check_circle:] **Labels:** accuracy can be measured and supervised "
                        "recovery is possible.")
        else:
            st.markdown(samples)
            st.markdown(":orange[:material/info:] **No labels:** scored by fidelity (agreement with the original "
                        "model); only label-free recovery objectives.")
        st.caption(f"{details(dataset)}  \nImported {dataset['created_at'][:16].replace('T', ' ')} UTC · "
                   f"id `{dataset['id']}`")
        if dataset["kind"] == "wav" and summary["converted"]:
            with st.expander("Converted files"):
                for group in summary["conversions"]:
                    more = group["count"] - len(group["files"])
                    st.markdown(f"**{group['from']} → {group['to']}**: " + ", ".join(f"`{f}`" for f in group["files"])
                                + (f" and {more} more" if more else ""))
