"""The Ray Train worker: the stages of a sequence, one after another, on one worker group.

``sequence_loop(config)`` is the ``train_loop_per_worker`` of the :class:`ray.train.torch.TorchTrainer` that
:func:`pipelines.sequence.run_sequence` starts. Each stage reads top to bottom (``run_stage``): build the model and the
method from the previous stage (in memory, or from its folder in the run's storage), shard with FSDP2 when there is
more than one worker, train with periodic checkpoints, fold the task into the method's memory, gather and merge the
weights, save the stage's model folder to the run's storage (rank 0), evaluate on every task seen so far plus the next
one, and write ``stage.json`` last.

What the driver learns, it learns through Ray, never through a shared disk: rank 0 puts ``("progress", stage, row)``
after every step and ``("stage", result)`` after every stage into a Ray queue (``config["channel"]``). Mid-stage
checkpoints go through ``ray.train.report`` with ``kind: "checkpoint"``; the end of a stage reports ``kind: "stage"``.

Data: every worker iterates the *whole* training dataset in the same order and keeps its slice of each global batch. So
every rank runs the same number of steps, and the global batches (hence the loss curve) are the same for any number of
workers. With ``training.shuffle`` (the default) that order is a fresh permutation of the task's rows every epoch, drawn
from ``(training.seed, stage, epoch)`` (Ray Data's local shuffle over a buffer that holds the whole task): the same on
every rank and on a resumed worker, different for another seed.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gorp.distributed import all_mean, rank_and_world
from pipelines import storage
from pipelines.checkpoints import load_checkpoint, save_checkpoint
from pipelines.results import STAGE_FILE, StageResult


# --------------------------------------------------------------------------- data
def _local_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of a global batch (padded to the global batch's longest row: the same for any world size)."""
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """The shuffle seed of one epoch of one stage: a function of the three alone, so every rank and a resumed worker
    draw the same permutation."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{stage}:{epoch}".encode()).digest()[:4], "little")


def global_batches(
    dataset, batch_size: int, steps: int, pad_token_id: int, shuffle: tuple[int, int, int] | None = None
):
    """``steps`` global batches (dicts of (B, L) tensors), cycling over epochs; the same sequence on every rank.

    ``shuffle``: ``(seed, stage, num_rows)`` to visit the rows in a seeded permutation, a new one each epoch (a local
    shuffle buffer of ``num_rows`` rows holds the whole task, so the permutation is uniform); None: the file's order."""
    from pipelines.feeding import PadCollate

    produced, epoch = 0, 0
    while True:
        order = {}
        if shuffle is not None:
            seed, stage, num_rows = shuffle
            order = {"local_shuffle_buffer_size": num_rows, "local_shuffle_seed": epoch_seed(seed, stage, epoch)}
        for batch in dataset.iter_torch_batches(
            batch_size=batch_size, drop_last=True, collate_fn=PadCollate(pad_token_id), **order
        ):
            yield batch
            produced += 1
            if produced >= steps:
                return
        if produced == 0:
            raise ValueError(f"the training set has fewer rows than one global batch ({batch_size})")
        epoch += 1


def stage_order(config: dict[str, Any]) -> tuple[int, int, int] | None:
    """``global_batches``' shuffle for a stage's merged config: None when ``training.shuffle`` is off."""
    if not config["training"].get("shuffle", True):
        return None
    return int(config["seed"]), int(config["stage"]), int(config["train_rows"])


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes in name order: which weights a stage started from."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- building a stage
@dataclass
class Carried:
    """What a stage hands the next one in the same worker: its merged model (already in memory: no reload from the
    stage folder) and the tokenizer. The method always comes from the folder, exactly as a resumed stage gets it."""

    uri: str  # the stage's model folder: the next stage's prev_uri
    model: Any
    tokenizer: Any


def _build(config: dict[str, Any], carried: Carried | None = None):
    """(model, tokenizer, method) for a stage: the model from the previous stage's folder, or from ``carried`` when
    that is the same folder; the method with its carried state from the folder (fresh for the first stage)."""
    from gorp.methods import build_method
    from gorp.methods.base import META_FILE, ContinualMethod
    from gorp.models import load_model

    prev_uri = config["prev_uri"]
    folder = storage.local_dir(prev_uri)  # a download for a remote folder (once per node)
    if carried is not None and carried.uri == prev_uri:
        model, tokenizer = carried.model, carried.tokenizer
    else:
        model, tokenizer = load_model(folder, trust_remote_code=config.get("trust_remote_code", False))
    if (folder / META_FILE).exists():
        method = ContinualMethod.load(folder, **config["method_args"])
        if method.name != config["method"]:
            raise ValueError(f"{prev_uri} was trained with {method.name!r}, this stream uses {config['method']!r}")
    else:
        method = build_method(config["method"], **config["method_args"])
    return model, tokenizer, method


