"""pipelines.evaluate: exact match and rank classification on tiny models whose answers are known, batching invariance
(left padding), order restoration, tokenization boundaries, truncation, and the split/merge of data-parallel eval."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from helpers_tokenizer import make_tokenizer
from pipelines.evaluate import (
    _clean_prediction,
    _sources,
    evaluate_task,
    generate_answers,
    rank_scores,
    split_for_rank,
)
from tiny_models import tiny_llama, tiny_t5

CORPUS = ["question about one two three four five : answer is it ?", "alpha beta gamma red apple pear"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("tok")
    return {
        "plain": AutoTokenizer.from_pretrained(make_tokenizer(root / "plain", CORPUS)),
        "bos": AutoTokenizer.from_pretrained(make_tokenizer(root / "bos", CORPUS, add_bos=True)),
        "eos": AutoTokenizer.from_pretrained(make_tokenizer(root / "eos", CORPUS, add_eos=True)),
    }


def bigram_llama(tok, logits: dict[tuple[str, str], float], hidden: int = 64):
    """A LLaMA whose next-token logits depend only on the current token: logit(v | u) = B[u, v].

    Attention and MLP outputs are zeroed, so the residual stream is the (one-hot) embedding of the current token; the
    final RMSNorm scales it to sqrt(hidden) and lm_head reads B off it.
    """
    v = len(tok)
    model = tiny_llama(vocab_size=v, hidden=hidden, layers=1, heads=4, intermediate=16)
    b = torch.zeros(v, v)
    for (u, w), value in logits.items():
        b[tok.convert_tokens_to_ids(u), tok.convert_tokens_to_ids(w)] = value
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[torch.arange(v), torch.arange(v)] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.model.norm.variance_epsilon = 0.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :v] = b.T / math.sqrt(hidden)
    return model, b


# prompt's last word -> answer -> end of sequence; after EOS "gamma" (shows up if EOS is not cut or not stripped)
MAPPING = {"one": "alpha", "two": "beta", "three": "gamma", "four": "alpha"}
PROMPTS = ["question one", "a question about two", "three", "question about it : four", "two", "one"]
ANSWERS = [MAPPING[p.split()[-1]] for p in PROMPTS]


def mapping_logits(eos: str = "</s>") -> dict[tuple[str, str], float]:
    out = {(k, v): 10.0 for k, v in MAPPING.items()}
    out.update({(a, eos): 10.0 for a in ("alpha", "beta", "gamma")})
    out[(eos, "gamma")] = 10.0
    return out


@pytest.mark.parametrize("kind", ["plain", "bos", "eos"])
def test_exact_match_known_greedy_output_and_order(tokenizers, kind):
    tok = tokenizers[kind]
    model, _ = bigram_llama(tok, mapping_logits())
    calls = []
    res = evaluate_task(
        model,
        tok,
        PROMPTS,
        ANSWERS,
        metric="exact_match",
        labels=["alpha", "beta", "gamma"],
        batch_size=4,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert res.predictions == ANSWERS  # in the caller's order, though batches run longest first
    assert (res.accuracy, res.n, res.correct, res.truncated) == (1.0, 6, 6, 0)
    assert calls[-1] == (6, 6) and len(calls) == 2
    wrong = ["beta" if a == "alpha" else a for a in ANSWERS]
    res = evaluate_task(model, tok, PROMPTS, wrong, metric="exact_match", labels=None, batch_size=4)
    assert res.correct == 3 and res.accuracy == 0.5


def test_exact_match_normalizes_and_truncates_from_the_left(tokenizers):
    tok = tokenizers["bos"]
    model, _ = bigram_llama(tok, mapping_logits())
    long = ["question about one two three : " * 3 + "two", "one"]
    res = evaluate_task(model, tok, long, ["Beta.", "ALPHA"], metric="exact_match", labels=None, max_prompt_tokens=4)
    assert res.predictions == ["beta", "alpha"] and res.correct == 2 and res.truncated == 1


def test_generation_config_is_greedy_quiet_and_restored(tokenizers, capfd, recwarn):
    tok = tokenizers["plain"]
    model, _ = bigram_llama(tok, {**mapping_logits(), ("one", "gamma"): 5.0})
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.7
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 100.0
    model.train()
    prompts, answers = [*PROMPTS, "alpha one"], [*ANSWERS, "alpha"]  # the penalty would turn "alpha" into "gamma"
    res = evaluate_task(model, tok, prompts, answers, metric="exact_match", labels=None, max_new_tokens=3)
    assert res.predictions == answers
    assert "generation" not in capfd.readouterr().err
    assert not [w for w in recwarn if "generat" in str(w.message)]
    assert model.training and model.generation_config.temperature == 0.7
    assert model.generation_config.repetition_penalty == 100.0


def test_clean_prediction_cuts_at_eos_and_newline(tokenizers):
    tok = tokenizers["plain"]
    ids = tok.convert_tokens_to_ids(["alpha", "beta", "</s>", "gamma"])
    assert _clean_prediction(tok, ids, {tok.eos_token_id}) == "alpha beta"

    class Stub:
        def decode(self, ids, skip_special_tokens=True):
            return "\n  Yes, sure\nmore lines"

    assert _clean_prediction(Stub(), [1, 2], set()) == "Yes, sure"


def test_rank_classification_known_scores(tokenizers):
    tok = tokenizers["bos"]
    logits = {("one", "red"): 4.0, ("red", "apple"): 3.0, ("apple", "</s>"): 1.0, ("one", "pear"): 2.5}
    logits.update({("two", "pear"): 4.0, ("pear", "</s>"): 0.5})
    model, b = bigram_llama(tok, logits)
    labels = ["red apple", "pear", "gamma"]
    scores, truncated = rank_scores(model, tok, ["question one ", "two "], labels, batch_size=2)

    def lp(u: str, v: str) -> float:
        ids = tok.convert_tokens_to_ids([u, v])
        return float(torch.log_softmax(b[ids[0]].double(), -1)[ids[1]])

    expected = [
        [
            lp("one", "red") + lp("red", "apple") + lp("apple", "</s>"),
            lp("one", "pear") + lp("pear", "</s>"),
            lp("one", "gamma") + lp("gamma", "</s>"),
        ],
        [
            lp("two", "red") + lp("red", "apple") + lp("apple", "</s>"),
            lp("two", "pear") + lp("pear", "</s>"),
            lp("two", "gamma") + lp("gamma", "</s>"),
        ],
    ]
    assert truncated == 0
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    res = evaluate_task(
        model,
        tok,
        ["question one ", "two ", "one "],
        ["red apple", "Pear", "red apple"],
        metric="rank_classification",
        labels=labels,
        batch_size=4,
    )
    assert res.predictions == ["red apple", "pear", "red apple"] and res.correct == 3


def _reference_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) from one unpadded forward."""
    ids = torch.tensor([context + continuation])
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(float(logp[len(context) - 1 + j, tok]) for j, tok in enumerate(continuation))


