"""What lora_ext installs into the host's Python environment, decided from installed versions alone.

The repository's `install.py` runs this: AUTOMATIC1111 executes an extension's `install.py` at every start (cwd = WebUI
root, the WebUI venv's python). The contract, most important first:
- Never upgrade, downgrade or remove an installed distribution. pip runs with a constraints file that pins EVERY
  installed distribution to its installed version, so it can only add what is missing, or fail and change nothing.
- Install only what is missing, at versions that work with what is there (diffusers 0.30.3 beside A1111 v1.10's
  transformers 4.30.2). torch is the host's (its build matches the GPU): reported when missing, never installed.
- A present but incompatible package (diffusers 0.27 left by another extension) is reported with the command that
  would fix it, and left alone.
- Quick and offline when nothing is missing: a few importlib.metadata look-ups, no subprocess, no network.

Standard library only and importable without torch or the `lora_ext` package (install.py loads this file by path,
before any dependency may exist). Nothing happens at import. Report lines go to stdout, prefixed `lora_ext:`: the
WebUI shows an installer's stdout and drops its stderr when it exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

PIP_ENV = "LORA_EXT_PIP"
"""Environment variable: a command line used instead of pip (`"/path/python" -m pip`, or a test stub)."""

Pip = Callable[[Sequence[str]], object]
"""Runs pip with these arguments (`["install", "-r", FILE, "-c", FILE]`); raises on failure, with pip's output."""


@dataclass(frozen=True)
class Requirement:
    """A distribution lora_ext needs at run time (the `dependencies` of pyproject.toml).

    `minimum`: oldest supported release; `too_old`: what breaks below it. `host`: provided by the host, never
    installed here (torch: the WebUI installs the build for the GPU). `needs`: installed only while these are present
    (pip would otherwise pull them in: accelerate would bring a generic torch). `python_below`: only needed on older
    Pythons (tomli, for tomllib before 3.11).
    """

    dist: str
    module: str
    minimum: str
    too_old: str = ""
    host: bool = False
    needs: tuple[str, ...] = ()
    python_below: tuple[int, int] | None = None


@dataclass(frozen=True)
class Cap:
    """While `host` is installed older than `host_below`, `dist` must stay older than `below`; `why` says what breaks.

    `prefer`: the exact release to install under this cap (a tested one); None lets pip pick the newest below it.
    """

    dist: str
    host: str
    host_below: str
    below: str
    prefer: str | None
    why: str


REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement("torch", "torch", "2.1", host=True),
    Requirement("safetensors", "safetensors", "0.4"),
    Requirement("numpy", "numpy", "1.24"),
    Requirement("transformers", "transformers", "4.30"),
    Requirement(
        "diffusers",
        "diffusers",
        "0.29",
        too_old="diffusers 0.27-0.28 import huggingface_hub.cached_download, which huggingface_hub 0.26 removed",
    ),
    Requirement("accelerate", "accelerate", "0.21", needs=("torch",)),
    Requirement("Pillow", "PIL", "9.5"),
    Requirement("tomli", "tomli", "1.1", python_below=(3, 11)),
)

CAPS: tuple[Cap, ...] = (
    Cap("diffusers", "transformers", "4.33", "0.31", "0.30.3",
        "diffusers 0.31+ imports transformers.integrations.deepspeed (transformers 4.33+)"),
    Cap("diffusers", "transformers", "4.37", "0.32", None,
        "diffusers 0.32+ imports transformers' Siglip models (transformers 4.37+)"),
    Cap("numpy", "torch", "2.2", "2", None,
        "torch 2.1 and older were built for numpy 1: tensor.numpy() and torch.from_numpy fail with numpy 2"),
)


@dataclass(frozen=True)
class Install:
    """One pip requirement to install: `spec` as given to pip (`diffusers==0.30.3`), `why` in words."""

    dist: str
    spec: str
    why: str


@dataclass(frozen=True)
class Problem:
    """Something the installer will not fix by itself; reported, nothing changed.

    kind: "incompatible" (installed at a version lora_ext cannot use), "host-missing" (torch: the host's to install),
    "blocked" (missing, but installing it would pull a missing host package). `installed` is None unless
    incompatible; `wanted` the acceptable range (`diffusers>=0.29,<0.31`); `fix` the pip requirement that would fix it
    ("" when pip is not the answer).
    """

    kind: str
    dist: str
    installed: str | None
    wanted: str
    why: str
    fix: str


