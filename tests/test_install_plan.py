"""install.py and lora_ext.install_plan: what gets installed beside the WebUI's pinned packages, and that nothing else
changes.

The plan is checked against tables of installed versions written here by hand (A1111 v1.10's requirements_versions.txt,
newer stacks); install.py runs as a subprocess on a fake environment (`python -S` with a PYTHONPATH of hand-made
*.dist-info folders) and a fake pip that records its arguments and "installs" by writing a dist-info folder. The real
installation (a venv, real pip, real PyPI) is the opt-in test at the end: LORA_EXT_INSTALL_E2E=1.
"""

from __future__ import annotations

import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_ext import install_plan as ip

ROOT = Path(__file__).resolve().parents[1]

# AUTOMATIC1111 v1.10.1's requirements_versions.txt pins (torch as its launch_utils installs it), plus what pip
# resolves around transformers 4.30.2 today (huggingface_hub 0.36.2, tokenizers 0.13.3).
WEBUI_110 = {
    "torch": "2.1.2+cu121",
    "torchvision": "0.16.2+cu121",
    "transformers": "4.30.2",
    "tokenizers": "0.13.3",
    "huggingface_hub": "0.36.2",
    "accelerate": "0.21.0",
    "safetensors": "0.4.2",
    "numpy": "1.26.2",
    "Pillow": "9.5.0",
    "gradio": "3.41.2",
    "fastapi": "0.94.0",
    "httpx": "0.24.1",
    "setuptools": "69.5.1",
}
WEBUI_110_PINNED = ("Pillow", "accelerate", "fastapi", "gradio", "numpy", "safetensors", "transformers", "httpx",
                    "setuptools")
# A newer host: transformers 4.44 (diffusers' newest releases work with it).
STACK_444 = {"torch": "2.4.1", "transformers": "4.44.2", "huggingface-hub": "0.24.6", "accelerate": "0.33.0",
             "safetensors": "0.4.4", "numpy": "2.0.1", "pillow": "10.4.0"}


def installs(plan: ip.Plan) -> list[str]:
    return [i.spec for i in plan.install]


def problem(plan: ip.Plan, dist: str) -> ip.Problem:
    found = [p for p in plan.problems if p.dist == dist]
    assert len(found) == 1, plan.problems
    return found[0]


def failing_pip(args):
    raise AssertionError(f"pip must not run: {args}")


# --- versions -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "expected"), [
    ("2.1.2+cu121", (2, 1, 2)), ("1.0", (1,)), ("1.0.0", (1,)), ("0.30.3", (0, 30, 3)), ("0.31.0.dev0", (0, 31)),
    ("4.30.2rc1", (4, 30, 2)), ("v1.2", (1, 2)), ("1!2.0", (2,)), ("0", (0,)), ("unknown", None), ("", None),
])
def test_release_numbers(version, expected):
    assert ip.release(version) == expected


@pytest.mark.parametrize(("version", "than", "expected"), [
    ("0.30.3", "0.31", True), ("0.31.0", "0.31", False), ("0.31.0.dev0", "0.31", False), ("4.30.2", "4.33", True),
    ("4.9", "4.33", True), ("4.100", "4.33", False), ("2.1.2+cu121", "2.2", True), ("2", "2.0.0", False),
    ("garbage", "1.0", None),
])
def test_older(version, than, expected):
    assert ip.older(version, than) is expected


@pytest.mark.parametrize(("version", "ok"), [
    ("1.26.2", True), ("2.1.2+cu121", True), ("0.31.0.dev0", True), ("1.0rc1", True), ("1.0.post2", True),
    ("2022", True), ("1!2.0", True), ("unknown", False), ("1.0-beta-weird", False), ("", False),
])
def test_pinnable_versions_are_pep440(version, ok):
    assert ip.is_pinnable(version) is ok


