"""A tiny word-level tokenizer built in-process (no hub, no network), saved as a Hugging Face tokenizer folder.

Used by the data tests and reusable by any test that needs ``AutoTokenizer.from_pretrained(path)`` to work offline:

    path = make_tokenizer(tmp_path / "tok", ["some words", "more words"])
    tok = AutoTokenizer.from_pretrained(path)

Words are split on whitespace and punctuation; every word of the corpus gets an id, anything else maps to ``<unk>``.
``add_eos=True`` appends ``</s>`` to every encoding (like T5), ``add_bos=True`` prepends ``<s>`` (like LLaMA); both
exercise the special-token handling of ``pipelines.data``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")


def make_tokenizer(folder: str | Path, corpus: Iterable[str], *, add_bos: bool = False, add_eos: bool = False) -> Path:
    """Build a word-level tokenizer over ``corpus``, save it to ``folder`` and return the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in corpus for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos or add_eos:
        single = " ".join([*(["<s>"] if add_bos else []), "$A", *(["</s>"] if add_eos else [])])
        backend.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    folder = Path(folder)
    tok.save_pretrained(folder)
    return folder
