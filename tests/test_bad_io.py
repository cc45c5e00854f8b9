"""I/O and W&B failures are one line naming the path (or saying how to log in), never a traceback, and
never leave a results.json: an unwritable run or sweep dir, an unwritable convert destination, a
full disk while writing results, a closed stdout (which is not an error at all), and
``logger.mode=online`` without W&B credentials.

Tests run as root, where permissions do not stop writes: an unwritable directory here is one under
a regular file (``<tmp>/afile/run``: mkdir fails with ENOTDIR), or a monkeypatched OS call.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import cspexp.outputs.files as files
from cspexp.utils import environment, failures
from cspexp.utils.environment import check_output_dirs, check_wandb_login, unwritable
from cspexp.utils.errors import ConfigError, OutputError

from conftest import CONF_DIR

WANDB = "lightning.pytorch.loggers.WandbLogger"
FAST = ["model=tiny_random", "prune=none", "dataset=shapes", "dataset.n=2", "logger=none"]


def run_cli(*args: str, cwd: Path, module: str = "cspexp", env: dict | None = None, stdout=subprocess.PIPE):
    full_env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=600)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture
def afile(tmp_path) -> Path:
    """A regular file: nothing can be created under it."""
    path = tmp_path / "afile"
    path.write_text("not a directory\n")
    return path


# --------------------------------------------------------------------------- run and sweep dirs
def test_unwritable_names_the_part_that_blocks(tmp_path, afile, monkeypatch):
    assert unwritable(tmp_path / "new" / "deeper") is None  # created later by Hydra: fine
    assert unwritable(afile / "run" / "x") == f"{afile} is not a directory"
    assert unwritable(afile) == "it exists and is not a directory"
    # not writable for this user (root ignores modes, so ask os.access to say no)
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(environment.os, "access", lambda p, mode: Path(p) != locked)
    assert unwritable(locked / "run") == f"{locked} is not writable"
    assert unwritable(locked) == "it is not writable"


@pytest.fixture
def initialized():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_the_default_run_dir_is_resolved_through_its_interpolations(initialized, afile):
    """hydra.run.dir is ${paths.log_dir}/runs/${now:…}: with paths.log_dir under a file, the message
    names the resolved directory (the date fills in, no ${…} is left)."""
    with pytest.raises(OutputError) as err:
        check_output_dirs("eval", [f"paths.log_dir={afile}/logs"], multirun=False)
    text = str(err.value)
    assert text.startswith(f"hydra.run.dir={afile}/logs/runs/") and "${" not in text
    assert text.endswith(f"cannot be used: {afile} is not a directory; set hydra.run.dir= to a directory you can write to")


def test_a_multirun_checks_the_sweep_dir_not_the_run_dir(initialized, afile, tmp_path):
    check_output_dirs("eval", [f"hydra.run.dir={afile}/run"], multirun=True)  # not used by -m
    with pytest.raises(OutputError, match=rf"^hydra.sweep.dir={afile}/sw cannot be used"):
        check_output_dirs("eval", [f"hydra.sweep.dir={afile}/sw", "prune.keep=0.1,0.2"], multirun=True)
    check_output_dirs("eval", [f"hydra.sweep.dir={tmp_path}/sw"], multirun=True)


def test_a_dir_that_cannot_be_resolved_here_is_left_to_hydra(initialized):
    check_output_dirs("eval", ["hydra.run.dir=${oc.env:CSPEXP_TEST_UNSET_VARIABLE}"], multirun=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["run", "sweep", "run_left_to_hydra", "sweep_left_to_hydra"])
def test_cli_an_unwritable_run_or_sweep_dir_is_one_line(tmp_path, afile, mode):
    """`--config-name` makes the pre-flight check leave the run to Hydra: then the Hydra callback
    (conf/hydra/default.yaml → OutputDirCheck) gives the same line."""
    key = "hydra.sweep.dir" if mode.startswith("sweep") else "hydra.run.dir"
    target = afile / "out"
    flags = (["-m"] if mode.startswith("sweep") else []) + (["--config-name=eval"] if mode.endswith("left_to_hydra") else [])
    grid = ["hydra/sweep_grid=none"] if mode.startswith("sweep") else []
    proc = run_cli(*flags, *grid, *FAST, f"{key}={target}", cwd=tmp_path)  # (Hydra's parser: flags first)
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr) == (f"error: {key}={target} cannot be used: {afile} is not a directory; "
                                           f"set {key}= to a directory you can write to")
    assert not list(tmp_path.rglob("results.json")) and not (tmp_path / "outputs").exists()


# --------------------------------------------------------------------------- a full disk
class _DiskFullFor:
    """`os` for cspexp.outputs.files whose fsync fails with ENOSPC for the temporary file of `name`
    (the temporary file's name is the one `chmod` was last given)."""

    def __init__(self, name: str) -> None:
        self.name, self.last = name, ""

    def chmod(self, path, mode):
        self.last = Path(path).name
        return os.chmod(path, mode)

    def fsync(self, fd):
        if self.last.startswith(f".{self.name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.fsync(fd)

    def __getattr__(self, name):
        return getattr(os, name)


def test_an_atomic_write_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    files.write_json_atomic(tmp_path / "results.json", {"old": True})
    monkeypatch.setattr(files, "os", _DiskFullFor("results.json"))
    with pytest.raises(OutputError) as err:
        files.write_json_atomic(tmp_path / "results.json", {"new": True})
    assert str(err.value) == f"cannot write {tmp_path / 'results.json'}: No space left on device (ENOSPC)"
    assert isinstance(err.value, OSError)
    assert json.loads((tmp_path / "results.json").read_text()) == {"old": True}  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


@pytest.mark.parametrize("full_at", ["samples.jsonl", "results.json"])
def test_a_full_disk_while_writing_results_is_one_line_and_no_results(compose_cfg, tmp_path, monkeypatch, capsys,
                                                                      full_at):
    from cspexp.evaluate import evaluate

    cfg = compose_cfg(*FAST)
    monkeypatch.setattr(files, "os", _DiskFullFor(full_at))
    with pytest.raises(SystemExit) as exc:
        failures.run_task(cfg, evaluate)
    assert exc.value.code == 2
    # in-process, Lightning's start-up lines share stderr (the CLI sample below checks it holds one line)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: cannot write {tmp_path / full_at}: No space left on device (ENOSPC)"
    assert not (tmp_path / "results.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    error = json.loads((tmp_path / "error.json").read_text())  # the disk is "full" only for full_at
    assert error["error"] == "OutputError" and error["user_error"] is True


DISK_FULL_CLI = """
import errno, os, sys
import cspexp.outputs.files as files

class DiskFull:  # fsync of results.json's temporary file fails with ENOSPC
    last = ""
    def chmod(self, path, mode):
        DiskFull.last = os.path.basename(path)
        return os.chmod(path, mode)
    def fsync(self, fd):
        if DiskFull.last.startswith(".results.json."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.fsync(fd)
    def __getattr__(self, name):
        return getattr(os, name)

files.os = DiskFull()
from cspexp.cli import main
sys.argv = ["cspexp", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_cli_a_full_disk_while_writing_results_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DISK_FULL_CLI, *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == f"error: cannot write {run_dir / 'results.json'}: No space left on device (ENOSPC)"
    names = {p.name for p in run_dir.iterdir()}
    assert {"samples.jsonl", "error.json"} <= names and "results.json" not in names
    assert not [n for n in names if n.endswith(".tmp")]


# --------------------------------------------------------------------------- python -m cspexp.convert
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lisa_fixtures import write_tiny_lisa

    return write_tiny_lisa(tmp_path_factory.mktemp("tiny"), layout="safetensors")


def _no_load(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the destination was checked")


def test_convert_into_a_destination_under_a_file_fails_before_loading(tiny, afile, capsys, monkeypatch):
    import cspexp.models.lisa_checkpoint as lisa_checkpoint
    from cspexp.convert import main

    monkeypatch.setattr(lisa_checkpoint, "load_lisa", _no_load)
    dst = afile / "model"
    assert main([str(tiny.path), str(dst), "--vision-tower", str(tiny.clip_path), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: DST {str(dst)!r} cannot be written: {afile} is not a directory"


def test_convert_into_a_directory_that_refuses_writes_fails_before_loading(tiny, tmp_path, capsys, monkeypatch):
    import cspexp.convert as convert_module
    import cspexp.models.lisa_checkpoint as lisa_checkpoint

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(lisa_checkpoint, "load_lisa", _no_load)
    monkeypatch.setattr(convert_module.tempfile, "mkdtemp", refuse)
    dst = tmp_path / "out" / "model"
    dst.parent.mkdir()
    assert convert_module.main([str(tiny.path), str(dst), "--vision-tower", str(tiny.clip_path), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: DST {str(dst)!r} cannot be written: {dst.parent} refuses a new directory "
                           f"({os.strerror(errno.EACCES)})")
    assert list(dst.parent.iterdir()) == []


def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    import cspexp.models.saved as saved
    from cspexp.convert import main

    real_save = saved.save_model

    def save_until_full(loaded, path):
        real_save(loaded, path)  # most of it written, then the disk fills up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(saved, "save_model", save_until_full)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model"
    assert main([str(tiny.path), str(dst), "--vision-tower", str(tiny.clip_path), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == f"error: cannot write DST {str(dst)!r}: No space left on device; DST was left as it was"
    assert list(out.iterdir()) == []  # neither DST nor the temporary directory


# --------------------------------------------------------------------------- a closed stdout
class _BrokenPipe:
    def __init__(self) -> None:
        self.writes = 0

    def write(self, text):
        self.writes += 1
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_the_stdout_wrapper_drops_output_once_the_reader_is_gone(monkeypatch):
    redirected = []
    monkeypatch.setattr(failures, "stdout_closed", lambda: redirected.append(True))
    stream = failures._ClosedStdoutSafe(_BrokenPipe())
    assert stream.write("table\n") == len("table\n")
    stream.flush()
    assert redirected == [True, True]


def test_the_summary_table_survives_a_closed_stdout(monkeypatch):
    """rich's own reaction to a closed stdout is SystemExit(1); the table's console only drops the output."""
    from cspexp.outputs.table import _Console

    redirected = []
    monkeypatch.setattr(failures, "stdout_closed", lambda: redirected.append(True))
    console = _Console(file=_BrokenPipe())
    console.print("a line")  # no SystemExit
    assert redirected == [True]


def _closed_pipe():
    """A pipe whose reader has already gone: every write to `w` fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    return w


@pytest.mark.slow
def test_cli_a_run_that_succeeds_exits_0_when_stdout_is_closed(tmp_path):
    run_dir = tmp_path / "run"
    w = _closed_pipe()
    try:
        proc = run_cli(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path, stdout=w)
    finally:
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Error" not in proc.stderr, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 2


@pytest.mark.slow
def test_cli_a_run_that_fails_still_says_why_when_stdout_is_closed(tmp_path):
    w = _closed_pipe()
    try:
        proc = run_cli(*FAST, "prune=fastv", "prune.layer=99", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, stdout=w)
    finally:
        os.close(w)
    assert proc.returncode == 2
    assert "prune.layer=99" in one_error_line(proc.stderr)


def test_cli_the_prompt_tool_exits_0_when_stdout_is_closed(tmp_path):
    w = _closed_pipe()
    try:
        proc = run_cli("model=tiny_random", "query=the red circle", cwd=tmp_path, module="cspexp.prompt", stdout=w)
    finally:
        os.close(w)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


# --------------------------------------------------------------------------- W&B online without credentials
def _wandb(mode):
    return OmegaConf.create({"_target_": WANDB, "mode": mode, "project": "cspexp"})


def test_offline_disabled_and_other_loggers_need_no_credentials(monkeypatch):
    def never(*args):
        raise AssertionError("credentials were looked up")

    monkeypatch.setattr(environment, "wandb_credentials", never)
    for cfg in (_wandb("offline"), _wandb("disabled"), _wandb("dryrun"), None,
                OmegaConf.create({"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "."})):
        check_wandb_login(cfg)


@pytest.mark.parametrize("mode", ["online", "run", "shared"])
def test_online_without_credentials_says_how_to_log_in(monkeypatch, mode):
    monkeypatch.setattr(environment, "wandb_credentials", lambda: False)
    with pytest.raises(ConfigError) as err:
        check_wandb_login(_wandb(mode))
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"logger.mode={mode} needs a W&B login")
    assert "`wandb login`" in text and "WANDB_API_KEY" in text and "logger.mode=offline" in text
    monkeypatch.setattr(environment, "wandb_credentials", lambda: True)
    check_wandb_login(_wandb(mode))


def test_the_configured_mode_follows_wandb_mode_unless_set_on_the_command_line(compose_cfg, monkeypatch):
    """conf/logger/wandb.yaml: mode is ${oc.env:WANDB_MODE,offline}; logger.mode=… replaces it."""
    monkeypatch.setattr(environment, "wandb_credentials", lambda: False)
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(ConfigError, match="^logger.mode=online needs a W&B login"):
        check_wandb_login(compose_cfg("logger=wandb").logger)
    check_wandb_login(compose_cfg("logger=wandb", "logger.mode=offline").logger)
    monkeypatch.delenv("WANDB_MODE")
    check_wandb_login(compose_cfg("logger=wandb").logger)  # offline by default
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(ConfigError, match="^logger.mode=online needs"):
        check_wandb_login(compose_cfg("logger=wandb", "logger.mode=online").logger)


def _bare_env(home: Path) -> dict:
    """No W&B credentials anywhere: an empty HOME, no key, no netrc, no identity token."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_CONFIG_DIR", "WANDB_BASE_URL")}
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1"}


def _python(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


CHECK = ("from omegaconf import OmegaConf\nfrom cspexp.utils.environment import check_wandb_login\n"
         f"check_wandb_login(OmegaConf.create({{'_target_': '{WANDB}', 'mode': 'online'}}))\nprint('ok')\n")


@pytest.mark.slow
def test_the_credential_lookup_reads_the_environment_and_netrc(tmp_path):
    env = _bare_env(tmp_path / "home")
    proc = _python(CHECK, env, tmp_path)
    assert proc.returncode == 1 and "logger.mode=online needs a W&B login" in proc.stderr
    proc = _python(CHECK, {**env, "WANDB_API_KEY": "x" * 40}, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    netrc = tmp_path / "home" / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'y' * 40}\n")
    netrc.chmod(0o600)
    proc = _python(CHECK, env, tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.slow
def test_wandb_itself_lets_the_init_mode_win_over_wandb_mode(tmp_path):
    """The precedence the check follows: wandb.init(mode="online") with WANDB_MODE=disabled still
    asks for credentials (and fails before any network call when there are none)."""
    env = {**_bare_env(tmp_path / "home"), "WANDB_MODE": "disabled", "WANDB_SILENT": "true"}
    proc = _python(f"import wandb\nwandb.init(mode='online', project='x', dir={str(tmp_path)!r})\n", env, tmp_path)
    assert proc.returncode != 0 and "No API key configured" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_cli_online_without_credentials_is_one_line_before_anything_runs(tmp_path):
    run_dir = tmp_path / "run"
    env = {**_bare_env(tmp_path / "home"), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "cspexp", "model=tiny_random", "dataset.n=2", "logger=wandb",
                           "logger.mode=online", f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith("error: logger.mode=online needs a W&B login") and "logger.mode=offline" in line
    assert not run_dir.exists()  # stopped before Hydra made the run dir: nothing built, nothing written
