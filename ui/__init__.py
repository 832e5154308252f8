"""Helpers shared by the Streamlit pages: formatting, tables and Altair charts. No torch here."""
