"""Compression Explorer: the Streamlit entry point (navigation, page config, sidebar).

The web process never imports torch: everything heavy happens in jobs run by the worker.

Who may see what (services/access.py): a share link shows its one result, comparison or search with no
navigation; a dashboard served to a network shows the sign-in page until the visitor signs in.
"""
from urllib.parse import urlparse

import streamlit as st

from services import access

st.set_page_config(page_title="Compression Explorer", page_icon=":material/compress:", layout="wide")

share_page = st.Page("app_pages/share.py", title="Shared", icon=":material/link:", url_path="share",
                     visibility="hidden")
pages = [
    st.Page("app_pages/models.py", title="Models", icon=":material/neurology:", default=True),  # served at /
    st.Page("app_pages/compress.py", title="Compress", icon=":material/compress:", url_path="compress"),
    st.Page("app_pages/data.py", title="Data", icon=":material/dataset:", url_path="data"),
    st.Page("app_pages/jobs.py", title="Jobs", icon=":material/pending_actions:", url_path="jobs"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/insights:", url_path="compare"),
    st.Page("app_pages/search.py", title="Search", icon=":material/search:", url_path="search"),
    st.Page("app_pages/result.py", title="Result", icon=":material/link:", url_path="result", visibility="hidden"),
]


def signed_in() -> bool:
    try:
        if "auth" in st.secrets:
            return bool(st.user.is_logged_in)
    except Exception:  # noqa: BLE001 - no secrets.toml: the password sign-in, if any
        pass
    return bool(st.session_state.get("signed_in"))


# A share link shows that one result, comparison or search and nothing else: no navigation at all.
def _no_page() -> None:
    """The navigation's default page in a share view: never shown (the address is /share), but a
    navigation without a default would send /share to "page not found"."""


if urlparse(st.context.url or "").path.rstrip("/").endswith("/share"):
    st.navigation([st.Page(_no_page, title="Compression Explorer", default=True), share_page],
                  position="hidden").run()
elif access.sign_in_required() and not signed_in():
    # Every address shows the sign-in page (the pages below are not even registered); the known ones are
    # routed to it too, so that a bookmarked /compare asks for the sign-in instead of saying "not found".
    from ui.sign_in import show_sign_in

    gate = [st.Page(show_sign_in, title="Sign in", default=True)]
    gate += [st.Page(show_sign_in, title="Sign in", url_path=page.url_path) for page in pages if page.url_path]
    st.navigation(gate + [share_page], position="hidden").run()
else:
    page = st.navigation(pages + [share_page])
    with st.sidebar:
        st.caption("Try compression options on a neural network and see what each does to its size, "
                   "speed and score. Every result has a link you can share.")
        if access.sign_in_required() and signed_in() and st.button("Sign out"):
            if st.session_state.get("signed_in"):  # the team password
                st.session_state.signed_in = False
                st.rerun()
            st.logout()  # the OpenID Connect provider's session (st.login)
    page.run()