def test_rank_scores_match_unpadded_forward_and_are_batch_invariant(tokenizers):
    tok = tokenizers["bos"]
    model = tiny_llama(seed=1, vocab_size=len(tok), hidden=32, layers=2, heads=4)
    prompts = ["question about one two three four : answer ", "two ? ", "it is four five : answer "]
    labels = ["alpha", "red apple", "beta gamma pear"]
    s1, _ = rank_scores(model, tok, prompts, labels, batch_size=1)
    s9, _ = rank_scores(model, tok, prompts, labels, batch_size=9)
    torch.testing.assert_close(s1, s9, atol=1e-4, rtol=0)
    bos, eos = [tok.bos_token_id], [tok.eos_token_id]
    for p, prompt in enumerate(prompts):
        ctx = bos + tok(prompt, add_special_tokens=False)["input_ids"]
        for j, label in enumerate(labels):
            ref = _reference_logprob(model, ctx, tok(label, add_special_tokens=False)["input_ids"] + eos)
            assert s1[p, j].item() == pytest.approx(ref, abs=1e-4)


def test_generation_is_batch_invariant_under_left_padding(tokenizers):
    tok = tokenizers["bos"]
    model = tiny_llama(seed=2, vocab_size=len(tok), hidden=32, layers=2, heads=4)
    prompts = ["question about one two three four : answer", "two", "it is four five : answer", "one one ?"]
    p1, _ = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=1)
    p4, _ = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=4)
    assert p1 == p4 and all(p1)


def _bpe_tokenizer():
    """A byte-level BPE (GPT-2 style: a word's leading space is part of its token) trained in-process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    corpus = ["Is a cat an animal?\nOptions: yes, no, maybe\nAnswer: yes", "Is it red?\nAnswer: no", "Answer: maybe"]
    backend.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def _training_logprob(model, tok, prompt: str, answer: str, seq2seq: bool) -> float:
    """Minus the summed training loss of (prompt, answer), built by the data module's Encoder: the reference."""
    from pipelines.encoding import Encoder

    ex = Encoder(tok, max_source_tokens=256, max_target_tokens=32, seq2seq=seq2seq).examples([prompt], [answer])
    ids, labels = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"])
    model.eval()
    with torch.no_grad():
        if seq2seq:
            logits = model(input_ids=ids, labels=labels).logits
        else:
            logits, labels = model(input_ids=ids).logits[:, :-1], labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.double().transpose(1, 2), labels, reduction="sum")
    return -loss.item()


@pytest.mark.parametrize("kind", ["plain", "bos", "eos"])
@pytest.mark.parametrize("seq2seq", [False, True])
def test_sources_are_the_training_sources(tokenizers, kind, seq2seq):
    from pipelines.encoding import Encoder

    tok = tokenizers[kind]
    prompts = ["question about one two three four : answer", "two", "it is four five : answer"]
    for limit in (64, 4):
        expected = Encoder(tok, max_source_tokens=limit, max_target_tokens=8, seq2seq=seq2seq).prompts(prompts)[0]
        sources, truncated = _sources(tok, prompts, seq2seq, limit, fallback=tok.eos_token_id)
        assert sources == expected and truncated == (2 if limit == 4 else 0)


