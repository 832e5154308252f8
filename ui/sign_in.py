"""Sign in: what every page shows first when the dashboard is served to a network (services/access.py)."""
import os

import streamlit as st

from services import access


def show_sign_in() -> None:
    st.title("Compression Explorer")
    oidc = False
    try:
        oidc = "auth" in st.secrets
    except Exception:  # noqa: BLE001 - no secrets.toml at all: no OpenID Connect provider
        oidc = False
    if oidc:
        st.write("Sign in to see this team's models, jobs and results.")
        if st.button("Sign in", type="primary"):
            st.login()
    elif os.environ.get("EXPLORER_PASSWORD_HASH"):
        with st.form("sign-in"):
            password = st.text_input("Team password", type="password")
            if st.form_submit_button("Sign in", type="primary"):
                if access.password_matches(password, os.environ["EXPLORER_PASSWORD_HASH"]):
                    st.session_state.signed_in = True
                    st.rerun()
                st.error("That password is not right.")
    else:
        st.error("This dashboard is served to a network, and no sign-in is configured, so it shows nothing. Set "
                 "EXPLORER_PASSWORD_HASH (make one with `python -m services hash-password`) or an OpenID Connect "
                 "provider in .streamlit/secrets.toml ([auth]), then restart it.")
    st.caption("A shared link (/share?id=…) opens without signing in.")
