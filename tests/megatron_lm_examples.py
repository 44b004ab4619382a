"""The flags of Megatron-LM's own dense-model example scripts, and the check that pretrain_diffusion.py takes
each one: parsed (honoured or accepted as descriptive) or refused by name, never "unrecognized arguments".

`script_argv(text)` reads one example script (bash) the way bash would run it, as far as these scripts go:
the arrays named after `pretrain_gpt.py` on its launch line, expanded in the order they are built (`NAME=(...)`,
`NAME+=(...)`, `"${OTHER[@]}"` inside), every branch of an `if` taken (mock and real data, FSDP, profiling),
comments dropped, `$VAR` / `${VAR:-default}` resolved from the script's assignments (a positional argument's
default where it has one), quoted words split as the unquoted `${ARRAY[@]}` splits them.

`verdicts(argv)` parses a command line with `parse_config`; a refusal must name one of the command line's
flags at the start of its message (`--flag: why`, `--flag value: why`), and that flag is then dropped and the
rest parsed again, until what is left parses.

Run as a script to regenerate the checked-in list from a Megatron-LM git directory (the tags of the supported
megatron-core releases):

    python -m tests.megatron_lm_examples /path/to/Megatron-LM/.git > tests/assets/megatron_lm_example_flags.txt
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

# Megatron-LM's example scripts that train a dense GPT-style model (pretrain_gpt.py).  Not here: BERT, T5,
# Mixtral, gpt-oss and DeepSeek (MoE), Mamba (hybrid), multimodal/MIMO, RL, post-training (modelopt),
# inference servers, the academic papers' scripts (pre-mcore flags).
DENSE_EXAMPLES = ("examples/gpt3/*.sh", "examples/llama/*.sh", "examples/megatron_fsdp/train_llama3_*.sh")
# The releases the project supports (megatron-core 0.16.x to 0.19.x): Megatron-LM's tags for them.
SUPPORTED_TAGS = re.compile(r"^core_v0\.(1[6-9])\.\d+$")

_ASSIGN = re.compile(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=(?!\()(.*)$")
_ARRAY = re.compile(r"^\s*([A-Za-z_]\w*)(\+?)=\((.*)$")
_EXPAND = re.compile(r"^\$\{(\w+)\[@\]\}$")
_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")
_LAUNCH = ("pretrain_gpt.py", "$PRETRAIN_SCRIPT_PATH", "${PRETRAIN_SCRIPT_PATH}")


def _words(line: str) -> list[str]:
    return shlex.split(line, comments=True, posix=True)


def _assignments(lines: list[str]) -> dict[str, str]:
    """The script's scalar variables: `NAME=value`, `NAME=${NAME:-default}` (the default), `NAME=${1:-x}`."""
    values: dict[str, str] = {}
    for line in lines:
        m = _ASSIGN.match(line)
        if not m:
            continue
        try:
            words = _words(m.group(2))
        except ValueError:
            continue
        raw = words[0] if words else ""
        d = re.fullmatch(r"\$\{\w+:-(.*)\}", raw)
        if d:
            raw = d.group(1).strip("\"'")
        if "$" not in raw or d:
            values[m.group(1)] = raw
    return values


def _substitute(word: str, values: dict[str, str]) -> str:
    def one(m):
        name = m.group(1) or m.group(3)
        if name in values:
            return values[name]
        return m.group(2).strip("\"'") if m.group(2) is not None else f"<{name}>"

    return _VAR.sub(one, word)


def script_argv(text: str) -> list[str]:
    """The command line an example script gives pretrain_gpt.py (every branch taken)."""
    text = text.replace("\\\n", " ")
    lines = text.splitlines()
    values = _assignments(lines)
    arrays: dict[str, list[str]] = {}
    launch: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _ARRAY.match(line)
        if m:
            name, append, body = m.group(1), m.group(2), m.group(3)
            items: list[str] = []
            while True:  # the array runs to the line whose words end with ")"
                stripped = body.split(" #")[0].rstrip() if not body.lstrip().startswith("#") else ""
                closing = stripped.endswith(")") and not stripped.endswith("[@]})")
                if stripped.endswith("[@]})") or closing:
                    stripped = stripped[:-1]
                    closing = True
                for word in _words(stripped):
                    e = _EXPAND.match(word)
                    if e:
                        items += arrays.get(e.group(1), [])
                    else:  # the unquoted ${ARRAY[@]} of the launch line splits quoted words at spaces
                        items += [w.strip("'\"") for w in _substitute(word, values).split()]
                if closing:
                    break
                i += 1
                body = lines[i]
            arrays[name] = (arrays.get(name, []) if append else []) + items
        elif any(token in line for token in _LAUNCH) and not line.lstrip().startswith(("#", "echo", "if", "PRETRAIN")):
            words = _words(line)
            start = next(k for k, w in enumerate(words) if any(w.endswith(t) for t in _LAUNCH))
            launch = words[start + 1:]
        i += 1
    argv: list[str] = []
    for word in launch:
        e = _EXPAND.match(word)
        argv += arrays.get(e.group(1), []) if e else [_substitute(word, values)]
    return argv