def test_requirement_minimums_match_pyproject():
    """The installer's table and pyproject.toml's `dependencies` must say the same (the package metadata is what pip
    checks when lora_ext is installed as a library)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    declared = {}
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*(;.*)?", dep)
        assert m, dep
        declared[ip.normalize(m.group(1))] = m.group(2)
    assert declared == {ip.normalize(r.dist): r.minimum for r in ip.REQUIREMENTS}
    assert declared["diffusers"] == "0.29"


# --- plan() ---------------------------------------------------------------------------------------------------------


def test_webui_110_stack_gets_diffusers_0_30_3_and_nothing_else():
    plan = ip.plan(WEBUI_110, python=(3, 11), pinned=WEBUI_110_PINNED)
    assert installs(plan) == ["diffusers==0.30.3"]
    assert "transformers 4.30.2" in plan.install[0].why
    assert plan.problems == ()
    # every requirement the WebUI provides is used as it is
    assert dict(plan.present) == {"torch": "2.1.2+cu121", "safetensors": "0.4.2", "numpy": "1.26.2",
                                  "transformers": "4.30.2", "accelerate": "0.21.0", "Pillow": "9.5.0"}


def test_python_310_also_needs_tomli_unless_present():
    assert installs(ip.plan(WEBUI_110, python=(3, 10))) == ["diffusers==0.30.3", "tomli>=1.1"]
    assert installs(ip.plan({**WEBUI_110, "tomli": "2.0.1"}, python=(3, 10))) == ["diffusers==0.30.3"]


def test_everything_present_means_nothing_to_do_and_no_pip():
    installed = {**WEBUI_110, "diffusers": "0.30.3"}
    plan = ip.plan(installed, python=(3, 11))
    assert plan.install == () and plan.problems == ()
    assert ip.run(plan, failing_pip, snapshot=lambda: installed) is None
    (line,) = ip.describe_plan(plan)
    assert line == ("all 7 requirements present (torch 2.1.2+cu121, safetensors 0.4.2, numpy 1.26.2, transformers "
                    "4.30.2, diffusers 0.30.3, accelerate 0.21.0, Pillow 9.5.0), nothing installed")


@pytest.mark.parametrize(("diffusers", "reason"), [
    ("0.27.2", "cached_download"), ("0.28.2", "cached_download"), ("0.31.0", "transformers.integrations.deepspeed"),
    ("0.35.1", "transformers.integrations.deepspeed"),
])
def test_incompatible_diffusers_is_reported_never_touched(diffusers, reason):
    plan = ip.plan({**WEBUI_110, "diffusers": diffusers}, python=(3, 11), pinned=WEBUI_110_PINNED)
    assert plan.install == ()
    p = problem(plan, "diffusers")
    assert (p.kind, p.installed, p.wanted, p.fix) == ("incompatible", diffusers, "diffusers>=0.29,<0.31",
                                                      "diffusers==0.30.3")
    assert reason in p.why
    text = "\n".join(ip.describe_plan(plan))
    assert f"diffusers {diffusers} is installed but lora_ext needs diffusers>=0.29,<0.31" in text
    assert "Left unchanged" in text and f'"{sys.executable}" -m pip install "diffusers==0.30.3"' in text
    assert ip.run(plan, failing_pip, snapshot=lambda: {}) is None


def test_newer_transformers_allows_newer_diffusers():
    assert installs(ip.plan(STACK_444, python=(3, 11))) == ["diffusers>=0.29"]
    plan = ip.plan({**STACK_444, "diffusers": "0.32.2"}, python=(3, 11))
    assert plan.install == () and plan.problems == ()
    # between 4.33 and 4.37: diffusers 0.31 works, 0.32 imports Siglip
    mid = {**STACK_444, "transformers": "4.35.2"}
    assert installs(ip.plan(mid, python=(3, 11))) == ["diffusers>=0.29,<0.32"]
    assert "Siglip" in problem(ip.plan({**mid, "diffusers": "0.32.0"}, python=(3, 11)), "diffusers").why


def test_numpy_2_is_kept_away_from_torch_2_1():
    without_numpy = {k: v for k, v in WEBUI_110.items() if k != "numpy"}
    assert installs(ip.plan({**without_numpy, "diffusers": "0.30.3"}, python=(3, 11))) == ["numpy>=1.24,<2"]
    p = problem(ip.plan({**WEBUI_110, "numpy": "2.0.1", "diffusers": "0.30.3"}, python=(3, 11),
                        pinned=WEBUI_110_PINNED), "numpy")
    assert p.kind == "incompatible" and p.fix == "" and "numpy 1" in p.why
    assert "update the WebUI" in "\n".join(ip.describe_plan(ip.plan({**WEBUI_110, "numpy": "2.0.1"},
                                                                      pinned=WEBUI_110_PINNED)))


def test_old_webui_pinned_package_is_reported_with_update_advice():
    plan = ip.plan({**WEBUI_110, "transformers": "4.25.1", "diffusers": "0.30.3"}, python=(3, 11),
                   pinned=WEBUI_110_PINNED)
    p = problem(plan, "transformers")
    assert (p.kind, p.fix) == ("incompatible", "")
    assert plan.install == ()
    # the same version outside a WebUI (not pinned): the pip command is the advice
    assert problem(ip.plan({**WEBUI_110, "transformers": "4.25.1"}, python=(3, 11)), "transformers").fix == \
        "transformers>=4.30"


def test_torch_is_never_installed_and_blocks_what_would_pull_it():
    installed = {k: v for k, v in WEBUI_110.items() if k not in ("torch", "accelerate")}
    plan = ip.plan(installed, python=(3, 11))
    assert installs(plan) == ["diffusers==0.30.3"]
    assert problem(plan, "torch").kind == "host-missing"
    assert problem(plan, "accelerate").kind == "blocked"
    assert "never installs" in "\n".join(ip.describe_plan(plan))


def test_unreadable_version_is_reported():
    p = problem(ip.plan({**WEBUI_110, "diffusers": "unknown"}, python=(3, 11)), "diffusers")
    assert p.kind == "incompatible" and "cannot be read" in p.why


def test_plan_accepts_any_spelling_of_names():
    spelled = {"TORCH": "2.1.2", "Transformers": "4.30.2", "huggingface-hub": "0.36.2", "Accelerate": "0.21.0",
               "safetensors": "0.4.2", "NumPy": "1.26.2", "pillow": "9.5.0", "Diffusers": "0.30.3"}
    plan = ip.plan(spelled, python=(3, 11))
    assert plan.install == () and plan.problems == ()


def test_webui_pins_read_from_requirements_versions(tmp_path):
    (tmp_path / "requirements_versions.txt").write_text(
        "setuptools==69.5.1  # temp fix\nGitPython==3.1.32\nPillow==9.5.0\ntorch\n\n# comment\ntransformers==4.30.2\n")
    assert ip.webui_pins(tmp_path) == ("setuptools", "GitPython", "Pillow", "transformers")
    assert ip.webui_pins(tmp_path / "nowhere") == ()


# --- constraints and run() ------------------------------------------------------------------------------------------


def test_constraints_pin_every_installed_distribution():
    installed = {**WEBUI_110, "weird-thing": "unknown", "Some_Pkg.Name": "1.0"}
    text = ip.constraints_text(installed)
    lines = text.splitlines()
    expected = {f"{ip.normalize(n)}=={v}" for n, v in installed.items() if n != "weird-thing"}
    assert set(lines) == expected and len(lines) == len(expected)
    assert "torch==2.1.2+cu121" in lines and "some-pkg-name==1.0" in lines and "huggingface-hub==0.36.2" in lines
    assert text.endswith("\n")


class RecordingPip:
    """A pip that records the files it was given and then 'installs' by changing the fake environment."""

    def __init__(self, env: dict[str, str], adds: dict[str, str], error: str | None = None):
        self.env, self.adds, self.error, self.calls = env, adds, error, []

    def __call__(self, args):
        args = list(args)
        assert args[0] == "install"
        self.calls.append({"args": args,
                           "requirements": Path(args[args.index("-r") + 1]).read_text().splitlines(),
                           "constraints": Path(args[args.index("-c") + 1]).read_text().splitlines()})
        if self.error:
            raise RuntimeError(self.error)
        self.env.update(self.adds)
        return "Successfully installed"


def test_run_installs_under_constraints_and_reads_back():
    env = dict(WEBUI_110)
    plan = ip.plan(env, python=(3, 11))
    pip = RecordingPip(env, {"diffusers": "0.30.3", "importlib-metadata": "8.5.0"})
    outcome = ip.run(plan, pip, snapshot=lambda: dict(env))
    (call,) = pip.calls
    assert call["requirements"] == ["diffusers==0.30.3"]
    assert sorted(call["constraints"]) == sorted(f"{ip.normalize(n)}=={v}" for n, v in WEBUI_110.items())
    assert outcome == ip.Outcome(plan.install, None, (("diffusers", "0.30.3"),), (),
                                 (("importlib-metadata", "8.5.0"),), ())
    lines = ip.describe_outcome(outcome, "pip")
    assert lines == ["installed diffusers 0.30.3 and new dependencies importlib-metadata 8.5.0 with pip",
                     "no package that was installed before was changed"]


def test_pip_failure_is_reported_with_manual_command():
    env = dict(WEBUI_110)
    plan = ip.plan(env, python=(3, 11))
    pip = RecordingPip(env, {}, error="pip exited with code 1\nERROR: ResolutionImpossible: huggingface-hub==0.36.2")
    outcome = ip.run(plan, pip, snapshot=lambda: dict(env))
    assert outcome.error.endswith("ResolutionImpossible: huggingface-hub==0.36.2")
    assert outcome.still_missing == ("diffusers",) and outcome.changed == () and outcome.installed == ()
    text = "\n".join(ip.describe_outcome(outcome, "pip"))
    assert "ERROR: pip could not install diffusers==0.30.3" in text and "  | ERROR: ResolutionImpossible" in text
    assert f'"{sys.executable}" -m pip install "diffusers==0.30.3"' in text
    assert "no package that was installed before was changed" in text


PIP_CONFLICT = """Command: "/venv/bin/python" -m pip install -r /tmp/x/requirements.txt -c /tmp/x/constraints.txt
Error code: 1
stdout: Collecting diffusers==0.30.3 (from -r /tmp/x/requirements.txt (line 1))
  Downloading diffusers-0.30.3-py3-none-any.whl (2.7 MB)
