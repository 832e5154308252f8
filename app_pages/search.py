"""Search: say what you can afford to lose; the product finds how far a compression rate can go.

/search starts one; /search?id=… shows one (live while it runs, and as a share link afterwards).
"""
import altair as alt
import pandas as pd
import streamlit as st

from services import api
from services.catalog import TASKS
from services.errors import UserError
from ui.session import get_db, share_links_panel, worker_banner

db = get_db()
search_id = st.query_params.get("id", "")


def _points(value: float) -> str:
    return f"{value:g} point{'' if value == 1 else 's'}"


def _goal(spec: dict) -> str:
    if spec.get("goal") == "front":
        return "the Pareto front of score against size"
    if spec.get("goal") == "size":
        return f"the best score with an ONNX file of at most **{spec['max_mb']:g} MB**"
    if spec.get("goal") == "speed":
        return f"the best score at least **{spec['min_speedup']:g}× faster** at batch 1"
    return f"the most compression with a score drop of at most **{_points(spec['max_drop'])}**"


def show(found_id: str, refreshing: bool = False) -> None:
    try:
        found = api.get_search(db, found_id)
    except UserError:
        st.error("No search has this link. Check that the whole link was copied.")
        return
    if refreshing and found["status"] != "running":
        st.rerun()  # the search just ended: redraw the whole page once, without the timer
    spec = found["spec"]
    portfolio = spec.get("strategy") == "portfolio"
    rates = spec.get("rates") or [spec]
    # a column per setting, by its short name unless two share it (prune.structured.amount, prune.magnitude.amount)
    shorts = [r["param"] for r in rates]
    column = {r["rate"]: (r["rate"] if shorts.count(r["param"]) > 1 else r["param"]) for r in rates}
    model = api.get_model(db, found["model_id"])
    if portfolio:
        st.title(f"{model['name']}: " + {"size": f"the best it can do in {spec.get('max_mb')} MB",
                                          "speed": f"the best it can do {spec.get('min_speedup')}× faster"}.get(
            spec.get("goal"), "how small can it get?"))
        ranges = f"{len(spec['candidates'])} candidate recipes ({'; '.join(c['label'] for c in spec['candidates'])})"
    else:
        st.title(f"{model['name']}: how far can {' and '.join(r['rate'] for r in rates)} go?")
        ranges = ", ".join(f"{column[r['rate']]} from {r['low']:g} to {r['high']:g} ({r['compresses']} compresses more)"
                           for r in rates)
    how = {"bracket": "bracketing the limit", "optuna": "Optuna's sampler (it resumes after a restart)",
           "portfolio": "measuring every candidate, then bracketing the rate of the most promising one"}[
        spec.get("strategy", "bracket")]
    st.write(f"Goal: {_goal(spec)} on `{spec['recipe']['task']}`, in at most {spec['budget']} trials, over {ranges}; "
             f"by {how}. Each trial is an ordinary compress job (Jobs page).")
    outcome = found["outcome"]
    if outcome:
        good = outcome.get("best") or outcome.get("front")
        (st.success if good else st.warning)(outcome["sentence"])
        if outcome.get("best"):
            st.page_link("app_pages/result.py", label="Open the recommended run", icon=":material/star:",
                         query_params={"id": outcome["best"]["run_id"]})
            st.page_link("app_pages/compress.py", label="Run the recommended recipe (opens it in Compress, ready to "
                         "submit or change)", icon=":material/play_arrow:",
                         query_params={"model": found["model_id"], "recipe_of": outcome["best"]["run_id"]})
        for trial in outcome.get("front") or []:
            settings = ", ".join(f"{column.get(n, n)} {v:.4g}" for n, v in trial["params"].items())
            st.page_link("app_pages/result.py", icon=":material/timeline:", query_params={"id": trial["run_id"]},
                         label=f"On the front: {settings}: {trial['size_ratio']:.2f}× smaller, "
                               f"{trial['score_name']} {100 * trial['score']:.2f}% ({api.score_change_words(-trial['drop'])})")
    else:
        st.info(f"Searching: {len(found['trials'])} trial(s) so far. This page fills in as trials finish.")
    trials = found["trials"]
    if not trials:
        return
    within = spec.get("max_drop")
    front_runs = {t["run_id"] for t in (outcome or {}).get("front") or []}
    rows = []
    for index, t in enumerate(trials):
        settings = ({"candidate": t["candidate"], "settings": ", ".join(f"{n.split('.')[-1]} {v:.4g}"
                                                                       for n, v in t["params"].items())}
                    if portfolio else {column[r["rate"]]: t["params"].get(r["rate"], t["rate"]) for r in rates})
        if spec.get("goal") in ("size", "speed"):
            over = ("drop" in t) and (t["size_bytes"] / 1e6 > spec["max_mb"] if spec["goal"] == "size"
                                      else t["speed_ratio"] < spec["min_speedup"])
            verdict = "" if "drop" not in t else "over the budget" if over else "within the budget"
        elif within is not None:
            verdict = "" if "drop" not in t else "within the goal" if t["drop"] <= within else "over the allowed drop"
        else:
            verdict = "on the front" if t["run_id"] in front_runs else ("" if "drop" not in t else "not on the front")
        if (t.get("error") or "").startswith("stopped early"):
            verdict = t["error"]  # ruled out by a finished trial, before it finished
        row = {"trial": index + 1, "verdict": verdict, **settings, "score drop (points)": t.get("drop"),
               "× smaller": t.get("size_ratio"), "speed vs the original": t.get("speed_ratio"), "status": t["status"],
               "link": t["share_path"]}
        rows.append(row)
    frame = pd.DataFrame(rows)
    measured = frame.dropna(subset=["score drop (points)"])
    x_rate = rates[0]
    if len(measured):
        # The first trial often tries the extreme (a drop of 80+ points); the answer lies near the
        # allowed drop. Drops beyond the cap are drawn on the top edge (the tooltip has the value).
        cap = max(5.0, 4 * (within or 1.0))
        measured = measured.assign(shown=measured["score drop (points)"].clip(upper=cap))
        y = alt.Y("shown:Q", title="Score drop (points)",
                  scale=alt.Scale(domain=[min(0.0, float(measured["shown"].min())), cap], nice=False))
        verdicts = (["within the budget", "over the budget"] if spec.get("goal") in ("size", "speed")
                    else ["within the goal", "over the allowed drop"] if within is not None
                    else ["on the front", "not on the front"])
        color = alt.Color("verdict:N", scale=alt.Scale(domain=verdicts, range=["#2ca02c", "#d62728"]),
                          legend=alt.Legend(title=None, orient="bottom", labelLimit=300))
        if spec.get("goal") == "speed":
            x = alt.X("speed vs the original:Q", title="× faster than the original (batch 1)",
                      scale=alt.Scale(zero=False, padding=12))
        elif spec.get("goal") in ("front", "size") or portfolio:
            x = alt.X("× smaller:Q", title="× smaller (size)", scale=alt.Scale(zero=False, padding=12))
        else:
            x = alt.X(f"{column[x_rate['rate']]}:Q", title=f"{column[x_rate['rate']]} (more compression to the right)",
                      scale=alt.Scale(reverse=x_rate["compresses"] == "lower", zero=False, nice=False, padding=12))
        tooltip = ["trial", *(["candidate", "settings"] if portfolio else [f"{column[r['rate']]}:Q" for r in rates]),
                   alt.Tooltip("score drop (points):Q", format=".2f"),
                   alt.Tooltip("× smaller:Q", format=".2f"), alt.Tooltip("speed vs the original:Q", format=".2f")]
        points_layer = alt.Chart(measured).mark_point(filled=True, size=120).encode(x=x, y=y, color=color,
                                                                                   tooltip=tooltip, href="link")
        layers = points_layer
        if not (spec.get("goal") == "front" or portfolio):  # numbered in order; elsewhere points bunch up
            layers += alt.Chart(measured).mark_text(dy=-12, fontSize=11).encode(x=x, y=y, text="trial:Q")
        if within is not None:
            layers += alt.Chart(pd.DataFrame({"y": [within]})).mark_rule(strokeDash=[4, 4], color="gray").encode(y="y")
        st.altair_chart(layers.properties(height=320), width="stretch")
        st.caption("Each point is one trial" + ("" if portfolio or within is None else
                                                ", numbered in the order the search chose it")
                   + (f"; the dashed line is the allowed drop ({within:g})" if within is not None else "")
                   + f"; drops over {cap:g} points are drawn on the top edge"
                   + ". Hover for the details; click a point to open its run.")
    st.dataframe(frame, hide_index=True, width="stretch",
                 column_config={"link": st.column_config.LinkColumn("run", display_text="open", width="small"),
                                "score drop (points)": st.column_config.NumberColumn(format="%.2f"),
                                "× smaller": st.column_config.NumberColumn(format="%.2f×"),
                                "speed vs the original": st.column_config.NumberColumn(
                                    format="%.2f×", help="Above 1: faster than the original; below 1: slower.")})


