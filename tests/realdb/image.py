"""A generated service's container image, rebuilt on this machine from what its Dockerfile says.

No image builder can run here (the base image cannot be pulled), so the image's file system is
laid out under a private directory instead: a container path ``/x`` is ``<root>/x``. Everything
comes from the rendered Dockerfile, parsed, never from a copy of it in this file:

* the build context holds only what the build stage COPYs (into its WORKDIR);
* the build stage's ``pip install`` runs there, non-editable, into the venv at the path the
  Dockerfile names; only then is the build directory removed, as the final stage never has it;
* the final stage's WORKDIR holds only what it COPYs from the context; its ENV (PATH first),
  USER, ENTRYPOINT and CMD are the environment, user and command of every process run in it.

Two parts are this machine's, not the image's: the interpreter (a Python of the same minor
version, see :func:`base_interpreter`) and the service's dependencies, which the venv sees
through a ``.pth`` line naming the test environment's site-packages instead of installing them
from PyPI again (the service is installed ``--no-deps``; ``pip check`` proves every requirement
is met, and their console scripts, ``alembic`` among them, are written to the venv's bin as pip
would). The service package itself is only ever the built wheel's.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import rendering
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The PATH a Linux image starts from (Docker's default), before the Dockerfile's ENV extends it.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What the python base image sets besides PATH that a Python process notices.
BASE_IMAGE_ENV = {"LANG": "C.UTF-8"}
# The build stage's RUN commands this emulation knows; any other fails the test (fail closed).
VENV_RUN = re.compile(r"^python3? -m venv (?P<venv>/\S+)$")
PIP_INSTALL_RUN = re.compile(r"^(?P<venv>/\S+)/bin/pip install (?P<args>.+)$")
# The final stage's: creating the user that USER names (numeric ids here, see run_as()).
USER_RUN = re.compile(r"^groupadd .+ && useradd .+$")


class DockerfileError(AssertionError):
    """The Dockerfile asks for something this emulation does not reproduce."""


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def words(self) -> tuple[dict[str, str], list[str]]:
        """(--flags, the other words) of a shell-form instruction such as COPY."""
        flags: dict[str, str] = {}
        words = shlex.split(self.arguments)
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        return flags, words

    def exec_form(self) -> list[str]:
        """The JSON array of CMD/ENTRYPOINT; shell form would add /bin/sh -c, not shipped here."""
        if not self.arguments.startswith("["):
            raise DockerfileError(f"{self.keyword} {self.arguments}: expected exec (JSON) form")
        return [str(word) for word in json.loads(self.arguments)]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile: continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # a comment or blank line, also inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        logical = ""
        instruction = Instruction(keyword.upper(), arguments.strip())
        if instruction.keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            raise DockerfileError(f"{keyword} {arguments}: instruction before FROM")
        else:
            stages[-1].instructions.append(instruction)
    if logical:
        raise DockerfileError("the Dockerfile ends inside a continued instruction")
    return stages


def env_of(stage: Stage, start: Mapping[str, str]) -> dict[str, str]:
    """The environment after the stage's ENV instructions (``$VAR``/``${VAR}`` expanded)."""
    env = dict(start)
    for instruction in stage.all("ENV"):
        for pair in shlex.split(instruction.arguments):
            name, sep, value = pair.partition("=")
            if not sep:
                raise DockerfileError(f"ENV {instruction.arguments}: expected NAME=value pairs")
            env[name] = re.sub(r"\$\{?(\w+)\}?", lambda match: env.get(match.group(1), ""), value)
    return env


