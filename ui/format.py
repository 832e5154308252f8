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


def recipe_summary(recipe: dict) -> str:
    """'prune.magnitude (amount 0.7) → quantize.dynamic': the steps in one line."""
    parts = []
    for step in recipe.get("steps", []):
        params = step.get("params", {})
        headline = next((f"{k} {v:g}" for k, v in params.items() if isinstance(v, float)), "")
        parts.append(f"{step['method']} ({headline})" if headline else step["method"])
    return " → ".join(parts) or "(no steps)"


STATUS_ICONS = {"queued": ":material/schedule:", "running": ":material/autorenew:",
                "succeeded": ":green[:material/check_circle:]", "failed": ":red[:material/error:]",
                "cancelled": ":gray[:material/block:]"}


def status_label(status: str) -> str:
    return f"{STATUS_ICONS.get(status, '')} **{status}**"


def ratio_delta(value: float | None, better: str, worse: str) -> str | None:
    """A metric delta that reads right: '2.10× smaller' (better, up) or '-4.20× slower' (worse,
    down). The sign drives st.metric's arrow and colour; no delta within 2% of the original."""
    if value is None or abs(value - 1) < 0.02:
        return None
    return f"{value:.2f}× {better}" if value > 1 else f"-{1 / value:.2f}× {worse}"


def per_second(value: float) -> str:
    return f"{value / 1e6:.2f} M/s" if value >= 1e6 else (f"{value / 1e3:.1f} k/s" if value >= 1e4 else f"{value:,.0f}/s")
