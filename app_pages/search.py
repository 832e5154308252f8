"""Search: say what you can afford to lose; the product finds how far a compression rate can go.

/search starts one; /search?id=… shows one (live while it runs, and as a share link afterwards).
"""
import altair as alt
import pandas as pd
import streamlit as st

from services import api
from services.catalog import TASKS
from services.errors import UserError
from ui.session import get_db, worker_banner

db = get_db()
search_id = st.query_params.get("id", "")


def show(found_id: str) -> None:
    try:
        found = api.get_search(db, found_id)
    except UserError:
        st.error("No search has this link. Check that the whole link was copied.")
        return
    spec = found["spec"]
    model = api.get_model(db, found["model_id"])
    st.title(f"{model['name']}: how far can {spec['rate']} go?")
    st.write(f"Goal: the most compression with a score drop of at most **{spec['max_drop']:g} points** on "
             f"`{spec['recipe']['task']}`, in at most {spec['budget']} trials, over {spec['param']} from "
             f"{spec['low']:g} to {spec['high']:g}. Each trial is an ordinary compress job (Jobs page).")
    if found["outcome"]:
        best = found["outcome"]["best"]
        (st.success if best else st.warning)(found["outcome"]["sentence"])
        if best:
            st.page_link("app_pages/result.py", label="Open the recommended run", icon=":material/star:",
                         query_params={"id": best["run_id"]})
    else:
        st.info(f"Searching: {len(found['trials'])} trial(s) so far. This page fills in as trials finish.")
    trials = found["trials"]
    if not trials:
        return
    rows = [{"trial": index + 1, spec["param"]: t["rate"], "status": t["status"],
             "score drop (points)": t.get("drop"), "× smaller": t.get("size_ratio"), "× faster": t.get("speed_ratio"),
             "within the goal": (t["drop"] <= spec["max_drop"]) if "drop" in t else None,
             "link": t["share_path"]} for index, t in enumerate(trials)]
    frame = pd.DataFrame(rows)
    measured = frame.dropna(subset=["score drop (points)"])
    if len(measured):
        points = alt.Chart(measured).mark_point(filled=True, size=120).encode(
            x=alt.X(f"{spec['param']}:Q", title=f"{spec['param']} ({spec['compresses']} compresses more)"),
            y=alt.Y("score drop (points):Q", title="Score drop (points, lower is better)"),
            color=alt.Color("within the goal:N", scale=alt.Scale(domain=[True, False], range=["#2ca02c", "#d62728"]),
                            legend=alt.Legend(title="within the goal", orient="bottom")),
            tooltip=["trial", f"{spec['param']}:Q", alt.Tooltip("score drop (points):Q", format=".2f"),
                     alt.Tooltip("× smaller:Q", format=".2f"), alt.Tooltip("× faster:Q", format=".2f")],
            href="link")
        order = alt.Chart(measured).mark_text(dy=-12, fontSize=11).encode(
            x=f"{spec['param']}:Q", y="score drop (points):Q", text="trial:Q")
        limit = alt.Chart(pd.DataFrame({"y": [spec["max_drop"]]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y")
        st.altair_chart((points + order + limit).properties(height=300), width="stretch")
        st.caption("Each point is one trial, numbered in the order the search chose them; the dashed line is the "
                   "allowed drop. Click a point to open its run.")
    st.dataframe(frame, hide_index=True, width="stretch",
                 column_config={"link": st.column_config.LinkColumn("run", display_text="open"),
                                "score drop (points)": st.column_config.NumberColumn(format="%.2f"),
                                "× smaller": st.column_config.NumberColumn(format="%.2f"),
                                "× faster": st.column_config.NumberColumn(format="%.2f")})


if search_id:
    try:
        running = api.get_search(db, search_id)["status"] == "running"
    except UserError:
        running = False
    if running:
        worker_banner(db)
    st.fragment(run_every=2.0 if running else None)(show)(search_id)
    st.page_link("app_pages/search.py", label="Start another search", icon=":material/search:")
    st.stop()

st.title("Search")
st.write("Say what you can afford to lose; the search finds how far one compression setting can go, measuring "
         "a few settings instead of a whole grid (each one an ordinary job), and recommends the best it measured.")
worker_banner(db)
models = [m for m in api.list_models(db) if m["status"] == "ready"]
if not models:
    st.info("No model is ready yet: prepare or import one on the Models page first.")
    st.stop()
model_ids = [m["id"] for m in models]
wanted = st.query_params.get("model")
model_id = st.selectbox("Model", model_ids, index=model_ids.index(wanted) if wanted in model_ids else 0,
                        format_func=lambda i: next(f"{m['name']} ({i})" for m in models if m["id"] == i))
model = api.get_model(db, model_id)
applies = {m["name"] for m in api.method_applicability(model) if m["applies"]}
rates = {name: r for name, r in api.search_rates().items() if r["method"] in applies}
if not rates:
    st.info("None of the settings the search can move applies to this model.")
    st.stop()
with st.form("start-search"):
    rate = st.selectbox("Setting to push", list(rates), format_func=lambda n: f"{n} — {rates[n]['help']}")
    task = st.selectbox("Score it on", model["tasks"], format_func=lambda t: f"{t} — {TASKS[t]['description']}")
    max_drop = st.number_input("Score points you can afford to lose", min_value=0.0, max_value=100.0, value=1.0,
                               step=0.5, help="The search never recommends a setting whose measured drop is larger.")
    budget = st.slider("Trials at most", 2, 15, 7, help="Each trial is one compress job; about 7 find the limit "
                       "within a few per cent of a 20-point grid.")
    if st.form_submit_button("Start the search", type="primary"):
        try:
            started = api.start_search(db, model_id, {}, rate, max_drop, budget, task)
        except UserError as problem:
            st.error(str(problem))
        else:
            st.query_params["id"] = started["id"]
            st.rerun()

earlier = api.list_searches(db, model_id)
if earlier:
    st.subheader("Earlier searches of this model")
    for found in earlier[:20]:
        sentence = found["outcome"]["sentence"] if found["outcome"] else "running…"
        st.page_link("app_pages/search.py", label=f"{found['spec']['rate']}, ≤ {found['spec']['max_drop']:g} points: "
                     f"{sentence[:140]}", query_params={"id": found["id"]})
