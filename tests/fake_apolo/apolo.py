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

With FAKE_APOLO_STORAGE=DIR it also keeps a fake platform in DIR (the offline rehearsal of the whole
platform path): ``storage:PATH`` is ``DIR/PATH``, and

* ``mkdir``, ``cp`` (local <-> storage; --recursive, --no-target-directory, --target-directory,
  --exclude) and ``rm`` act on that tree; ``secret add NAME VALUE|@FILE`` stores a secret;
* ``run`` records a job (name, tags, restart policy, status) in DIR/.fake-apolo/jobs.json and, when the
  job's command starts with a program named in FAKE_APOLO_EXECUTE (e.g. "boneage,bash"), runs it here
  and now: each ``--volume storage:PATH:MOUNT[:ro|rw]`` mount path in the command, its environment and
  its workdir is replaced by ``DIR/PATH``; ``--env NAME=secret:S`` gets the stored secret (a job whose
  secret is missing fails, as on the platform); FAKE_APOLO_PYTHONPATH is put first on the job's
  PYTHONPATH. A job that exits non-zero under ``--restart on-failure|always`` is run again, as the
  platform restarts it, up to FAKE_APOLO_MAX_RESTARTS (3) times; every restart is recorded. Attached
  (no --detach), ``run`` prints the job's output and exits with its exit code, as the real CLI does.
  Other commands (jupyter, sleep) stay "running";
* ``ps`` lists the running and pending jobs carrying ``--tag``; ``kill`` ends them (an unknown job is
  an error); ``logs`` prints a job's output.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# Global options that take a value (apolo --options); the others are flags. tests/test_makefile.py
# checks this set against the installed apolo CLI's own definitions.
GLOBAL_WITH_VALUE = {"--color", "--config-path", "--network-timeout", "--neuromation-config"}
# Options of `apolo run` that take no value (tests/test_makefile.py checks this set against the real CLI too).
RUN_FLAGS = {"--browse", "--detach", "--extshm", "--http-auth", "--no-extshm", "--no-http-auth", "--no-pass-config",
             "--no-tty", "--no-wait-for-seat", "--no-wait-start", "--pass-config", "--privileged", "--tty",
             "--wait-for-seat", "--wait-start", "-T", "-X", "-t", "-x"}


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
    if os.environ.get("FAKE_APOLO_STORAGE"):
        return Platform(Path(os.environ["FAKE_APOLO_STORAGE"])).call(sub, rest[1:], quiet)
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


def split_run(args: list[str]) -> tuple[dict[str, list[str]], str, list[str]]:
    """`apolo run` arguments -> (options: name -> values, image, command)."""
    options: dict[str, list[str]] = {}
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "--":
        opt = args[i]
        if "=" in opt:
            opt, value = opt.split("=", 1)
            options.setdefault(opt, []).append(value)
        elif opt in RUN_FLAGS:
            options.setdefault(opt, []).append("")
        else:
            i += 1
            options.setdefault(opt, []).append(args[i])
        i += 1
    image, rest = args[i], args[i + 1:]
    return options, image, rest[1:] if rest[:1] == ["--"] else rest


