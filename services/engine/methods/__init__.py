"""All registered methods. Adding a method = adding one module here that defines METHOD.

Modules are found by name, so two people adding methods never edit the same file. Declarations
import no torch: the web process builds its forms from them.
"""
import importlib
import pkgutil

from services.engine.registry import Method


def _discover() -> dict[str, Method]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue  # helpers shared by several methods
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            if method.name in found:
                raise RuntimeError(f"two modules register the method {method.name!r}")
            found[method.name] = method
    # catalog order: the families in the order a user meets them, then by name
    return dict(sorted(found.items(), key=lambda item: (FAMILY_ORDER.index(item[0].split(".")[0])
                                                        if item[0].split(".")[0] in FAMILY_ORDER
                                                        else len(FAMILY_ORDER), item[0])))


FAMILY_ORDER = ["prune", "quantize", "lowrank", "share", "vocab", "distill", "sequence"]
REGISTRY: dict[str, Method] = _discover()


def get_method(name: str) -> Method | None:
    return REGISTRY.get(name)
