"""Compression Explorer: the Streamlit entry point (navigation, page config, sidebar).

The web process never imports torch: everything heavy happens in jobs run by the worker.
"""
import streamlit as st

st.set_page_config(page_title="Compression Explorer", page_icon=":material/compress:", layout="wide")

pages = [
    st.Page("app_pages/models.py", title="Models", icon=":material/neurology:", default=True),  # served at /
    st.Page("app_pages/compress.py", title="Compress", icon=":material/compress:", url_path="compress"),
    st.Page("app_pages/data.py", title="Data", icon=":material/dataset:", url_path="data"),
    st.Page("app_pages/jobs.py", title="Jobs", icon=":material/pending_actions:", url_path="jobs"),
    st.Page("app_pages/compare.py", title="Compare", icon=":material/insights:", url_path="compare"),
    st.Page("app_pages/search.py", title="Search", icon=":material/search:", url_path="search"),
    st.Page("app_pages/result.py", title="Result", icon=":material/link:", url_path="result", visibility="hidden"),
]
page = st.navigation(pages)
with st.sidebar:
    st.caption("Try compression options on a neural network and see what each does to its size, "
               "speed and score. Every result has a link you can share.")
page.run()
