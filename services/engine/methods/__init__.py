"""All registered methods. Adding a method = adding one file here and one line below."""
from services.engine.methods import prune_magnitude, quantize_dynamic
from services.engine.registry import Method

REGISTRY: dict[str, Method] = {m.name: m for m in (prune_magnitude.METHOD, quantize_dynamic.METHOD)}


def get_method(name: str) -> Method | None:
    return REGISTRY.get(name)
