"""The transformers range is stated once per exported package and matches setup.cfg; exported code under an older
transformers fails with a message that names the release it needs."""

import configparser
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fresh_process import BLOCK_REPOSITORY
from packaging.requirements import Requirement

import modeling_nanovlm.configuration_nanovlm as configuration
import processing.image_processing_nanovlm as image_processing

from test_export import save_with_reference

ROOT = Path(__file__).resolve().parent.parent


def setup_cfg_requirement(name: str) -> Requirement:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line for line in config["options"]["install_requires"].split("\n") if line.strip()]
    return next(Requirement(line) for line in lines if Requirement(line).name == name)


def test_exported_code_states_the_transformers_range_of_setup_cfg():
    wanted = setup_cfg_requirement("transformers").specifier
    assert Requirement(configuration.TRANSFORMERS_REQUIREMENT).specifier == wanted
    assert Requirement(image_processing.TRANSFORMERS_REQUIREMENT).specifier == wanted


OLD_TRANSFORMERS_SCRIPT = BLOCK_REPOSITORY + textwrap.dedent(
    """
    import importlib.metadata, sys
    import transformers

    real_version = importlib.metadata.version
    importlib.metadata.version = lambda name: "5.0.0" if name == "transformers" else real_version(name)

    from transformers import AutoConfig, AutoProcessor

    for auto_class in (AutoConfig, AutoProcessor):
        try:
            auto_class.from_pretrained(sys.argv[1], trust_remote_code=True)
        except ImportError as error:
            print(f"{auto_class.__name__}:", " ".join(str(error).split()))
        else:
            print(f"{auto_class.__name__}: loaded")
    """
)


def fresh_environment() -> dict:
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1"}


def test_exported_folder_under_an_older_transformers_names_the_release_it_needs(tmp_path):
    folder = save_with_reference(tmp_path / "nanovlm")
    result = subprocess.run(
        [sys.executable, "-c", OLD_TRANSFORMERS_SCRIPT, str(folder)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=fresh_environment(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["AutoConfig", "AutoProcessor"]
    for line in lines:
        assert f"{configuration.TRANSFORMERS_REQUIREMENT} is required" in line, line
        assert "found transformers==5.0.0" in line and f"pip install '{configuration.TRANSFORMERS_REQUIREMENT}'" in line
