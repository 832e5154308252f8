"""Recipe forms generated from the method registry: one widget per declared parameter."""
from __future__ import annotations

import streamlit as st


def param_widget(param: dict, key: str, value):
    """Draw the widget for one parameter schema and return its value."""
    label = param["name"].replace("_", " ")
    help_text = param["help"]
    kind = param["type"]
    if kind == "float" and _spans_orders_of_magnitude(param):
        # a learning rate: a slider cannot pick 5e-5 on a 0..0.1 scale
        return st.number_input(label, min_value=float(param["minimum"]), max_value=float(param["maximum"]),
                               value=float(value), format="%.1e", step=float(param.get("step") or 1e-5),
                               help=help_text, key=key)
    if kind == "float":
        return st.slider(label, min_value=float(param["minimum"]), max_value=float(param["maximum"]),
                         value=float(value), step=float(param.get("step") or 0.01), help=help_text, key=key)
    if kind == "int":
        return st.number_input(label, min_value=int(param["minimum"]), max_value=int(param["maximum"]),
                               value=int(value), step=int(param.get("step") or 1), help=help_text, key=key)
    if kind == "bool":
        return st.toggle(label, value=bool(value), help=help_text, key=key)
    if kind == "choice":
        choices = param["choices"]
        return st.radio(label, choices, index=choices.index(value) if value in choices else 0,
                        help=help_text, key=key, horizontal=True)
    if kind == "multichoice":
        return st.multiselect(label, param["choices"], default=list(value), help=help_text, key=key)
    if kind == "names":
        text = st.text_input(label, value=", ".join(value), help=help_text + " Separate names with commas.",
                             key=key)
        return [name.strip() for name in text.split(",") if name.strip()]
    raise ValueError(f"no widget for parameter type {kind}")


def _spans_orders_of_magnitude(param: dict) -> bool:
    low, high = param.get("minimum"), param.get("maximum")
    if param["name"] == "lr":
        return True
    return low is not None and high is not None and low > 0 and high / low >= 1000
