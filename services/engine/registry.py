"""The method registry: every compression method is one unit with a declared parameter schema.

This module and the method declarations import no torch, so the web process can build its
forms from the registry and the CLI can validate recipes without loading a model. Each method's
`apply` imports its heavy libraries when it runs, inside the job's child process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # 'float' | 'int' | 'bool' | 'choice' | 'multichoice' | 'names'
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple = ()
    # Architectures the parameter means something for (empty = all the method's): the form shows it
    # only for those; a recipe may still carry it, at its default.
    architectures: tuple = ()
    # A compression rate the search may move: 'higher' or 'lower' compresses more (services/search.py).
    compresses: str = ""

    def clean(self, value: Any, where: str, field: str) -> Any:
        """`value` checked against this parameter and converted (an int to a float where a float is due);
        a UserError that names `where` ("Step 2 (prune.magnitude): 'amount'") and the form's `field` otherwise."""
        import math

        from services.errors import UserError

        if self.kind in ("float", "int"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where} must be a number, not {value!r}.", field=field)
            if isinstance(value, int) and abs(value) > 2 ** 53:
                raise UserError(f"{where} is far out of range; got a number with {len(str(value))} digits.",
                                field=field)
            if self.kind == "int":
                if float(value) != int(value):
                    raise UserError(f"{where} must be a whole number, not {value!r}.", field=field)
                value = int(value)
            else:
                value = float(value)
            if not math.isfinite(value):
                raise UserError(f"{where} must be a finite number; got {value!r}.", field=field)
            too_low = self.minimum is not None and value < self.minimum
            too_high = self.maximum is not None and value > self.maximum
            if too_low or too_high:
                if self.minimum is not None and self.maximum is not None:
                    allowed = f"between {self.minimum:g} and {self.maximum:g}"
                elif self.minimum is not None:
                    allowed = f"at least {self.minimum:g}"
                else:
                    allowed = f"at most {self.maximum:g}"
                raise UserError(f"{where} must be {allowed}; got {value:g}.", field=field)
            return value
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise UserError(f"{where} must be true or false, not {value!r}.", field=field)
            return value
        if self.kind == "choice":
            if value not in self.choices:
                raise UserError(f"{where} must be one of {', '.join(map(str, self.choices))}; got {value!r}.",
                                field=field)
            return value
        if self.kind in ("multichoice", "names"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise UserError(f"{where} must be a list of names.", field=field)
            if self.kind == "multichoice":
                unknown = [v for v in value if v not in self.choices]
                if unknown:
                    raise UserError(f"{where}: unknown choice {unknown[0]!r}; choose from "
                                    f"{', '.join(self.choices)}.", field=field)
                if not value:
                    raise UserError(f"{where} needs at least one choice.", field=field)
            return value
        raise AssertionError(f"unknown parameter kind {self.kind}")

    def schema(self) -> dict:
        out = {"name": self.name, "type": self.kind, "default": self.default, "help": self.help}
        if self.compresses:
            out["compresses"] = self.compresses
        if self.architectures:
            out["architectures"] = list(self.architectures)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        if self.step is not None:
            out["step"] = self.step
        if self.choices:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True)
class Method:
    name: str
    title: str
    explanation: str  # one sentence a non-expert understands: what it does, when it helps, what it costs
    stage: str  # 'torch' (changes the PyTorch module) or 'onnx' (rewrites the exported graph)
    applies_to: tuple  # model formats: 'torch', 'onnx'
    params: tuple = ()
    # Architectures it works on (see services/catalog.ARCHITECTURES); empty = any of its formats.
    architectures: tuple = ()
    # Built-in models it works on, where it needs what only they have (a pooling stage, a merging
    # encoder); empty = any model of its formats and architectures.
    models: tuple = ()
    # Writes integer weights: nothing that needs float weights (pruning, a second quantizer) may follow.
    quantizes: bool = False
    effect_note: str = ""  # shown beside results: what to expect from this method's numbers
    apply: Callable | None = field(default=None, compare=False, repr=False)
    # Per-layer sensitivity: `layer_names(target)` lists the layers `apply` can compress one at a
    # time (target = the torch module for torch-stage methods, the ONNX path for onnx-stage ones);
    # `apply` then honours params["only_layers"] (the scan) and the names in params[skip_param]
    # (layers left alone; `skip_sensitive: N` adds the N most sensitive of the latest scan).
    layer_names: Callable | None = field(default=None, compare=False, repr=False)
    skip_param: str = ""
    # `check(params, task)`: '' when these settings can run for this task, else why not (one sentence),
    # so that what only the method knows is still refused at submit, not in the worker. No torch.
    check: Callable | None = field(default=None, compare=False, repr=False)

    def schema(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "explanation": self.explanation,
            "stage": self.stage,
            "applies_to": list(self.applies_to),
            "architectures": list(self.architectures),
            "quantizes": self.quantizes,
            "sensitivity": self.scannable,
            "skip_param": self.skip_param,
            "effect_note": self.effect_note,
            "params": [p.schema() for p in self.params],
        }

    @property
    def scannable(self) -> bool:
        return self.layer_names is not None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def why_not(self, model_format: str, architecture: str, model_id: str = "") -> str:
        """'' when this method applies to such a model, else the reason in one sentence."""
        from services.catalog import ARCHITECTURES

        if model_format not in self.applies_to:
            if model_format == "onnx":
                return ("needs a PyTorch model; an ONNX upload can only be changed by graph-level methods "
                        "(those that rewrite the ONNX graph, such as quantization).")
            return "needs an ONNX graph."
        if self.architectures and architecture not in self.architectures:
            wanted = " or ".join(ARCHITECTURES[a] for a in self.architectures)
            return f"works on {wanted}; this model is {ARCHITECTURES.get(architecture, architecture)}."
        if self.models and model_id not in self.models:
            names = ", ".join(self.models[:-1]) + " and " + self.models[-1] if len(self.models) > 1 else self.models[0]
            return f"works on the built-in {names} only, whose encoders it changes from inside."
        return ""
