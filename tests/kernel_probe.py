"""A few LIP-VGG16 training steps in a fresh process (its CPU kernels chosen by FER_CPU_KERNELS
before torch loads); prints the capability torch dispatched to and the sha256 of the trained
weights. tests/test_kernels.py runs it pinned and native and checks the pinned bytes against
tests/data/kernel_reference.json, made on another machine.

`python tests/kernel_probe.py --write-reference` (on an AVX-512 CPU) rewrites that reference;
it is needed when the code the probe runs changes (its `code` fingerprint says which)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

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
                      "losses": losses, "code": code_fingerprint()}))


def code_fingerprint() -> str:
    """sha256 over the project's modules this process loaded (paths and bytes): the reference's
    bytes hold only for the code that made them, so a change to the network or the training step
    must be told apart from a change of CPU."""
    root = Path(__file__).resolve().parent.parent
    files = sorted({Path(m.__file__).resolve().relative_to(root) for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) and Path(m.__file__).resolve().is_relative_to(root / "pipeline")})
    h = hashlib.sha256()
    for f in files:
        h.update(f.as_posix().encode() + b"\0" + (root / f).read_bytes())
    return h.hexdigest()


def write_reference() -> None:
    """Runs the probe pinned and native in fresh processes and writes the reference beside the test."""
    def probe(mode: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
        out = subprocess.run([sys.executable, __file__], env={**env, "FER_CPU_KERNELS": mode},
                             capture_output=True, text=True, check=True, timeout=300).stdout
        return json.loads(out.strip().splitlines()[-1])

    from pipeline.kernels import cpu_flags

    pinned, native = probe("portable"), probe("native")
    flags = cpu_flags()
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "unknown")
    ref = {"pinned_sha256": pinned["sha256"], "pinned_losses": pinned["losses"], "code": pinned["code"],
           "made_on": {"cpu_model": model, "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
                       "native_capability": native["capability"], "native_sha256": native["sha256"],
                       "torch": torch.__version__.split("+")[0]},
           "how": "python tests/kernel_probe.py --write-reference (tests/test_kernels.py)"}
    out = Path(__file__).parent / "data" / "kernel_reference.json"
    out.write_text(json.dumps(ref, indent=1) + "\n")
    print(f"wrote {out}: pinned {pinned['sha256'][:12]}, native {native['capability']} {native['sha256'][:12]}")


if __name__ == "__main__":
    write_reference() if sys.argv[1:] == ["--write-reference"] else main()