@dataclass(frozen=True)
class Plan:
    """plan()'s decision. `present`: (dist, version) pairs that satisfy lora_ext, in REQUIREMENTS order."""

    present: tuple[tuple[str, str], ...]
    install: tuple[Install, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class Outcome:
    """What run() did, read back from the environment's metadata after pip.

    `error`: pip's failure in its own words (None: pip reported success). `installed`: requested distributions now
    present, with versions; `still_missing`: requested ones still absent. `added`: other distributions that appeared
    (new dependencies). `changed`: (dist, before, after or None if removed) for distributions that were there before:
    the constraints make this impossible, and it is checked rather than assumed.
    """

    requested: tuple[Install, ...]
    error: str | None
    installed: tuple[tuple[str, str], ...]
    still_missing: tuple[str, ...]
    added: tuple[tuple[str, str], ...]
    changed: tuple[tuple[str, str, str | None], ...]


# --- versions ---------------------------------------------------------------------------------------------------------

_RELEASE = re.compile(r"\s*[vV]?(?:\d+!)?(\d+(?:\.\d+)*)")
# PEP 440 public version with an optional local label; anything else would make pip reject the whole constraints file.
_PEP440 = re.compile(
    r"\s*v?(?:\d+!)?\d+(?:\.\d+)*"
    r"(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?\d*)?"
    r"(?:-\d+|[-_.]?(?:post|rev|r)[-_.]?\d*)?"
    r"(?:[-_.]?dev[-_.]?\d*)?"
    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?\s*",
    re.IGNORECASE,
)


def normalize(name: str) -> str:
    """PEP 503 name: `Pillow` -> `pillow`, `huggingface_hub` -> `huggingface-hub`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...] | None:
    """The release numbers of a version without trailing zeros: "2.1.2+cu121" -> (2, 1, 2), "1.0" -> (1,).

    Pre-, post- and dev-releases count as their release ("0.31.0.dev0" -> (0, 31)). None when it has no numbers.
    """
    match = _RELEASE.match(version)
    if match is None:
        return None
    parts = [int(p) for p in match.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def older(version: str, than: str) -> bool | None:
    """Whether `version`'s release is older than `than`'s; None when `version` cannot be read."""
    have, bound = release(version), release(than)
    if have is None or bound is None:
        return None
    return have < bound


def is_pinnable(version: str) -> bool:
    """Whether pip accepts `name==version` (a PEP 440 version)."""
    return _PEP440.fullmatch(version) is not None


# --- the plan ---------------------------------------------------------------------------------------------------------


def names_read_by_plan() -> tuple[str, ...]:
    """Every distribution plan() looks at: the requirements and the packages their caps depend on."""
    names = [r.dist for r in REQUIREMENTS] + [c.host for c in CAPS]
    return tuple(dict.fromkeys(names))


def _active_cap(dist: str, versions: Mapping[str, str]) -> Cap | None:
    """The tightest cap on `dist` given the installed versions (None: no upper bound)."""
    best: Cap | None = None
    for cap in CAPS:
        if normalize(cap.dist) != normalize(dist):
            continue
        host_version = versions.get(normalize(cap.host))
        if host_version is None or not older(host_version, cap.host_below):
            continue
        if best is None or older(cap.below, best.below):
            best = cap
    return best


def _range(minimum: str, below: str | None) -> str:
    return f">={minimum}" + (f",<{below}" if below else "")


def plan(
    installed: Mapping[str, str],
    python: tuple[int, int] | None = None,
    pinned: Iterable[str] = (),
) -> Plan:
    """Decide what to install, from `installed` (distribution name -> version, any spelling of the names).

    `python`: (major, minor), default the running one. `pinned`: distributions the host pins (the WebUI's
    requirements_versions.txt); for those the advice is to update the host, never a pip command. Pure: no I/O.
    """
    versions = {normalize(k): v for k, v in installed.items()}
    pins = {normalize(p) for p in pinned}
    py = python or (sys.version_info[0], sys.version_info[1])
    present: list[tuple[str, str]] = []
    install: list[Install] = []
    problems: list[Problem] = []
    for req in REQUIREMENTS:
        if req.python_below is not None and py >= req.python_below:
            continue
        have = versions.get(normalize(req.dist))
        cap = _active_cap(req.dist, versions)
        wanted = req.dist + _range(req.minimum, cap.below if cap else None)
        spec = f"{req.dist}=={cap.prefer}" if cap and cap.prefer else wanted
        if have is None:
            if req.host:
                problems.append(Problem("host-missing", req.dist, None, wanted,
                                        f"{req.dist} is not installed; lora_ext never installs it (the host installs "
                                        "the build that matches the GPU)", ""))
                continue
            absent = [n for n in req.needs if normalize(n) not in versions]
            if absent:
                problems.append(Problem("blocked", req.dist, None, wanted,
                                        f"{req.dist} is missing and was not installed: it needs "
                                        f"{', '.join(absent)}, which is missing too (pip would install a generic "
                                        "build); install that first", spec))
                continue
            why = "missing"
            if cap is not None:
                why += f"; compatible with {cap.host} {versions[normalize(cap.host)]}"
            install.append(Install(req.dist, spec, why))
            continue
        too_old = older(have, req.minimum)
        if too_old is None:
            why = f"its version {have!r} cannot be read"
        elif too_old:
            why = f"older than {req.minimum}" + (f": {req.too_old}" if req.too_old else "")
        elif cap is not None and not older(have, cap.below):
            why = f"{cap.why}; installed {cap.host} {versions[normalize(cap.host)]}"
        else:
            present.append((req.dist, have))
            continue
        problems.append(Problem("incompatible", req.dist, have, wanted, why,
                                "" if normalize(req.dist) in pins or req.host else spec))
    return Plan(tuple(present), tuple(install), tuple(problems))


# --- the environment --------------------------------------------------------------------------------------------------


def installed_versions(names: Iterable[str] | None = None) -> dict[str, str]:
    """Installed distributions of this interpreter's sys.path, normalized name -> version (importlib.metadata only).

    With `names`, only those are looked up (a few milliseconds); without, every distribution is read (tens of
    milliseconds per hundred). Where a name is installed twice, the first on sys.path wins, as for imports.
    """
    found: dict[str, str] = {}
    if names is not None:
        for name in names:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            if version:
                found[normalize(name)] = version
        return found
    for dist in importlib.metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version:
            found.setdefault(normalize(name), version)
    return found


def constraints_text(installed: Mapping[str, str]) -> str:
    """A pip constraints file pinning every distribution in `installed` to its version, one `name==version` a line.

    Versions pip cannot parse are left out (pip would reject the whole file); such distributions are then not pinned.
    """
    lines = [f"{normalize(n)}=={v}" for n, v in sorted(installed.items(), key=lambda kv: normalize(kv[0]))
             if is_pinnable(v)]
    return "".join(line + "\n" for line in lines)


def webui_pins(root: str | os.PathLike[str]) -> tuple[str, ...]:
    """Distribution names the WebUI at `root` pins with `name==version` in its requirements_versions.txt (or none)."""
    path = Path(root) / "requirements_versions.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return ()
    found = (re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==", line) for line in text.splitlines())
    return tuple(m.group(1) for m in found if m)


# --- pip --------------------------------------------------------------------------------------------------------------


def subprocess_pip(command: Sequence[str]) -> Pip:
    """pip as a subprocess: `command` + arguments (e.g. [sys.executable, "-m", "pip"]). Raises RuntimeError with
    pip's output when it exits non-zero; returns its output otherwise."""
    def pip(args: Sequence[str]) -> str:
        done = subprocess.run([*command, *args], capture_output=True, text=True, errors="replace", check=False)
        output = (done.stdout or "") + (done.stderr or "")
        if done.returncode != 0:
            raise RuntimeError(f"pip exited with code {done.returncode}\n{output}")
        return output

    return pip


def _quote(arg: str) -> str:
    """One argument for the WebUI's `run_pip` (a shell command line: sh on Linux/macOS, cmd.exe on Windows)."""
    if re.fullmatch(r"[A-Za-z0-9_./:=+-]+", arg):
        return arg
    if re.search(r'["$`%!\n]', arg):
        raise ValueError(f"cannot pass {arg!r} to a shell command line safely")
    return f'"{arg}"'


def webui_pip() -> Pip | None:
    """The WebUI's `launch.run_pip` when this runs inside an AUTOMATIC1111-style WebUI root (it adds the WebUI's index
    URL and --prefer-binary, and skips pip when the WebUI runs with --skip-install), else None."""
    spec = importlib.util.find_spec("launch")
    if spec is None or spec.origin is None:
        return None
    if not (Path(spec.origin).parent / "modules" / "launch_utils.py").is_file():
        return None
    try:
        launch = importlib.import_module("launch")
    except (Exception, SystemExit):  # a WebUI that cannot import here: plain pip still works
        return None
    run_pip = getattr(launch, "run_pip", None)
    if not callable(run_pip):
        return None

    fallback = subprocess_pip([sys.executable, "-m", "pip"])

    def pip(args: Sequence[str]) -> object:
        try:
            command = " ".join(_quote(a) for a in args)
        except ValueError:  # a temporary path a shell would mangle: the same interpreter's pip, without a shell
            return fallback(args)
        return run_pip(command, desc="lora_ext requirements")

    return pip


def choose_pip(environ: Mapping[str, str]) -> tuple[Pip, str]:
    """The pip to use and its name for messages: $LORA_EXT_PIP, else the WebUI's run_pip, else `python -m pip`."""
    command = environ.get(PIP_ENV, "").strip()
    if command:
        return subprocess_pip(shlex.split(command, posix=os.name != "nt")), f"{PIP_ENV} ({command})"
    pip = webui_pip()
    if pip is not None:
        return pip, "the WebUI's pip (launch.run_pip)"
    return subprocess_pip([sys.executable, "-m", "pip"]), f"{sys.executable} -m pip"


def run(
    plan_: Plan,
    pip: Pip,
    snapshot: Callable[[], Mapping[str, str]] = installed_versions,
) -> Outcome | None:
    """Install `plan_.install` with one pip call under a constraints file pinning every installed distribution.

    `snapshot()` reads every installed distribution (name -> version), before and after pip. Returns None when there is
    nothing to install (pip is not called). pip's failure is returned in Outcome.error, never raised.
    """
    if not plan_.install:
        return None
    before = {normalize(k): v for k, v in snapshot().items()}
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="lora_ext_pip_") as tmp:
        requirements = Path(tmp) / "requirements.txt"
        constraints = Path(tmp) / "constraints.txt"
        requirements.write_text("".join(i.spec + "\n" for i in plan_.install), encoding="utf-8")
        constraints.write_text(constraints_text(before), encoding="utf-8")
        try:
            pip(["install", "-r", str(requirements), "-c", str(constraints)])
        except Exception as exc:  # pip's failure is the user's news, reported by the caller with pip's own words
            error = str(exc).strip() or type(exc).__name__
    importlib.invalidate_caches()
    after = {normalize(k): v for k, v in snapshot().items()}
    requested = {normalize(i.dist) for i in plan_.install}
    installed = tuple((i.dist, after[normalize(i.dist)]) for i in plan_.install if normalize(i.dist) in after)
    still_missing = tuple(i.dist for i in plan_.install if normalize(i.dist) not in after)
    added = tuple((n, v) for n, v in sorted(after.items()) if n not in before and n not in requested)
    changed = tuple((n, v, after.get(n)) for n, v in sorted(before.items()) if after.get(n) != v)
    return Outcome(plan_.install, error, installed, still_missing, added, changed)


