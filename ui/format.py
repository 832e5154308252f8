"""Numbers as a person reads them."""
from __future__ import annotations


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def human_count(n: float | None) -> str:
    if n is None:
        return "—"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return f"{n:.0f}"


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value * 1000:.1f} µs" if value < 1 else f"{value:.2f} ms"


def ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(map(str, value)) or "none"
    return str(value)


def recipe_summary(recipe: dict) -> str:
    """'prune.magnitude (amount 0.7) → quantize.dynamic (operators MatMul+Conv)': every step with the
    parameters that differ from their defaults (the headline number, its first float, always), and the
    name if any."""
    from services.engine.methods import REGISTRY  # torch-free declarations

    parts = []
    for step in recipe.get("steps", []):
        method = REGISTRY.get(step["method"])
        params = step.get("params", {})
        shown = []
        first_float = next((p for p in method.params if p.kind == "float"), None) if method else None
        for key, value in params.items():
            declared = method.param(key) if method else None
            headline = declared is not None and declared is first_float
            if headline or declared is None or value != declared.default:
                shown.append(f"{key.replace('_', ' ')} {_value(value)}")
        parts.append(f"{step['method']} ({', '.join(shown)})" if shown else step["method"])
    summary = " → ".join(parts) or "(no steps)"
    return f"{recipe['name']}: {summary}" if recipe.get("name") else summary


STATUS_ICONS = {"queued": ":material/schedule:", "running": ":material/autorenew:",
                "succeeded": ":green[:material/check_circle:]", "failed": ":red[:material/error:]",
                "cancelled": ":gray[:material/block:]"}


def status_label(status: str) -> str:
    return f"{STATUS_ICONS.get(status, '')} **{status}**"


def ratio_delta(value: float | None, better: str, worse: str) -> dict:
    """st.metric keyword arguments for a ratio to the original: '2.10× smaller' in green with an up
    arrow, or '4.20× slower' in red with a down arrow; nothing within 2% of the original."""
    if value is None or abs(value - 1) < 0.02:
        return {"delta": None}
    if value > 1:
        return {"delta": f"{value:.2f}× {better}", "delta_color": "normal", "delta_arrow": "up"}
    return {"delta": f"{1 / value:.2f}× {worse}", "delta_color": "inverse", "delta_arrow": "down"}


def per_second(value: float) -> str:
    return f"{value / 1e6:.2f} M/s" if value >= 1e6 else (f"{value / 1e3:.1f} k/s" if value >= 1e4 else f"{value:,.0f}/s")


def where_it_ran(runner: dict | None) -> str:
    """'ray (host, node 3af119a4, GPU 0)': the executor, the machine, and on Ray the node and GPUs."""
    if not runner:
        return ""
    details = [runner.get("node") or "?"]
    if runner.get("node_id"):
        details.append(f"node {runner['node_id'][:8]}")
    if runner.get("gpu_ids"):
        details.append("GPU " + ", ".join(runner["gpu_ids"]))
    return f"{runner.get('executor', '?')} ({', '.join(details)})"
