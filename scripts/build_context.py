#!/usr/bin/env python3
"""Assembles what a Dockerfile's build stage works on, the way `docker
build` does, without a Docker engine: the context (every file that
`.dockerignore` does not leave out), then what the first stage's `COPY`
lines take from it, into an empty folder standing for its WORKDIR.

    scripts/build_context.py CONTEXT_DIR DOCKERFILE DESTINATION

`.dockerignore` rules as Docker applies them: one pattern per line, `#`
comments, `*` and `?` within a path segment, `**` across segments, a
pattern also covers everything below a directory it matches, `!` makes an
exception, and the last matching line wins.
"""
import os
import re
import shutil
import sys


def translate(pattern):
    """A pattern as a regular expression over slash-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                i += 1
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(c, re.escape(c))
        i += 1
    return re.compile(out + r"\Z")


def rules(path):
    parsed = []
    if not os.path.exists(path):
        return parsed
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        parsed.append((keep, pattern, translate(pattern)))
    return parsed


def excluded(rel, parsed):
    """Whether `rel` (or a directory above it) is left out."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for keep, _, regex in parsed:
        if any(regex.match(p) for p in prefixes):
            verdict = not keep
    return verdict


def may_hold_exceptions(rel_dir, parsed):
    """Whether an exception could re-include something below `rel_dir`."""
    return any(keep and (p.startswith(rel_dir + "/") or "*" in p) for keep, p, _ in parsed)


def context_files(context):
    """Every file of the context, less what `.dockerignore` leaves out."""
    parsed = rules(os.path.join(context, ".dockerignore"))
    found = []
    for root, dirs, files in os.walk(context):
        rel_root = os.path.relpath(root, context)
        rel_root = "" if rel_root == "." else rel_root
        kept = []
        for d in dirs:
            rel = f"{rel_root}/{d}" if rel_root else d
            if not excluded(rel, parsed) or may_hold_exceptions(rel, parsed):
                kept.append(d)
        dirs[:] = kept
        for f in files:
            rel = f"{rel_root}/{f}" if rel_root else f
            if not excluded(rel, parsed):
                found.append(rel)
    return found


def first_stage_copies(dockerfile):
    """(sources, destination) of each `COPY` of the first stage that takes
    from the context (not `--from`)."""
    copies, stage = [], 0
    for line in open(dockerfile, encoding="utf-8").read().replace("\\\n", " ").splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].upper() == "FROM":
            stage += 1
        elif words[0].upper() in ("COPY", "ADD") and stage == 1:
            args = [w for w in words[1:] if not w.startswith("--")]
            if any(w.startswith("--from") for w in words[1:]):
                continue
            copies.append((args[:-1], args[-1]))
    return copies


def main(context, dockerfile, destination):
    files = context_files(context)
    copied = 0
    for sources, dest in first_stage_copies(dockerfile):
        for src in sources:
            src = os.path.normpath(src)
            for rel in files:
                if src == ".":
                    inner = rel
                elif rel == src:
                    inner = os.path.basename(rel) if dest.endswith("/") or dest == "." else ""
                elif rel.startswith(src + "/"):
                    inner = rel[len(src) + 1 :]
                else:
                    continue
                target = os.path.normpath(os.path.join(destination, dest, inner))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copy2(os.path.join(context, rel), target)
                copied += 1
    print(f"build stage: {copied} files from the context of {len(files)} in {destination}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
