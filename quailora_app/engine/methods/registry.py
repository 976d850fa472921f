"""The one registry of LoRA initialization methods: name -> correction function and how every reader shows it.

A method computed per layer is one function (E, spec, rank, *, als_rounds, solver, EHd) -> (P, Rt), with the
low-rank correction C = P @ Rt of the quantization error E = W - Q (m x n) and spec the damped H = H + lambda I
of the layer's inputs (init_math.DampedH). Registering it is all it takes to appear in the config's checks, the
CLI and form choices, initialize(), the init report, the teaching views and the plots:

    @register_method("half_svd", label="4-bit + half the SVD correction", colour="#8c564b", help="...")
    def half_svd(E, spec, rank, **options):
        P, Rt = init_math.svd_correction(E, rank)
        return P / 2, Rt

Two built-ins are not computed per layer: the `qlora` baseline (peft's default init, B = 0, C = 0: every error
figure is relative to it) and `loftq` (peft's replace_lora_weights_loftq, run on the peft model by the init flow).
Two change the quantized base itself (kind "requant", methods/loftq.py): LoftQ's T alternating steps of quantizing
W - C and fitting C to W - Q give, per layer, a new quantized layer holding Q_T beside the factors of C_T.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from quailora_app.engine.methods import init_math
from quailora_app.engine.methods.init_math import DampedH

LAYER = "layer"  # computed per layer by initialize() through `correct`
BASELINE = "baseline"  # the no-correction reference (qlora)
ANCHOR = "anchor"  # peft's LoftQ, computed on the peft model by the init flow
MODEL = "model"  # computed over the whole model by `build(ModelContext) -> ModelInit`, after the per-layer pass
# changes the quantized base: per layer a new quantized layer (Q_T) and the factors of its correction, computed by
# initialize(requant=True) through `requant` (methods/loftq.py); the flows that do not swap bases skip it
REQUANT = "requant"
KINDS = (LAYER, BASELINE, ANCHOR, MODEL, REQUANT)
QLORA = "qlora"  # the baseline's name: always run, 1.0 in every error figure


class CorrectionFn(Protocol):
    """A per-layer initialization: the rank-`rank` correction C = P @ Rt of E (P: m x r, Rt: r x n)."""

    def __call__(self, E: Tensor, spec: DampedH, rank: int, *, als_rounds: int, solver: str,
                 EHd: Tensor | None) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class Method:
    """One initialization method as every reader needs it."""

    name: str
    label: str  # legend of the init figures and tables ("4-bit + ...")
    short: str  # checkbox, axis tick and heatmap title
    colour: str  # one colour in every figure
    help: str  # one line: what the method does
    kind: str = LAYER
    correct: CorrectionFn | None = None  # None unless kind == LAYER
    # (plan.ModelContext) -> plan.ModelInit, or its "module:function" path, imported when the method is first run
    # (the registry imports no whole-model method: they import the calibration pipeline, which reads the registry);
    # None unless kind == MODEL
    builder: Callable[..., Any] | str | None = None
    # (W, layer, spec, rank, *, E, EHd, solver, options) -> loftq.LoftqLayer, or its "module:function" path, imported
    # when first run (the quantizers it calls import config, which reads this registry); None unless kind == REQUANT
    requant: Callable[..., Any] | str | None = None
    calibrated: bool = False  # reads spec (H): the time of forming H + lambda I is charged to it
    nested: bool = False  # (exact solver) its rank-r factors are the leading r of P's columns / Rt's rows at any
    # larger rank, so a rank sweep computes it once
    uses_EHd: Callable[[int, int, str], bool] | None = None  # (m, n, solver) -> given the meter's E Hd
    layer_label: str = ""  # legend of the teaching views (what the correction does to one layer); default: short
    dash: str = "solid"  # line style in the teaching views
    marker: str = "circle"  # plotly marker symbol in the teaching views
    default: bool = False  # in the default method list of `init`
    # minimizes each layer's own error on the full-precision inputs: a layer it leaves worse than no correction is a
    # defect, reset by the self-check (evaluation/selfcheck.py); False for whole-model methods aiming at another target
    layer_objective: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method {self.name!r}: kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if (self.kind == LAYER) != (self.correct is not None):
            raise ValueError(f"method {self.name!r}: a correction function is needed exactly when kind is {LAYER!r}")
        if (self.kind == MODEL) != (self.builder is not None):
            raise ValueError(f"method {self.name!r}: a builder is needed exactly when kind is {MODEL!r}")
        if (self.kind == REQUANT) != (self.requant is not None):
            raise ValueError(f"method {self.name!r}: a requant function is needed exactly when kind is {REQUANT!r}")
        for path in (self.builder, self.requant):
            if isinstance(path, str) and path.count(":") != 1:
                raise ValueError(f"method {self.name!r}: a function path reads 'package.module:function', "
                                 f"not {path!r}")

    @property
    def per_layer(self) -> bool:
        return self.kind == LAYER

    def build(self, ctx: Any) -> Any:
        """Run this whole-model method: its builder(ctx), imported from its "module:function" path on first use."""
        if self.builder is None:
            raise ValueError(f"method {self.name!r} is not built over the whole model")
        builder = self.builder
        if isinstance(builder, str):
            module, function = builder.split(":")
            builder = getattr(importlib.import_module(module), function)
        return builder(ctx)

    @property
    def changes_base(self) -> bool:
        """It replaces the quantized layers themselves (kind "requant"): its factors only hold on its own base."""
        return self.kind == REQUANT

    def requantize(self, W: Tensor, layer: Any, spec: DampedH, rank: int, *, E: Tensor | None = None,
                   EHd: Tensor | None = None, solver: str = "exact", options: Mapping[str, Any] | None = None) -> Any:
        """Run this requant method on one layer (W its full-precision weight, `layer` the quantized one; E = W - Q
        and E Hd when the caller has them): a loftq.LoftqLayer with the new quantized layer and the factors of C."""
        if self.requant is None:
            raise ValueError(f"method {self.name!r} does not change the quantized base")
        fn = self.requant
        if isinstance(fn, str):
            module, function = fn.split(":")
            fn = getattr(importlib.import_module(module), function)
        return fn(W, layer, spec, rank, E=E, EHd=EHd, solver=solver, options=dict(options or {}))

    @property
    def legend(self) -> str:
        """The teaching views' legend."""
        return self.layer_label or self.short

    def correction(self, E: Tensor, spec: DampedH, rank: int, *, als_rounds: int = 20, solver: str = "exact",
                   EHd: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(P, Rt) of this method's rank-`rank` correction of E."""
        if self.correct is None:
            raise ValueError(f"method {self.name!r} is not computed per layer")
        return self.correct(E, spec, rank, als_rounds=als_rounds, solver=solver, EHd=EHd)

    def sweep(self, E: Tensor, spec: DampedH, ranks: Sequence[int], *,
              als_rounds: int = 20) -> list[tuple[Tensor, Tensor]]:
        """(P, Rt) at each of `ranks` (exact solver). A nested method is computed once, at the largest rank, and
        truncated: P[:, :r], Rt[:r] is its rank-r correction."""
        if self.nested:
            P, Rt = self.correction(E, spec, max(ranks), als_rounds=als_rounds)
            return [(P[:, :r], Rt[:r]) for r in ranks]
        return [self.correction(E, spec, r, als_rounds=als_rounds) for r in ranks]


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the registry (a name is registered once)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def register_method(name: str, *, label: str, colour: str, help: str, calibrated: bool = False,
                    short: str | None = None, **fields) -> Callable[[CorrectionFn], CorrectionFn]:
    """Decorator: register a per-layer correction function under `name` (`short` defaults to the name; further
    `fields`: see Method)."""

    def wrap(fn: CorrectionFn) -> CorrectionFn:
        register(Method(name, label, short or name, colour, help, correct=fn, calibrated=calibrated, **fields))
        return fn

    return wrap


def register_model_method(name: str, *, label: str, colour: str, help: str, short: str | None = None,
                          **fields) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a whole-model method (kind "model") whose `fn(plan.ModelContext) -> plan.ModelInit`
    runs after the per-layer pass (a user's or a test's method; the built-in ones are registered below by path)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        register(Method(name, label, short or name, colour, help, kind=MODEL, builder=fn, **fields))
        return fn

    return wrap


def unregister_method(name: str) -> None:
    """Remove a method (for tests that register a toy one)."""
    del _METHODS[name]


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(_METHODS)}") from None