Requirement already satisfied: filelock in /venv/lib/python3.10/site-packages (from diffusers==0.30.3) (3.13.1)
INFO: pip is looking at multiple versions of diffusers to determine which version is compatible.

The conflict is caused by:
    diffusers 0.30.3 depends on huggingface-hub>=0.23.2
    The user requested (constraint) huggingface-hub==0.20.3

To fix this you could try to:
1. loosen the range of package versions you've specified

stderr: ERROR: Cannot install -r /tmp/x/requirements.txt (line 1) because these package versions have conflicting
ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/
"""


def test_pip_excerpt_keeps_the_reason():
    assert ip.pip_excerpt(PIP_CONFLICT) == [
        "Error code: 1",
        "The conflict is caused by:",
        "    diffusers 0.30.3 depends on huggingface-hub>=0.23.2",
        "    The user requested (constraint) huggingface-hub==0.20.3",
        "stderr: ERROR: Cannot install -r /tmp/x/requirements.txt (line 1) because these package versions have "
        "conflicting",
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/"]
    assert ip.pip_excerpt("a\nb\nc", limit=2) == ["b", "c"]  # nothing recognisable: the end of it
    offline = ("pip exited with code 1\nWARNING: Retrying (Retry(total=4)) after connection broken by "
               "'NewConnectionError(...)': /simple/diffusers/\n"
               "ERROR: Could not find a version that satisfies the requirement diffusers==0.30.3 "
               "(from versions: none)\nERROR: No matching distribution found for diffusers==0.30.3\n")
    assert ip.pip_excerpt(offline) == [
        "pip exited with code 1",
        "ERROR: Could not find a version that satisfies the requirement diffusers==0.30.3 (from versions: none)",
        "ERROR: No matching distribution found for diffusers==0.30.3"]


def test_pip_that_does_nothing_is_noticed():
    """The WebUI's run_pip returns without running pip when the WebUI was started with --skip-install."""
    env = dict(WEBUI_110)
    outcome = ip.run(ip.plan(env, python=(3, 11)), RecordingPip(env, {}), snapshot=lambda: dict(env))
    assert outcome.error is None and outcome.still_missing == ("diffusers",)
    assert "--skip-install" in "\n".join(ip.describe_outcome(outcome, "pip"))


