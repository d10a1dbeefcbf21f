"""Plain PyTorch with safepoint: stop it at any moment, run it again, it continues exactly.

    python examples/torch_loop.py [ROOT]    # ROOT defaults to runs/torch_loop

Checkpoints every 10 batches (mid-epoch); SIGTERM or Ctrl-C saves at the next batch
end and exits; a run killed outright (SIGKILL, power loss) resumes from the last
checkpoint. Resumed or not, the final weights are the same, bit for bit.
"""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safepoint
from safepoint.torch import ResumableSampler, RNGState

torch.manual_seed(0)
data = TensorDataset(torch.randn(1024, 20), torch.randint(0, 2, (1024,)))
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
sampler = ResumableSampler(data, seed=0)  # shuffles; its position is saved
loader = DataLoader(data, batch_size=32, sampler=sampler)

root = sys.argv[1] if len(sys.argv) > 1 else "runs/torch_loop"
mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
state = {"model": model, "optimizer": opt, "scheduler": sched, "sampler": sampler,
         "rng": RNGState(), "epoch": 0}  # fmt: skip
every_10 = safepoint.ModelCheckpoint(mgr, state=state, save_freq=10)
state["checkpointing"] = every_10
if (ckpt := mgr.restore(state, missing_ok=True)) is not None:
    print(f"resumed from {ckpt.name}")
mgr.save_on_signal(state)  # SIGTERM / SIGUSR1 / Ctrl-C: save at the next batch end, exit

for epoch in range(state["epoch"], 4):
    every_10.on_epoch_begin(epoch)  # mid-epoch checkpoints record the right epoch
    for batch, (x, y) in enumerate(loader):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        every_10.on_batch_end(batch, {"loss": loss.item()})
    sched.step()
    state["epoch"] = epoch + 1
    print(f"epoch {epoch + 1}: loss {loss.item():.4f}")
mgr.save(state, step=every_10.step, epoch=state["epoch"])  # the final state
mgr.close()
print("weights:", sum(p.double().sum().item() for p in model.parameters()).hex())
