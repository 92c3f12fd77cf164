"""Evaluate a causal LM (or a seq2seq model such as T5) on one task: exact match of greedy generation, or rank
classification over the label options. Pure torch + transformers: the pipeline calls it on a Ray worker or the driver.

The model sees exactly what training fed it (``pipelines.encoding.Encoder``): prompts arrive formatted
(``pipelines.records.format_prompt``, ending in "Answer:"); the source is the tokenizer's leading special tokens (BOS) +
the prompt's tokens (+ its trailing special tokens, e.g. T5's EOS, for a seq2seq encoder only); the target is
``format_target(answer)`` (" yes" for a causal LM, "yes" for a decoder), tokenized on its own, + EOS.

* Generation is greedy, left-padded, with the model's own generation config swapped out for a clean greedy one while it
  runs (no sampling flags, no repetition penalty, no warnings). Only new tokens are decoded, cut at EOS / first newline.
* Rank classification scores each option by the total log-likelihood of its target tokens (EOS included, so an option
  that is a prefix of another is not favoured; ``score_eos``) given the source: the negative training loss of that
  example, summed over its tokens. No generation; (example, option) pairs batched, one forward per batch.
* ``max_prompt_tokens`` (special tokens included) truncates prompts from the left, as training does (the end, "Answer:",
  stays next to the answer); the number truncated is reported in ``EvalResult.truncated``.

Data parallel evaluation: ``split_for_rank`` gives each worker every ``world``-th example, ``merge_counts`` combines
the workers' results (counts summed, predictions back in the original order); under torch.distributed, all-reduce
``[result.correct, result.n]``. Not on an FSDP-sharded model with uneven splits: the ranks would run different numbers
of forwards (each an all-gather) and hang.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.nn import functional as F

from gorp.metrics import exact_match, normalize_answer
from pipelines.encoding import encode_prompts
from pipelines.records import format_target

METRICS = ("exact_match", "rank_classification")
T = TypeVar("T")
Progress = Callable[[int, int], None]  # progress(done, total), in sequences run through the model


@dataclass
class EvalResult:
    accuracy: float  # correct / n, in [0, 1]; 0.0 when n == 0
    n: int
    predictions: list[str]  # in the order of the prompts
    seconds: float
    correct: int
    truncated: int = 0  # prompts cut to max_prompt_tokens


def split_for_rank(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Every ``world``-th item starting at ``rank``: deterministic, disjoint, covering, and mixing short and long."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return list(items[rank::world])


# ---- tokenization ------------------------------------------------------------------------------------------------


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []


def _pad_and_eos(tokenizer) -> tuple[int, list[int]]:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad, [] if eos is None else [eos]


def _sources(tokenizer, prompts: Sequence[str], seq2seq: bool, max_prompt_tokens: int | None, fallback: int):
    """Source ids as training builds them (:func:`pipelines.encoding.encode_prompts`), and how many were cut."""
    ids, _, cut = encode_prompts(tokenizer, prompts, max_source_tokens=max_prompt_tokens, seq2seq=seq2seq)
    return [s or [fallback] for s in ids], sum(cut)  # a causal LM needs a token to predict the first from


def _left_pad(seqs: Sequence[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _chunks(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


def _accepts(model, name: str) -> bool:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs through
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# ---- exact match: greedy generation --------------------------------------------------------------------------------


@contextlib.contextmanager
def _greedy_generation_config(model, **ids):
    """Swap every (wrapped) model's generation config for a clean greedy one: no sampling flags to warn about, no
    repetition penalty or other decoding preferences of the checkpoint altering the evaluation."""
    from transformers import GenerationConfig

    owners = [m for m in model.modules() if isinstance(getattr(m, "generation_config", None), GenerationConfig)]
    saved = [m.generation_config for m in owners]
    clean = GenerationConfig(do_sample=False, num_beams=1, **ids)
    try:
        for m in owners:
            m.generation_config = clean
        yield clean
    finally:
        for m, cfg in zip(owners, saved, strict=True):
            m.generation_config = cfg


def _clean_prediction(tokenizer, new_ids: list[int], stop: set[int]) -> str:
    for j, tok in enumerate(new_ids):
        if tok in stop:
            new_ids = new_ids[:j]
            break
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return text.lstrip().split("\n", 1)[0].strip()


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    progress: Progress | None = None,
) -> tuple[list[str], int]:
    """Greedy answers (new tokens, cut at EOS / first newline) in prompt order, and how many prompts were cut."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad, eos = _pad_and_eos(tokenizer)
    contexts, truncated = _sources(tokenizer, prompts, seq2seq, max_prompt_tokens, (eos or [pad])[0])
    order = sorted(range(len(contexts)), key=lambda i: -len(contexts[i]))
    device = next(model.parameters()).device
    predictions: list[str] = [""] * len(contexts)
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    model_eos = [model_eos] if isinstance(model_eos, int) else list(model_eos or [])
    eos = list(dict.fromkeys(eos + model_eos))  # the tokenizer's EOS and any other stop tokens the model declares
    stop = set(eos) | {pad}
    ids = {"pad_token_id": pad, "eos_token_id": eos or None, "max_new_tokens": max_new_tokens}
    if seq2seq:
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        ids["decoder_start_token_id"] = start if start is not None else model.config.decoder_start_token_id
    elif tokenizer.bos_token_id is not None:
        ids["bos_token_id"] = tokenizer.bos_token_id
    done = 0
    with _eval_mode(model), _greedy_generation_config(model, **ids):
        for batch in _chunks(order, batch_size):
            input_ids, mask = _left_pad([contexts[i] for i in batch], pad, device)
            out = model.generate(input_ids=input_ids, attention_mask=mask)
            new = out[:, 1:] if seq2seq else out[:, input_ids.shape[1] :]
            for row, i in enumerate(batch):
                predictions[i] = _clean_prediction(tokenizer, new[row].tolist(), stop)
            done += len(batch)
            if progress is not None:
                progress(done, len(contexts))
    return predictions, truncated


