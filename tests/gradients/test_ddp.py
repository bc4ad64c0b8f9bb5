"""fixed_point under DistributedDataParallel: 2 gloo processes agree with one process."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lipdeq import fixed_point


class TinyDEQ(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inj = nn.Linear(3, 6).double()
        self.lin = nn.Linear(6, 6, bias=False).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.6 / torch.linalg.matrix_norm(self.lin.weight, ord=2))
        self.out = nn.Linear(6, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.inj(x)
        z, _ = fixed_point(lambda z: torch.tanh(self.lin(z) + u), torch.zeros(x.shape[0], 6, dtype=x.dtype),
                           f_tol=1e-12, b_tol=1e-12, f_max_iter=200, b_max_iter=200, stop_mode="abs")
        return self.out(z)


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, generator=gen, dtype=torch.float64), torch.randint(0, 2, (8,), generator=gen)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = nn.parallel.DistributedDataParallel(TinyDEQ())
    x, y = _data()
    shard = slice(rank * 4, rank * 4 + 4)
    nn.functional.cross_entropy(model(x[shard]), y[shard]).backward()
    torch.save(_grads(model.module), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_on_ranks_and_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    g0 = torch.load(tmp_path / "rank0.pt")
    g1 = torch.load(tmp_path / "rank1.pt")
    single = TinyDEQ()
    x, y = _data()
    nn.functional.cross_entropy(single(x), y).backward()
    for a, b, c in zip(g0, g1, _grads(single)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-12)
