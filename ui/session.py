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
