"""A few LIP-VGG16 training steps in a fresh process (its CPU kernels chosen by FER_CPU_KERNELS
before torch loads); prints the capability torch dispatched to and the sha256 of the trained
weights. tests/test_kernels.py runs it pinned and native and checks the pinned bytes against
tests/data/kernel_reference.json, made on another machine."""
import hashlib
import json

import pipeline  # noqa: F401 - pins (or not) the CPU kernels before torch is imported
import torch
import torch.nn.functional as F

from pipeline.model import lip_vgg16


def main() -> None:
    torch.set_num_threads(1)  # the summation order may depend on the thread count
    torch.manual_seed(0)
    model = lip_vgg16(7, width=0.0625, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 3, 56, 56, generator=g)
    y = torch.randint(0, 7, (16,), generator=g)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "sha256": h.hexdigest(),
                      "losses": losses}))


if __name__ == "__main__":
    main()
