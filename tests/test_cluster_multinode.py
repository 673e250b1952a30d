"""Outgrowing one machine, with the real components, all on 127.0.0.1 and ended by PID:

* a three-node Ray cluster (`ray start --head` + two `ray start --address`, one CPU each);
* an S3-compatible object store (`moto_server`) holding Ray's checkpoints (`ray.storage_path:
  s3://...`), MLflow's artifacts and a DVC remote; credentials and endpoint from AWS_* variables;
* an MLflow tracking server (`mlflow server`, sqlite backend, artifacts proxied to the bucket).

One `dvc repro` with RAY_ADDRESS and MLFLOW_TRACKING_URI set runs every Ray stage on the cluster,
with the two training workers on different nodes; the raylet of a worker's node is SIGKILLed in
the middle of an epoch, and the run resumes from the bucket's last checkpoint with the full
history. Then `dvc push`, a fresh `git clone` + `dvc pull` gets the model, and `dvc repro` there
has nothing to do.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import free_port, start_server, stop_process_group, wait_ready
from test_dvc_pipeline import _copy_repo, _merge

BIN = Path(sys.executable).parent
BUCKET = "fer-shared"
EPOCHS = 5
KILL_AFTER = 2  # the kill comes once epoch 2's checkpoint is registered

TINY = {
    "synth": {"rafdb": {"n": 280, "seed": 0}, "sfew": {"n": 70, "seed": 1}},
    "model": {"width": 0.0625},
    # 0.6 CPU per worker on 1-CPU nodes: the two workers cannot share a node
    "ray": {"num_workers": 2, "cpus_per_worker": 0.6, "max_failures": 1,
            "storage_path": f"s3://{BUCKET}/ray"},
    "train_rafdb": {"image_size": 56, "crop": 48, "epochs": EPOCHS, "batch_size": 32},
    "finetune_sfew": {"image_size": 56, "crop": 48, "epochs": 1, "batch_size": 32},
}


def _ps() -> list[tuple[int, int, int, str]]:
    """(pid, ppid, pgid, command line) of every process."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,pgid=,args="], capture_output=True, text=True,
                         timeout=30).stdout
    rows = []
    for ln in out.splitlines():
        parts = ln.split(None, 3)
        if len(parts) == 4:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2]), parts[3]))
    return rows


def _raylet(node: subprocess.Popen) -> int:
    """PID of the raylet of the node that `ray start --block` (process group ``node.pid``) runs."""
    pids = [pid for pid, ppid, _, args in _ps() if ppid == node.pid and args.split()[0].endswith("/raylet")]
    assert len(pids) == 1, f"raylet of node {node.pid}: {pids}"
    return pids[0]


def _train_workers() -> dict[int, int]:
    """{pid: parent raylet pid} of the live Ray Train worker processes."""
    return {pid: ppid for pid, ppid, _, args in _ps() if args.startswith("ray::RayTrainWorker")}


def _checkpoints(s3, prefix: str = "ray/") -> set[int]:
    """Epochs with a checkpoint in the bucket (any training run)."""
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {int(m.group(2)) for k in keys if (m := re.search(r"(train_rafdb-[^/]+)/epoch_(\d{4})/", k))}


def _committed_epoch(s3, prefix: str = "ray/") -> int:
    """Newest epoch whose checkpoint the Ray Train controller has registered, read from the
    controller's snapshot in the bucket. A checkpoint whose files are uploaded but not yet registered
    is not what a restarted worker group resumes from: killing then would lose two epochs."""
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    newest = 0
    for k in keys:
        if re.search(r"train_rafdb-[^/]+/checkpoint_manager_snapshot\.json$", k):
            snap = json.loads(s3.get_object(Bucket=BUCKET, Key=k)["Body"].read())
            name = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""
            if m := re.fullmatch(r"epoch_(\d{4})", name):
                newest = max(newest, int(m.group(1)))
    return newest


