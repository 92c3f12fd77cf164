"""One continual stage on a Ray Train worker group: load the previous stage, train one task, merge, evaluate, save.

``sequence_loop(config)`` is the ``train_loop_per_worker`` of a :class:`ray.train.torch.TorchTrainer`; it runs
``run_stage`` for each stage in order. A stage reads top to bottom: build the model and the method from the previous
stage's folder, shard with FSDP2 when there is more than one worker, train with periodic sharded checkpoints
(``torch.distributed.checkpoint`` for the model, one safetensors file per rank for the optimizer), fold the task into
the method's memory, gather and merge the weights, save the stage's model folder (rank 0), and evaluate on every task
seen so far plus the next one (for forward transfer).

Data: every worker iterates the *whole* training dataset in the same seeded order and keeps its slice of each global
batch. So every rank runs the same number of steps, and the global batches (hence the loss curve) are the same for any
number of workers. The price is that each worker reads all token ids (small next to the compute of a language model).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

STAGE_FILE = "stage.json"
PROGRESS_FILE = "progress.jsonl"


# --------------------------------------------------------------------------- helpers
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean(x: float) -> float:
    rank, world = _world()
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


def _local_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (padded to the global batch's longest row: the same for any world size)."""
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def global_batches(dataset, batch_size: int, steps: int, pad_token_id: int):
    """``steps`` global batches (dicts of (B, L) tensors), cycling over epochs; the same sequence on every rank."""
    from pipelines.data import PadCollate

    produced = 0
    while True:
        for batch in dataset.iter_torch_batches(
            batch_size=batch_size, drop_last=True, collate_fn=PadCollate(pad_token_id)
        ):
            yield batch
            produced += 1
            if produced >= steps:
                return
        if produced == 0:
            raise ValueError(f"the training set has fewer rows than one global batch ({batch_size})")


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, model, optimizer, step: int, stage: int) -> None:
    """Sharded model (DCP) + this rank's optimizer state (safetensors + JSON) + the step."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    rank, world = _world()
    folder.mkdir(parents=True, exist_ok=True)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(folder / "model"))
    sd = optimizer.state_dict()
    tensors = {
        f"{pid}/{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)
    }
    save_file(tensors, str(folder / f"optim-rank{rank}.safetensors"))
    (folder / f"optim-rank{rank}.json").write_text(json.dumps({"param_groups": sd["param_groups"], "world": world}))
    if rank == 0:
        (folder / "progress.json").write_text(json.dumps({"stage": stage, "step": step, "world": world}))


def load_checkpoint(folder: Path, model, optimizer) -> int:
    """Restore what ``save_checkpoint`` wrote; returns the step to continue from."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    rank, world = _world()
    meta = json.loads((folder / "progress.json").read_text())
    if meta["world"] != world:
        raise RuntimeError(
            f"checkpoint {folder} was written by {meta['world']} workers, this stage has {world}: optimizer shards "
            "cannot be re-split; resume with the same num_workers"
        )
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(folder / "model"))
    set_model_state_dict(model, state["model"])
    groups = json.loads((folder / f"optim-rank{rank}.json").read_text())["param_groups"]
    flat = load_file(str(folder / f"optim-rank{rank}.safetensors"))
    st: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        pid, name = key.split("/", 1)
        st.setdefault(int(pid), {})[name] = v
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": st, "param_groups": groups})
    return int(meta["step"])


# --------------------------------------------------------------------------- the stage
@dataclass
class Carried:
    """What a stage hands the next one in the same worker: its merged model (already in memory: no reload from the
    stage folder) and the tokenizer. The method always comes from the folder, exactly as a resumed stage gets it."""

    folder: Path  # the stage's model folder: the next stage's prev_dir
    model: Any
    tokenizer: Any