# --- the report -------------------------------------------------------------------------------------------------------


def _manual(specs: Iterable[str]) -> str:
    return f'"{sys.executable}" -m pip install ' + " ".join(f'"{s}"' for s in specs)


def describe_plan(plan_: Plan) -> list[str]:
    """Report lines (without the `lora_ext: ` prefix) for a plan, before anything is installed."""
    lines: list[str] = []
    for p in plan_.problems:
        if p.kind == "incompatible":
            fix = (f"to use lora_ext, run: {_manual([p.fix])}" if p.fix
                   else "the WebUI provides it: update the WebUI")
            lines.append(f"WARNING: {p.dist} {p.installed} is installed but lora_ext needs {p.wanted} ({p.why}). "
                         f"Left unchanged (installed by you, the WebUI or another extension); {fix}")
        else:
            lines.append(f"WARNING: {p.why}")
    present = ", ".join(f"{d} {v}" for d, v in plan_.present)
    if not plan_.install:
        if not plan_.problems:
            lines.append(f"all {len(plan_.present)} requirements present ({present}), nothing installed")
        else:
            lines.append(f"nothing installed; present and compatible: {present or 'none'}")
    for item in plan_.install:
        lines.append(f"installing {item.spec} ({item.why})")
    return lines


def pip_excerpt(error: str, limit: int = 25) -> list[str]:
    """The lines of pip's output that say what went wrong: its `ERROR:` lines, the exit code and pip's "The conflict is
    caused by" block (not its retry warnings); the last `limit` lines when none match. At most `limit` lines."""
    keep: list[str] = []
    in_conflict = False
    for line in error.splitlines():
        if line.strip().startswith("The conflict is caused by"):
            in_conflict = True
        elif in_conflict and not line.strip():
            in_conflict = False
        if in_conflict or re.search(r"\bERROR\b|^Error code|^pip exited", line):
            keep.append(line.rstrip())
    return (keep or [line.rstrip() for line in error.splitlines()])[-limit:]


