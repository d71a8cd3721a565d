"""The causal-LM loss without the full logits: the LM head and cross-entropy run a chunk of tokens
at a time, and each chunk's logits are recomputed in the backward pass instead of kept.

transformers' causal-LM forward projects every position to the vocabulary before the loss: a
[tokens, vocab] tensor, then its fp32 copy and its gradient. With Qwen3's 151,936-token vocabulary
that is ~1.2 GB per 2,048 tokens for the fp32 logits alone, ~3 GB at the step's peak; chunked, it
is the same per `chunk_tokens` tokens, whatever the sequence length. The loss and every gradient
are the plain loss's (same shift, same ignore index, same normalisation by the batch's trained
tokens under gradient accumulation); only the order of the float sums differs.

Installed on a model for the length of a training run (`chunked_loss`), the way Liger's fused
linear cross-entropy patches the forward; Liger's kernel is used instead where it is on.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from tasks.core.chat import IGNORE_INDEX

if TYPE_CHECKING:
    import torch
    from torch import nn


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_tokens: int,
                           num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """transformers' `ForCausalLMLoss(head(hidden), labels)` computed `chunk_tokens` positions at a time.

    `hidden`: [batch, seq, hidden] after the final norm; `labels`: [batch, seq], IGNORE_INDEX where no
    loss is taken (the label of position i is predicted from position i - 1, as in transformers).
    The mean over trained tokens, or the sum divided by `num_items_in_batch` when given (the Trainer's
    count across accumulated micro-batches).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:].reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        chunk_targets = targets[start : start + chunk_tokens]
        if not bool((chunk_targets != IGNORE_INDEX).any()):
            continue  # nothing to predict here: no logits, no gradient
        total = total + checkpoint(_chunk_loss_sum, head, flat[start : start + chunk_tokens], chunk_targets,
                                   use_reentrant=False)
    if num_items_in_batch is None:
        return total / (targets != IGNORE_INDEX).sum()  # 0/0 is nan, as the plain mean of nothing
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _router_aux_loss(causal_lm: nn.Module, router_logits: Any, attention_mask: Any) -> torch.Tensor:
    """The MoE load-balancing loss exactly as the model's own forward computes it."""
    balance = getattr(sys.modules[type(causal_lm).__module__], "load_balancing_loss_func", None)
    if balance is None:
        raise NotImplementedError(f"{type(causal_lm).__name__}: router logits requested but its module has no "
                                  "load_balancing_loss_func; set train.loss_chunk_tokens: null")
    return balance(router_logits, causal_lm.num_experts, causal_lm.num_experts_per_tok, attention_mask)


def _forward(causal_lm: nn.Module, original, chunk_tokens: int, input_ids=None, attention_mask=None,
             position_ids=None, labels=None, output_router_logits=None, **kwargs):
    """The causal LM's forward; in training with labels, the loss by `chunked_causal_lm_loss` and no logits."""
    if labels is None or not causal_lm.training or kwargs.get("logits_to_keep"):
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                        output_router_logits=output_router_logits, **kwargs)
    kwargs.pop("logits_to_keep", None)
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    config = causal_lm.config
    routed = bool(output_router_logits if output_router_logits is not None else getattr(config, "output_router_logits", False))
    if routed:
        kwargs["output_router_logits"] = True
    outputs = causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    loss = chunked_causal_lm_loss(outputs.last_hidden_state, causal_lm.lm_head, labels, chunk_tokens,
                                  kwargs.get("num_items_in_batch"))
    if not hasattr(config, "num_experts"):
        return CausalLMOutputWithPast(loss=loss, logits=None)
    aux_loss = _router_aux_loss(causal_lm, outputs.router_logits, attention_mask) if routed else None
    if aux_loss is not None:
        loss = loss + causal_lm.router_aux_loss_coef * aux_loss.to(loss.device)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=None,
                                     router_logits=outputs.router_logits if routed else None)


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The `...ForCausalLM` module inside a PEFT wrapper (or the model itself)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(inner, "lm_head") and hasattr(inner, "model")):
        raise TypeError(f"{type(inner).__name__} is not a causal LM with `model` and `lm_head`: "
                        "set train.loss_chunk_tokens: null")
    return inner


@contextmanager
def chunked_loss(model: nn.Module, chunk_tokens: int | None) -> Iterator[None]:
    """For the block, `model`'s training forward takes its loss by `chunked_causal_lm_loss`
    (`chunk_tokens` None: unchanged). Evaluation and generation keep the plain forward."""
    if not chunk_tokens:
        yield
        return
    causal_lm = causal_lm_of(model)
    had_own = "forward" in vars(causal_lm)
    original = causal_lm.forward
    causal_lm.forward = functools.partial(_forward, causal_lm, original, chunk_tokens)
    try:
        yield
    finally:
        if had_own:
            causal_lm.forward = original
        else:
            del causal_lm.forward