def test_a_changed_package_would_be_reported_loudly():
    env = dict(WEBUI_110)
    pip = RecordingPip(env, {"diffusers": "0.30.3", "transformers": "4.46.0"})
    outcome = ip.run(ip.plan(env, python=(3, 11)), pip, snapshot=lambda: dict(env))
    assert outcome.changed == (("transformers", "4.30.2", "4.46.0"),)
    assert "WARNING: installed packages changed although they were pinned: transformers 4.30.2 -> 4.46.0" in \
        ip.describe_outcome(outcome, "pip")


def test_installed_versions_reads_this_environment():
    import importlib.metadata

    everything = ip.installed_versions()
    assert everything["pytest"] == importlib.metadata.version("pytest")
    assert ip.installed_versions(["PyTest", "surely-not-installed-xyz"]) == {"pytest": everything["pytest"]}


def test_shell_quoting_for_webui_run_pip():
    assert ip._quote("install") == "install"
    assert ip._quote("/tmp/lora_ext_pip_x/req.txt") == "/tmp/lora_ext_pip_x/req.txt"
    assert ip._quote("C:\\Users\\A B\\req.txt") == '"C:\\Users\\A B\\req.txt"'
    assert ip._quote("diffusers>=0.29,<0.31") == '"diffusers>=0.29,<0.31"'
    with pytest.raises(ValueError):
        ip._quote('a"b')


