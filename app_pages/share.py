"""A share link (/share?id=…): one result, comparison or search, read-only, for anyone with the link.

No navigation, no other run's data, nothing to submit or cancel: a visitor who is not signed in sees
this page and nothing else (app.py); a revoked, expired or unknown link says so and shows nothing.
"""
import json

import pandas as pd
import streamlit as st

from services import access, api
from services.errors import UserError
from ui.format import human_bytes, ms, recipe_summary
from ui.session import get_db
from ui.tables import COLUMN_ORDER, column_config, runs_frame

db = get_db()
try:
    share = access.open_share(db, st.query_params.get("id", ""))
except UserError as problem:
    st.title("Shared link")
    st.error(str(problem))
    st.stop()

target = share["target"]


def run_facts(run: dict) -> None:
    metrics, baseline = run["metrics"], run["baseline"]
    st.subheader(api.summary_sentence(metrics, baseline))
    st.table(pd.DataFrame([
        {"": "original", "size": human_bytes(baseline["size_bytes"]), "latency, batch 1": ms(baseline["latency_ms"]["p50"]),
         metrics["score_name"]: f"{100 * baseline['score']:.2f}%"},
        {"": "compressed", "size": human_bytes(metrics["size_bytes"]), "latency, batch 1": ms(metrics["latency_ms"]["p50"]),
         metrics["score_name"]: f"{100 * metrics['score']:.2f}%"}]).set_index(""))
    for sentence in metrics.get("notes", []):
        st.caption(f"• {sentence}")
    st.markdown("**Recipe**")
    st.code(json.dumps(run["recipe"], indent=2), language="json")


if share["kind"] == "run":
    run = api.get_run(db, target["run"])
    model = api.get_model(db, run["model_id"])
    st.title(f"{model['name']}: {recipe_summary(run['recipe'])}")
    if run.get("metrics") is None:
        st.info(f"This run is {run['status']}.")
    else:
        run_facts(run)
elif share["kind"] == "comparison":
    runs = [api.get_run(db, run_id) for run_id in target["runs"]]
    runs = [run for run in runs if run.get("metrics")]
    st.title(f"{api.get_model(db, target['model'])['name']}: {len(runs)} run{'s' if len(runs) != 1 else ''} "
             "side by side")
    if runs:
        shown = [column for column in COLUMN_ORDER if column != "link"]  # no way on to the full result pages
        st.dataframe(runs_frame(runs, runs[0]["baseline"]).drop(columns=["link"]), column_config=column_config(st),
                     column_order=shown, hide_index=True, width="stretch")
        for run in runs:
            st.markdown(f"- {recipe_summary(run['recipe'])}: {api.summary_sentence(run['metrics'], run['baseline'])}")
else:
    found = api.get_search(db, target["search"])
    st.title(f"{api.get_model(db, found['model_id'])['name']}: a compression search")
    outcome = found["outcome"]
    (st.success if outcome and (outcome.get("best") or outcome.get("front")) else st.info)(
        outcome["sentence"] if outcome else f"Still searching: {len(found['trials'])} trial(s) so far.")
    rows = [{"trial": index + 1, "settings": ", ".join(f"{name.split('.')[-1]} {value:.4g}"
                                                       for name, value in t["params"].items()) or t.get("candidate"),
             "score drop (points)": t.get("drop"), "× smaller": t.get("size_ratio"),
             "× faster": t.get("speed_ratio"), "status": t["status"]} for index, t in enumerate(found["trials"])]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
st.caption("A read-only link shared from Compression Explorer"
           + (f"; it expires {share['expires_at'][:16].replace('T', ' ')} UTC." if share["expires_at"] else "."))