if search_id:
    try:
        running = api.get_search(db, search_id)["status"] == "running"
    except UserError:
        running = False
    if running:
        worker_banner(db)
    st.fragment(run_every=2.0 if running else None)(show)(search_id, refreshing=running)
    try:
        api.get_search(db, search_id)
    except UserError:
        pass
    else:
        site = (st.context.url or "").split("?")[0].rsplit("/", 1)[0]
        share_links_panel(db, "search", {"search": search_id}, "search", search_id, site)
    st.page_link("app_pages/search.py", label="Start another search", icon=":material/search:")
    st.stop()

st.title("Search")
st.write("Say what you can afford to lose; the search finds how far compression can go, measuring a few "
         "settings instead of a whole grid (each one an ordinary job), and recommends the best it measured.")
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
    preferred = [n for n in ("prune.structured.amount", "sequence.pool.rate") if n in rates][:1] or list(rates)[:1]
    chosen = st.multiselect("Settings to push (leave empty to let the search choose the methods)", list(rates),
                            default=preferred, format_func=lambda n: f"{n} — {rates[n]['help']}",
                            help="One setting is bracketed in a few trials; several at once are searched with Optuna; "
                                 "none: a portfolio of methods is measured first, then the best one is refined.")
    task = st.selectbox("Score it on", model["tasks"], format_func=lambda t: f"{t} — {TASKS[t]['description']}")
    goal = st.radio("Goal", list(api.SEARCH_GOALS), format_func=api.SEARCH_GOALS.get, horizontal=True)
    max_drop = st.number_input("Score points you can afford to lose", min_value=0.0, max_value=100.0, value=1.0,
                               step=0.5, help="The search never recommends a setting whose measured drop is larger. "
                                              "Used by the first goal only.")
    size_col, speed_col = st.columns(2)
    max_mb = size_col.number_input("Size budget (MB), for the size goal", min_value=0.001, value=1.0, step=0.5,
                                   format="%.3f")
    min_speedup = speed_col.number_input("Speed-up wanted (×), for the speed goal", min_value=1.05, value=2.0,
                                         step=0.25)
    budget = st.slider("Trials at most", 2, 15, 7, help="Each trial is one compress job; about 7 find the limit "
                       "of one setting within a few per cent of a 20-point grid.")
    minutes = st.number_input("Minutes at most (0: no time limit)", min_value=0.0, max_value=1440.0, value=0.0,
                              step=5.0, help="No new trial starts after this; the best trial measured wins.")
    if st.form_submit_button("Start the search", type="primary"):
        try:
            started = api.start_search(db, model_id, {}, chosen, max_drop if goal == "max-drop" else None, budget,
                                       task, goal=goal, minutes=minutes or None,
                                       max_mb=max_mb if goal == "size" else None,
                                       min_speedup=min_speedup if goal == "speed" else None)
        except UserError as problem:
            st.error(str(problem))
        else:
            st.query_params["id"] = started["id"]
            st.rerun()

earlier = api.list_searches(db, model_id)
if earlier:
    st.subheader("Earlier searches of this model")
    for found in earlier[:20]:
        spec, outcome = found["spec"], found["outcome"]
        best = (outcome or {}).get("best")
        if best:
            what = f"best {best['size_ratio']:.2f}× smaller, {api.score_change_words(-best['drop'])}"
        elif outcome:
            what = f"{len(outcome.get('front') or [])} run(s) on the front" if outcome.get("front") else "no answer"
        else:
            what = "running…"
        goal_text = {"front": "front", "size": f"≤ {spec.get('max_mb')} MB",
                     "speed": f"≥ {spec.get('min_speedup')}× faster"}.get(spec.get("goal"))
        goal_text = goal_text or f"≤ {_points(spec['max_drop'])}"
        names = ", ".join(r["rate"] for r in spec.get("rates") or []) or "methods chosen by the search"
        st.page_link("app_pages/search.py", query_params={"id": found["id"]},
                     label=f"{found['created_at'][:16].replace('T', ' ')} UTC · {names} · {goal_text} · {what}")
