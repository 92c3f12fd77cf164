"""The memory plan ``gorp validate`` prints: per worker, the estimated bytes of parameters, gradients, optimizer
state and activations for the stream's batch and longest sequence, without FSDP and with FSDP over the configured
workers, the optimizer state other methods would need, and a warning when the peak exceeds the memory visible here
(:mod:`gorp.memplan` does the counting on the meta device: nothing is loaded)."""

from __future__ import annotations

from pathlib import Path

COMPARED = ("gorp", "lora", "full")  # the optimizer-state line: GORP's projected state, LoRA's, full AdamW's


def memory_plan(stream, folder: str | Path) -> tuple[str, list[str]]:
    """(the report, warnings) for ``stream`` on the model in ``folder`` (its config.json only)."""
    from transformers import AutoConfig

    from gorp.memplan import memory_report, memory_warnings, plan_memory

    config = AutoConfig.from_pretrained(folder, trust_remote_code=stream.trust_remote_code)
    tc, sc = stream.training, stream.scaling
    # the longest batch dynamic padding can make: the longest prompt budget plus the longest answer
    seq_len = max(t.max_source_tokens + t.max_target_tokens for t in stream.tasks)
    common = {
        "batch_size": tc.batch_size,
        "seq_len": seq_len,
        "workers": sc.num_workers,
        "precision": tc.precision,
        "activation_checkpointing": tc.activation_checkpointing,
        "tasks": len(stream.tasks),
        "device": "cuda" if sc.use_gpu else "cpu",
    }
    fsdp_options = (False, True) if sc.num_workers > 1 else (False,)  # one worker: FSDP shards nothing
    plans = [plan_memory(config, stream.method, stream.method_args, fsdp=f, **common) for f in fsdp_options]
    others = {m: plan_memory(config, m, {}, fsdp=False, **common).optimizer for m in COMPARED if m != stream.method}
    title = (
        f"memory per worker: {stream.method}, {tc.precision}, batch {tc.batch_size} over {sc.num_workers} worker(s), "
        f"sequences up to {seq_len} tokens" + (", activation checkpointing" if tc.activation_checkpointing else "")
    )
    chosen = plans[-1] if sc.fsdp else plans[0]
    return title + "\n" + memory_report(plans, others), memory_warnings(chosen, on_gpu=sc.use_gpu)
