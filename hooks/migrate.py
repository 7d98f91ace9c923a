"""Migrations that copier runs on `copier update` (copier.yml `_migrations`), never on copy.

    move-file OLD NEW   A release moved a rendered file from OLD to NEW. Copier on its own
                        would drop the project's OLD (edits included) and write a fresh NEW.
                        This carries the project's edits across: a three-way merge of the
                        project's OLD (ours), OLD as the previous release rendered it (base)
                        and NEW as the new release renders it (theirs), written to NEW.
                        Overlapping edits become conflict markers with copier's own labels and
                        the file is marked unmerged, exactly like copier's own conflicts, so
                        `git diff --name-only --diff-filter=U` lists every file to resolve.

Run in the `after` stage from the project's root, by the interpreter that runs copier
(`{{ _copier_python }}`), so `copier` and `yaml` are importable. It reads the state before the
update from the project's HEAD commit (copier refuses to update a dirty project, so HEAD holds
the user's last edits) and renders the previous release with the answers recorded there.
Standard library, copier and PyYAML only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# Copier's labels for inline conflicts (copier/_main.py), so one grep finds ours and copier's.
LABELS = ("before updating", "last update", "after updating")


def git(*args: str, stdin: bytes | None = None) -> bytes:
    result = subprocess.run(["git", *args], input=stdin, capture_output=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode().strip()}")
    return result.stdout


def committed(path: str) -> bytes | None:
    """The file as the project's HEAD has it (paths relative to the project root), or None."""
    try:
        return git("show", f"HEAD:./{path}")
    except RuntimeError:
        return None


def previous_release(path: str, answers_file: str) -> bytes | None:
    """The file as the previous release rendered it, with the answers recorded before update."""
    recorded = committed(answers_file)
    if recorded is None:
        return None
    answers = yaml.safe_load(recorded) or {}
    data = {key: value for key, value in answers.items() if not key.startswith("_")}
    from copier import run_copy  # the interpreter that runs copier has it

    with tempfile.TemporaryDirectory(prefix="poolwise-migrate.") as tmp:
        run_copy(
            answers["_src_path"],
            tmp,
            data=data,
            vcs_ref=answers["_commit"],
            defaults=True,
            overwrite=True,
            quiet=True,
            skip_tasks=True,
            unsafe=True,  # updating across a migration already required --trust
        )
        rendered = Path(tmp, path)
        return rendered.read_bytes() if rendered.is_file() else None


def mark_unmerged(path: str, stages: dict[int, bytes]) -> None:
    """Record base/ours/theirs in the index, as copier does for its own conflicts."""
    repo_path = git("rev-parse", "--show-prefix").decode().strip() + path
    mode = "100755" if os.access(path, os.X_OK) else "100644"
    lines = [f"0 {'0' * 40}\t{repo_path}"]
    for stage, content in sorted(stages.items()):
        sha = git("hash-object", "-w", "--stdin", stdin=content).decode().strip()
        lines.append(f"{mode} {sha} {stage}\t{repo_path}")
    git("update-index", "--index-info", stdin="\n".join(lines).encode() + b"\n")


def move_file(old: str, new: str, answers_file: str) -> str:
    ours = committed(old)
    if ours is None:
        return f"{old} was not in the project; nothing to carry over to {new}"
    new_path = Path(new)
    # Copier has removed OLD already (the new release does not render it); make sure, and drop
    # the folders that held only it.
    Path(old).unlink(missing_ok=True)
    folder = Path(old).parent
    while folder != Path(".") and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent
    if not new_path.is_file():
        # The new release does not render NEW for this project: keep the user's file there.
        new_path.parent.mkdir(parents=True, exist_ok=True)
        new_path.write_bytes(ours)
        return f"moved {old} -> {new}"
    theirs = new_path.read_bytes()
    base = previous_release(old, answers_file)
    if base is None or ours == base:
        return f"moved {old} -> {new} (no local edits to carry over)"
    with tempfile.TemporaryDirectory(prefix="poolwise-merge.") as tmp:
        files = {name: Path(tmp, name) for name in ("ours", "base", "theirs")}
        files["ours"].write_bytes(ours)
        files["base"].write_bytes(base)
        files["theirs"].write_bytes(theirs)
        labels = [arg for label in LABELS for arg in ("-L", label)]
        merge = subprocess.run(
            ["git", "merge-file", *labels, *map(str, files.values())],
            capture_output=True,
            check=False,
        )
        if merge.returncode > 127:  # git merge-file exits -1 on errors, else the conflict count
            raise RuntimeError(f"git merge-file failed: {merge.stderr.decode().strip()}")
        new_path.write_bytes(files["ours"].read_bytes())
    if merge.returncode == 0:
        return f"moved {old} -> {new}, kept your edits"
    mark_unmerged(new, {1: base, 2: ours, 3: theirs})
    return (
        f"moved {old} -> {new}; {merge.returncode} conflict(s) between your edits and the"
        " release: resolve the <<<<<<< markers, then git add it"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hooks/migrate.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    move = commands.add_parser("move-file", help="carry the project's edits from OLD to NEW")
    move.add_argument("old")
    move.add_argument("new")
    move.add_argument("--answers-file", default=".copier-answers.yml")
    args = parser.parse_args(argv)
    try:
        message = move_file(args.old, args.new, args.answers_file)
    except (RuntimeError, OSError, KeyError) as error:
        print(f"poolwise migration failed: {error}", file=sys.stderr)
        return 1
    print(f"poolwise migration: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
