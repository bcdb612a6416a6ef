"""Two gloo processes compute the factors of the global batch, identical on every rank."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.model_tester import tester

tiny_model, random_batch = tester.get_model, tester.prepare_inputs


def _worker(rank: int, world_size: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = tiny_model().train()
        mu = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1.0, 2.0, 4.0])
        factors = model.collapse.scale_factors_for(mu.chunk(world_size)[rank])
        gathered = [torch.empty_like(factors) for _ in range(world_size)]
        dist.all_gather(gathered, factors)
        # A DDP training step on each rank's half of one batch (no dropout, so a one-process run can be compared):
        # the running estimates are identical on both ranks and equal the one-process estimate.
        ddp = torch.nn.parallel.DistributedDataParallel(tiny_model(seed=1, dropout=0.0))
        batch = {k: v.chunk(world_size)[rank] for k, v in random_batch(batch_size=8, seed=3).items()}
        ddp(**batch).loss.backward()
        estimates = [torch.empty(4) for _ in range(world_size)]
        dist.all_gather(estimates, ddp.module.collapse.scale_factors.clone())
        results[rank] = (factors, torch.stack(gathered), torch.stack(estimates))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes: see .ci/run
def test_two_processes_compute_the_global_batch_factors(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    mu = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.5, 1.0, 2.0, 4.0])
    single = tiny_model().train().collapse.scale_factors_for(mu)
    for rank in range(2):
        factors, gathered, estimates = results[rank]
        assert torch.allclose(factors, single, rtol=1e-5), "a rank's factors differ from the one-process global batch"
        assert torch.equal(gathered[0], gathered[1]) and torch.equal(estimates[0], estimates[1])
    model = tiny_model(seed=1, dropout=0.0).train()
    model(**random_batch(batch_size=8, seed=3))
    assert torch.allclose(results[0][2][0], model.collapse.scale_factors, rtol=1e-5)