@pytest.mark.slow
def test_dvc_repro_on_a_cluster_with_object_storage_and_a_tracking_server(tmp_path):
    import boto3
    from botocore.config import Config

    s3_port, ml_port, ray_port = free_port(), free_port(), free_port()
    # moto accepts any credentials: fresh ones per run, handed over in the usual variables
    aws = {"AWS_ACCESS_KEY_ID": secrets.token_hex(8), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
           "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"}
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "DVC_"))}
    env = {**base, **aws, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site")}
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths have a limit
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_server([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)], env,
                                  tmp_path / "moto.log", f"http://127.0.0.1:{s3_port}/moto-api/"))
        s3 = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name=aws["AWS_DEFAULT_REGION"],
                          aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"], config=Config(connect_timeout=10, read_timeout=30, retries={"max_attempts": 2}))
        s3.create_bucket(Bucket=BUCKET)
        mlflow_server = start_server(  # waited for once the cluster is up
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
             "--artifacts-destination", f"s3://{BUCKET}/mlartifacts"], env, tmp_path / "mlflow.log")
        procs.append(mlflow_server)
        ray_env = _ray_env(env)
        address = f"127.0.0.1:{ray_port}"

        def node(i: int) -> subprocess.Popen:
            return _ray_node(i, address, ray_tmp, ray_env, procs, tmp_path, cpus=1)

        head = node(0)
        nodes = [node(1), node(2)]  # one at a time: a node joins before the next starts
        raylets = {_raylet(n): n for n in (head, *nodes)}
        wait_ready(mlflow_server, f"http://127.0.0.1:{ml_port}/health", tmp_path / "mlflow.log")

        work = _small_repo(tmp_path, TINY)
        shutil.rmtree(work / "mlartifacts", ignore_errors=True)
        job = {**env, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ml_port}",
               **{f"GIT_{w}_{k}": v for w in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "t"), ("EMAIL", "t@t"))}}

        def run(*cmd, cwd=work, timeout=600):
            return subprocess.run(cmd, cwd=cwd, env=job, capture_output=True, text=True, timeout=timeout)

        for cmd in (["git", "init", "-q"], ["dvc", "remote", "add", "-d", "store", f"s3://{BUCKET}/dvc"],
                    ["dvc", "remote", "modify", "store", "endpointurl", aws["AWS_ENDPOINT_URL"]],
                    ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
            r = run(*cmd)
            assert r.returncode == 0, (cmd, r.stdout, r.stderr)

        # ---- dvc repro on the cluster; a worker node's raylet is killed during train_rafdb
        log_path = tmp_path / "repro.log"
        with open(log_path, "w") as log:
            repro = subprocess.Popen(["dvc", "repro"], cwd=work, env=job, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        procs.append(repro)
        deadline = time.monotonic() + 900
        killed = None
        while repro.poll() is None and time.monotonic() < deadline:
            if killed is None and _committed_epoch(s3) >= KILL_AFTER:
                workers = _train_workers()
                on = {raylets.get(pp) for pp in workers.values()}
                assert len(workers) == 2 and len(on) == 2 and None not in on, (workers, raylets)
                victim = next(n for n in nodes if n in on)  # a worker's node, never the head
                kill_pid = _raylet(victim)
                done_before = _committed_epoch(s3)
                os.kill(kill_pid, signal.SIGKILL)
                killed = {"epochs_done": done_before, "workers": workers, "raylet": kill_pid}
            time.sleep(0.2)
        assert repro.poll() is not None, "dvc repro did not finish in 900 s:\n" + log_path.read_text()[-4000:]
        out = log_path.read_text()
        assert repro.returncode == 0, out[-6000:]
        assert killed is not None, "train_rafdb never reached its second checkpoint:\n" + out[-4000:]
        print(f"killed raylet {killed['raylet']} after epoch {killed['epochs_done']} was in the bucket")

        # both training stages joined the cluster (evaluation at num_workers 1 runs in the stage's
        # own process); none started a private instance
        assert out.count(f"joined the Ray cluster at {address}") == 2, out[-4000:]
        assert "started a private local Ray instance" not in out
        # resumed from the bucket's last checkpoint, at most the epoch in flight lost
        resumed = [int(m) for m in re.findall(r"resumed from checkpoint after epoch (\d+)", out)]
        assert resumed and resumed[0] >= killed["epochs_done"], (resumed, killed)
        print(f"resumed after epoch {resumed[0]}")
        history = json.loads((work / "reports/history_rafdb.json").read_text())
        assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
        # each epoch line shows once (not once per node). Epochs after the checkpoint resumed from
        # may show twice: the survivors go on until Ray declares the node dead (seconds), and what
        # they report then is not registered. A rerun epoch gives the same loss and accuracies
        # (all but the speed): it starts from the same checkpoint and seed.
        for e in range(1, EPOCHS + 1):
            lines = re.findall(rf"epoch {e}/{EPOCHS}  (loss .*)  [\d.]+ img/s", out)
            assert len(lines) in ({1, 2} if e > resumed[0] else {1}), (e, lines, resumed)
            assert len(set(lines)) == 1, (e, lines)
        # a dead node is one line per dead worker in the controller's log, not a traceback
        controller = [ln for ln in out.splitlines() if "(TrainController" in ln]
        ray_lines = [ln for ln in out.splitlines() if "(TrainController" in ln or "(RayTrainWorker" in ln]
        assert not any("Traceback" in ln for ln in ray_lines), "\n".join(ray_lines)[-3000:]
        assert any("[ActorDiedError" in ln and "node" in ln for ln in controller), "\n".join(controller)[-3000:]

        # ---- the tracking server has it all; nothing local
        assert not (work / "mlflow.db").exists() and not (work / "mlartifacts").exists()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"http://127.0.0.1:{ml_port}")
        exp = client.get_experiment_by_name(yaml.safe_load((work / "params.yaml").read_text())["mlflow"]["experiment"])
        runs = client.search_runs([exp.experiment_id])
        stages = {r.data.tags.get("stage") for r in runs if r.info.status == "FINISHED"}
        assert {"train_rafdb", "finetune_sfew", "evaluate"} <= stages, stages
        train = next(r for r in runs if r.data.tags.get("stage") == "train_rafdb")
        steps = {m.step for m in client.get_metric_history(train.info.run_id, "val_accuracy")}
        assert steps == set(range(1, EPOCHS + 1)), steps  # the workers' per-epoch metrics
        for name in ("lip-vgg16-rafdb", "lip-vgg16-sfew"):
            v = client.get_model_version_by_alias(name, "champion")
            assert v.source, v
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/").get("Contents", [])]
        assert any(k.endswith("MLmodel") for k in keys), keys[:20]  # logged models live in the bucket
        assert _checkpoints(s3)  # and Ray's checkpoints

        # ---- DVC remote on the bucket: push, fresh clone, pull, nothing to do
        for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "trained"], ["dvc", "push"]):
            r = run(*cmd)
            assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        assert s3.list_objects_v2(Bucket=BUCKET, Prefix="dvc/").get("KeyCount", 0) > 0
        clone = tmp_path / "clone"
        r = run("git", "clone", "-q", str(work), str(clone))
        assert r.returncode == 0, r.stderr
        r = run("dvc", "pull", cwd=clone)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert (clone / "models/rafdb/model.pt").read_bytes() == (work / "models/rafdb/model.pt").read_bytes()
        r = run("dvc", "repro", cwd=clone, timeout=300)
        assert r.returncode == 0 and "Running stage" not in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
        assert "up to date" in r.stdout, r.stdout
    finally:
        _end_cluster(procs, ray_port, ray_tmp)