def answer_counts(predictions: list[str], top: int = 5) -> dict[str, int]:
    """The ``top`` most frequent answers (normalized as exact match compares them) and their counts, the rest summed
    under "(other)"."""
    from collections import Counter

    from gorp.metrics import normalize_answer

    counts = Counter(normalize_answer(p) for p in predictions).most_common()
    out = dict(counts[:top])
    rest = sum(c for _, c in counts[top:])
    return out | {"(other)": rest} if rest else out


def _evaluate(
    model, tokenizer, eval_sets: dict[str, dict], names: list[str], batch_size: int
) -> tuple[dict[str, float], dict[str, dict[str, int]]]:
    """Accuracy on each named task, and its most frequent answers; examples split across ranks (on the unsharded
    model), counts summed and predictions gathered."""
    from pipelines.evaluate import evaluate_task, split_for_rank

    rank, world = rank_and_world()
    accuracy, answers = {}, {}
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
        predictions = [res.predictions]
        if world > 1:
            dist.all_reduce(counts)
            predictions = [None] * world
            dist.all_gather_object(predictions, res.predictions)
        accuracy[name] = float(counts[0] / counts[1]) if counts[1] else 0.0
        answers[name] = answer_counts([p for part in predictions for p in part])
    return accuracy, answers


# --------------------------------------------------------------------------- training
def _train(model, method, optimizer, dataset, config: dict[str, Any], start: int, work_dir: Path):
    """The stage's optimizer steps from ``start`` on; returns (losses, tokens, seconds)."""
    import ray.train
    from ray.train import Checkpoint

    from gorp.loop import train_step
    from gorp.precision import get_precision

    rank, world = rank_and_world()
    precision = get_precision(config["training"].get("precision"))  # autocast on one worker; a no-op under FSDP2
    tcfg, stage, task = config["training"], int(config["stage"]), config["task"]
    steps, batch_size, pad = int(config["steps"]), int(tcfg["batch_size"]), int(config["pad_token_id"])
    every = int(tcfg.get("checkpoint_every") or 0)
    hooks, channel = config.get("hooks"), config.get("channel")
    losses, tokens, t0 = [], 0, time.perf_counter()
    model.train()
    for step, batch in enumerate(global_batches(dataset, batch_size, steps, pad, stage_order(config))):
        if step < start:
            continue  # the same deterministic order: skip what the checkpoint already covers
        local = _local_slice(batch, rank, world)
        loss = all_mean(train_step(model, method, optimizer, local, tcfg.get("grad_clip"), precision))
        if hooks is not None:
            loss = hooks.after_step(stage, task, step, loss)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"stage {stage + 1} ({task}): the loss is not finite at step {step + 1}; lower the learning rate "
                "or check the data. No model version is created for this stage."
            )
        losses.append(loss)
        tokens += int(batch["attention_mask"].sum())
        if rank == 0 and channel is not None:
            elapsed = time.perf_counter() - t0
            row = {"step": step + 1, "steps": steps, "loss": loss, "tokens_per_s": tokens / elapsed}
            channel.put(("progress", stage, row | {"elapsed_s": elapsed}))
        if every and (step + 1) % every == 0 and step + 1 < steps:
            folder = work_dir / f"ckpt-{stage}-{step + 1}"
            save_checkpoint(folder, model, optimizer, step + 1, stage)
            metrics = {"kind": "checkpoint", "stage": stage, "step": step + 1, "loss": loss}
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)))
    return losses, tokens, time.perf_counter() - t0


def _save_stage(merged, tokenizer, method, out_uri: str, work_dir: Path) -> None:
    """Rank 0: the stage's model folder (safetensors weights, tokenizer, method state) into the run's storage."""
    folder = work_dir / "model"
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    method.save(folder)
    storage.upload_dir(folder, out_uri)


# --------------------------------------------------------------------------- the stage
def _node_ids(world: int) -> list[str]:
    """The Ray node of each rank (a collective)."""
    import ray

    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, nodes[0])
        nodes = gathered
    return nodes


def _merge(model, method, optimizer, fsdp: bool, arch: dict[str, Any], batches):
    """Fold the task into the method's memory, gather the weights and merge the adapters: a plain model (no copy of
    the weights, no read from disk)."""
    from gorp.fsdp import full_state_dict
    from gorp.models import model_from_state_dict

    method.end_task(model, optimizer, batches=batches)
    sd = full_state_dict(model) if fsdp else model.state_dict()
    plain = method.finalize_state_dict({k: v.detach() for k, v in sd.items()})  # no copy: the model is dropped next
    return model_from_state_dict(state_dict=plain, **arch)