# --- install.py in-process: the real environment has everything ---------------------------------------------------


def test_install_py_here_is_a_no_op_without_subprocess_or_torch(monkeypatch, capsys):
    """This venv has every requirement: install.py must not start a process, and must not need torch to decide."""
    def no_process(*args, **kwargs):
        raise AssertionError("no subprocess when nothing is missing")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    monkeypatch.setattr(sys, "argv", ["install.py"])
    try:
        runpy.run_path(str(ROOT / "install.py"), run_name="__main__")
    finally:
        sys.modules.pop("lora_ext_install_plan", None)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and re.fullmatch(r"lora_ext: all 7 requirements present \(torch .*\), nothing installed",
                                          out[0]), out


def test_main_dry_run_installs_nothing(monkeypatch):
    monkeypatch.setattr(ip, "installed_versions", lambda names=None: dict(WEBUI_110))
    monkeypatch.setattr(ip, "choose_pip", lambda environ: pytest.fail("no pip in a dry run"))
    out = io.StringIO()
    assert ip.main(["--dry-run"], environ={}, out=out) == 0
    assert out.getvalue().splitlines()[-2:] == [
        "lora_ext: installing diffusers==0.30.3 (missing; compatible with transformers 4.30.2)",
        "lora_ext: dry run: nothing installed"]


# --- install.py as the WebUI runs it: a subprocess on a fake environment -------------------------------------------

FAKE_PIP = r'''
import json, os, re, sys
from pathlib import Path
args = sys.argv[1:]
requirements = Path(args[args.index("-r") + 1]).read_text().split()
constraints = Path(args[args.index("-c") + 1]).read_text().splitlines()
with open(os.environ["FAKE_PIP_LOG"], "a") as log:
    log.write(json.dumps({"args": args, "requirements": requirements, "constraints": constraints}) + "\n")
if os.environ.get("FAKE_PIP_MODE") == "fail":
    print("ERROR: Cannot install diffusers==0.30.3 because these package versions have conflicting dependencies.",
          file=sys.stderr)
    print("ERROR: ResolutionImpossible: for help visit https://pip.pypa.io", file=sys.stderr)
    sys.exit(1)
for spec in requirements:
    name, version = re.match(r"([A-Za-z0-9_.-]+)[=<>]=?([0-9.]+)", spec).groups()
    info = Path(os.environ["FAKE_SITE"]) / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
print("Successfully installed " + " ".join(requirements))
'''

