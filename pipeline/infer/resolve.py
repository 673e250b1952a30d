"""A model reference (``model.pt``, a logged-model folder, ``file://``, ``runs:/``, ``models:/``,
``s3://`` ...) -> the local path of its ``model.pt`` checkpoint, without unpickling anything.

``mlflow.pyfunc.load_model`` unpickles the model folder's ``python_model.pkl``: whoever can write
to a registry could run code on every user of ``fer predict``. So ``fer predict`` reads only two
files of a logged model: ``MLmodel`` (YAML, ``safe_load``) to find the checkpoint artifact and the
sha256 recorded when it was logged, and the checkpoint itself, which
:func:`pipeline.model.checkpoint.load_model` opens with ``torch.load(weights_only=True)``.
(``mlflow models serve`` and ``mlflow.pyfunc.load_model`` do unpickle: they trust the registry,
as MLflow itself does.)
"""
from __future__ import annotations

import contextlib
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from pipeline.errors import FerError
from pipeline.outputs import sha256_file

#: ``MLmodel`` metadata key holding the checkpoint's sha256 (written by registry.log_model).
SHA_KEY = "fer_checkpoint_sha256"
_LOGGED_MODEL_ID = re.compile(r"^models:/(m-[0-9a-f]{32})/?$")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _local_folder(ref: str) -> Path | None:
    if ref.startswith("file://"):
        return Path(unquote(urlparse(ref).path))
    if "://" in ref or ref.startswith(("models:/", "runs:/")):
        return None
    return Path(ref)


def _checkpoint_entry(mlmodel: dict, where: str) -> tuple[str, str | None]:
    """(checkpoint path inside the model folder, recorded sha256) from a parsed MLmodel."""
    pyfunc = ((mlmodel or {}).get("flavors") or {}).get("python_function") or {}
    ckpt = ((pyfunc.get("artifacts") or {}).get("checkpoint") or {}).get("path")
    if pyfunc.get("loader_module") != "mlflow.pyfunc.model" or not isinstance(ckpt, str):
        raise FerError(f"{where} is not a model logged by this pipeline (its MLmodel names no "
                       "`checkpoint` artifact)")
    parts = Path(ckpt).parts
    if Path(ckpt).is_absolute() or ".." in parts or not parts:
        raise FerError(f"{where}: the checkpoint path {ckpt!r} in MLmodel leaves the model folder")
    sha = ((mlmodel.get("metadata") or {}).get(SHA_KEY))
    return ckpt, sha if isinstance(sha, str) else None


def _read_mlmodel(path: Path, where: str) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise FerError(f"{where}: cannot read its MLmodel file ({_first_line(e)})") from e
    if not isinstance(doc, dict):
        raise FerError(f"{where}: its MLmodel file is not a mapping")
    return doc


def _verify(ckpt: Path, sha: str | None, where: str) -> Path:
    if sha is None:
        print(f"fer predict: note: {where} records no checkpoint sha256 (logged by an older "
              "version); loading it with weights_only=True", file=sys.stderr)
    elif sha256_file(ckpt) != sha:
        raise FerError(f"{where}: the checkpoint's sha256 differs from the one recorded when it "
                       "was logged; refusing it")
    return ckpt


def _local(folder: Path, ref: str) -> Path:
    if folder.is_file():
        return folder  # a model.pt: weights_only loading, nothing to verify against
    if not folder.is_dir():
        raise FerError(f"{ref}: checkpoint or model folder not found")
    if (folder / "MLmodel").is_file():
        ckpt_rel, sha = _checkpoint_entry(_read_mlmodel(folder / "MLmodel", ref), ref)
        ckpt = folder / ckpt_rel
        if not ckpt.is_file():
            raise FerError(f"{ref}: the MLmodel names {ckpt_rel}, which the folder lacks")
        return _verify(ckpt, sha, ref)
    if (folder / "model.pt").is_file():
        return folder / "model.pt"
    raise FerError(f"{ref} is a folder with neither model.pt (a training output) nor MLmodel "
                   "(a logged model)")


def _download(uri: str, dst: Path) -> Path:
    import mlflow.artifacts

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


@contextlib.contextmanager
def checkpoint_path(ref: str):
    """Yield the local ``model.pt`` of ``ref``; downloaded files are removed afterwards."""
    folder = _local_folder(ref)
    if folder is not None:
        yield _local(folder, ref)
        return
    from pipeline.tracking import tracking_uri, using_store

    store = tracking_uri()
    tmp = Path(tempfile.mkdtemp(prefix="fer-model-"))
    try:
        with using_store():
            try:
                m = _LOGGED_MODEL_ID.match(ref)
                if m:  # a logged model's own id: its folder is the logged model's location
                    from pipeline.tracking import client

                    root = client().get_logged_model(m.group(1)).artifact_location
                else:
                    root = ref.rstrip("/")
                mlmodel = _download(f"{root}/MLmodel", tmp / "meta")
                ckpt_rel, sha = _checkpoint_entry(_read_mlmodel(mlmodel, ref), ref)
                ckpt = _download(f"{root}/{ckpt_rel}", tmp / "ckpt")
            except FerError:
                raise
            except ModuleNotFoundError as e:
                raise FerError(f"reading {ref} needs the Python package {e.name!r} "
                               f"(pip install {'boto3' if e.name in ('boto3', 'botocore') else e.name})") from e
            except Exception as e:  # noqa: BLE001 - MLflow, HTTP and storage errors: one line
                raise FerError(f"cannot load {ref} from the MLflow store {store}: {_first_line(e)} "
                               "(pass --model path/to/model.pt)") from e
        yield _verify(ckpt, sha, ref)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