class Platform:
    """The fake platform state under FAKE_APOLO_STORAGE (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.state_file = root / ".fake-apolo" / "state.json"
        self.state = (json.loads(self.state_file.read_text()) if self.state_file.is_file()
                      else {"jobs": [], "secrets": {}})

    def save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def local(self, uri: str) -> Path:
        """storage:PATH (relative to the project, or /absolute) -> DIR/PATH; a local path stays as it is."""
        if not uri.startswith("storage:"):
            return Path(uri)
        return self.root / uri[len("storage:"):].lstrip("/")

    def call(self, sub: str, args: list[str], quiet: bool) -> int:
        handler = getattr(self, "do_" + sub.replace("-", "_"), None)
        code = handler(args, quiet) if handler else 0
        self.save()
        return code

    # storage
    def do_mkdir(self, args: list[str], quiet: bool) -> int:
        for a in args:
            if not a.startswith("-"):
                self.local(a).mkdir(parents=True, exist_ok=True)
        return 0

    def do_rm(self, args: list[str], quiet: bool) -> int:
        for a in args:
            if not a.startswith("-"):
                shutil.rmtree(self.local(a), ignore_errors=True)
        return 0

    def do_cp(self, args: list[str], quiet: bool) -> int:
        excludes, target_dir, paths, i = [], None, [], 0
        while i < len(args):
            a = args[i]
            if a in ("--exclude", "--include", "--target-directory", "-t"):
                i += 1
                if a == "--exclude":
                    excludes.append(args[i])
                elif a in ("--target-directory", "-t"):
                    target_dir = args[i]
            elif not a.startswith("-"):
                paths.append(a)
            i += 1
        pairs = ([(p, f"{target_dir}/{Path(p).name}") for p in paths] if target_dir
                 else [(paths[0], paths[1])])
        for src, dst in pairs:
            s, d = self.local(src), self.local(dst)
            if not s.exists():
                print(f"ERROR: {src}: no such file or directory", file=sys.stderr)
                return 1
            if s.is_dir():
                shutil.copytree(s, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*excludes))
            else:
                d.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, d)
        return 0

    def do_secret(self, args: list[str], quiet: bool) -> int:
        if args[:1] == ["add"]:
            name, value = args[1], args[2]
            self.state["secrets"][name] = Path(value[1:]).read_text() if value.startswith("@") else value
        elif args[:1] == ["ls"]:
            for name in sorted(self.state["secrets"]):
                print(name)
        return 0

    # jobs
    def find(self, ref: str) -> dict | None:
        live = [j for j in self.state["jobs"] if ref in (j["id"], j["name"])]
        return (sorted(live, key=lambda j: j["status"] in ("running", "pending")) or [None])[-1]

    def do_run(self, args: list[str], quiet: bool) -> int:
        options, image, command = split_run(args)
        name = (options.get("--name") or [""])[-1]
        if name and any(j["name"] == name and j["status"] in ("running", "pending") for j in self.state["jobs"]):
            print(f"ERROR: a job named {name} is already running", file=sys.stderr)
            return 1
        job = {"id": f"job-{len(self.state['jobs']) + 1:04d}", "name": name, "image": image, "command": command,
               "tags": options.get("--tag", []), "restart": (options.get("--restart") or ["never"])[-1],
               "detach": "--detach" in options, "status": "running", "exit_code": None, "runs": 0, "log": ""}
        self.state["jobs"].append(job)
        print(f"Job ID: {job['id']} Status: pending")
        programs = {p for p in os.environ.get("FAKE_APOLO_EXECUTE", "").split(",") if p}
        if not command or command[0] not in programs:
            return 0
        mounts = []
        for spec in options.get("--volume", []):
            remote, mount = spec.rsplit(":", 2)[:2] if spec.count(":") >= 3 else spec.rsplit(":", 1)
            mounts.append((mount, str(self.local(remote))))
            self.local(remote).mkdir(parents=True, exist_ok=True)
        mounts.sort(key=lambda m: -len(m[0]))

        def mapped(text: str) -> str:  # a mount path (not a longer name starting with it) -> its storage folder
            for mount, local in mounts:
                text = re.sub(re.escape(mount) + r"(?=/|$|[\s'\";:])", lambda _: local, text)
            return text

        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        for k in [k for k in env if k.startswith(("FAKE_APOLO", "KAGGLE_"))]:
            env.pop(k)
        for item in options.get("--env", []):
            key, value = item.split("=", 1)
            if value.startswith("secret:"):
                if value[7:] not in self.state["secrets"]:
                    job.update(status="failed", exit_code=127, log=f"secret {value[7:]} not found\n")
                    print(job["log"], end="", file=sys.stderr)
                    return 0 if job["detach"] else 127
                value = self.state["secrets"][value[7:]]
            env[key] = mapped(value)
        if os.environ.get("FAKE_APOLO_PYTHONPATH"):
            first = os.environ["FAKE_APOLO_PYTHONPATH"]
            env["PYTHONPATH"] = os.pathsep.join(p for p in (first, env.get("PYTHONPATH")) if p)
        workdir = mapped((options.get("--workdir") or [str(self.root)])[-1])
        if not Path(workdir).is_dir():
            workdir = str(self.root / ".fake-apolo" / "workdir")
            Path(workdir).mkdir(parents=True, exist_ok=True)
        max_restarts = int(os.environ.get("FAKE_APOLO_MAX_RESTARTS", "3"))
        while True:
            proc = subprocess.run([mapped(a) for a in command], env=env, cwd=workdir, capture_output=True, text=True)
            job["runs"] += 1
            job["log"] += proc.stdout + proc.stderr
            restarts = job["restart"] == "always" or (job["restart"] == "on-failure" and proc.returncode != 0)
            if not restarts or job["runs"] > max_restarts:
                break
        job.update(status="succeeded" if proc.returncode == 0 else "failed", exit_code=proc.returncode)
        if job["detach"]:
            return 0
        print(job["log"], end="")
        return proc.returncode

    def do_ps(self, args: list[str], quiet: bool) -> int:
        tags = [args[i + 1] for i, a in enumerate(args) if a == "--tag"]
        for j in self.state["jobs"]:
            if j["status"] in ("running", "pending") and all(t in j["tags"] for t in tags):
                print(j["id"] if quiet else f"  {j['id']}  {j['name']}  {j['status']}")
        return 0

    def do_kill(self, args: list[str], quiet: bool) -> int:
        code = 0
        for ref in args:
            job = self.find(ref)
            if job is None:
                print(f"ERROR: job {ref} not found", file=sys.stderr)
                code = 1
            elif job["status"] in ("running", "pending"):
                job["status"] = "cancelled"
            print(ref)
        return code

    def do_logs(self, args: list[str], quiet: bool) -> int:
        job = self.find(args[-1])
        print(job["log"] if job else "", end="")
        return 0 if job else 1


if __name__ == "__main__":
    sys.exit(main())
