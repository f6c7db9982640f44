"""A stand-in for the `apolo` CLI (and its old name `neuro`) used by tests/test_makefile.py.

It never talks to a platform. Every call appends one JSON line to the file named by
FAKE_APOLO_LOG: {"prog": "apolo", "argv": [...]} (argv without the program name), then
prints output shaped like the real CLI's where the Makefile reads it:

* ``apolo -q ps ...`` prints one job id per line, taken from FAKE_APOLO_PS_IDS
  (whitespace-separated; empty means no jobs);
* ``apolo run ...`` prints a job id line like the real CLI.

FAKE_APOLO_FAIL="kill,exec" makes the named (first-level) subcommands exit with status 1
after logging, as the real CLI does for e.g. an unknown job name.

Run it as ``python tests/fake_apolo/apolo.py ARGS``; the tests put a small ``apolo`` wrapper
that does exactly this first on PATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

# Global options that take a value (apolo --options); the others are flags. tests/test_makefile.py
# checks this set against the installed apolo CLI's own definitions.
GLOBAL_WITH_VALUE = {"--color", "--config-path", "--network-timeout", "--neuromation-config"}


def split_global(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split argv into (global options, subcommand and its arguments)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        opt = argv[i]
        i += 1
        if opt in GLOBAL_WITH_VALUE:
            i += 1
    return argv[:i], argv[i:]


def main() -> int:
    log = os.environ.get("FAKE_APOLO_LOG")
    if not log:
        print("fake apolo: FAKE_APOLO_LOG is not set", file=sys.stderr)
        return 2
    argv = sys.argv[1:]
    prog = os.path.basename(os.environ.get("FAKE_APOLO_PROG", "apolo"))
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps({"prog": prog, "argv": argv}) + "\n")

    global_opts, rest = split_global(argv)
    sub = rest[0] if rest else ""
    failing = {s for s in os.environ.get("FAKE_APOLO_FAIL", "").split(",") if s}
    if sub in failing:
        print(f"ERROR: fake failure of `{prog} {sub}`", file=sys.stderr)
        return 1

    quiet = any(o in ("-q", "--quiet") for o in global_opts)
    if sub == "ps":
        ids = os.environ.get("FAKE_APOLO_PS_IDS", "").split()
        if quiet:
            for job_id in ids:
                print(job_id)
        else:
            print("  ID                                         NAME      STATUS")
            for job_id in ids:
                print(f"  {job_id}  job       running")
    elif sub == "run":
        digest = hashlib.sha1(" ".join(argv).encode()).hexdigest()[:8]
        print(f"Job ID: job-{digest}-0000-0000-0000-000000000000 Status: pending")
    return 0


if __name__ == "__main__":
    sys.exit(main())