FAKE_LAUNCH = r'''
"""Stands in for the WebUI's launch.py: run_pip builds a shell command line, as AUTOMATIC1111's does."""
import os, subprocess, sys
python = sys.executable

def run_pip(command, desc=None, live=False):
    with open(os.environ["FAKE_RUN_PIP_LOG"], "a") as log:
        log.write(command + "\n")
    result = subprocess.run(f'"{python}" "{os.environ["FAKE_PIP_SCRIPT"]}" {command} --prefer-binary', shell=True,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"Couldn't install {desc}.\nstdout: {result.stdout}\nstderr: {result.stderr}")
    return result.stdout
'''


def _dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


@pytest.fixture
def fake_env(tmp_path):
    """A copy of the extension's installer files, a site folder holding the WebUI 1.10 stack's metadata, a fake pip."""
    ext = tmp_path / "extensions" / "lora_ext"
    (ext / "lora_ext").mkdir(parents=True)
    (ext / "install.py").write_text((ROOT / "install.py").read_text())
    (ext / "lora_ext" / "install_plan.py").write_text((ROOT / "lora_ext" / "install_plan.py").read_text())
    site = tmp_path / "site"
    for name, version in WEBUI_110.items():
        _dist(site, name, version)
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    return tmp_path


def _run_install(root: Path, cwd: Path, pythonpath: str, **env) -> tuple[subprocess.CompletedProcess, float]:
    environ = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": pythonpath, "FAKE_SITE": str(root / "site"),
               "FAKE_PIP_LOG": str(root / "pip.log"), "FAKE_PIP_SCRIPT": str(root / "fake_pip.py"), **env}
    start = time.perf_counter()
    # -S: no site-packages, so the fake site folder is the whole environment importlib.metadata sees
    done = subprocess.run([sys.executable, "-S", str(root / "extensions" / "lora_ext" / "install.py")], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=60)
    return done, time.perf_counter() - start


def _pip_calls(root: Path) -> list[dict]:
    log = root / "pip.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_install_py_installs_diffusers_then_is_a_fast_no_op(fake_env):
    pip_cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(fake_env / 'fake_pip.py'))}"
    done, _ = _run_install(fake_env, fake_env, str(fake_env / "site"), LORA_EXT_PIP=pip_cmd)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "lora_ext: installing diffusers==0.30.3 (missing; compatible with transformers 4.30.2)"
    assert out[1] == f"lora_ext: installed diffusers 0.30.3 with {ip.PIP_ENV} ({pip_cmd})"
    assert out[2] == "lora_ext: no package that was installed before was changed"
    assert re.fullmatch(r"lora_ext: done in \d+\.\d s", out[3]) and len(out) == 4
    (call,) = _pip_calls(fake_env)
    assert call["requirements"] == ["diffusers==0.30.3"]
    # every distribution of the environment is pinned, each to its installed version
    assert sorted(call["constraints"]) == sorted(f"{ip.normalize(n)}=={v}" for n, v in WEBUI_110.items())
    assert (fake_env / "site" / "diffusers-0.30.3.dist-info").is_dir()

    again, seconds = _run_install(fake_env, fake_env, str(fake_env / "site"), LORA_EXT_PIP=pip_cmd)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "lora_ext: all 7 requirements present (torch 2.1.2+cu121, safetensors 0.4.2, numpy 1.26.2, transformers "
        "4.30.2, diffusers 0.30.3, accelerate 0.21.0, Pillow 9.5.0), nothing installed"]
    assert len(_pip_calls(fake_env)) == 1  # pip was not called again
    assert seconds < 1.0


def test_install_py_exits_0_and_explains_when_pip_fails(fake_env):
    pip_cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(fake_env / 'fake_pip.py'))}"
    done, _ = _run_install(fake_env, fake_env, str(fake_env / "site"), LORA_EXT_PIP=pip_cmd, FAKE_PIP_MODE="fail")
    assert done.returncode == 0
    text = done.stdout
    assert "lora_ext: ERROR: " in text and "could not install diffusers==0.30.3; pip said:" in text
    assert "lora_ext:   | ERROR: ResolutionImpossible" in text
    assert "lora_ext: ERROR: still missing: diffusers. The WebUI starts anyway" in text
    assert f'"{sys.executable}" -m pip install "diffusers==0.30.3"' in text
    assert not (fake_env / "site" / "diffusers-0.30.3.dist-info").exists()
    assert sorted(p.name for p in (fake_env / "site").iterdir()) == sorted(
        f"{n}-{v}.dist-info" for n, v in WEBUI_110.items())


