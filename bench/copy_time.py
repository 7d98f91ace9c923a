"""Benchmark: `copier copy --defaults` of poolwise against a one-file template, side by side.

    .venv/bin/python bench/copy_time.py              # ~2 minutes; prints the table
    .venv/bin/python bench/copy_time.py --write      # and rewrites its section of RESULTS.md

Run by hand, not by the test suite. Every template is a fresh, packed git repository in a
temporary directory, so each copy clones the same way (poolwise's is a snapshot of this working
tree, uncommitted changes included, as copier itself takes a dirty local template):

  one-file      one question, one file: the floor any template pays (interpreter, copier's
                imports, git clone, answers file)
  poolwise      this working tree
  baseline      (--baseline REF) this working tree with copier.yml and includes/ from REF, to
                measure a change to the questions alone
  no-questions  (--explain) poolwise with every validator, help and computed budget replaced by
                its value: what the questions cost
  empty-files   (--explain) poolwise with every rendered file emptied: what rendering costs
  template-only (--explain) poolwise with only what copier reads (copier.yml, includes/,
                hooks/, template/): what cloning the rest of the repository costs
  plain-files   (--explain) the one-file template's question over the files poolwise renders,
                copied as they are: what copier's own work per file costs

Each round runs every template once, in the same order, as `copier copy --defaults --quiet
--vcs-ref HEAD` in a fresh process; the table gives the median of the rounds, in wall time and
in CPU time (the copier process and its git children, from wait4), and each median's ratio to
the one-file template's. CPU time is the steadier of the two on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jinja2
import yaml

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
BEGIN = "<!-- copy-time:begin (written by bench/copy_time.py) -->"
END = "<!-- copy-time:end -->"
COPIER = Path(sys.executable).parent / "copier"
TARGET_RATIO = 1.3


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
    env |= {"GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    ).stdout


def commit_packed(directory: Path) -> Path:
    git(directory, "init", "-q")
    git(directory, "add", "-A")
    git(directory, "commit", "-qm", "snapshot")
    git(directory, "gc", "-q", "--prune=now")
    return directory


def one_file_template(root: Path) -> Path:
    directory = root / "one-file"
    directory.mkdir()
    (directory / "copier.yml").write_text(
        "project_name:\n  type: str\n  help: Name of the project\n  default: demo\n"
    )
    (directory / "README.md.jinja").write_text("# {{ project_name }}\n")
    return commit_packed(directory)


def working_tree(root: Path, name: str) -> Path:
    """This repository's tracked and untracked (not ignored) files, as one commit."""
    directory = root / name
    files = git(REPO, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    for relative in filter(None, files):
        source = REPO / relative
        if source.is_file() and not source.is_symlink():
            target = directory / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return directory


def baseline_template(root: Path, ref: str) -> Path:
    """This working tree with copier.yml and includes/ as they were at `ref`."""
    directory = working_tree(root, "baseline")
    shutil.rmtree(directory / "includes")
    listing = git(REPO, "ls-tree", "-r", "--name-only", ref, "--", "copier.yml", "includes")
    for relative in listing.split():
        target = directory / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            subprocess.run(
                ["git", "show", f"{ref}:{relative}"], cwd=REPO, check=True, capture_output=True
            ).stdout
        )
    return commit_packed(directory)


def no_questions_template(root: Path) -> Path:
    """poolwise whose questions are plain values: no validator, help, type or budget macro.

    Every answer and computed value of a `copier copy --defaults` is written in as a constant,
    so copier renders the same files from the same answers without any question logic.
    """
    directory = working_tree(root, "no-questions")
    probe = root / "answers-probe"
    command = [str(COPIER), "copy", "--defaults", "--quiet", "--vcs-ref", "HEAD"]
    subprocess.run([*command, str(REPO), str(probe)], check=True, capture_output=True)
    answers = yaml.safe_load((probe / ".copier-answers.yml").read_text())
    shutil.rmtree(probe)
    config = yaml.safe_load((directory / "copier.yml").read_text())
    plain = {key: value for key, value in config.items() if key.startswith("_")}
    plain["_message_after_copy"] = ""
    # Computed values depend on the answers: render them once, in order, as copier does.
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(REPO),
        extensions=["jinja2_ansible_filters.AnsibleCoreFiltersExtension"],
        **config["_envops"],
    )
    context = {**answers, "_copier_conf": {"data": {}, "defaults": True, "user_defaults": {}}}
    for name, question in config.items():
        if name.startswith("_"):
            continue
        if name in answers:
            plain[name] = {"default": answers[name]}
            continue
        value = question.get("default")
        kind = environment.from_string(question.get("type", "str")).render(context)
        if isinstance(value, str):
            value = environment.from_string(value).render(context)
            value = value if kind == "str" else yaml.safe_load(value)
        context[name] = value
        plain[name] = {"default": value, "when": False}
    (directory / "copier.yml").write_text(yaml.safe_dump(plain, sort_keys=False))
    return commit_packed(directory)