def _small_repo(tmp_path: Path, over: dict) -> Path:
    """A copy of the project under ``tmp_path/repo`` with ``over`` merged into its params and no
    MLflow store of its own yet."""
    work = tmp_path / "repo"
    work.mkdir()
    _copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(_merge(params, over), sort_keys=False))
    (work / "mlflow.db").unlink(missing_ok=True)
    return work


def _end_cluster(procs: list, ray_port: int, ray_tmp: str) -> None:
    """End what a test started (newest first), and what `ray stop` would forget."""
    for p in reversed(procs):
        _end_group(p)
    current = Path("/tmp/ray/ray_current_cluster")
    if current.is_file() and current.read_text().strip().endswith(f":{ray_port}"):
        current.unlink()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _ray_env(env: dict) -> dict:
    """A quick verdict on a killed node; patience with startup on a busy machine."""
    return {**env, "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
            "RAY_agent_register_timeout_ms": "120000", "RAY_raylet_start_wait_time_s": "120"}


def _ray_node(i: int, address: str, ray_tmp: str, ray_env: dict, procs: list, log_dir: Path, *,
              cpus: int) -> subprocess.Popen:
    """Node ``i`` (0: the head, on ``address``'s port) started by `ray start --block`, up and counted
    by the head; appended to ``procs`` (ended by the caller). On a busy machine a raylet may give up
    waiting for its agents; such a start (the process has exited) is retried."""
    # nodes on one machine must not race for the same ports: each its own (worker ports below
    # Linux's ephemeral range, so no randomly bound socket takes them)
    def ports() -> list[str]:
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()),
                "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port",
                str(free_port()), "--metrics-export-port", str(free_port()),
                "--min-worker-port", str(21000 + 1000 * i), "--max-worker-port", str(21999 + 1000 * i)]

    common = ["--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus),
              "--num-gpus", "0", "--object-store-memory", str(100 * 2**20)]
    # each node its own temp dir, as on separate machines: nodes that share one session folder
    # each forward every worker's log file in it, and every line shows once per node
    tmp = Path(ray_tmp) / f"n{i}"
    tmp.mkdir(exist_ok=True)
    cmd = ([str(BIN / "ray"), "start", "--head", "--port", address.rsplit(":", 1)[1], "--temp-dir", str(tmp),
            "--include-dashboard", "false"] if i == 0 else
           [str(BIN / "ray"), "start", "--address", address, "--temp-dir", str(tmp)])
    for _ in range(4):
        proc = start_server([*cmd, *common, *ports()], ray_env, log_dir / f"node{i}.log")
        procs.append(proc)
        if _wait_nodes(address, i + 1, ray_env, proc):
            return proc
        _end_group(proc)  # what the failed start left behind
    raise AssertionError(f"Ray node {i} did not start:\n" + (log_dir / f"node{i}.log").read_text()[-3000:])