def describe_outcome(outcome: Outcome, pip_name: str) -> list[str]:
    """Report lines (without the `lora_ext: ` prefix) for what run() did with `pip_name`."""
    lines: list[str] = []
    if outcome.installed:
        done = ", ".join(f"{d} {v}" for d, v in outcome.installed)
        extra = f" and new dependencies {', '.join(f'{d} {v}' for d, v in outcome.added)}" if outcome.added else ""
        lines.append(f"installed {done}{extra} with {pip_name}")
    elif outcome.added:
        lines.append(f"pip added {', '.join(f'{d} {v}' for d, v in outcome.added)}")
    if outcome.error is not None:
        lines.append(f"ERROR: {pip_name} could not install {', '.join(i.spec for i in outcome.requested)}; pip said:")
        lines.extend(f"  | {line}" for line in pip_excerpt(outcome.error))
    if outcome.still_missing:
        missing = [i.spec for i in outcome.requested if i.dist in outcome.still_missing]
        why = "" if outcome.error is not None else " (pip did nothing: the WebUI skips pip with --skip-install)"
        lines.append(f"ERROR: still missing: {', '.join(outcome.still_missing)}{why}. The WebUI starts anyway; "
                     f"lora_ext will not work until you install {'it' if len(missing) == 1 else 'them'} "
                     f"in the WebUI's environment: {_manual(missing)}")
    if outcome.changed:
        moved = ", ".join(f"{d} {b} -> {a or 'removed'}" for d, b, a in outcome.changed)
        lines.append(f"WARNING: installed packages changed although they were pinned: {moved}")
    else:
        lines.append("no package that was installed before was changed")
    return lines


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    out: TextIO | None = None,
) -> int:
    """The installer: plan from installed metadata, install what is missing, say what happened.

    Returns 0 when lora_ext's requirements are all present and compatible afterwards, else 1 (install.py ignores it:
    a failed install must not stop the WebUI).
    """
    parser = argparse.ArgumentParser(prog="install.py", description="Install what lora_ext needs and is missing.")
    parser.add_argument("--dry-run", action="store_true", help="say what would be installed; install nothing")
    args, _ = parser.parse_known_args(argv)
    env = os.environ if environ is None else environ
    stream = sys.stdout if out is None else out

    def say(lines: Iterable[str]) -> None:
        for line in lines:
            print(f"lora_ext: {line}", file=stream, flush=True)

    start = time.perf_counter()
    decided = plan(installed_versions(names_read_by_plan()), pinned=webui_pins(os.getcwd()))
    say(describe_plan(decided))
    if not decided.install or args.dry_run:
        if args.dry_run and decided.install:
            say(["dry run: nothing installed"])
        return 1 if decided.problems else 0
    pip, pip_name = choose_pip(env)
    outcome = run(decided, pip)
    if outcome is None:  # not reached: decided.install is not empty
        return 1
    say(describe_outcome(outcome, pip_name))
    say([f"done in {time.perf_counter() - start:.1f} s"])
    ok = outcome.error is None and not outcome.still_missing and not outcome.changed
    return 0 if ok and not decided.problems else 1