def flag_groups(argv: list[str]) -> list[tuple[str, list[str]]]:
    """(flag, its values) in command-line order."""
    groups: list[tuple[str, list[str]]] = []
    for word in argv:
        if word.startswith("--"):
            groups.append((word, []))
        elif groups:
            groups[-1][1].append(word)
    return groups


def _parse(argv: list[str]) -> str | None:
    """None when `argv` parses; else the error message (argparse's last stderr line, without the prefix)."""
    from megatron_dataeff.arguments import parse_config

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_config(argv)
    except SystemExit as exc:
        if exc.code != 2:
            raise
        last = err.getvalue().strip().splitlines()[-1]
        return last.split("error: ", 1)[1] if "error: " in last else last
    return None


def verdicts(argv: list[str]) -> dict[str, str]:
    """flag -> "parsed", or the refusal naming it.  Raises AssertionError where a flag is not recognised or a
    refusal names none of the command line's flags."""
    from megatron_dataeff.arguments import build_parser

    groups = flag_groups(argv)
    known = build_parser()._option_string_actions  # exact names: argparse would also take an abbreviation
    unknown = sorted({flag for flag, _ in groups} - set(known))
    assert not unknown, f"not flags of pretrain_diffusion.py (unrecognized, or taken as an abbreviation): {unknown}"
    result: dict[str, str] = {}
    while True:
        message = _parse([w for flag, vals in groups for w in (flag, *vals)])
        if message is None:
            result.update({flag: "parsed" for flag, _ in groups})
            return result
        assert "unrecognized arguments" not in message and "ambiguous option" not in message, message
        named = [flag for flag, _ in groups if re.match(re.escape(flag) + r"(?=[ :])", message)]
        assert named, f"a refusal that names none of the flags {[f for f, _ in groups]}: {message}"
        assert not message.startswith("argument "), f"argparse's own refusal, not ours: {message}"
        result[named[0]] = message
        groups = [(flag, vals) for flag, vals in groups if flag != named[0]]


# The checked-in list: one line per flag and value, `--flag value ...  # script@tags script@tags ...`.

def read_list(path: Path) -> dict[str, list[str]]:
    """The command line of each script version (`script@tags`) in the checked-in list."""
    argv: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        words, versions = line.split("  # ", 1)
        for version in versions.split():
            argv.setdefault(version, []).extend(shlex.split(words))
    return argv


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True,
                          text=True).stdout


def collect(git_dir: str) -> str:
    """The checked-in list's text, from the supported tags of a Megatron-LM git directory."""
    tags = sorted((t for t in _git(git_dir, "tag").split() if SUPPORTED_TAGS.match(t)),
                  key=lambda t: tuple(int(x) for x in t[6:].split(".")))
    blobs: dict[str, list[tuple[str, str]]] = {}  # script -> [(tag, blob)]
    for tag in tags:
        for path in _git(git_dir, "ls-tree", "-r", "--name-only", tag, "examples").split():
            if any(Path(path).match(p) for p in DENSE_EXAMPLES):
                blobs.setdefault(path, []).append((tag, _git(git_dir, "rev-parse", f"{tag}:{path}").strip()))
    lines: dict[str, list[str]] = {}  # "--flag value" -> versions
    for path, seen in sorted(blobs.items()):
        runs: list[list[tuple[str, str]]] = []  # consecutive tags with the same file
        for tag, blob in seen:
            if runs and runs[-1][-1][1] == blob:
                runs[-1].append((tag, blob))
            else:
                runs.append([(tag, blob)])
        for run in runs:
            version = f"{path[len('examples/'):]}@{run[0][0]}" + (f"..{run[-1][0]}" if len(run) > 1 else "")
            for flag, vals in flag_groups(script_argv(_git(git_dir, "cat-file", "-p", run[0][1]))):
                versions = lines.setdefault(shlex.join([flag, *vals]), [])
                if version not in versions:
                    versions.append(version)
    header = (f"# Flags of Megatron-LM's dense-model example scripts ({', '.join(DENSE_EXAMPLES)}) at tags "
              f"{tags[0]}..{tags[-1]}, as tests/megatron_lm_examples.py reads them (every branch taken).\n"
              "# One line per flag and value: the flag, its value, and the script versions (path@first..last tag\n"
              "# with that file) whose command line has it.  Regenerate with:\n"
              "#   python -m tests.megatron_lm_examples /path/to/Megatron-LM/.git "
              "> tests/assets/megatron_lm_example_flags.txt\n")
    return header + "".join(f"{words}  # {' '.join(versions)}\n"
                            for words, versions in sorted(lines.items(), key=lambda kv: kv[0]))


if __name__ == "__main__":
    sys.stdout.write(collect(sys.argv[1]))