def base_interpreter(run_as: list[str]) -> str:
    """A Python of this interpreter's minor version that the image's user can really run.

    Preferably the test environment's own base interpreter. A non-root user may be unable to
    read its standard library (pyenv under a root-only home, for example): Python then falls
    back to another prefix without an error, so the prefix the user sees is compared with
    root's. The minor version must match: the dependencies' compiled modules are built for it.
    """
    minor = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [getattr(sys, "_base_executable", sys.executable)]
    candidates += [f"{prefix}/bin/python{minor}" for prefix in ("/usr/local", "/usr")]
    probe = "import sys; print(sys.base_prefix, '%d.%d' % sys.version_info[:2])"
    seen: list[str] = []
    for candidate in dict.fromkeys(candidates):
        if not os.access(candidate, os.X_OK):
            continue
        own, theirs = (
            subprocess.run(
                [*prefix, candidate, "-I", "-c", probe],
                cwd="/",
                env={"PATH": IMAGE_PATH},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            for prefix in ([], run_as)
        )
        seen.append(f"{candidate}: {own.stdout.strip()!r} vs {theirs.stdout.strip()!r}")
        same = own.returncode == theirs.returncode == 0 and own.stdout == theirs.stdout
        if same and own.stdout.split()[-1] == minor:
            return candidate
    raise AssertionError(
        f"no Python {minor} that the image's user can run with its own standard library"
        f" (checked {'; '.join(seen) or 'nothing executable'}); install python{minor}"
    )


@dataclass
class ShippedImage:
    """The image's file system under ``root``, built and ready to run processes in."""

    project: Path
    root: Path
    stages: list[Stage]
    log: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, project: Path) -> ShippedImage:
        """Lay out and build the image of the project at ``project`` (its rendered Dockerfile)."""
        root = Path(tempfile.mkdtemp(prefix="poolwise-image-"))
        root.chmod(0o755)  # the image's user must reach /opt/venv and the WORKDIR below it
        image = cls(project, root, parse_dockerfile((project / "Dockerfile").read_text()))
        try:
            image._build()
        except BaseException:
            image.remove()
            raise
        return image

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- paths
    def path(self, container_path: str | PurePosixPath) -> Path:
        """Where a container path of the image lives on this machine."""
        relative = PurePosixPath(container_path).relative_to("/")
        return self.root.joinpath(*relative.parts)

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    @property
    def venv(self) -> Path:
        (venv,) = self._venvs
        return self.path(venv)

    @property
    def site_packages(self) -> Path:
        purelib = sysconfig.get_path(
            "purelib", vars={"base": str(self.venv), "platbase": str(self.venv)}
        )
        return Path(purelib)

    @property
    def workdir(self) -> Path:
        """The final stage's WORKDIR: where every process of the image starts."""
        return self.path(self._workdir(self.final))

    @property
    def user(self) -> tuple[int, int]:
        """The final stage's USER as numeric (uid, gid), as the image runs it."""
        instruction = self.final.last("USER")
        if instruction is None:
            raise DockerfileError("the image runs as root: the final stage has no USER")
        uid, _, gid = instruction.arguments.partition(":")
        if not (uid.isdigit() and gid.isdigit()) or int(uid) == 0:
            raise DockerfileError(f"USER {instruction.arguments}: expected numeric non-root ids")
        return int(uid), int(gid)

    def command(self, *cmd_override: str) -> list[str]:
        """ENTRYPOINT + CMD of the final stage; ``cmd_override`` replaces CMD, as a platform can."""
        entrypoint = self.final.last("ENTRYPOINT")
        cmd = self.final.last("CMD")
        command = list(cmd_override) or (cmd.exec_form() if cmd else [])
        return (entrypoint.exec_form() if entrypoint else []) + command

    # -- running processes in the image
    def run_as(self) -> list[str]:
        """The prefix that runs a command as the image's USER (nothing when we are not root).

        Like the realdb harness runs PostgreSQL: setpriv exec()s, so the pid we hold is the
        process's own. The ids are the Dockerfile's numeric USER, which this machine's
        /etc/passwd need not know: no supplementary groups, and HOME=/ (see env()), as
        unwritable as the image user's home, which useradd --no-create-home never made.
        """
        if os.geteuid() != 0:
            return []
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            raise AssertionError("setpriv (util-linux) is needed to run as the image's USER")
        uid, gid = self.user
        return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]

    def env(self, **overrides: str | int) -> dict[str, str]:
        """The final stage's environment with container paths mapped, plus ``overrides``.

        Nothing of this process's environment (PYTHONPATH, PG*, VIRTUAL_ENV, ...) gets in.
        """
        env = env_of(self.final, {"PATH": IMAGE_PATH, "HOME": "/", **BASE_IMAGE_ENV})
        env["PATH"] = os.pathsep.join(
            str(self.path(entry)) if entry.startswith(tuple(self._venvs)) else entry
            for entry in env["PATH"].split(os.pathsep)
        )
        env.update({name: str(value) for name, value in overrides.items()})
        return env

    def argv(self, command: list[str], env: Mapping[str, str]) -> list[str]:
        """``command`` as the image runs it: its program found on the image's PATH, as USER."""
        program = shutil.which(command[0], path=env["PATH"])
        if program is None or not program.startswith(str(self.root)):
            raise AssertionError(f"{command[0]} is not on the image's PATH ({env['PATH']})")
        return [*self.run_as(), program, *command[1:]]

    def popen(self, command: list[str], env: Mapping[str, str], **options: Any) -> subprocess.Popen:
        """Start ``command`` in the WORKDIR as the image's user, in its own session."""
        return subprocess.Popen(
            self.argv(command, env),
            cwd=self.workdir,
            env=dict(env),
            start_new_session=True,
            **options,
        )

    def run(
        self, command: list[str], env: Mapping[str, str], timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, env),
            cwd=self.workdir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    # -- the build
    @property
    def _venvs(self) -> list[str]:
        venvs = [
            match["venv"]
            for stage in self.stages
            for run in stage.all("RUN")
            if (match := VENV_RUN.match(run.arguments))
        ]
        if len(venvs) != 1:
            raise DockerfileError(f"expected one `python -m venv <path>` RUN, found {venvs}")
        return venvs

    @staticmethod
    def _workdir(stage: Stage) -> str:
        """The stage's one absolute WORKDIR, which every relative COPY and `pip install` follow."""
        workdirs = stage.all("WORKDIR")
        if len(workdirs) != 1 or not workdirs[0].arguments.startswith("/"):
            name = stage.name or stage.base
            raise DockerfileError(f"stage {name}: expected one absolute WORKDIR")
        position = stage.instructions.index(workdirs[0])
        for instruction in stage.instructions[:position]:
            relative_copy = instruction.keyword == "COPY" and "from" not in instruction.words()[0]
            if relative_copy or PIP_INSTALL_RUN.match(instruction.arguments):
                where = f"{instruction.keyword} {instruction.arguments}"
                raise DockerfileError(f"{where}: comes before the stage's WORKDIR")
        return workdirs[0].arguments

    def _copy_from_context(self, stage: Stage) -> None:
        """The stage's COPY instructions from the build context (the rendered project).

        Docker semantics: a directory source copies its contents into the destination; a file
        goes into a destination ending in / (or ., or with several sources) under its own name.
        """
        workdir = PurePosixPath(self._workdir(stage))
        for copy in stage.all("COPY"):
            flags, words = copy.words()
            if "from" in flags:
                continue  # between stages: checked in _build
            *sources, dest = words
            target = self.path(workdir / dest)
            into_directory = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
            for source in sources:
                origin = self.project / source
                if not origin.exists():
                    raise DockerfileError(f"COPY {copy.arguments}: {source} is not in the project")
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True, ignore=_bytecode)
                else:
                    destination = target / origin.name if into_directory else target
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, destination)
            self.log.append(f"COPY {copy.arguments} -> {target.relative_to(self.root)}")

    def _build(self) -> None:
        if len(self.stages) != 2:
            raise DockerfileError(f"expected a build stage and a final stage, found {self.stages}")
        build, final = self.stages
        (venv,) = self._venvs
        # The build stage: context files, the venv, `pip install` of the project, non-editable.
        self._copy_from_context(build)
        self._create_venv()
        build_dir = self.path(self._workdir(build))
        if build_dir == self.root or self.venv.is_relative_to(build_dir):
            raise DockerfileError(f"build WORKDIR {self._workdir(build)} holds the venv")
        # This machine's pip configuration (index, certificates) with the stage's ENV on top;
        # pip's cache cannot change what is built, and saves CI a download of setuptools.
        env = env_of(build, rendering.clean_env(with_poolwise=False, PATH=IMAGE_PATH))
        env.pop("PIP_NO_CACHE_DIR", None)
        for run in build.all("RUN"):
            if VENV_RUN.match(run.arguments):
                continue
            match = PIP_INSTALL_RUN.match(run.arguments)
            if match is None or match["venv"] != venv:
                raise DockerfileError(f"build stage: RUN {run.arguments} is not reproduced here")
            args = shlex.split(match["args"])
            if "-e" in args or "--editable" in args:
                raise DockerfileError(f"RUN {run.arguments}: the image must not install editable")
            # --no-deps: the dependencies are the test environment's (see the module docstring).
            command = [str(self.venv / "bin" / "python"), "-m", "pip", "install", "--no-deps"]
            self._check_call([*command, *args], build_dir, env)
            self._dependency_scripts()
        shutil.rmtree(build_dir)
        # The final stage: the venv from the build stage (same path), the WORKDIR's files.
        for copy in final.all("COPY"):
            flags, words = copy.words()
            if "from" in flags and (flags["from"] != build.name or words != [venv, venv]):
                raise DockerfileError(f"COPY {copy.arguments}: only {venv} is carried over")
        for run in final.all("RUN"):
            if not USER_RUN.match(run.arguments):
                raise DockerfileError(f"final stage: RUN {run.arguments} is not reproduced here")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._copy_from_context(final)

    def _create_venv(self) -> None:
        python = base_interpreter(self.run_as())
        venv = [python, "-m", "venv", "--without-pip", str(self.venv)]
        self._check_call(venv, self.root, {"PATH": IMAGE_PATH})
        # The test environment's installed distributions (pip among them), after the venv's own.
        own = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        (self.site_packages / "_test_environment.pth").write_text("\n".join(sorted(own)) + "\n")
        self.log.append(f"venv {self.venv.relative_to(self.root)} from {python}")

    def _dependency_scripts(self) -> None:
        """The console scripts pip would have put in the venv's bin with the dependencies
        (``alembic``, which the migration Job runs), for the installed service's requirements
        and theirs; markers are evaluated by this interpreter, of the venv's minor version."""
        # The venv's own site-packages holds one distribution: the service.
        (service,) = importlib.metadata.distributions(path=[str(self.site_packages)])
        for dist in requirement_closure(service):
            for entry in dist.entry_points.select(group="console_scripts"):
                script = self.venv / "bin" / entry.name
                module, _, attribute = entry.value.partition(":")
                script.write_text(
                    f"#!{self.venv / 'bin' / 'python'}\nimport sys\n"
                    f"from {module} import {attribute.split('.')[0]}\n"
                    f"sys.exit({attribute}())\n"
                )
                script.chmod(0o755)
                self.log.append(f"script {entry.name} of {dist.metadata['Name']}")

    def _check_call(self, command: list[str], cwd: Path, env: Mapping[str, str]) -> None:
        proc = subprocess.run(
            command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        self.log.append(f"$ {shlex.join(command)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(command)} failed ({proc.returncode}):\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )


def requirement_closure(
    top: importlib.metadata.Distribution,
) -> list[importlib.metadata.Distribution]:
    """The distributions ``top`` requires, transitively (extras and markers honoured)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    extras_seen: dict[str, set[str]] = {}
    todo: list[tuple[importlib.metadata.Distribution, frozenset[str]]] = [(top, frozenset())]
    while todo:
        dist, extras = todo.pop()
        for raw in dist.requires or []:
            requirement = Requirement(raw)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate(env) for env in environments):
                continue
            key = canonicalize_name(requirement.name)
            wanted = set(requirement.extras)
            if key in found and wanted <= extras_seen[key]:
                continue
            found[key] = importlib.metadata.distribution(requirement.name)
            extras_seen.setdefault(key, set()).update(wanted)
            todo.append((found[key], frozenset(wanted)))
    return list(found.values())


def _bytecode(directory: str, names: list[str]) -> list[str]:
    # What running the project's tests left in src/ is not part of a checkout (nor of a wheel).
    return [name for name in names if name == "__pycache__" or name.endswith(".pyc")]
