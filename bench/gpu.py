"""Everything this CPU machine cannot prove, proven on the first GPU in one run (< 8 minutes):

  (a) the test suite's `gpu`-marked tests (bf16 + channels_last training, NCCL all-reduce with 2
      GPUs, the on-device loader, ten-crop evaluation equal to the CPU result);
  (b) full-width LIP-VGG16 and VGG16-BN training throughput at 90x90, bf16 autocast +
      channels_last, eager and torch.compile: images/s and the fraction of the GPU's bf16 peak
      (forward FLOPs x 3 x images/s / peak);
  (c) the on-device loader (DeviceBatches) vs torchvision's DataLoader + PIL transforms on the
      same images, to the GPU;
  (d) the paper configuration (params.paper.yaml: width 1.0, 90x90 crops of 100x100, 60 epochs)
      through `dvc repro` on one GPU, on synthetic sets of RAF-DB's size (12,271 train / 3,068
      test), in a temporary copy of the repo: wall time per stage.

Prints one table at the end. Without a GPU it prints one line and exits 0.

    python bench/gpu.py [--skip tests,throughput,loader,paper] [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ROWS: list[tuple[str, str, str]] = []
#: Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; --peak-tflops overrides.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
         "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "GH200": 989.0, "B200": 2250.0}


def row(section: str, item: str, value: str) -> None:
    ROWS.append((section, item, value))
    print(f"[{section}] {item}: {value}", flush=True)


def sync() -> None:
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------- (a) tests
def run_tests() -> None:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/test_gpu_paths.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    row("a tests", "pytest -m gpu", f"{'OK' if r.returncode == 0 else 'FAILED'}: {last} "
        f"({time.perf_counter() - t:.0f} s)")
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-2000:], sep="\n")


# ---------------------------------------------------------------------------- (b) throughput
def forward_flops(model, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, size, size, device="cuda")
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(x)
    model.train()
    return float(fc.get_total_flops())


def throughput(peak_tflops: float | None, batch: int, steps: int) -> None:
    from pipeline.model import lip_vgg16
    from pipeline.train.steps import train_step

    x = torch.randn(batch, 3, 90, 90, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (batch,), device="cuda")
    nets = {"LIP-VGG16 (lip/conv/eca)": dict(pool="lip", head="conv", attention="eca"),
            "VGG16-BN (max/fc/none)": dict(pool="max", head="fc", attention="none")}
    for name, kw in nets.items():
        for compiled in (False, True):
            torch.manual_seed(0)
            m = lip_vgg16(7, width=1.0, **kw).cuda().to(memory_format=torch.channels_last)
            flops = forward_flops(m, 90)
            run = torch.compile(m) if compiled else m
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
            crit = torch.nn.CrossEntropyLoss()
            t0 = time.perf_counter()
            for _ in range(3):  # warm-up (and compile)
                train_step(run, x, y, crit, opt, amp=True, channels_last=True)
            sync()
            warm = time.perf_counter() - t0
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                train_step(run, x, y, crit, opt, amp=True, channels_last=True)
                sync()
                times.append(time.perf_counter() - t)
            dt = statistics.median(times)
            ips = batch / dt
            frac = f", {3 * flops * ips / (peak_tflops * 1e12):.1%} of bf16 peak" if peak_tflops else ""
            row("b throughput", f"{name}, {'compiled' if compiled else 'eager'}",
                f"{ips:,.0f} img/s (batch {batch}, {flops / 1e9:.2f} GFLOP fwd/img{frac}; "
                f"warm-up {warm:.0f} s)")
            del run, m, opt
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- (c) loader
class _PILSet(torch.utils.data.Dataset):
    def __init__(self, images, labels, crop: int):
        import torchvision.transforms as T

        from pipeline.data.loader import IMAGENET_MEAN, IMAGENET_STD

        self.images, self.labels = images.permute(0, 2, 3, 1).numpy(), labels
        self.tf = T.Compose([T.RandomCrop(crop), T.RandomHorizontalFlip(), T.RandomRotation(10),
                             T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.fromarray(self.images[i])), self.labels[i]


def loader(n: int, batch: int) -> None:
    from pipeline.data.loader import DeviceBatches

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 100, 100), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 7, (n,), generator=g)
    db = DeviceBatches(images, labels, batch_size=batch, crop=90, train=True, device="cuda",
                       max_rotate_deg=10.0, drop_last=True)
    for x, _ in db:  # warm-up epoch
        pass
    sync()
    t = time.perf_counter()
    seen = 0
    for x, y in db:
        seen += len(y)
    sync()
    dev_ips = seen / (time.perf_counter() - t)
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    dl = torch.utils.data.DataLoader(_PILSet(images, labels, 90), batch_size=batch, shuffle=True,
                                     num_workers=workers, pin_memory=True, drop_last=True,
                                     persistent_workers=True)
    for i, (x, _) in enumerate(dl):  # warm-up: start the workers
        if i == 2:
            break
    t = time.perf_counter()
    seen = 0
    for x, y in dl:
        x = x.cuda(non_blocking=True)
        seen += len(y)
    sync()
    pil_ips = seen / (time.perf_counter() - t)
    row("c loader", "DeviceBatches (crop, flip, rotate on the GPU)", f"{dev_ips:,.0f} img/s")
    row("c loader", f"DataLoader + PIL ({workers} workers, pinned)", f"{pil_ips:,.0f} img/s")
    row("c loader", "ratio device/PIL", f"{dev_ips / pil_ips:.1f}x")


# ---------------------------------------------------------------------------- (d) paper run
STAGES = ["synth@rafdb", "synth@sfew", "ingest@rafdb", "ingest@sfew", "imagenet_init", "train_rafdb",
          "finetune_sfew", "evaluate@rafdb", "evaluate@sfew"]


def paper_run(timeout: int) -> None:
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="fer-gpu-"))
    work = tmp / "repo"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    p = yaml.safe_load((REPO / "params.paper.yaml").read_text())
    p["datasets"] = {"rafdb": "data/synthetic/rafdb", "sfew": "data/synthetic/sfew"}
    p["synth"] = {"rafdb": {"n": 12271 + 3068, "seed": 0}, "sfew": {"n": 1394, "seed": 1}}
    p["imagenet_init"]["source"] = "none"  # no network here: random init, same compute
    cpus = os.cpu_count() or 2
    p["ray"].update(num_workers=1, use_gpu=True, cpus_per_worker=max(1, cpus - 2))
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"), "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)

    def run(*cmd, t=600):
        return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=t)

    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=b@b", "-c", "user.name=b", "commit", "-qm", "copy"]):
        run(*cmd)
    deadline = time.perf_counter() + timeout
    total = 0.0
    for st in STAGES:
        left = int(deadline - time.perf_counter())
        if left < 10:
            row("d paper", st, "not run (time budget spent)")
            continue
        t = time.perf_counter()
        try:
            r = run("dvc", "repro", "-s", st, t=left)
            ok = r.returncode == 0
        except subprocess.TimeoutExpired:
            ok, r = False, None
        dt = time.perf_counter() - t
        total += dt
        extra = ""
        if st.startswith("evaluate") and ok:
            m = work / "metrics" / f"eval_{st.split('@')[1]}.json"
            if m.exists():
                import json

                extra = f", ten-crop accuracy {json.loads(m.read_text())['accuracy']:.3f}"
        row("d paper", st, f"{'OK' if ok else 'FAILED'} {dt:6.1f} s{extra}")
        if not ok:
            print((r.stdout[-3000:] + r.stderr[-3000:]) if r else "timed out")
            break
    row("d paper", "all stages", f"{total:.0f} s")
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip", default="", help="comma list of: tests, throughput, loader, paper")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (default: table)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--paper-timeout", type=int, default=330, help="seconds for the dvc repro stages")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU found; nothing to prove here (run it on a GPU machine)")
        return
    name = torch.cuda.get_device_name(0)
    peak = a.peak_tflops or next((v for k, v in PEAKS.items() if k in name), None)
    print(f"GPU: {name} x{torch.cuda.device_count()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"bf16 peak {peak or 'unknown'} TFLOP/s", flush=True)
    skip = set(filter(None, a.skip.split(",")))
    t0 = time.perf_counter()
    if "tests" not in skip:
        run_tests()
    if "throughput" not in skip:
        throughput(peak, a.batch, a.steps)
    if "loader" not in skip:
        loader(8192, 256)
    if "paper" not in skip:
        paper_run(a.paper_timeout)
    w = max(len(s) + len(i) for s, i, _ in ROWS) + 3
    print(f"\n{'=' * 30} bench/gpu.py on {name} ({time.perf_counter() - t0:.0f} s) {'=' * 30}")
    for s, i, v in ROWS:
        print(f"{(s + ' | ' + i):<{w}} | {v}")


if __name__ == "__main__":
    main()