def test_rank_scores_are_the_training_likelihood():
    """An option is scored on the very tokens training puts after the prompt (" yes" + EOS with a BPE that folds the
    space into the word), so its score is minus the training loss of that example."""
    from pipelines.records import format_prompt

    tok = _bpe_tokenizer()
    assert tok(" yes")["input_ids"] != tok("yes")["input_ids"]
    model = tiny_llama(seed=3, vocab_size=len(tok), hidden=32, layers=2, heads=4)
    labels = ["yes", "no", "maybe"]
    prompts = [format_prompt("Is a cat an animal?", "", labels), format_prompt("Is it red?", "really", None)]
    scores, _ = rank_scores(model, tok, prompts, labels, batch_size=4)
    for p, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            assert scores[p, j].item() == pytest.approx(_training_logprob(model, tok, prompt, label, False), abs=1e-4)


def test_seq2seq_t5(tokenizers):
    tok = tokenizers["eos"]  # T5-style: the tokenizer appends </s>
    model = tiny_t5(seed=4, vocab_size=len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    prompts = ["question about one two three four : answer", "two", "it is four five : answer"]
    labels = ["alpha", "red apple", "pear"]
    s1, _ = rank_scores(model, tok, prompts, labels, batch_size=1)
    s9, _ = rank_scores(model, tok, prompts, labels, batch_size=9)
    torch.testing.assert_close(s1, s9, atol=1e-4, rtol=0)
    for p, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            assert s1[p, j].item() == pytest.approx(_training_logprob(model, tok, prompt, label, True), abs=1e-4)
    p1, _ = generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=1)
    p3, _ = generate_answers(model, tok, prompts, max_new_tokens=4, batch_size=3)
    assert p1 == p3
    res = evaluate_task(model, tok, prompts, ["alpha", "pear", "pear"], metric="rank_classification", labels=labels)
    assert res.n == 3 and res.predictions == [labels[j] for j in s1.argmax(1).tolist()]


@pytest.mark.parametrize("metric", ["exact_match", "rank_classification"])
def test_split_and_merge_equal_the_unsplit_result(tokenizers, metric):
    tok = tokenizers["plain"]
    model, _ = bigram_llama(tok, mapping_logits())
    prompts = PROMPTS + ["five", "question two"]
    answers = ANSWERS + ["gamma", "alpha"]
    kw = {"metric": metric, "labels": ["alpha", "beta", "gamma"], "batch_size": 2}
    full = evaluate_task(model, tok, prompts, answers, **kw)
    world = 3
    parts = [
        evaluate_task(model, tok, split_for_rank(prompts, r, world), split_for_rank(answers, r, world), **kw)
        for r in range(world)
    ]
    assert sorted(x for r in range(world) for x in split_for_rank(list(range(8)), r, world)) == list(range(8))
    # what the worker does: sum the counts of the ranks (each example was scored by exactly one)
    assert (sum(p.n for p in parts), sum(p.correct for p in parts)) == (full.n, full.correct)
    assert [parts[i % world].predictions[i // world] for i in range(full.n)] == full.predictions
    assert 0 < full.accuracy < 1


def test_split_for_rank_edges():
    assert split_for_rank([], 0, 2) == []
    assert split_for_rank("abcde", 1, 2) == ["b", "d"]
    with pytest.raises(ValueError):
        split_for_rank([1, 2], 2, 2)


def test_input_validation(tokenizers):
    tok = tokenizers["plain"]
    model, _ = bigram_llama(tok, mapping_logits())
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_task(model, tok, ["one"], ["alpha"], metric="bleu", labels=None)
    with pytest.raises(ValueError, match="answers"):
        evaluate_task(model, tok, ["one"], ["alpha", "beta"], metric="exact_match", labels=None)
    with pytest.raises(ValueError, match="label options"):
        evaluate_task(model, tok, ["one"], ["delta"], metric="rank_classification", labels=["alpha", "beta"])
    with pytest.raises(ValueError, match="needs the label options"):
        evaluate_task(model, tok, ["one"], ["alpha"], metric="rank_classification", labels=None)
    res = evaluate_task(model, tok, [], [], metric="rank_classification", labels=["alpha"])
    assert (res.n, res.accuracy, res.predictions) == (0, 0.0, [])


def test_answer_counts_keep_the_most_frequent_normalized_answers_and_sum_the_rest():
    from pipelines.worker import answer_counts

    preds = ["Yes", "yes.", "no", "maybe", "No", "a", "b", "c", "yes"]
    assert answer_counts(preds, top=3) == {"yes": 3, "no": 2, "maybe": 1, "(other)": 3}
    assert answer_counts(["x", "x"]) == {"x": 2} and answer_counts([]) == {}
