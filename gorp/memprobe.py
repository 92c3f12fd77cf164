"""Measure the peak memory of a few training steps on CPU, in a fresh process: the reference for :mod:`gorp.memplan`.

``python -m gorp.memprobe '<json>'`` prints one JSON line. The process imports everything and warms the kernels up on a
throwaway model first, then takes its resident set size (RSS) as the baseline, resets the kernel's high-water mark
(``/proc/self/clear_refs``, Linux) and builds the model, the method and the optimizer, and trains ``steps`` steps. The
peak is the high-water mark minus the baseline: the model, its gradients, the optimizer state and the activations,
plus whatever the allocator holds on to (what a user's process really uses). ``tracemalloc`` would not see torch's
allocations; ``ru_maxrss`` cannot be reset after the imports.

The JSON request: ``model`` ({"llama": {LlamaConfig kwargs}} for random weights of a given shape,
{"tiny": {LlamaConfig overrides of TINY}}, or {"path": folder}), ``method`` and ``method_args``, ``batch``,
``seq``, ``steps``, ``precision``, ``activation_checkpointing``, ``threads``.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

# glibc's malloc raises its mmap threshold (up to 32 MiB) after the first large frees and then keeps freed tensors in
# its heap; with a fixed threshold, tensors of 128 KiB and more are mapped and unmapped, and RSS follows live memory.
# Measured on the tiny model (batch 32 x 128): 83.6 MiB peak with glibc's default, 43.9 MiB with the fixed threshold.
MMAP_THRESHOLD = 128 * 1024


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> None:
    """Set the high-water mark to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


# {"tiny": {overrides}}: a small LLaMA of this shape (the tests' tiny model: tests/tiny_models.py)
TINY = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
    "attn_implementation": "eager",
}


# SmolLM2-135M-Instruct's shape (its config.json): {"llama": SMOLLM2} where the demo model is not prepared
SMOLLM2 = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
}


def build_model(spec: dict[str, Any]):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gorp.models import load_model

    if "path" in spec:
        return load_model(spec["path"])[0]
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(TINY | spec.get("tiny", {}) if "tiny" in spec else spec["llama"]))).float()


def _batch(step: int, batch: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _steps(req: dict[str, Any], model) -> list[float]:
    from gorp.loop import train_step
    from gorp.methods import build_method
    from gorp.models import enable_activation_checkpointing
    from gorp.precision import Precision

    method = build_method(req["method"], **req.get("method_args", {}))
    model = method.setup_task(model, 0)
    if req.get("activation_checkpointing"):
        enable_activation_checkpointing(model)
    opt = method.make_optimizer(model)
    model.train()
    times = []
    vocab = model.config.vocab_size if hasattr(model, "config") else 128
    for step in range(int(req.get("steps", 2))):
        t0 = time.perf_counter()
        train_step(model, method, opt, _batch(step, req["batch"], req["seq"], vocab), 1.0, Precision(req["precision"]))
        times.append(time.perf_counter() - t0)
    return times


def probe(req: dict[str, Any]) -> dict[str, Any]:
    """Run the request in this process (see the module docstring); returns baseline, peak and step times."""
    torch.set_num_threads(int(req.get("threads", 1)))
    warm = dict(req, steps=1, batch=2, seq=8)  # lazy library state (thread pools, kernels) before the baseline
    _steps(warm, build_model({"tiny": {}}))
    gc.collect()
    baseline = rss_bytes()
    reset_peak_rss()
    model = build_model(req["model"])
    after_model = rss_bytes() - baseline
    times = _steps(req, model)
    return {
        "baseline_bytes": baseline,
        "model_bytes": after_model,
        "peak_bytes": peak_rss_bytes() - baseline,
        "step_s": times,
    }


def measure(req: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """``probe(req)`` in a fresh Python process (so nothing of this one's memory counts), with a fixed malloc mmap
    threshold (``MMAP_THRESHOLD``: what is measured is what the tensors use, not what glibc keeps cached)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run(
        [sys.executable, "-m", "gorp.memprobe", json.dumps(req)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(probe(json.loads(sys.argv[1]))))
