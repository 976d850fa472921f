"""Held-out perplexity: exp(mean token negative log-likelihood) over fixed evaluation windows."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

#: The version of the numbers perplexity() gives: bump it with any change that moves them (the windows, the
#: batching, the reduction), so the perplexities cached on disk (evaluation/perplexity_cache.py) are measured again.
PERPLEXITY_VERSION = 1


@torch.no_grad()
def perplexity(model, eval_ids: torch.Tensor, batch_size: int = 4) -> float:
    """ppl = exp( sum_t -log p(x_t | x_<t) / T ) over every window of `eval_ids` (windows x seq_len),
    each window predicting its tokens 2..L. The same tokens for every model, so figures compare."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(eval_ids), batch_size):
        ids = eval_ids[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_nll / total_tokens)


def gap_closed(ppl_method: float | None, ppl_baseline: float | None, ppl_target: float | None) -> float | None:
    """(ppl_qlora - ppl_method) / (ppl_qlora - ppl_target): 0 = no better than plain 4-bit, 1 = as good as the target.
    None when a perplexity is missing, the baseline is as good as the target, or the share is not finite."""
    if None in (ppl_method, ppl_baseline, ppl_target):
        return None
    gap = ppl_baseline - ppl_target
    if not math.isfinite(gap) or abs(gap) < 1e-9:
        return None
    share = (ppl_baseline - ppl_method) / gap
    return share if math.isfinite(share) else None


#: tokens of the probe window on which check_adapter_applied compares logits
PROBE_TOKENS = 32


@torch.no_grad()
def _corrects(factors: Mapping[str, Any]) -> bool:
    """Whether an adapter's correction s B A is not zero on some layer (qlora's, or one with every layer reset, is)."""
    return any(bool(f.B.any()) for f in factors.values())


def _refuse_if_plain(name: str, logits: torch.Tensor, plain_logits: torch.Tensor) -> None:
    """Raise when a correcting variant's logits are the uncorrected base's bit for bit."""
    if torch.equal(logits, plain_logits):
        raise RuntimeError(f"internal error: {name}'s logits equal the uncorrected 4-bit base's although its "
                           "correction is not zero; its adapter is not applied, so its figures would be QLoRA's")


def check_adapter_applied(model, probe_ids: torch.Tensor, plain_logits: torch.Tensor, name: str,
                          factors: Mapping[str, Any], **forward) -> None:
    """Fail loudly when variant `name`'s model is the uncorrected base in disguise: its logits on `probe_ids` equal
    the plain base's (`plain_logits`, B = 0) bit for bit although its correction s B A is not zero, i.e. the
    adapter its figures would be reported under is not the one applied. `forward` goes to the forward call (peft's
    `adapter_names` on a base holding several adapters)."""
    if not _corrects(factors):
        return  # no correction (qlora, or every layer reset): the base's logits are the right ones
    device = next(p for p in model.parameters()).device
    _refuse_if_plain(name, model(input_ids=probe_ids.to(device), **forward).logits, plain_logits)


def check_adapters_applied(model, probe_ids: torch.Tensor, factors: Mapping[str, Mapping[str, Any]],
                           base_route: str) -> None:
    """`check_adapter_applied` for every adapter of a base holding several, in one forward pass: row 0 runs the
    base alone (`base_route`, peft's name for no adapter), row i + 1 adapter i (peft's `adapter_names`), all on the
    same probe; an adapter whose correction is not zero must change its row's logits."""
    names = [name for name, f in factors.items() if _corrects(f)]
    if not names:
        return
    device = next(p for p in model.parameters()).device
    probe = probe_ids.reshape(1, -1).to(device)
    logits = model(input_ids=probe.repeat(len(names) + 1, 1), adapter_names=[base_route, *names]).logits
    for row, name in enumerate(names, start=1):
        _refuse_if_plain(name, logits[row], logits[0])