# ---- rank classification: log-likelihood of each option ----------------------------------------------------------


def _causal_scores(model, contexts, conts, batch_size, pad, device, progress) -> list[float]:
    scores = [0.0] * len(contexts)
    order = sorted(range(len(contexts)), key=lambda i: -(len(contexts[i]) + len(conts[i])))
    keep_logits, pass_positions = _accepts(model, "logits_to_keep"), _accepts(model, "position_ids")
    done = 0
    for batch in _chunks(order, batch_size):
        width = max(len(conts[i]) for i in batch)
        if width:  # else nothing to score (empty options without EOS)
            input_ids, mask = _left_pad([contexts[i] + conts[i] for i in batch], pad, device)
            kwargs = {"input_ids": input_ids, "attention_mask": mask}
            if pass_positions:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            if keep_logits:  # left padding: every continuation ends its row, only the last width + 1 logits matter
                kwargs["logits_to_keep"] = width + 1
            logp = torch.log_softmax(model(**kwargs).logits[:, -(width + 1) : -1].float(), dim=-1)
            token_logp = logp.gather(-1, input_ids[:, -width:].unsqueeze(-1)).squeeze(-1)
            for row, i in enumerate(batch):
                m = len(conts[i])
                scores[i] = float(token_logp[row, width - m :].sum()) if m else 0.0
        done += len(batch)
        if progress is not None:
            progress(done, len(contexts))
    return scores


def _seq2seq_scores(model, enc, dec, batch_size, pad, device, progress) -> list[float]:
    scores = [0.0] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: -(len(enc[i]) + len(dec[i])))
    done = 0
    for batch in _chunks(order, batch_size):
        input_ids, mask = _left_pad([enc[i] for i in batch], pad, device)
        width = max(max(len(dec[i]) for i in batch), 1)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            labels[row, : len(dec[i])] = torch.tensor(dec[i], dtype=torch.long)
        labels = labels.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, labels=labels).logits.float()
        token_logp = -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        for row, i in enumerate(batch):
            scores[i] = float(token_logp[row].sum())
        done += len(batch)
        if progress is not None:
            progress(done, len(enc))
    return scores


def rank_scores(
    model,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    *,
    batch_size: int = 16,
    max_prompt_tokens: int | None = None,
    score_eos: bool = True,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, int]:
    """Log-likelihood (float64, shape [len(prompts), len(labels)]) of each option given each prompt, summed over the
    option's tokens (and EOS with ``score_eos``); and how many prompts were cut to ``max_prompt_tokens``.

    All (prompt, option) pairs are sorted by length and batched ``batch_size`` sequences per forward.
    """
    if not labels:
        raise ValueError("rank classification needs label options")
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    pad, eos = _pad_and_eos(tokenizer)
    eos = eos if score_eos else []
    device = next(model.parameters()).device
    targets = [ids + eos for ids in _encode(tokenizer, [format_target(lab, seq2seq=seq2seq) for lab in labels])]
    bos = tokenizer.bos_token_id
    sources, truncated = _sources(tokenizer, prompts, seq2seq, max_prompt_tokens, bos if bos is not None else pad)
    sources = [src for src in sources for _ in labels]  # (prompt, option) pairs, prompt-major
    with _eval_mode(model):
        score = _seq2seq_scores if seq2seq else _causal_scores
        flat = score(model, sources, targets * len(prompts), batch_size, pad, device, progress)
    scores = torch.tensor(flat, dtype=torch.float64).reshape(len(prompts), len(labels))
    return scores, truncated


# ---- one task -----------------------------------------------------------------------------------------------------


def evaluate_task(
    model,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    *,
    metric: str,
    labels: list[str] | None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    max_prompt_tokens: int | None = None,
    progress: Progress | None = None,
) -> EvalResult:
    """Accuracy of ``model`` on (prompt, answer) pairs under ``metric`` ("exact_match" or "rank_classification").

    exact_match: greedy generation of up to ``max_new_tokens`` (default: the longest label's token count + 2, or 16
    without labels), compared with the answer after normalization (lower case, punctuation stripped).
    rank_classification: the option of ``labels`` with the highest log-likelihood; every answer must be an option.
    ``progress(done, total)`` is called after each batch.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    t0 = time.perf_counter()
    kw = {"batch_size": batch_size, "max_prompt_tokens": max_prompt_tokens, "progress": progress}
    if metric == "rank_classification":
        if not labels:
            raise ValueError("metric rank_classification needs the label options (labels)")
        options = {normalize_answer(label) for label in labels}
        missing = sorted({a for a in answers if normalize_answer(a) not in options})
        if missing:
            raise ValueError(f"answers not among the label options {list(labels)}: {missing[:5]}")
        scores, truncated = rank_scores(model, tokenizer, prompts, labels, **kw)
        predictions = [labels[j] for j in scores.argmax(dim=1).tolist()] if prompts else []
    else:
        if max_new_tokens is None:
            longest = max((len(ids) for ids in _encode(tokenizer, [format_target(x) for x in labels or []])), default=0)
            max_new_tokens = longest + 2 if labels else 16
        predictions, truncated = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **kw)
    correct = sum(exact_match(p, a) for p, a in zip(predictions, answers, strict=True))
    accuracy = correct / len(prompts) if prompts else 0.0
    return EvalResult(
        accuracy, len(prompts), predictions, time.perf_counter() - t0, correct=correct, truncated=truncated
    )
