"""Never silently worse: every written correction measured through the quantized layer's own product.

For each adapted layer, on held-out windows whose inputs X the layer sees in the full-precision model (block by
block, as in calibration), with W from the checkpoint and layer(x) the quantized layer's own forward (the product
it really computes, in whatever layout bitsandbytes holds it, with its compute dtype's rounding):

    plain     = sum_x ||W x - layer(x)||^2
    corrected = sum_x ||W x - layer(x) - s B A x||^2
    ratio     = sqrt(corrected / plain)     (1.0 = no correction: the report's calibrated error, measured afresh)

Nothing here reads Q back, so a correction fitted to a Q the layer does not multiply by (a misread layout) shows as
a ratio above 1. A method that minimizes each layer's own error (svd, quailora, closed_form, ...) must not leave a
layer above 1 + TOLERANCE: such a layer is reset to the plain QLoRA start (B = 0, A as peft draws it) and named. A
whole-model method aiming at another target (the model's output distribution, the corrected 4-bit stream) is
measured and reported, not reset: its held-out perplexity judges it.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from quailora_app.engine.adapters import Factors
from quailora_app.engine.calibration.calibrate import calibrate_blocks, decoder_layers
from quailora_app.engine.calibration.plan import split_path
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.methods.registry import find_method
from quailora_app.engine.quantization.layers import own_product
from quailora_app.errors import ModelError

#: a layer whose held-out error ratio exceeds 1 + TOLERANCE got worse from its correction
TOLERANCE = 0.02
#: held-out tokens the check runs on (whole windows, at least one): enough for a stable ratio, cheap beside the fit
CHECK_TOKENS = 512


def check_window_count(available: int, seq_len: int, tokens: int = CHECK_TOKENS) -> int:
    """How many of `available` windows of `seq_len` tokens the check uses: about `tokens`, at least one."""
    return max(1, min(available, tokens // max(seq_len, 1)))


def max_resets(layers: int) -> int:
    """More layers than this getting worse is no chance: something is wrong with the whole model (the API refuses)."""
    return max(2, layers // 20)


@dataclass
class SelfCheck:
    """One method's self-check: per layer the held-out error ratio, and which layers were reset to B = 0."""

    method: str
    ratios: dict[str, float]  # module path -> sqrt(corrected / plain) on the held-out windows
    judged: bool  # the method minimizes each layer's own error: a layer above 1 + tolerance is reset
    tokens: int
    held_out: bool  # the windows were not among those the correction was fitted on
    tolerance: float = TOLERANCE
    seconds: float = 0.0
    reset: list[str] = field(default_factory=list)

    @property
    def worse(self) -> list[str]:
        """Layers the correction makes worse beyond the tolerance."""
        return [path for path, ratio in self.ratios.items() if not ratio <= 1 + self.tolerance]

    @property
    def median(self) -> float:
        values = sorted(self.ratios.values())
        return values[len(values) // 2] if values else float("nan")

    def summary(self) -> str:
        """One line: what the CLI, the app and the flows' log say (`report_lines`)."""
        return report_lines({self.method: self.record()})[0]

    def record(self) -> dict:
        """What report.json keeps (report["self_check"][method])."""
        return {"tokens": self.tokens, "held_out": self.held_out, "tolerance": self.tolerance, "judged": self.judged,
                "median_ratio": self.median, "worst": max(self.ratios.values(), default=float("nan")),
                "layers_reset": list(self.reset), "layers_worse": self.worse, "seconds": self.seconds,
                "ratios": dict(self.ratios)}


def judged_per_layer(method: str) -> bool:
    """Whether `method` minimizes each layer's own error (registry flag `layer_objective`)."""
    found = find_method(method)
    return bool(found is not None and found.layer_objective)


@torch.no_grad()
def measure(model, checkpoint: Checkpoint, check_ids: torch.Tensor, corrections: Mapping[str, Mapping[str, Factors]],
            scalings: Mapping[str, float], *, device: torch.device, dtype: torch.dtype = torch.float32,
            should_stop: Callable[[], bool] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    """(plain, corrected) squared errors per method and layer (see the module docstring), in one block-by-block
    pass of `check_ids` through the full-precision blocks. `model`: the quantized model (its layers may be wrapped
    by peft); `corrections`: method -> module path -> factors; `scalings`: module path -> s."""
    paths = sorted({path for factors in corrections.values() for path in factors})
    if not paths:
        return {}
    prefix, _ = decoder_layers(model)
    only: dict[int, list[str]] = {}
    for path in paths:
        index, local = split_path(prefix, path)
        only.setdefault(index, []).append(local)
    modules = dict(model.named_modules())
    out: dict[str, dict[str, tuple[float, float]]] = {method: {} for method in corrections}
    for block in calibrate_blocks(model, checkpoint, check_ids, (), device, dtype, should_stop=should_stop,
                                  only=only, stop_message="during the self-check", keep_io=True):
        for group in block.groups:
            X = group.X.to(device)
            for local in group.names:
                path = f"{block.prefix}.{local}"
                # what a correction should remove: (W - Q) x, with W x (+ b) from the full-precision block's own
                # forward and Q x (+ b) as the quantized layer computes it
                residual = group.Y.pop(local).to(device) - own_product(modules[path], X.to(dtype))
                plain = float(residual.double().pow(2).sum())
                for method, factors in corrections.items():
                    f = factors.get(path)
                    if f is None:
                        continue
                    A, B = f.A.to(device=device, dtype=torch.float32), f.B.to(device=device, dtype=torch.float32)
                    added = scalings[path] * ((X @ A.T) @ B.T)
                    out[method][path] = (plain, float((residual - added).double().pow(2).sum()))
                del residual
            del X
            group.X = None
        block.weights.clear()
    return out


def self_check(model, checkpoint: Checkpoint, check_ids: torch.Tensor,
               corrections: Mapping[str, dict[str, Factors]], scalings: Mapping[str, float], *,
               device: torch.device, dtype: torch.dtype = torch.float32, held_out: bool = True,
               should_stop: Callable[[], bool] | None = None) -> dict[str, SelfCheck]:
    """Measure every method's corrections (`measure`) and reset, in `corrections` itself, each layer a method
    judged per layer makes worse: its factors become the plain start (B = 0). One SelfCheck per method."""
    start = time.perf_counter()
    measured = measure(model, checkpoint, check_ids, corrections, scalings, device=device, dtype=dtype,
                       should_stop=should_stop)
    seconds = (time.perf_counter() - start) / max(len(measured), 1)
    checks = {}
    for method, errors in measured.items():
        ratios = {path: math.sqrt(c / p) if p > 0 else (1.0 if c == 0 else math.inf)
                  for path, (p, c) in errors.items()}
        check = SelfCheck(method, ratios, judged_per_layer(method), int(check_ids.numel()), held_out, seconds=seconds)
        if check.judged:
            check.reset = check.worse
            factors = corrections[method]
            for path in check.reset:
                factors[path] = plain_start(factors[path])
        checks[method] = check
    return checks


def plain_start(factors: Factors) -> Factors:
    """peft's default LoRA start for a layer of these shapes: A drawn as peft draws it (Kaiming-uniform, a = sqrt(5),
    seeded by the shape so a rerun gives the same), B = 0: the layer adds nothing, as in plain QLoRA."""
    generator = torch.Generator().manual_seed(hash(tuple(factors.A.shape)) % 2 ** 31)
    A = torch.empty_like(factors.A, device="cpu")
    bound = 1 / math.sqrt(A.shape[1])  # kaiming_uniform_(a=sqrt(5)) on an (r x n) weight: U(-1/sqrt(n), 1/sqrt(n))
    A.uniform_(-bound, bound, generator=generator)
    return Factors(A.to(factors.A.device), torch.zeros_like(factors.B))


def refuse_if_damaged(checks: Mapping[str, SelfCheck], layers: int) -> None:
    """Raise one clear ModelError when a method judged per layer makes more than a few layers worse: the base the
    corrections were fitted to is not the one the layers compute with, so no adapter should be handed over."""
    for check in checks.values():
        if check.judged and len(check.reset) > max_resets(layers):
            raise ModelError(
                f"{check.method} would make {len(check.reset)} of {layers} layers worse than no correction on "
                f"held-out text (e.g. {', '.join(check.reset[:3])}; error ratio up to "
                f"{max(check.ratios[p] for p in check.reset):.2f}x): the weight Q read back from the quantized "
                "layers does not match the product they compute (an unsupported bitsandbytes layout or version?), "
                "or the calibration text is unlike the model's inputs. The adapter was left unchanged.")


def scalings_of(plan: Mapping[str, tuple[int, float]]) -> dict[str, float]:
    """module path -> s from a LoRA plan (path -> (rank, scaling))."""
    return {path: float(entry[1]) for path, entry in plan.items()}


def report_lines(records: Mapping[str, Mapping]) -> list[str]:
    """One line per method from report["self_check"] (method -> SelfCheck.record()): what the CLI and the app say."""
    lines = []
    for method, r in records.items():
        where = "held-out" if r.get("held_out") else "calibration (no held-out text was left)"
        line = (f"self-check of {method} ({r['tokens']:,} {where} tokens, each layer's own product): median error "
                f"ratio {r['median_ratio']:.3f}, worst {r['worst']:.3f}")
        reset, worse = r.get("layers_reset") or [], r.get("layers_worse") or []
        if reset:
            line += (f"; {len(reset)} layer(s) worse than no correction, reset to B = 0: {', '.join(reset[:4])}"
                     + (" ..." if len(reset) > 4 else ""))
        elif worse:
            line += (f"; {len(worse)} layer(s) above 1 + {r['tolerance']:g}, kept ({method} aims at the whole model: "
                     "its held-out perplexity judges it)")
        else:
            line += "; no layer worse"
        lines.append(line)
    return lines
