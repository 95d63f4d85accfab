"""scripts/gpu_check.sh runs only on a lent GPU machine, minutes at a time: an option a command in it
no longer takes would spend that time on a usage error. Every command it runs is parsed here."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from clfpipe.cli import build_parser
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _commands() -> list[list[str]]:
    """Each `check NAME SECONDS COMMAND...` line's command (python3 or "$py" onwards), continuation lines joined, shell values
    replaced by a word (a ${VAR:-default} by its default)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        match = re.search(r"\bcheck \S+ .*?((?:python3|\"\$py\") .*)", line)
        if match:
            words = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", match.group(1))
            words = words.replace('"${overrides[@]}"', "")
            commands.append([re.sub(r"\$\{?\w+\}?", "x", w) for w in shlex.split(words)])
    return commands


def test_the_script_is_valid_bash_and_runs_the_checks_it_names():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert len(_commands()) >= 12


def test_every_clfpipe_command_in_it_parses():
    runs = [c[c.index("clfpipe") + 1:] for c in _commands() if c[:3] == ["python3", "-m", "clfpipe"]]
    assert {"demo", "export", "verify", "train"} <= {argv[1] if argv[0] == "-v" else argv[0] for argv in runs}
    for argv in runs:
        try:
            build_parser().parse_args(argv)
        except SystemExit:  # argparse's exit on an unknown option or value (its message is on stderr)
            pytest.fail(f"clfpipe {' '.join(argv)}: does not parse")


BENCHMARKS = sorted({re.search(r"benchmarks/(\w+)\.py", " ".join(c)).group(1) for c in _commands()
                     if re.search(r"benchmarks/\w+\.py", " ".join(c))})


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_option_in_it_exists(name):
    flags = {w.split("=")[0] for c in _commands() if f"benchmarks/{name}.py" in " ".join(c) for w in c if w.startswith("--")}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    unknown = [flag for flag in sorted(flags) if not re.search(rf"{re.escape(flag)}\b", done.stdout)]
    assert not unknown, f"{name}.py takes no {unknown}"
