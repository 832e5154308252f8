"""Per-run database access for the pages, and the bits of page chrome they share."""
from __future__ import annotations

import streamlit as st

from services import api
from storage import explorer_home, open_db


@st.cache_resource
def _seeded(home: str) -> bool:
    api.connect(home)  # migrations + built-in model rows, once per process
    return True


def get_db():
    """A fresh connection for this script run: SQLite connections must not be shared between
    the threads Streamlit runs sessions on, and opening one costs about a millisecond."""
    home = explorer_home()
    _seeded(str(home))
    return open_db(home)


def worker_banner(db) -> None:
    if not api.worker_alive(db):
        st.warning(
            "No worker is running, so queued jobs will wait. `make run` starts one beside the web app "
            "(or run `python -m services worker`).", icon=":material/warning:")


def share_links_panel(db, kind: str, target: dict, key: str, value: str, site: str) -> None:
    """Read-only links anyone may open without signing in: create one (optionally expiring), see and revoke
    the ones made before (services/access.py)."""
    from services import access
    from services.errors import UserError

    with st.expander("Read-only link for anyone (opens without signing in)"):
        st.caption("Shows this and nothing else: no other page, no other run, nothing to submit or cancel. "
                   "Revoke it here whenever you like.")
        days = st.number_input("Expires after (days; 0 = never)", min_value=0.0, max_value=3650.0, value=0.0,
                               step=1.0, key=f"share-days-{kind}")
        if st.button("Create a read-only link", key=f"share-create-{kind}"):
            try:
                access.create_share(db, kind, target, days or None)
            except UserError as problem:
                st.error(str(problem))
        for share in access.shares_of(db, kind, key, value):
            state = ("withdrawn" if share["revoked_at"] else
                     f"expires {share['expires_at'][:16].replace('T', ' ')} UTC" if share["expires_at"] else "no expiry")
            left, right = st.columns([5, 1])
            left.code(f"{site}{share['path']}", language=None)
            left.caption(state)
            if not share["revoked_at"] and right.button("Revoke", key=f"revoke-{share['id']}"):
                access.revoke_share(db, share["id"])
                st.rerun()