def run_stage(
    common: dict[str, Any], st: dict[str, Any], resume: Path | None, carried: Carried | None = None
) -> tuple[StageResult, Carried]:
    """Train, merge, save and evaluate one stage on this worker; ``resume``: a checkpoint folder of this stage;
    ``carried``: the previous stage's model, when this worker ran it. Returns the stage's result and its carry."""
    import ray.train

    from gorp.fsdp import shard_model
    from gorp.models import enable_activation_checkpointing
    from gorp.precision import get_precision

    rank, world = rank_and_world()
    config = {**common, **st}
    stage, tcfg, hooks, evals = int(st["stage"]), common["training"], common.get("hooks"), common["eval_sets"]
    eval_bs, batch_size, pad = int(common.get("eval_batch_size", 16)), int(tcfg["batch_size"]), int(st["pad_token_id"])
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by the number of workers ({world})")
    work_dir = Path(tempfile.mkdtemp(prefix=f"gorp-stage{stage}-rank{rank}-"))
    timings: dict[str, float] = {}
    t_setup = time.perf_counter()
    model, tokenizer, method = _build(config, carried)
    del carried
    if hooks is not None:
        model, method = hooks.after_build(stage, model, method)
    start = {
        "weights_digest": weights_digest(model.state_dict()) if rank == 0 else "",
        "memory": {k: list(v.shape) for k, v in method.state_tensors().items()},
    }
    # the plain model, before adapters and sharding: what the merged weights are loaded into at the end
    arch = {"cls": type(model), "config": model.config, "dtype": next(model.parameters()).dtype}
    t0 = time.perf_counter()
    zero_shot, _ = _evaluate(model, tokenizer, evals, st.get("zero_shot_tasks") or [], eval_bs)
    timings["zero_shot_s"] = time.perf_counter() - t0
    dataset = ray.train.get_dataset_shard(st["dataset"])

    def first_batches():  # for methods that look at the task before training (slice)
        for b in global_batches(dataset, batch_size, 8, pad, stage_order(config)):
            yield _local_slice(b, rank, world)

    torch.manual_seed(int(common["seed"]) + stage)  # the same initialization on every rank
    model = method.setup_task(model, stage, batches=first_batches)
    if tcfg.get("activation_checkpointing"):
        enable_activation_checkpointing(model)  # after the adapters, before sharding
    fsdp = world > 1 and common.get("fsdp", True)
    if fsdp:
        shard_model(model, mp_policy=get_precision(tcfg.get("precision")).mp_policy())
    optimizer = method.make_optimizer(model)
    resumed_from = load_checkpoint(resume, model, optimizer) if resume is not None else 0
    timings["setup_s"] = time.perf_counter() - t_setup - timings["zero_shot_s"]
    losses, tokens, timings["train_s"] = _train(model, method, optimizer, dataset, config, resumed_from, work_dir)
    t0 = time.perf_counter()
    merged = _merge(model, method, optimizer, fsdp, arch, first_batches)
    del model, optimizer
    if rank == 0:
        _save_stage(merged, tokenizer, method, st["out_uri"], work_dir)
    timings["finalize_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    row, answers = _evaluate(merged, tokenizer, evals, st["eval_tasks"], eval_bs)
    timings["eval_s"] = time.perf_counter() - t0
    result = StageResult(
        stage=stage,
        task=st["task"],
        method=common["method"],
        model_uri=st["out_uri"],
        row=row,
        zero_shot=zero_shot,
        answers=answers,
        method_stats=method.task_stats(),
        losses=losses,
        steps=int(st["steps"]),
        resumed_from=resumed_from,
        timings=timings,
        tokens_per_s=tokens / timings["train_s"] if timings["train_s"] else 0.0,
        world_size=world,
        nodes=_node_ids(world),
        data_digests=st["data_digests"],
        start=start,
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    _finish(result, common.get("channel"))
    return result, Carried(st["out_uri"], merged, tokenizer)


def _finish(result: StageResult, channel) -> None:
    """Rank 0 writes ``stage.json`` last (its presence marks the stage complete) and tells the driver; every rank
    reports the end of the stage to Ray Train (a barrier)."""
    import ray.train

    if rank_and_world()[0] == 0:
        storage.write_text(storage.join(result.model_uri, STAGE_FILE), result.to_json())
        if channel is not None:
            channel.put(("stage", result.stage, result.to_json()))
    ray.train.report({"kind": "stage", "stage": result.stage, "task": result.task, **result.timings})


def _latest_checkpoint() -> tuple[Path, int] | None:
    """The checkpoint Ray Train hands a (re)started worker group, copied locally, and the stage it belongs to."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="gorp-resume-"))
    with ckpt.as_directory() as d:
        shutil.copytree(d, folder, dirs_exist_ok=True)
    return folder, int(json.loads((folder / "progress.json").read_text())["stage"])


def sequence_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker``: the stages in ``config["stages"]`` in order, on one worker group.

    A stage whose ``stage.json`` exists in the run's storage is complete (an earlier attempt of this fit got past it
    before a worker died) and is skipped; the latest checkpoint resumes the stage it belongs to. Each stage starts from
    the model the one before left in memory; the first (or one after a restart) loads its previous stage's folder.
    """
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    resume = _latest_checkpoint()
    common = {k: v for k, v in config.items() if k != "stages"}
    carried = None  # the model stays in memory from one stage to the next
    for st in config["stages"]:
        if storage.exists(storage.join(st["out_uri"], STAGE_FILE)):
            continue
        ckpt = resume[0] if resume is not None and resume[1] == st["stage"] else None
        _, carried = run_stage(common, st, ckpt, carried)
