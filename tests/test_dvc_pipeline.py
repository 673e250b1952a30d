"""End to end: `dvc repro` in a temporary copy of the repo, on a reduced synthetic config."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"accuracy", "accuracy_center", "mean_class_accuracy", "per_class", "n_test"}

REDUCED = {
    "synth": {"rafdb": {"n": 360, "seed": 0}, "sfew": {"n": 200, "seed": 1}},
    "model": {"width": 0.0625},
    "ray": {"num_workers": 2, "cpus_per_worker": 0.5, "max_failures": 0},
    "train_rafdb": {"image_size": 56, "crop": 48, "epochs": 4, "batch_size": 32},
    "finetune_sfew": {"image_size": 56, "crop": 48, "epochs": 2, "batch_size": 32},
}


def _copy_repo(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def _merge(base: dict, over: dict) -> dict:
    for k, v in over.items():
        base[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return base


#: The outputs dvc.yaml declares ``cache: false``: committed to git beside dvc.lock.
GIT_TRACKED_OUTPUTS = {f"reports/ingest_{d}.json" for d in ("rafdb", "sfew")} | {
    "reports/imagenet_init.json", "reports/history_rafdb.json", "reports/history_sfew.json",
    "reports/curves_rafdb.png", "reports/curves_sfew.png"} | {
    f"{p}_{d}.{e}" for d in ("rafdb", "sfew")
    for p, e in (("metrics/eval", "json"), ("plots/confusion", "csv"), ("plots/confusion", "png"))}


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    """A git copy of the repo on the reduced config, after one `dvc repro`: (work, run)."""
    tmp_path = tmp_path_factory.mktemp("dvc")
    work = tmp_path / "repo"
    work.mkdir()
    _copy_repo(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(_merge(params, REDUCED), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"), "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
           **{f"GIT_{w}_{k}": v for w in ("AUTHOR", "COMMITTER")  # dvc exp commits too
              for k, v in (("NAME", "t"), ("EMAIL", "t@t"))}}
    env.pop("MLFLOW_TRACKING_URI", None)  # the contract's default: sqlite at the repo root
    env.pop("RAY_ADDRESS", None)

    def run(*cmd, timeout=1200, **env_over):
        """Run ``cmd`` in the copy; ``env_over`` adds or replaces environment variables."""
        return subprocess.run(cmd, cwd=work, env={**env, **env_over}, capture_output=True, text=True,
                              timeout=timeout)

    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        assert run(*cmd).returncode == 0

    first = run("dvc", "repro")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return work, run


@pytest.mark.slow
def test_dvc_repro_end_to_end(repro):
    work, run = repro
    for out in ("data/synthetic/rafdb/EmoLabel/list_patition_label.txt", "data/synthetic/sfew/Train",
                "data/parquet/rafdb/train.parquet", "data/parquet/sfew/test.parquet",
                "reports/ingest_rafdb.json", "reports/ingest_sfew.json", "models/imagenet_init.pt",
                "models/rafdb/model.pt", "models/sfew/model.pt", "reports/history_rafdb.json",
                "plots/confusion_rafdb.csv", "plots/confusion_sfew.png", "dvc.lock"):
        assert (work / out).exists(), out
    for ds in ("rafdb", "sfew"):
        m = json.loads((work / f"metrics/eval_{ds}.json").read_text())
        assert set(m) == METRIC_KEYS
        n_test = json.loads((work / f"reports/ingest_{ds}.json").read_text())["counts"]["test"]
        assert m["n_test"] == n_test
        assert 0 <= m["accuracy"] <= 1 and set(m["per_class"]) == {
            "surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"}
    # registry: one version per dataset, with the champion alias, in the repo-root sqlite store
    db = sqlite3.connect(work / "mlflow.db")
    names = {r[0] for r in db.execute("select name from registered_models")}
    assert {"lip-vgg16-rafdb", "lip-vgg16-sfew"} <= names
    aliases = {r[0] for r in db.execute("select name from registered_model_aliases where alias='champion'")}
    assert {"lip-vgg16-rafdb", "lip-vgg16-sfew"} <= aliases

    second = run("dvc", "repro")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "up to date" in second.stdout, second.stdout
    assert "Running stage" not in second.stdout

    shown = run("dvc", "metrics", "show", "--json")
    assert shown.returncode == 0 and "eval_rafdb.json" in shown.stdout


def check_mlflow_ui(browser, base: str, client, experiment: str, docs: Path) -> None:
    """Walk the MLflow UI at ``base`` as a user picking a model does, from the home page, and
    write what they see into ``docs/``: the experiment's runs, a training run's per-epoch chart,
    both registered models with their champion, and the champion's version page (signature,
    description with the training run's real id, and its link to that run's page).

    MLflow 3.17's UI ignores the experiment's ``mlflow.experimentKind`` tag: it starts in its
    GenAI mode (no Model registry link, the experiment opening on a traces overview) until the
    user picks "Model training", which the browser then remembers. So that is the first click."""
    import re

    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    train = {"rafdb": by_stage["train_rafdb"], "sfew": by_stage["finetune_sfew"]}
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    ctx.set_default_timeout(60_000)  # every wait below: a busy 2-core machine, never forever
    # as for a user who closed the assistant panel once (it opens itself on a first visit and
    # would take a third of every picture)
    ctx.add_init_script("""for (const [k, v] of [['mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true'],
                                                  ['mlflow.assistant.panelOpen_v1', 'false']])
                             if (localStorage.getItem(k) === null) localStorage.setItem(k, v);""")
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # MLflow's "try the new registry UI" and similar popups cover what is clicked next: closed
    # whenever one appears, as a user would
    dialogs = page.get_by_role("dialog")
    page.add_locator_handler(dialogs, lambda d: d.get_by_role("button", name="Close").first.click())

    def picture(name: str, height: int = 900) -> None:
        """The page as the user sees it, without a popup left open over it."""
        if dialogs.count() and dialogs.first.is_visible():
            dialogs.first.get_by_role("button", name="Close").first.click()
        page.set_viewport_size({"width": 1400, "height": height})
        page.screenshot(path=str(docs / name))
        page.set_viewport_size({"width": 1400, "height": 900})

    try:
        page.goto(base + "/", timeout=60_000)  # the UI polls forever: wait for text, not the network
        page.get_by_text("Model training", exact=True).first.click()
        page.get_by_role("link", name="Model registry").first.wait_for()  # hidden in GenAI mode

        # the experiment opens on its runs: the two training runs and the two evaluations
        page.get_by_role("link", name="Experiments").first.click()
        page.get_by_role("link", name=experiment, exact=True).first.click()
        for r in runs:
            page.get_by_role("link", name=r.info.run_name, exact=True).first.wait_for()
        assert re.search(rf"#/experiments/{exp.experiment_id}/runs(\?|$)", page.url), page.url
        picture("mlflow_runs.png", height=500)

        # a training run's per-epoch chart: val_accuracy with one point per epoch
        rafdb = train["rafdb"]
        epochs = len(client.get_metric_history(rafdb.info.run_id, "val_accuracy"))
        assert epochs >= 2
        page.get_by_role("link", name=rafdb.info.run_name, exact=True).first.click()
        page.get_by_role("tab", name="Model metrics").first.click()
        page.get_by_placeholder("Search metric charts").fill("val_accuracy")
        page.wait_for_function("""([name, n]) => [...document.querySelectorAll('.js-plotly-plot')].some(p => {
            let card = p; while (card && !(card.innerText || '').split('\\n').includes(name)) card = card.parentElement;
            return card && p.querySelectorAll('.scatterlayer .trace .points path').length === n
                && [...p.querySelectorAll('.scatterlayer path.js-line')].some(l => (l.getAttribute('d') || '').length > 10);
        })""", arg=["val_accuracy", epochs])
        picture("mlflow_run_metrics.png", height=650)

        # the registry: both models, each with its champion
        page.get_by_role("link", name="Model registry").first.click()
        for ds in train:
            row = page.get_by_role("row").filter(has_text=f"lip-vgg16-{ds}")
            row.get_by_text("champion").first.wait_for()
        picture("mlflow_models.png", height=400)

        # the champion's version page: signature, description, the link to its training run
        mv = client.get_model_version_by_alias("lip-vgg16-rafdb", "champion")
        assert mv.tags["training_run_id"] == rafdb.info.run_id
        page.get_by_role("link", name="lip-vgg16-rafdb", exact=True).first.click()
        page.get_by_role("link", name=f"Version {mv.version}", exact=True).first.click()
        page.get_by_text("Outputs (8)").first.wait_for()
        page.get_by_text("Inputs (1)").first.wait_for()
        page.get_by_text(f"Training run: {rafdb.info.run_id} ({rafdb.info.run_name})").first.wait_for()
        picture("mlflow_model_version.png", height=1050)  # down to the signature
        with ctx.expect_page() as opened:  # the description's link opens the run in a new tab
            page.get_by_role("link", name=rafdb.info.run_id, exact=True).first.click()
        run_page = opened.value
        run_page.get_by_text(rafdb.info.run_name).first.wait_for(timeout=60_000)
        assert f"/runs/{rafdb.info.run_id}" in run_page.url, run_page.url
        assert not errors, errors
    finally:
        ctx.close()


@pytest.mark.slow
def test_mlflow_ui_shows_runs_models_and_lineage(repro, browser, tmp_path):
    """`mlflow server` on the store `dvc repro` wrote (127.0.0.1, a free port, ended by its PID's
    process group whatever happens), walked in Chromium: see :func:`check_mlflow_ui`. Its
    screenshots are the ones docs/mlflow.md shows."""
    import mlflow

    from conftest import free_port, start_server, stop_process_group

    work, run = repro
    uri = f"sqlite:///{work / 'mlflow.db'}"
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    server = start_server([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                           "--port", str(port), "--workers", "1", "--backend-store-uri", uri],
                          env, tmp_path / "mlflow.log", ready_url=f"http://127.0.0.1:{port}/health")
    try:
        experiment = yaml.safe_load((work / "params.yaml").read_text())["mlflow"]["experiment"]
        check_mlflow_ui(browser, f"http://127.0.0.1:{port}", mlflow.MlflowClient(uri), experiment,
                        REPO / "docs")
    finally:
        stop_process_group(server)


def _exp_rows(shown) -> list[dict]:
    """`dvc exp show --json` -> [{rev, name, accuracy}] for the baseline and its experiments."""
    rows = []

    def visit(node):
        if isinstance(node, dict):
            data = node.get("data")
            if isinstance(data, dict) and "metrics" in data:
                m = (data.get("metrics") or {}).get("metrics/eval_rafdb.json") or {}
                rows.append({"rev": node.get("rev") or data.get("rev"), "name": node.get("name"),
                             "accuracy": (m.get("data") or {}).get("accuracy")})
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(shown)
    return rows


@pytest.mark.slow
def test_dvc_exp_run_compares_with_the_committed_baseline(repro):
    """The cache: false outputs are not git-ignored: committed with dvc.lock they are the
    baseline's figures, so `dvc exp show` puts an experiment's accuracy beside them and
    `dvc metrics diff` prints the change. Nothing else the pipeline writes is left untracked."""
    work, run = repro
    status = run("git", "status", "--porcelain", "--untracked-files=all")
    assert status.returncode == 0
    untracked = {ln[3:] for ln in status.stdout.splitlines() if ln.startswith("?? ")}
    changed = {ln[3:] for ln in status.stdout.splitlines() if not ln.startswith("?? ")}
    # main commits the embedded default's figures: here they are new (untracked) or modified
    assert untracked <= GIT_TRACKED_OUTPUTS, sorted(untracked - GIT_TRACKED_OUTPUTS)
    assert changed <= GIT_TRACKED_OUTPUTS | {"dvc.lock"}, changed
    not_ignored = run("git", "check-ignore", "--no-index", *sorted(GIT_TRACKED_OUTPUTS))
    assert not_ignored.stdout.strip() == "", not_ignored.stdout  # none of them is ignored
    assert all((work / f).is_file() for f in GIT_TRACKED_OUTPUTS)
    ignored = run("git", "status", "--porcelain", "--ignored", "--untracked-files=all").stdout
    for big in ("data/parquet/rafdb/train.parquet", "models/rafdb/model.pt", "mlflow.db"):
        assert f"!! {big}" in ignored, big  # generated and large: stays ignored
    for cmd in (["git", "add", "dvc.lock", *sorted(GIT_TRACKED_OUTPUTS)],
                ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline"]):
        r = run(*cmd)
        assert r.returncode == 0, r.stderr
    base = json.loads((work / "metrics/eval_rafdb.json").read_text())["accuracy"]

    epochs = REDUCED["train_rafdb"]["epochs"] - 2
    # target evaluate@rafdb: only train_rafdb and its evaluation rerun (not the SFEW stages)
    exp = run("dvc", "exp", "run", "-n", "fewer-epochs", "-S", f"train_rafdb.epochs={epochs}",
              "evaluate@rafdb")
    assert exp.returncode == 0, exp.stdout[-3000:] + exp.stderr[-3000:]
    new = json.loads((work / "metrics/eval_rafdb.json").read_text())["accuracy"]

    shown = run("dvc", "exp", "show", "--json")
    assert shown.returncode == 0, shown.stderr
    rows = _exp_rows(json.loads(shown.stdout))
    by_name = {r["name"]: r for r in rows if r["name"]}
    assert "fewer-epochs" in by_name, rows
    assert by_name["fewer-epochs"]["accuracy"] == pytest.approx(new)
    head = run("git", "rev-parse", "HEAD").stdout.strip()
    baseline = [r for r in rows if r["rev"] == head]
    assert baseline and baseline[0]["accuracy"] == pytest.approx(base), rows  # not "!"

    diff = run("dvc", "metrics", "diff", "--all", "--json")
    assert diff.returncode == 0, diff.stderr
    acc = json.loads(diff.stdout)["metrics/eval_rafdb.json"]["accuracy"]
    assert acc["old"] == pytest.approx(base) and acc["new"] == pytest.approx(new)
    text = run("dvc", "metrics", "diff", "--all").stdout  # Path Metric HEAD workspace Change
    row = [ln.split() for ln in text.splitlines()
           if ln.split()[:2] == ["metrics/eval_rafdb.json", "accuracy"]]
    assert row and len(row[0]) == 5, text
    old_v, new_v, change = map(float, row[0][2:])
    assert old_v == pytest.approx(base, abs=1e-4) and new_v == pytest.approx(new, abs=1e-4), text
    assert change == pytest.approx(new - base, abs=1e-4), text


@pytest.mark.slow
def test_dvc_queue_runs_experiments_two_at_a_time(repro, tmp_path):
    """`dvc exp run --queue` of two parameter sets, `dvc queue start -j 2`: every experiment
    completes with its own metrics in `dvc exp show` and its own MLflow training run, and the two
    that ran at once did not share Ray storage or outputs (each history has its own length)."""
    import mlflow

    work, run = repro
    db = tmp_path / "queue-mlflow.db"  # one store for the queue's workers (each runs in a temp copy)
    env_uri = f"sqlite:///{db}"

    def qrun(*cmd, timeout=1500):
        return run(*cmd, timeout=timeout, MLFLOW_TRACKING_URI=env_uri)

    epochs = {"q-e1": 1, "q-e2": 2}
    for name, n in epochs.items():
        # a seed no other test uses: an epochs value another test already ran would be restored from
        # DVC's run cache (shared by the module's fixture) without training, and log no MLflow run
        r = qrun("dvc", "exp", "run", "--queue", "-n", name, "-S", f"train_rafdb.epochs={n}",
                 "-S", f"train_rafdb.seed={900 + n}", "evaluate@rafdb")
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = qrun("dvc", "queue", "start", "-j", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    deadline = time.time() + 1500
    while time.time() < deadline:
        st = qrun("dvc", "queue", "status").stdout
        if not any(s in st for s in ("Queued", "Running")):
            break
        time.sleep(10)
    st = qrun("dvc", "queue", "status").stdout
    assert st.count("Success") == len(epochs), st + "\n" + "\n".join(
        qrun("dvc", "queue", "logs", n).stdout[-2000:] for n in epochs)

    shown = json.loads(qrun("dvc", "exp", "show", "--json").stdout)
    by_name = {r["name"]: r for r in _exp_rows(shown) if r["name"]}
    for name in epochs:
        assert name in by_name and by_name[name]["accuracy"] is not None, by_name

    client = mlflow.tracking.MlflowClient(env_uri)
    exp = client.get_experiment_by_name(yaml.safe_load((work / "params.yaml").read_text())["mlflow"]["experiment"])
    train = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "train_rafdb"]
    assert sorted(int(r.data.params["epochs"]) for r in train) == [1, 2], [r.data.params for r in train]
    for r in train:
        assert r.info.status == "FINISHED"
        hist = client.get_metric_history(r.info.run_id, "val_accuracy")
        assert sorted(m.step for m in hist) == list(range(1, int(r.data.params["epochs"]) + 1))


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in session ``sid`` (Ray's raylet and workers after kill -9)."""
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    os.kill(int(d.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _output_hashes(work: Path) -> dict[str, str]:
    """sha256 of every file under every output dvc.yaml declares (models, data, reports, plots)."""
    import hashlib

    roots = ["data/synthetic", "data/parquet", "models", "reports", "metrics", "plots"]
    out = {}
    for r in roots:
        for f in sorted((work / r).rglob("*")):
            # not outputs: a write in progress, and the flock file beside an output (a kill -9 leaves
            # it, holding no lock: the next run takes it)
            if f.is_file() and ".tmp-" not in str(f) and not (f.name.startswith(".") and f.name.endswith(".lock")):
                out[str(f.relative_to(work))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _failing_cases(cases, run, params_file, original, store, store_bytes, before, work) -> None:
    """Each case fails with its one line, no traceback, and every previous output as it was."""
    for name, setup, cmd, names in cases:
        setup()
        r = run(*cmd, timeout=600)
        params_file.write_text(original)
        damaged = store.read_bytes() != store_bytes
        store.write_bytes(store_bytes)
        # refused stages never touch the store; one that trained and failed records its FAILED run
        assert not damaged or name in ("damaged mlflow.db", "full disk"), f"{name}: the store was rewritten"
        assert r.returncode != 0, f"{name}: {r.stdout[-1500:]}"
        assert "Traceback" not in r.stderr, f"{name}: {r.stderr[-3000:]}"
        ours = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
        assert len(ours) == 1 and names in ours[0], f"{name}: {r.stderr[-2000:]}"
        after = _output_hashes(work)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"{name}: outputs changed or lost: {changed[:10]}"


@pytest.mark.slow
def test_a_failed_or_refused_stage_keeps_every_previous_output(repro, tmp_path):
    """Every output is `persist: true`, so DVC no longer deletes it before the stage runs: a stage
    refused for bad params or bad input, through `dvc repro` and `dvc exp run`, fails with its one
    line and leaves every previous model, dataset, report, metric and plot byte-identical."""
    work, run = repro
    params_file = work / "params.yaml"
    original = params_file.read_text()
    before = _output_hashes(work)
    assert any(k.startswith("models/rafdb/") for k in before) and "reports/history_rafdb.json" in before
    as_file = tmp_path / "a-file.txt"
    as_file.write_text("not a dataset\n")
    empty = tmp_path / "empty-dataset"
    empty.mkdir()

    def with_params(**over):
        p = yaml.safe_load(original)
        for dotted, v in over.items():
            sec, key = dotted.split(".")
            p[sec][key] = v
        params_file.write_text(yaml.safe_dump(p, sort_keys=False))

    store = work / "mlflow.db"
    store_bytes = store.read_bytes()
    epochs = yaml.safe_load(original)["train_rafdb"]["epochs"]

    def damaged_store():  # a training stage that must run, and a store cut in half
        with_params(**{"train_rafdb.epochs": epochs + 1})
        store.write_bytes(store_bytes[: len(store_bytes) // 2])

    cases = [  # (name, set-up, command, what the stage's line must name)
        ("negative epochs", lambda: with_params(**{"train_rafdb.epochs": -1}), ["dvc", "repro"],
         "train_rafdb.epochs"),
        ("damaged mlflow.db", damaged_store, ["dvc", "repro"], "mlflow.db"),
        ("dvc exp run -S epochs=abc", lambda: None,
         ["dvc", "exp", "run", "-S", "train_rafdb.epochs=abc", "evaluate@rafdb"], "train_rafdb.epochs"),
        ("dataset path is a file", lambda: with_params(**{"datasets.rafdb": str(as_file)}), ["dvc", "repro"],
         str(as_file)),
        ("empty dataset folder", lambda: with_params(**{"datasets.rafdb": str(empty)}), ["dvc", "repro"],
         str(empty)),
    ]
    full = tmp_path / "full-disk"  # checkpoints to a 64 KiB tmpfs (where this machine lets us mount one)
    full.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)],
                             capture_output=True, timeout=30).returncode == 0
    if mounted:
        cases.append(("full disk", lambda: with_params(**{"train_rafdb.epochs": epochs + 1,
                                                          "ray.storage_path": str(full)}),
                      ["dvc", "repro"], "no space left on device"))
    else:
        print("full disk: not tried (cannot mount a tmpfs here; it needs root)")
    try:
        _failing_cases(cases, run, params_file, original, store, store_bytes, before, work)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(full)], capture_output=True, timeout=30)
    assert run("dvc", "status").returncode == 0


    # Ctrl-C in the middle of training (SIGINT to dvc's process group, as a terminal sends it),
    # then kill -9 of the whole group (no handler runs: an OOM kill, a closed laptop, a lost node)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    for sig in (signal.SIGINT, signal.SIGKILL):
        with_params(**{"train_rafdb.epochs": epochs + 1})
        log = tmp_path / f"interrupted-{sig.name}.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(["dvc", "repro"], cwd=work, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            deadline = time.time() + 600
            while time.time() < deadline and proc.poll() is None and not re.search(r"epoch \d+/\d+", log.read_text()):
                time.sleep(0.5)  # one epoch done (the second pass resumes after the first's)
            assert proc.poll() is None, f"the stage ended before it was interrupted: {log.read_text()[-2000:]}"
            os.killpg(proc.pid, sig)
            proc.wait(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
            _kill_session(proc.pid)  # what Ray started in that session and outlived the kill
        params_file.write_text(original)
        assert proc.returncode != 0, log.read_text()[-2000:]
        after = _output_hashes(work)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"{sig.name}: outputs changed or lost: {changed[:10]}"
        assert run("dvc", "status").returncode == 0, sig.name  # DVC's lock is released
