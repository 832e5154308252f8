"""Jobs: the queue, live. Progress bars and messages refresh while anything is queued or running."""
import streamlit as st

from services import api
from ui.format import recipe_summary, status_label, where_it_ran
from ui.session import get_db, worker_banner

st.title("Jobs")
db = get_db()
worker_banner(db)

status_filter = st.segmented_control(
    "Show", ["all", "queued", "running", "succeeded", "failed", "cancelled"], default="all", key="status-filter")
page_size = 25
if st.session_state.get("jobs-page-filter") != status_filter:  # a new filter starts at the newest page
    st.session_state["jobs-page-filter"] = status_filter
    st.session_state["jobs-page"] = 0
page_number = st.session_state.get("jobs-page", 0)


def job_title(job: dict) -> str:
    if job["kind"] == "compress":
        return f"Compress **{job['model_id']}**: {recipe_summary(job['payload']['recipe'])}"
    if job["kind"] == "sensitivity":
        return f"Sensitivity scan of **{job['model_id']}** with `{job['payload']['method']}` (each layer alone)"
    return f"Prepare **{job['model_id']}** (train and measure the original model)"


def queue_busy(db) -> bool:
    return any(api.list_jobs(db, status=s, limit=1) for s in ("queued", "running"))


def job_list() -> None:
    db = get_db()
    if queue_busy(db) != busy:
        st.rerun()  # switch the refresh rate
    status = None if status_filter in (None, "all") else status_filter
    jobs = api.list_jobs(db, status=status, limit=page_size, offset=page_number * page_size)
    if not jobs:
        st.info("No jobs yet. Submit one on the Compress page." if status is None else f"No {status} jobs.")
        return
    for job in jobs:
        with st.container(border=True):
            top, side = st.columns([5, 1])
            top.markdown(f"{status_label(job['status'])} · {job_title(job)}")
            top.caption(f"job `{job['id'][:12]}` · created {job['created_at'][:19].replace('T', ' ')} UTC"
                        + (f" · attempt {job['attempts']} of {job['max_attempts']}" if job["attempts"] else "")
                        + (f" · ran on {where_it_ran(job['runner'])}" if job.get("runner") else ""))
            if job["status"] == "running":
                top.progress(job["progress"], text=job["message"] or "running")
            elif job["status"] == "queued":
                top.caption(job["message"] or "waiting for a worker")
            elif job["status"] == "failed":
                top.error(job["error"] or "failed")
            elif job["status"] == "cancelled":
                top.caption(job["message"])
            if job["status"] in ("queued", "running"):
                if side.button("Cancel", key=f"cancel-{job['id']}", disabled=job["cancel_requested"]):
                    api.cancel_job(db, job["id"])
                    st.rerun()
            if job["kind"] == "compress" and job["status"] == "succeeded":
                run = api.get_run(db, job["run_id"])
                if run["metrics"]:
                    top.markdown(f"→ {api.summary_sentence(run['metrics'], run['baseline'])}")
                side.page_link("app_pages/result.py", label="Result", icon=":material/link:", query_params={"id": job["run_id"]})
            if job["kind"] == "sensitivity" and job["status"] == "succeeded":
                scan = api.latest_scan(db, job["model_id"], job["payload"]["method"])
                if scan:
                    worst = ", ".join(f"`{row['layer']}`" for row in scan["layers"][:3])
                    top.markdown(f"→ most sensitive: {worst} (chart on the Compress page, under the step)")


# Refresh every second while something is queued or running, otherwise every few seconds (to
# notice jobs submitted from elsewhere) without re-reading the page's runs each second.
busy = queue_busy(db)
st.fragment(run_every=1.0 if busy else 5.0)(job_list)()
shown_status = None if status_filter in (None, "all") else status_filter
has_older = bool(api.list_jobs(db, status=shown_status, limit=1, offset=(page_number + 1) * page_size))
prev, _, nxt = st.columns([1, 4, 1])
if prev.button("← Newer", disabled=page_number == 0):
    st.session_state["jobs-page"] = page_number - 1
    st.rerun()
if nxt.button("Older →", disabled=not has_older):
    st.session_state["jobs-page"] = page_number + 1
    st.rerun()
