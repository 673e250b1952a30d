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
    from pipeline.train.config import TrainConfig
    from pipeline.train.imbalance import make_batches
    from pipeline.train.steps import train_step

    torch.set_num_threads(1)  # the summation order may depend on the thread count
    torch.manual_seed(0)
    model = lip_vgg16(7, width=0.0625, dropout=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 3, 56, 56), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 7, (64,), generator=g)
    # the training stage's own batches: random crops, mirror and rotation (affine grids)
    run = TrainConfig(data="-", sampler="shuffle", num_classes=7)
    batches = make_batches(run, images, labels, batch_size=16, crop=48, train=True, seed=3,
                           max_rotate_deg=10.0, drop_last=True)
    batches.set_epoch(1)
    losses = []
    for _, (x, y) in zip(range(4), batches):
        loss, _ = train_step(model, x, y, F.cross_entropy, opt)
        losses.append(float(loss))
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "sha256": h.hexdigest(),
                      "losses": losses}))


if __name__ == "__main__":
    main()
