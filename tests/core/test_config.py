"""The job spec: YAML plus --section.key overrides, clear errors, and every shipped config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig

from batch_classify.core.config import ConfigError, JobSpec, load_spec, parse_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MINIMAL = {"model": {"name": "m"}, "data": {"path": "d"}, "output": {"dir": "o"}}


def write_yaml(path: Path, value: dict) -> Path:
    path.write_text(yaml.safe_dump(value))
    return path


def test_three_keys_make_a_complete_job(tmp_path):
    spec = load_spec(write_yaml(tmp_path / "job.yaml", MINIMAL))
    assert (spec.model.name, spec.data.path, spec.output.dir) == ("m", "d", "o")
    assert spec.runtime.device == "auto" and spec.output.top_k == 5 and spec.data.kind == "auto"


def test_command_line_overrides_the_file(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", MINIMAL)
    spec = load_spec(path, ["--runtime.device", "cpu", "--output.top_k", "3", "--data.path", "x"])
    assert (spec.runtime.device, spec.output.top_k, spec.data.path) == ("cpu", 3, "x")


def test_resolved_spec_round_trips_through_yaml(tmp_path):
    spec = load_spec(write_yaml(tmp_path / "job.yaml", MINIMAL), ["--runtime.batch_size", "7"])
    again = load_spec(write_yaml(tmp_path / "resolved.yaml", yaml.safe_load(spec.to_yaml())))
    assert again == spec


@pytest.mark.parametrize(("change", "named"), [
    ({"model": {"name": "m", "nme": "x"}}, "nme"),
    ({"runtime": {"batch_size": "many"}}, "runtime.batch_size"),
    ({"runtime": {"batch_size": 0}}, "runtime.batch_size"),
    ({"runtime": {"device": "gpu"}}, "runtime.device"),
    ({"output": {"dir": "o", "top_k": 0}}, "output.top_k"),
    ({"model": {"name": ""}}, "model.name"),
    ({"data": {"path": "d", "kind": "zip"}}, "data.kind"),
    ({"runtime": {"preprocess": "turbo"}}, "runtime.preprocess"),
    ({"runtime": {"channels_last": "sometimes"}}, "runtime.channels_last"),
])
def test_bad_keys_and_values_fail_naming_the_key(tmp_path, change, named):
    path = write_yaml(tmp_path / "job.yaml", {**MINIMAL, **change})
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_spec(path)


def test_unknown_section_on_the_command_line_is_named(tmp_path):
    path = write_yaml(tmp_path / "job.yaml", MINIMAL)
    with pytest.raises(ConfigError, match="runtme"):
        load_spec(path, ["--runtme.device", "cpu"])


def test_missing_required_key_is_named():
    with pytest.raises(ConfigError, match=r"model\.name"):
        parse_args(["--data.path", "d", "--output.dir", "o"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_job_config_loads(path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec) and spec.model.name and spec.data.path and spec.output.dir


@pytest.mark.parametrize("path", sorted((CONFIGS / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_every_model_preset_loads_on_top_of_a_job(path):
    spec = parse_args(["--config", str(CONFIGS / "imagenet-val.yaml"), "--config", str(path)])
    assert spec.model.name == yaml.safe_load(path.read_text())["model"]["name"]
    assert spec.data.path == "/data/imagenet/val"


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_accelerate_config_loads(path):
    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 1 and config.num_machines >= 1
