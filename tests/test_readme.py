"""The README's commands: each composes as capjob composes it (known keys, valid values), each
offline one passes its dry run, and an example that promises an output produces it.

Commands are read from the README's ```bash blocks (lines starting with `capjob`, with their
`\\` continuations), so a README edit is tested as written."""

import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from capjob import cli, preflight
from capjob.config import to_typed
from helpers.config import REPO, compose

README = REPO / "README.md"


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.strip() for line in joined.splitlines() if line.strip().startswith("capjob ")]
    return commands


COMMANDS = readme_commands()


def arguments(command: str, tmp_path: pathlib.Path) -> tuple[list[str], bool]:
    """(the overrides, multirun) of one README command, $PWD as the test's folder."""
    args = shlex.split(command.replace("$PWD", str(tmp_path)), comments=True)[1:]
    return cli._overrides(args)


def test_the_readme_has_the_commands_this_file_tests():
    assert len(COMMANDS) >= 10 and any("json_schema" in c for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_readme_command_composes(command, tmp_path):
    """Every README command (every swept value of a sweep) composes with known keys and valid
    values: what `capjob` itself checks before it starts."""
    overrides, multirun = arguments(command, tmp_path)
    compositions = cli._compositions(overrides, multirun)
    assert compositions
    for chosen in compositions:
        cfg = compose(chosen)
        preflight.check_keys(cfg)
        to_typed(cfg)


OFFLINE = [c for c in COMMANDS if "experiment=offline" in c and "--multirun" not in c and "--cfg" not in c]


@pytest.mark.parametrize("command", OFFLINE)
def test_each_offline_readme_command_passes_its_dry_run(command, tmp_path):
    overrides, _ = arguments(command, tmp_path)
    checked = preflight.dry_run(to_typed(compose([*overrides, "job.dry_run=true", f"sink.path={tmp_path}/out"])))
    assert checked.rows and checked.rows > 0


@pytest.mark.e2e
def test_the_readme_json_example_writes_json_for_every_image(tmp_path):
    """The structured-captions example, run as written (its output folder aside): every image
    gets a column holding JSON valid against its schema, nothing is quarantined."""
    import jsonschema
    import pyarrow.parquet as pq

    (command,) = [c for c in OFFLINE if "json_schema" in c]
    overrides, _ = arguments(command, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "capjob", *overrides, f"sink.path={tmp_path}/out", f"hydra.run.dir={tmp_path}/run"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = to_typed(compose(overrides))
    (name, spec), = cfg.caption.prompts.items()
    captions = pq.read_table(tmp_path / "out" / "captions").to_pylist()
    quarantined = pq.read_table(tmp_path / "out" / "quarantine").num_rows if (tmp_path / "out" / "quarantine").exists() else 0
    assert quarantined == 0, pq.read_table(tmp_path / "out" / "quarantine").column("reason").to_pylist()
    assert len(captions) == 60  # the sample set
    for row in captions:
        jsonschema.validate(json.loads(row[f"caption_{name}"]), spec["json_schema"])
