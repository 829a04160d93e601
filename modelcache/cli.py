"""The `modelcache` console command: dispatches each subcommand to the component that owns it.

Each component parses its own flags (`<component>.cli.main(argv) -> exit code`), so the runtime can
pass unknown vLLM flags through and this module stays a table. Components are imported lazily: the
agent's start-up never pays for the runtime's imports and vice versa.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from localmodel.errors import InvalidInput, ModelcacheError

# subcommand -> (module holding `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pull": ("agent.pull_cli", "download a whole model into a folder, verified and resumable"),
    "agent": ("agent.cli", "the node agent: hold the right models on this node"),
    "status": ("agent.status_cli", "what a node's cache holds and is doing"),
    "controller": ("controller.cli", "the cluster controller"),
    "serve": ("runtime.cli", "the serving launcher: plan and exec vLLM on cached weights"),
}

# Commands that set up no logging of their own: localmodel.logs.command_logging keeps their stderr ours.
PLAIN_LOGGING = ("pull", "status")

USAGE = "usage: modelcache {" + ",".join(COMMANDS) + "} [options]\n"


def _help() -> str:
    lines = [USAGE, "commands:"]
    lines += [f"  {name:<11} {text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\n`modelcache COMMAND --help` shows a command's options.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        (sys.stdout if args else sys.stderr).write(_help())
        return 0 if args else 2
    if args[0] == "--version":
        from importlib.metadata import version

        print(f"modelcache {version('modelcache')}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"modelcache: unknown command {name!r}; choose one of {', '.join(COMMANDS)}\n")
        return 2
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            sys.stderr.write(f"modelcache {name}: not implemented yet in this version\n")
            return 2
        raise
    if name in PLAIN_LOGGING:
        from localmodel.logs import command_logging

        command_logging(f"modelcache {name}")
    try:
        code: int = module.main(rest)
    except InvalidInput as e:
        sys.stderr.write(f"modelcache {name}: {e}\n")
        return 2
    except ModelcacheError as e:
        sys.stderr.write(f"modelcache {name}: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
