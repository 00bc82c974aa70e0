"""What a registered denoiser tells its users: the requirements (CPU torch from PyTorch's index,
unlabelled pins), the signature and the stored input example. The rules alone, pip's choice
between a CUDA and a CPU wheel of one release (two local folders), and on the local stack (marked
``stack``) a registered version's files. Serving it through pyfunc is tested in test_denoise_job.py."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import uuid
import zipfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from pipeline.modelstore import SERVING_PACKAGES, TORCH_CPU_INDEX, serving_requirements, serving_signature


def test_requirements_name_the_cpu_index_first_then_pins_without_local_labels():
    first, *pins = serving_requirements()
    assert first == f"--extra-index-url {TORCH_CPU_INDEX}"
    assert [pin.split("==")[0] for pin in pins] == list(SERVING_PACKAGES)
    assert f"torch=={version('torch').split('+')[0]}" in pins and not any("+" in pin for pin in pins)


def _wheel(folder: Path, release: str) -> None:
    """A minimal wheel of a package ``fakepkg`` at version ``release``."""
    folder.mkdir()
    info = f"fakepkg-{release}.dist-info"
    files = {"fakepkg/__init__.py": "",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: fakepkg\nVersion: {release}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text)}" for name, text in files.items()]
    with zipfile.ZipFile(folder / f"fakepkg-{release}-py3-none-any.whl", "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{info}/RECORD", "\n".join([*record, f"{info}/RECORD,,"]) + "\n")


def test_pip_takes_the_cpu_build_for_an_unlabelled_pin_when_both_are_offered(tmp_path):
    """Why the requirements work: ``==X`` matches ``X+cpu``, which sorts above ``X``."""
    _wheel(tmp_path / "pypi", "1.0.0")
    _wheel(tmp_path / "cpu-index", "1.0.0+cpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-index",
                    "--find-links", str(tmp_path / "pypi"), "--find-links", str(tmp_path / "cpu-index"),
                    "--dest", str(tmp_path / "got"), "fakepkg==1.0.0"], check=True, env=env, timeout=120)
    assert [p.name for p in (tmp_path / "got").iterdir()] == ["fakepkg-1.0.0+cpu-py3-none-any.whl"]


def test_the_signature_takes_any_number_of_rgb_images_of_any_size():
    signature = serving_signature()
    for schema in (signature.inputs, signature.outputs):
        (spec,) = schema.inputs
        assert (spec.type, spec.shape) == (np.dtype(np.float32), (-1, 3, -1, -1))


# ---------------------------------------------------------------- on the stack


@pytest.mark.stack
def test_a_registered_version_keeps_its_input_example_signature_and_cpu_torch_requirements(settings):
    import mlflow
    import yaml
    from mlflow.artifacts import download_artifacts

    from pipeline.model import build_model
    from pipeline.modelstore import log_denoiser
    from pipeline.tracking import ensure_experiment

    name = f"modelstore-test-{uuid.uuid4().hex[:8]}"
    mlflow.set_tracking_uri(settings.mlflow_uri)
    client = mlflow.MlflowClient(settings.mlflow_uri)
    with mlflow.start_run(experiment_id=ensure_experiment(client, "tests-modelstore"), run_name=name):
        info = log_denoiser(build_model("tiny"), T=20, registered_name=name)
    try:
        uri = f"models:/{name}/{info.registered_model_version}"
        registered = mlflow.models.get_model_info(uri)
        assert registered.signature.to_dict() == serving_signature().to_dict()
        assert registered.saved_input_example_info["type"] == "ndarray"
        model = mlflow.pyfunc.load_model(uri)
        example = model.input_example
        assert example.dtype == np.float32 and example.shape[:2] == (1, 3)
        assert model.predict(example).shape == example.shape

        def artifact(file: str) -> str:
            return Path(download_artifacts(artifact_uri=f"{uri}/{file}")).read_text()

        assert artifact("requirements.txt").splitlines() == serving_requirements()
        conda = yaml.safe_load(artifact("conda.yaml"))
        assert [d for d in conda["dependencies"] if isinstance(d, dict)] == [{"pip": serving_requirements()}]
        assert yaml.safe_load(artifact("python_env.yaml"))["dependencies"] == ["-r requirements.txt"]
    finally:
        client.delete_registered_model(name)