def empty_files_template(root: Path) -> Path:
    """poolwise with the same questions and the same rendered paths, every file emptied."""
    directory = working_tree(root, "empty-files")
    for path in (directory / "template").rglob("*"):
        if path.is_file():
            path.write_text("")
    return commit_packed(directory)


def template_only(root: Path) -> Path:
    """poolwise without the files copier never reads (tests/, src/, bench/, docs/, ...)."""
    directory = working_tree(root, "template-only")
    for path in directory.iterdir():
        if path.name not in ("copier.yml", "includes", "hooks", "template"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return commit_packed(directory)


def plain_files_template(root: Path) -> Path:
    """One question, and the files a poolwise `copier copy --defaults` writes, as plain files."""
    directory = root / "plain-files"
    command = [str(COPIER), "copy", "--defaults", "--quiet", "--vcs-ref", "HEAD"]
    subprocess.run(
        [*command, str(REPO), str(directory / "template")], check=True, capture_output=True
    )
    (directory / "template" / ".copier-answers.yml").unlink()
    (directory / "copier.yml").write_text(
        "_subdirectory: template\n"
        "project_name:\n  type: str\n  help: Name of the project\n  default: demo\n"
    )
    return commit_packed(directory)


def copy_once(template: Path, destination: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of copier and its children) of one `copier copy --defaults`."""
    started = time.perf_counter()
    command = [str(COPIER), "copy", "--defaults", "--quiet", "--vcs-ref", "HEAD"]
    process = subprocess.Popen(
        [*command, str(template), str(destination)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"copier copy of {template} failed:\n{stderr[-2000:]}")
    shutil.rmtree(destination)
    return wall, usage.ru_utime + usage.ru_stime


def machine() -> str:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    copier_version = subprocess.run(
        [str(COPIER), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    git_version = git(REPO, "--version").strip()
    return (
        f"cpu {cpu}, {os.cpu_count()} cores; os {platform.system()} {platform.release()};"
        f" python {platform.python_version()}; {copier_version}; {git_version}"
    )


def table(results: dict[str, list[tuple[float, float]]], rounds: int) -> str:
    base_wall = statistics.median(wall for wall, _ in results["one-file"])
    base_cpu = statistics.median(cpu for _, cpu in results["one-file"])
    rows = [
        "| template | wall, median | x one-file | CPU, median | x one-file |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, samples in results.items():
        wall = statistics.median(value for value, _ in samples)
        cpu = statistics.median(value for _, value in samples)
        ratios = f"{wall / base_wall:.2f} | {cpu:.3f} s | {cpu / base_cpu:.2f}"
        rows.append(f"| {name} | {wall:.3f} s | {ratios} |")
    return "\n".join(rows) + f"\n\n{rounds} rounds, each running every template once in this order."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="copies of each template")
    parser.add_argument("--baseline", metavar="REF", help="also copy copier.yml/includes at REF")
    parser.add_argument("--explain", action="store_true", help="also copy the diagnostic variants")
    parser.add_argument("--write", action="store_true", help=f"rewrite the section in {RESULTS}")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="poolwise-copy-time-") as scratch:
        root = Path(scratch)
        templates = {
            "one-file": one_file_template(root),
            "poolwise": commit_packed(working_tree(root, "poolwise")),
        }
        if args.baseline:
            templates[f"baseline ({args.baseline})"] = baseline_template(root, args.baseline)
        if args.explain:
            templates["no-questions"] = no_questions_template(root)
            templates["empty-files"] = empty_files_template(root)
            templates["template-only"] = template_only(root)
            templates["plain-files"] = plain_files_template(root)
        load_before = os.getloadavg()
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in templates}
        for template in templates.values():  # warm the page cache and copier's imports
            copy_once(template, root / "warm-up")
        for number in range(args.rounds):
            for name, template in templates.items():
                results[name].append(copy_once(template, root / f"copy-{number}"))
        load_after = os.getloadavg()

    poolwise = statistics.median(wall for wall, _ in results["poolwise"])
    one_file = statistics.median(wall for wall, _ in results["one-file"])
    poolwise_cpu = statistics.median(cpu for _, cpu in results["poolwise"])
    one_file_cpu = statistics.median(cpu for _, cpu in results["one-file"])
    verdict = (
        f"poolwise / one-file: {poolwise / one_file:.2f}x wall, {poolwise_cpu / one_file_cpu:.2f}x"
        f" CPU (target <= {TARGET_RATIO}x: "
        + ("met" if poolwise / one_file <= TARGET_RATIO else "**not met**")
        + ")"
    )
    command = "`.venv/bin/python bench/copy_time.py " + " ".join(sys.argv[1:]) + "`"
    section = "\n".join(
        [
            BEGIN,
            "## `copier copy --defaults` time against a one-file template",
            "",
            f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC with"
            f" {command.replace(' `', '`')}.",
            "",
            f"Machine: {machine()}. Load average before {load_before[0]:.2f},"
            f" after {load_after[0]:.2f}.",
            "",
            table(results, args.rounds),
            "",
            verdict + ".",
            END,
        ]
    )
    print(section)
    if args.write:
        text = RESULTS.read_text()
        if BEGIN in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            text = head + section + tail
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
