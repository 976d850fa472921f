"""What a model variant says, token by token, against the full-precision model: continuation of a prompt, and
teacher-forced agreement along the full-precision continuation.

- `stream_rows` / `stream_tokens`: greedy (or seeded sampling) continuation of prompts of one length (a batch,
  e.g. one prompt under several adapters of one base) for exactly N new tokens, one forward per token with the
  model's key-value cache, each step's tokens yielded as soon as they are chosen. It does not stop at the
  end-of-text token: every variant gets the same number of positions (held-out text is packed documents joined by
  that token, so the model may well continue past it).
- `forced_logprobs`: teacher forcing. One forward pass over prompt + continuation y gives, at each position t of
  the continuation, log p(. | prompt, y_<t): the next-token distribution the model would have had, had it said
  what full precision said so far.
- `agreement`: per position, whether the variant's top-1 next token is full precision's top-1 there, and
  KL(p_full || p_variant) = sum_v p_full(v) (log p_full(v) - log p_variant(v)), in nats; the summary is the share
  of positions that agree and the mean KL. Full precision against itself agrees everywhere with KL 0 exactly.
- `top_tokens`: the k most likely next tokens and their probabilities at one position.

Pure torch: no tokenizer, no UI. Works on any causal LM of transformers, quantized or not, with or without peft.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


def model_device(model) -> torch.device:
    return next(p for p in model.parameters()).device


def _choose(logits: torch.Tensor, sample: bool, temperature: float, generator: torch.Generator | None) -> int:
    """The next token from one position's logits: the argmax, or a draw from softmax(logits / temperature)."""
    if not sample:
        return int(logits.argmax())
    probs = torch.softmax(logits.double().cpu() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()  # not only no_grad: no version counters or view tracking, a few % of a decode step
def stream_rows(model, prompt_ids: torch.Tensor, new_tokens: int, *, sample: bool = False, temperature: float = 1.0,
                seed: int = 0, **forward) -> Iterator[list[int]]:
    """Continue each row of `prompt_ids` (B x P: prompts of the same length, so no padding) by exactly `new_tokens`
    tokens, one forward per step with the model's key-value cache, yielding the B chosen token ids of each step as
    soon as they are chosen. Greedy by default; with `sample`, each row draws from softmax(logits / temperature)
    with its own CPU generator seeded with `seed`, so the same seed gives the same draws on every row, variant and
    run. `forward` goes to every forward call: peft's `adapter_names` (one per row) runs a different adapter on
    each row of one batch, so several variants of one base decode together and pay the base's layers once."""
    if new_tokens < 1:
        return
    if sample and temperature <= 0:
        raise ValueError(f"temperature must be positive to sample, not {temperature}")
    was_training = model.training
    model.eval()
    device = model_device(model)
    step_input = prompt_ids.reshape(-1, prompt_ids.shape[-1]).to(device)
    rows = step_input.shape[0]
    generators = [torch.Generator().manual_seed(seed) for _ in range(rows)] if sample else [None] * rows
    past = None
    try:
        for _ in range(new_tokens):
            out = model(input_ids=step_input, past_key_values=past, use_cache=True, **forward)
            past = out.past_key_values
            last = out.logits[:, -1].float()
            tokens = [_choose(last[row], sample, temperature, generators[row]) for row in range(rows)]
            yield tokens
            step_input = torch.tensor([[t] for t in tokens], device=device)
    finally:
        model.train(was_training)


def stream_tokens(model, prompt_ids: torch.Tensor, new_tokens: int, **kw) -> Iterator[int]:
    """`stream_rows` of one prompt (1-D, or 1 x P): each new token id as it is chosen."""
    for tokens in stream_rows(model, prompt_ids.reshape(1, -1), new_tokens, **kw):
        yield tokens[0]


def continue_tokens(model, prompt_ids: torch.Tensor, new_tokens: int, **kw) -> list[int]:
    """`stream_tokens` gathered into a list."""
    return list(stream_tokens(model, prompt_ids, new_tokens, **kw))


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes transformers' `logits_to_keep` (the output projection for the last
    positions only): most causal LMs of transformers 5 do."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def forced_logprobs(model, prompt_ids: torch.Tensor, continuation: torch.Tensor, **forward) -> torch.Tensor:
    """Teacher forcing: log-probabilities (float32, CPU, B x N x vocab) of the next token at each of the N positions
    of `continuation` (B x N, or 1-D for one sequence) after `prompt_ids` (B x P or 1-D): row t is
    log p(. | prompt, continuation[:t]), the distribution from which continuation[t] was chosen. One pass over
    prompt + continuation, its output projection only for the positions asked where the model takes
    `logits_to_keep`. (The last token stays in the pass although its own next token is not asked: LLM.int8 picks
    its outlier columns over the whole batch, so each position's 8-bit logits depend on every token in it.)
    `forward` goes to the forward call (peft's `adapter_names`, one per row)."""
    prompt_ids, continuation = prompt_ids.reshape(-1, prompt_ids.shape[-1]), continuation.reshape(
        -1, continuation.shape[-1])
    n = continuation.shape[1]
    was_training = model.training
    model.eval()
    device = model_device(model)
    keep = {"logits_to_keep": n + 1} if _keeps_logits(model) else {}
    try:
        ids = torch.cat([prompt_ids, continuation], dim=1).to(device)
        logits = model(input_ids=ids, use_cache=False, **forward, **keep).logits
    finally:
        model.train(was_training)
    return torch.log_softmax(logits[:, -n - 1:-1].float(), dim=-1).cpu()