def test_install_py_uses_the_webui_run_pip_through_a_shell(fake_env):
    """Inside a WebUI root (launch.py + modules/launch_utils.py, on PYTHONPATH as the WebUI sets it) the installer
    goes through launch.run_pip, whose command line a shell splits again."""
    webui = fake_env / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "modules" / "launch_utils.py").write_text("")
    (webui / "launch.py").write_text(FAKE_LAUNCH)
    (webui / "requirements_versions.txt").write_text("transformers==4.30.2\nnumpy==1.26.2\n")
    # a temporary directory with a space: the command line must quote it
    tmp = fake_env / "temp dir"
    tmp.mkdir()
    done, _ = _run_install(fake_env, webui, os.pathsep.join([str(webui), str(fake_env / "site")]),
                           FAKE_RUN_PIP_LOG=str(fake_env / "run_pip.log"), TMPDIR=str(tmp))
    assert done.returncode == 0, done.stderr
    assert "lora_ext: installed diffusers 0.30.3 with the WebUI's pip (launch.run_pip)" in done.stdout
    (command,) = (fake_env / "run_pip.log").read_text().splitlines()
    assert re.fullmatch(r'install -r "[^"]*temp dir[^"]*requirements\.txt" -c "[^"]*constraints\.txt"', command)
    (call,) = _pip_calls(fake_env)
    assert call["requirements"] == ["diffusers==0.30.3"] and call["args"][-1] == "--prefer-binary"


def test_install_py_survives_a_broken_installer(fake_env):
    (fake_env / "extensions" / "lora_ext" / "lora_ext" / "install_plan.py").write_text("raise RuntimeError('boom')\n")
    done, _ = _run_install(fake_env, fake_env, str(fake_env / "site"))
    assert done.returncode == 0
    assert done.stdout.startswith("lora_ext: ERROR: the installer failed (RuntimeError: boom); the WebUI starts anyway")
    assert "diffusers==0.30.3" in done.stdout


# --- the real thing (network, a venv, minutes): LORA_EXT_INSTALL_E2E=1 ------------------------------------------------

E2E_STACK = ["transformers==4.30.2", "tokenizers==0.13.3", "safetensors==0.4.2", "numpy==1.26.2", "Pillow==9.5.0"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LORA_EXT_INSTALL_E2E") != "1", reason="set LORA_EXT_INSTALL_E2E=1 (needs PyPI)")
def test_real_pip_installs_diffusers_beside_the_webui_110_stack(tmp_path):
    """A venv with A1111 v1.10's pins (torch as metadata only: the host's, never installed); install.py, real pip."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    subprocess.run([py, "-m", "pip", "install", "-q", *E2E_STACK], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "accelerate==0.21.0"], check=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    _dist(Path(site), "torch", "2.1.2")
    freeze = [py, "-c", "import importlib.metadata as m, json; "
                        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"]
    before = json.loads(subprocess.run(freeze, check=True, capture_output=True, text=True).stdout)

    done = subprocess.run([py, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0
    assert "lora_ext: installing diffusers==0.30.3 (missing; compatible with transformers 4.30.2)" in done.stdout
    assert "lora_ext: installed diffusers 0.30.3" in done.stdout, done.stdout
    after = json.loads(subprocess.run(freeze, check=True, capture_output=True, text=True).stdout)
    assert after["diffusers"] == "0.30.3"
    assert {k: after.get(k) for k in before} == before  # nothing that was there changed
    check = "import diffusers.utils.dynamic_modules_utils, transformers; print(transformers.__version__)"
    assert subprocess.run([py, "-c", check], check=True, capture_output=True, text=True).stdout.strip() == "4.30.2"

    start = time.perf_counter()
    again = subprocess.run([py, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - start < 1.0
    assert "nothing installed" in again.stdout and "installing" not in again.stdout