def _end_group(proc: subprocess.Popen) -> None:
    """Stop ``proc``'s process group, also when its leader has exited and children remain."""
    try:
        stop_process_group(proc)
    except ProcessLookupError:
        pass


def _wait_nodes(address: str, n: int, env: dict, proc: subprocess.Popen, timeout: float = 180) -> bool:
    """True once `ray status` on ``address`` shows ``n`` alive nodes; False when ``proc`` (the
    `ray start` of the last one) has exited or ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            r = subprocess.run([str(BIN / "ray"), "status", "--address", address], env=env, capture_output=True,
                               text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
        if r.returncode == 0 and len(re.findall(r"^\s*1 node_", r.stdout.split("Pending:")[0], re.M)) >= n:
            return True
        time.sleep(1)
    return False


LOST = {  # one training worker asking for 2 CPUs: only the 2-CPU node can hold it
    "synth": {"rafdb": {"n": 280, "seed": 0}, "sfew": {"n": 70, "seed": 1}},
    "model": {"width": 0.0625},
    "ray": {"num_workers": 1, "cpus_per_worker": 2, "max_failures": 1, "storage_path": "ray_results"},
    "train_rafdb": {"image_size": 56, "crop": 48, "epochs": 40, "batch_size": 32},
}


@pytest.mark.slow
def test_a_lost_node_no_other_can_replace_stops_training_in_one_line(tmp_path):
    """A head of 1 CPU and a node of 2 running the one training worker; that node's raylet is
    SIGKILLed after epoch 1. Nothing left can hold a 2-CPU worker and no autoscaler can add a node,
    so `dvc repro` on the cluster stops with one line naming what the cluster has, instead of Ray
    Train retrying the placement every 60 s for ever."""
    ray_port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_", "DVC_"))}
    env = {**base, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site")}
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")
    procs: list[subprocess.Popen] = []
    address = f"127.0.0.1:{ray_port}"
    try:
        ray_env = _ray_env(env)
        _ray_node(0, address, ray_tmp, ray_env, procs, tmp_path, cpus=1)
        big = _ray_node(1, address, ray_tmp, ray_env, procs, tmp_path, cpus=2)
        work = _small_repo(tmp_path, LOST)
        job = {**env, "RAY_ADDRESS": address,
               **{f"GIT_{w}_{k}": v for w in ("AUTHOR", "COMMITTER") for k, v in (("NAME", "t"), ("EMAIL", "t@t"))}}
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
            r = subprocess.run(cmd, cwd=work, env=job, capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (cmd, r.stdout, r.stderr)
        log = tmp_path / "repro.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(["dvc", "repro", "train_rafdb"], cwd=work, env=job, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None and "epoch 1/" not in log.read_text():
            time.sleep(0.5)
        assert proc.poll() is None, "train_rafdb ended before the kill:\n" + log.read_text()[-4000:]
        os.kill(_raylet(big), signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=600)
        waited = time.monotonic() - killed
        out = log.read_text()
        assert proc.returncode != 0, out[-3000:]
        ours = [ln for ln in out.splitlines() if ": error: " in ln]
        assert len(ours) == 1 and "Ray could not place the training workers" in ours[0], out[-4000:]
        assert "1 CPU" in ours[0], ours  # what is left: the head
        assert "Traceback" not in out, out[-4000:]
        print(f"stopped {waited:.0f} s after the kill: {ours[0]}")
    finally:
        _end_cluster(procs, ray_port, ray_tmp)