def _build(config: dict[str, Any], carried: Carried | None = None):
    """(model, tokenizer, method) for a stage: the model from the previous stage's folder, or from ``carried`` when
    that is the same folder; the method with its carried state from the folder (fresh for the first stage)."""
    from gorp.methods import build_method
    from gorp.methods.base import META_FILE, ContinualMethod
    from gorp.models import load_model

    prev = Path(config["prev_dir"])
    if carried is not None and carried.folder == prev:
        model, tokenizer = carried.model, carried.tokenizer
    else:
        model, tokenizer = load_model(prev, trust_remote_code=config.get("trust_remote_code", False))
    if (prev / META_FILE).exists():
        method = ContinualMethod.load(prev, **config["method_args"])
        if method.name != config["method"]:
            raise ValueError(f"stage {prev} was trained with {method.name!r}, this stream uses {config['method']!r}")
    else:
        method = build_method(config["method"], **config["method_args"])
    return model, tokenizer, method


def _evaluate(model, tokenizer, eval_sets: dict[str, dict], names: list[str], batch_size: int) -> dict[str, float]:
    """Accuracy on each named task; examples split across ranks (on the unsharded model), counts summed."""
    from pipelines.evaluate import evaluate_task, split_for_rank

    rank, world = _world()
    out = {}
    for name in names:
        es = eval_sets[name]
        res = evaluate_task(
            model,
            tokenizer,
            split_for_rank(es["prompts"], rank, world),
            split_for_rank(es["answers"], rank, world),
            metric=es["metric"],
            labels=es.get("labels"),
            batch_size=batch_size,
            max_prompt_tokens=es.get("max_prompt_tokens"),
        )
        counts = torch.tensor([res.correct, res.n], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        out[name] = float(counts[0] / counts[1]) if counts[1] else 0.0
    return out


def run_stage(
    common: dict[str, Any], st: dict[str, Any], resume: Path | None, carried: Carried | None = None
) -> tuple[dict[str, Any], Carried]:
    """Train, merge, save and evaluate one stage on this worker; ``resume``: a checkpoint folder of this stage;
    ``carried``: the previous stage's model, when this worker ran it. Returns the stage's metrics and its carry."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    from gorp.fsdp import full_state_dict, shard_model
    from gorp.loop import train_step
    from gorp.models import model_from_state_dict

    rank, world = _world()
    config = {**common, **st}
    out_dir = Path(st["out_dir"])
    work_dir = Path(tempfile.mkdtemp(prefix=f"gorp-stage{st['stage']}-rank{rank}-"))
    tcfg = common["training"]
    fsdp = world > 1 and common.get("fsdp", True)
    t_setup = time.perf_counter()
    model, tokenizer, method = _build(config, carried)
    del carried
    # the plain model, before adapters and sharding: what the merged weights are loaded into at the end
    arch = {"cls": type(model), "config": model.config, "dtype": next(model.parameters()).dtype}
    metrics: dict[str, Any] = {"stage": st["stage"], "task": st["task"]}
    eval_bs = int(common.get("eval_batch_size", 16))
    if st.get("zero_shot_tasks"):
        t0 = time.perf_counter()
        metrics["zero_shot"] = _evaluate(model, tokenizer, common["eval_sets"], st["zero_shot_tasks"], eval_bs)
        metrics["zero_shot_s"] = time.perf_counter() - t0

    dataset = ray.train.get_dataset_shard(st["dataset"])
    steps, batch_size, pad = int(st["steps"]), int(tcfg["batch_size"]), int(st["pad_token_id"])
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of workers ({world})")

    def first_batches():  # for methods that look at the task before training (slice)
        for b in global_batches(dataset, batch_size, 8, pad):
            yield _local_slice(b, rank, world)

    torch.manual_seed(int(common["seed"]) + int(st["stage"]))  # the same initialization on every rank
    model = method.setup_task(model, st["stage"], batches=first_batches)
    if fsdp:
        shard_model(model)
    optimizer = method.make_optimizer(model)
    start = 0
    if resume is not None:
        start = load_checkpoint(resume, model, optimizer)
    setup_s = time.perf_counter() - t_setup - metrics.get("zero_shot_s", 0.0)  # load, adapters, shard, optimizer
    progress = out_dir.parent / PROGRESS_FILE
    if rank == 0:
        progress.parent.mkdir(parents=True, exist_ok=True)
    losses, tokens, t_train = [], 0, time.perf_counter()
    every = int(tcfg.get("checkpoint_every") or 0)
    faults = common.get("faults") or {}  # injected by the recovery tests
    step_sleep = float(faults.get("step_sleep", 0.0))
    model.train()
    for step, batch in enumerate(global_batches(dataset, batch_size, steps, pad)):
        if step < start:
            continue  # the same deterministic order: skip what the checkpoint already covers
        loss = _all_mean(train_step(model, method, optimizer, _local_slice(batch, rank, world), tcfg.get("grad_clip")))
        if step_sleep:
            time.sleep(step_sleep)  # a slower step
        if faults.get("nan") == f"{st['task']}:{step}":
            loss = float("nan")  # as if the batch had blown up
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"stage {st['stage']} ({st['task']}): the loss is not finite at step {step}; lower the learning rate "
                "or check the data. No model version is created for this stage."
            )
        losses.append(loss)
        tokens += int(batch["attention_mask"].sum())
        if rank == 0:
            elapsed = time.perf_counter() - t_train
            row = {
                "step": step + 1,
                "steps": steps,
                "loss": loss,
                "tokens_per_s": tokens / elapsed,
                "elapsed_s": elapsed,
            }
            with progress.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if every and (step + 1) % every == 0 and step + 1 < steps:
            folder = work_dir / f"ckpt-{st['stage']}-{step + 1}"
            save_checkpoint(folder, model, optimizer, step + 1, st["stage"])
            ray.train.report(
                {"stage": st["stage"], "step": step + 1, "loss": loss},
                checkpoint=Checkpoint.from_directory(str(folder)),
            )
    train_s = time.perf_counter() - t_train

    t_final = time.perf_counter()
    method.end_task(model, optimizer, batches=first_batches)
    sd = full_state_dict(model) if fsdp else model.state_dict()
    plain = method.finalize_state_dict({k: v.detach() for k, v in sd.items()})  # no copy: the model is dropped next
    del model, optimizer, sd
    merged = model_from_state_dict(state_dict=plain, **arch)  # no copy of the weights, no read from disk
    if rank == 0:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        method.save(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finalize_s = time.perf_counter() - t_final
    t_eval = time.perf_counter()
    row = _evaluate(merged, tokenizer, common["eval_sets"], st["eval_tasks"], eval_bs)
    metrics.update(
        row=row,
        losses=losses,
        steps=steps,
        resumed_from=start,
        setup_s=setup_s,
        train_s=train_s,
        finalize_s=finalize_s,
        eval_s=time.perf_counter() - t_eval,
        tokens_per_s=tokens / train_s if train_s else 0.0,
        world_size=world,
    )
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, nodes[0])
        nodes = gathered
    metrics["nodes"] = nodes  # the Ray node of each rank
    shutil.rmtree(work_dir, ignore_errors=True)
    if rank == 0:  # written last: its presence marks the stage complete
        tmp_file = out_dir / (STAGE_FILE + ".tmp")
        tmp_file.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp_file, out_dir / STAGE_FILE)
    ray.train.report({k: v for k, v in metrics.items() if k not in ("losses", "row", "zero_shot", "nodes")})
    return metrics, Carried(out_dir, merged, tokenizer)


def sequence_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the stages in ``config["stages"]`` in order, on one worker group.

    A stage whose ``stage.json`` exists is complete (an earlier attempt of this fit got past it before a worker died)
    and is skipped; the latest checkpoint resumes the stage it belongs to. Each stage starts from the model the one
    before left in memory; the first (or one after a restart) loads its previous stage's folder.
    """
    import ray.train

    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    resume = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        folder = Path(tempfile.mkdtemp(prefix="gorp-resume-"))
        with ckpt.as_directory() as d:
            shutil.copytree(d, folder, dirs_exist_ok=True)
        meta = json.loads((folder / "progress.json").read_text())
        resume = (folder, int(meta["stage"]))
    common = {k: v for k, v in config.items() if k != "stages"}
    carried = None  # the model stays in memory from one stage to the next
    for st in config["stages"]:
        if (Path(st["out_dir"]) / STAGE_FILE).exists():
            continue
        _, carried = run_stage(common, st, resume[0] if resume and resume[1] == st["stage"] else None, carried)
