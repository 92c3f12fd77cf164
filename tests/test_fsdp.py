"""FSDP2 exactness: two gloo processes give the same weights (and task memory) as one process on the same data.

The one-process reference runs in a spawned process too: the worker sets one torch thread, deterministic algorithms
and the seed, which must not leak into pytest's process (and later tests)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import fsdp_worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METHODS = ["gorp", "gorp-orthogonal", "gorp-wide", "gorp-randomized", "galore"]
# Moving task 2's A off task 1's basis makes the result sensitive to that basis: perturbing the stored bases alone by
# 1e-7, in one process, moves layer 1's q_proj by 1.6e-5 and its task-2 basis by 2.4e-5 (relative); one process and two
# differ by 1.0e-5 and 1.5e-5. That is the problem's conditioning, not the sharding (the Kaiming run agrees to 9e-7).
TOLERANCE = {"gorp-orthogonal": 1e-4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every method's two-task sequence in one process and sharded over two, each side one spawn for all methods
    (starting the processes costs more than the training)."""
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state())
    reference = mp.start_processes(fsdp_worker.run, args=(1, METHODS, str(single), 0), nprocs=1, join=False)
    mp.spawn(fsdp_worker.run, args=(2, METHODS, str(sharded), _free_port()), nprocs=2, join=True)
    while not reference.join():
        pass
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(), torch.random.get_rng_state())
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])  # nothing leaked into this process
    return single, sharded


@pytest.mark.parametrize("method", METHODS)
def test_two_process_fsdp2_equals_single_process(method, runs):
    a, b = (load_file(str(folder / f"{method}.safetensors")) for folder in runs)
    assert a.keys() == b.keys()
    # the run really trained and (for gorp) really carried a memory
    base = fsdp_worker.tiny_llama(seed=0).state_dict()
    moved = max((a[f"model/{k}"] - v).abs().max().item() for k, v in base.items())
    assert moved > 1e-3
    if method.startswith("gorp"):
        assert any(k.startswith("state/memory/") and v.shape[1] > 0 for k, v in a.items())
        # task 2's gradients met task 1's memory; the share removed is a sum over shards (compared below)
        assert 0 < a["stats/memory_removed_lora_a"] < 1 and 0 < a["stats/memory_removed_full_rank"] < 1
    if method == "gorp-wide":  # down_proj (32 x 64) is wide: its memory lives on the input axis
        assert a["state/memory/model.layers.0.mlp.down_proj.weight"].shape[0] == 64
    for k in a:
        if k == "losses":
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
            continue
        if k.startswith("state/memory/"):  # a basis is defined up to rotation: compare the subspaces
            a[k], b[k] = a[k] @ a[k].T, b[k] @ b[k].T
        rel = (a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)
        assert rel < TOLERANCE.get(method, 1e-5), f"{k}: relative difference {rel:.2e}"