def find_method(name: str) -> Method | None:
    """The method called `name`, or None (figures also show references such as "full" and "int8")."""
    return _METHODS.get(name)


def all_methods() -> list[Method]:
    """Every registered method, in registration order (the order of every table and figure)."""
    return list(_METHODS.values())


def method_names() -> tuple[str, ...]:
    """Every registered name (the CLI and form choices; read when a parser or form is built)."""
    return tuple(_METHODS)


def default_method_names() -> tuple[str, ...]:
    return tuple(m.name for m in _METHODS.values() if m.default)


def model_method_names() -> tuple[str, ...]:
    """The methods built over the whole model after the per-layer pass."""
    return tuple(m.name for m in _METHODS.values() if m.kind == MODEL)


def per_layer_names() -> tuple[str, ...]:
    """The methods initialize() computes layer by layer."""
    return tuple(m.name for m in _METHODS.values() if m.per_layer)


def init_method_names() -> tuple[str, ...]:
    """Every method that corrects the one shared base of an init run: all but those that change the base (kind
    "requant": an init run computes them when named, and saves each one's base with its adapter)."""
    return tuple(m.name for m in _METHODS.values() if m.kind != REQUANT)


def requant_names() -> tuple[str, ...]:
    """The methods that change the quantized base (kind "requant"): initialize(requant=True) computes them."""
    return tuple(m.name for m in _METHODS.values() if m.kind == REQUANT)


