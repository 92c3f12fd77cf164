"""Checkpoints of a stage in progress: the sharded model through ``torch.distributed.checkpoint`` and each rank's
optimizer state as safetensors (tensors only: no pickle), reported through ``ray.train.report`` so that Ray Train
persists them in the run's storage and hands the latest back to a restarted worker group.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gorp.distributed import rank_and_world


def save_checkpoint(folder: Path, model, optimizer, step: int, stage: int) -> None:
    """Sharded model (DCP) + this rank's optimizer state (safetensors + JSON) + the step."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    rank, world = rank_and_world()
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

    rank, world = rank_and_world()
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