#: bytes of float32 logits one teacher-forced pass over several routes may hold (more routes: more passes)
ROUTED_LOGITS_BYTES = 512 * 2**20


def _vocab_size(model) -> int:
    """Rows of the model's output projection (the logits' last dimension)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else 262_144


def forced_logprobs_routed(model, prompt_ids: torch.Tensor, continuation: torch.Tensor,
                           routes: Sequence[str]) -> list[torch.Tensor]:
    """`forced_logprobs` of the same B sequences under each of `routes` (peft adapter names, one base holding
    them all): one B x N x vocab tensor per route, from as few forward passes as fit ROUTED_LOGITS_BYTES of
    logits, the rows of several routes in one batch (peft's `adapter_names` sends each row to its adapter), so the
    base's layers are paid once per pass rather than once per route."""
    prompt_ids, continuation = prompt_ids.reshape(-1, prompt_ids.shape[-1]), continuation.reshape(
        -1, continuation.shape[-1])
    rows = prompt_ids.shape[0]
    per_route = rows * (prompt_ids.shape[1] + continuation.shape[1]) * _vocab_size(model) * 4
    step = max(1, ROUTED_LOGITS_BYTES // max(per_route, 1))
    out: list[torch.Tensor] = []
    for first in range(0, len(routes), step):
        chunk = list(routes[first:first + step])
        both = forced_logprobs(model, prompt_ids.repeat(len(chunk), 1), continuation.repeat(len(chunk), 1),
                               adapter_names=[route for route in chunk for _ in range(rows)])
        out.extend(both.split(rows))
    return out


@dataclass
class Agreement:
    """A variant against the reference (full precision), position by position (B x N)."""

    agree: torch.Tensor  # bool: the variant's top-1 next token is the reference's
    kl: torch.Tensor  # float64: KL(p_reference || p_variant) in nats
    top1: torch.Tensor  # long: the variant's top-1 next token

    @property
    def top1_agreement(self) -> float:
        """The share of positions where the variant's top-1 is the reference's."""
        return float(self.agree.double().mean()) if self.agree.numel() else float("nan")

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean()) if self.kl.numel() else float("nan")

    def record(self, row: int = 0) -> dict:
        """One sequence's figures and per-position arrays, as report.json holds them."""
        return {"top1_agreement": float(self.agree[row].double().mean()), "mean_kl": float(self.kl[row].mean()),
                "agree": [bool(a) for a in self.agree[row]], "kl": [float(k) for k in self.kl[row]],
                "top1": [int(t) for t in self.top1[row]]}


@dataclass(frozen=True)
class Reference:
    """The reference's teacher-forced log-probabilities (B x N x vocab) in float64 with their probabilities and
    top-1 tokens, made once for all the variants compared with it (`agreement`)."""

    logprobs: torch.Tensor  # float64
    probs: torch.Tensor  # float64: exp(logprobs)
    top1: torch.Tensor

    @classmethod
    def of(cls, logprobs: torch.Tensor) -> Reference:
        ref64 = logprobs.reshape(-1, *logprobs.shape[-2:]).double()
        return cls(ref64, ref64.exp(), ref64.argmax(-1))


def agreement(reference: torch.Tensor | Reference, variant: torch.Tensor) -> Agreement:
    """Per position of two teacher-forced log-probability tensors (B x N x vocab, or N x vocab; the reference
    first, or its `Reference` made once for many variants): whether the top-1 tokens are the same, and
    KL(p_reference || p_variant), summed in float64. The same tensor twice gives agreement everywhere and KL 0
    exactly."""
    ref = reference if isinstance(reference, Reference) else Reference.of(reference)
    variant = variant.reshape(-1, *variant.shape[-2:])
    if ref.logprobs.shape != variant.shape:
        raise ValueError(f"log-probabilities of shapes {tuple(ref.logprobs.shape)} and {tuple(variant.shape)} do "
                         "not compare: the same positions and vocabulary are needed")
    var_top = variant.argmax(-1)
    kl = (ref.probs * (ref.logprobs - variant.double())).sum(-1).clamp_min(0.0)
    return Agreement(ref.top1 == var_top, kl, var_top)


def versus_plain(plain: Agreement, corrected: Agreement) -> dict[str, float]:
    """Over the same positions: the share where only the corrected variant agrees with the reference (it fixes
    what plain 4-bit gets wrong), only plain 4-bit agrees (the correction breaks it), both, neither."""
    p, c = plain.agree.reshape(-1), corrected.agree.reshape(-1)
    n = max(p.numel(), 1)
    return {"corrected_only": float((c & ~p).sum()) / n, "plain_only": float((p & ~c).sum()) / n,
            "both": float((p & c).sum()) / n, "neither": float((~p & ~c).sum()) / n, "positions": int(p.numel())}


def top_tokens(logprobs: torch.Tensor, k: int = 10) -> list[tuple[int, float]]:
    """The k most likely next tokens at one position (a vocab-sized log-probability vector): (token id,
    probability), most likely first."""
    values, ids = torch.topk(logprobs.float(), min(k, logprobs.shape[-1]))
    return [(int(i), float(v.exp())) for i, v in zip(ids, values, strict=True)]