# ------------------------------------------------------------------------------------------------- built-ins
register(Method(QLORA, "4-bit + QLoRA init (no correction)", "QLoRA", "#d62728",
                "peft's default init (A random, B = 0): no correction, the 1.0 baseline", kind=BASELINE,
                layer_label="QLoRA (no correction)", default=True))


@register_method("svd", label="4-bit + SVD of the error (uncalibrated)", short="SVD", colour="#ff7f0e",
                 help="best low-rank fit of the weight error", nested=True, layer_label="SVD of E (uncalibrated)",
                 marker="square", default=True)
def svd(E: Tensor, spec: DampedH, rank: int, **options) -> tuple[Tensor, Tensor]:
    """Truncated SVD of E: argmin ||E - C||_F over rank-r C (Eckart-Young)."""
    return init_math.svd_correction(E, rank)


@register_method("quailora", label="4-bit + QuAILoRA (calibrated)", short="QuAILoRA", colour="#1f77b4",
                 help="the paper's calibrated alternating least squares", calibrated=True,
                 layer_label="QuAILoRA (calibrated ALS)", marker="circle-open", default=True)
def quailora(E: Tensor, spec: DampedH, rank: int, *, als_rounds: int = 20, **options) -> tuple[Tensor, Tensor]:
    """ALS on min tr((E - C) Hd (E - C)^T), C = P R^T, from the SVD of E (`als_rounds` rounds)."""
    return init_math.quailora_correction(E, spec, rank, als_rounds)


def _wide_and_exact(m: int, n: int, solver: str) -> bool:
    """closed_form's m <= n route forms E Hd E^T: the error meter's E Hd spares its m n^2 product."""
    return solver == "exact" and m <= n


@register_method("closed_form", label="4-bit + closed form (calibrated optimum)", short="closed form",
                 colour="#2ca02c", help="the exact optimum of QuAILoRA's calibrated objective", calibrated=True,
                 nested=True, uses_EHd=_wide_and_exact, layer_label="closed form (calibrated optimum)", dash="dash",
                 marker="x", default=True)
def closed_form(E: Tensor, spec: DampedH, rank: int, *, solver: str = "exact", EHd: Tensor | None = None,
                **options) -> tuple[Tensor, Tensor]:
    """argmin tr((E - C) Hd (E - C)^T) over rank-r C: SVD_r(E L) L^-1 with Hd = L L^T."""
    return init_math.closed_form_correction(E, spec, rank, solver=solver, EHd=EHd)


register(Method("loftq", "4-bit + LoftQ (peft)", "LoftQ", "#9467bd",
                "peft's implementation of LoftQ (one iteration; needs CUDA)", kind=ANCHOR, default=True))


# LoftQ as published, quantizer-agnostic (methods/loftq.py), registered by path: it calls the quantizers.
register(Method("loftq_svd", "4-bit + LoftQ, T steps (base quantized again)", "LoftQ (T steps)", "#c5b0d5",
                "LoftQ as published: T alternating steps of quantizing W - C and fitting C to W - Q by SVD (T = "
                "loftq_iter, 5 by default); the quantized base itself changes", kind=REQUANT,
                requant="quailora_app.engine.methods.loftq:loftq_svd", layer_label="LoftQ (T steps, SVD)",
                dash="dashdot", marker="triangle-up", layer_objective=False))
register(Method("loftq_calibrated", "4-bit + calibrated LoftQ, T steps (base quantized again)",
                "calibrated LoftQ", "#98df8a",
                "LoftQ's alternation with the calibrated closed form as the fit step (T = loftq_iter); the quantized "
                "base itself changes", kind=REQUANT, requant="quailora_app.engine.methods.loftq:loftq_calibrated",
                calibrated=True, layer_label="LoftQ (T steps, calibrated)", dash="dashdot", marker="triangle-down",
                layer_objective=False))


# Whole-model methods, registered by path: their modules import the calibration pipeline, which reads this registry.
register(Method("budget", "4-bit + closed form, ranks under a budget", "budgeted ranks", "#17becf",
                "the calibrated optimum with per-layer ranks chosen to remove the most error at uniform rank r's LoRA "
                "parameter count", kind=MODEL, builder="quailora_app.engine.methods.budget:build", calibrated=True))
register(Method("distill", "4-bit + closed form, then distilled (model-level KL)", "distill", "#e377c2",
                "closed form, then a few AdamW steps on the LoRA factors (Q frozen) toward the full-precision model's "
                "next-token distribution (KL) on the calibration text", kind=MODEL,
                builder="quailora_app.engine.methods.distill:build", layer_objective=False))
register(Method("sequential", "4-bit + error feedback (sequential closed form)", "sequential", "#bcbd22",
                "the closed form fitted block by block, in forward order, to the inputs the corrected 4-bit model "
                "produces, aiming at the full-precision outputs and residual stream", kind=MODEL,
                builder="quailora_app.engine.methods.sequential:build", layer_label="error feedback (sequential)",
                dash="dot", marker="diamond", layer_objective=False))
