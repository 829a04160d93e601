"""The images' Dockerfiles, read as text (no Docker daemon): pinned bases, a multi-stage agent image
that runs as a numeric non-root user, writes no bytecode, and has `modelcache` as its entrypoint."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str


def parse(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for these files:
    no heredocs, no parser directives other than the default escape)."""
    out: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        op, _, args = text.partition(" ")
        out.append(Instruction(op.upper(), args.strip()))
    assert not pending, f"{path}: a continued line never ends"
    return out


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARGs with defaults declared before the first FROM (the ones FROM may use)."""
    args: dict[str, str] = {}
    for ins in instructions:
        if ins.op == "FROM":
            break
        if ins.op == "ARG" and "=" in ins.args:
            k, v = ins.args.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return args


def stages(instructions: list[Instruction]) -> list[tuple[str, str | None]]:
    """(image, stage name) per FROM, with ${ARG} defaults substituted."""
    args = build_args(instructions)
    out = []
    for ins in instructions:
        if ins.op != "FROM":
            continue
        words = [w for w in ins.args.split() if not w.startswith("--platform")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), words[0])
        name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
        out.append((image, name))
    return out


def pinned(image: str, names: set[str]) -> bool:
    """An earlier stage, a digest, or a tag that names a version (not `latest`, not a bare name)."""
    if image in names:
        return True
    if "@sha256:" in image:
        return True
    repo, _, tag = image.rpartition(":")
    if not repo or "/" in tag:
        return False
    return tag != "latest" and bool(re.search(r"\d", tag))


def last(instructions: list[Instruction], op: str) -> str | None:
    found = [i.args for i in instructions if i.op == op]
    return found[-1] if found else None


def env_vars(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.op == "ENV":
            for k, v in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", ins.args):
                env[k] = v.strip('"')
    return env


@pytest.mark.parametrize("name", ["Dockerfile.agent", "Dockerfile.runtime"])
def test_every_base_image_is_pinned(name: str) -> None:
    ins = parse(ROOT / name)
    found = stages(ins)
    assert found, f"{name} has no FROM"
    names = {n for _, n in found if n}
    for image, _ in found:
        assert "$" not in image, f"{name}: FROM {image} uses an ARG with no default"
        assert pinned(image, names), f"{name}: FROM {image} is not pinned to a version"


def test_parser_reads_continuations_and_refuses_floating_tags() -> None:
    assert not pinned("python:latest", set())
    assert not pinned("python", set())
    assert not pinned("registry:5000/python", set())
    assert pinned("python:3.11.11-slim-bookworm", set())
    assert pinned("python@sha256:" + "0" * 64, set())
    assert pinned("build", {"build"})


def test_agent_image_is_multi_stage_slim_non_root_with_modelcache_entrypoint() -> None:
    ins = parse(ROOT / "Dockerfile.agent")
    found = stages(ins)
    assert len(found) >= 2, "the agent image is built in stages"
    final_image, _ = found[-1]
    assert "slim" in final_image or "distroless" in final_image, final_image
    # The final stage copies the built environment from an earlier stage, not the sources.
    final_start = max(i for i, x in enumerate(ins) if x.op == "FROM")
    final = ins[final_start:]
    copies = [i.args for i in final if i.op == "COPY"]
    assert copies and all(c.startswith("--from=") for c in copies), copies
    assert not any(i.op == "RUN" and "pip install" in i.args for i in final)

    user = last(final, "USER")
    assert user is not None, "no USER in the final stage"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and not root"

    entrypoint = last(final, "ENTRYPOINT")
    assert entrypoint is not None
    assert json.loads(entrypoint) == ["modelcache"]

    env = env_vars(ins[final_start:])
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("HOME", "").startswith("/tmp"), "HOME on a writable volume for a read-only root"


def test_runtime_image_is_pinned_and_runs_the_launcher() -> None:
    ins = parse(ROOT / "Dockerfile.runtime")
    image, _ = stages(ins)[-1]
    assert image.startswith("vllm/vllm-openai:v"), image
    cmd = last(ins, "CMD")
    assert cmd is not None and json.loads(cmd)[:2] == ["modelcache", "serve"]
    assert last(ins, "ENTRYPOINT") == "[]", "vLLM's own entrypoint is cleared"


@pytest.mark.parametrize("name", ["Dockerfile.agent", "Dockerfile.runtime"])
def test_copied_paths_exist(name: str) -> None:
    for ins in parse(ROOT / name):
        if ins.op != "COPY" or ins.args.startswith("--from="):
            continue
        sources = ins.args.split()[:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist in the build context"


# -- the agent image's locked install (issue 20 §5) -------------------------------------------------

REQUIREMENTS = ROOT / "requirements"


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) of a pip-compile --generate-hashes file; fails on any entry
    that is not pinned with == or has no hash."""
    entries: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line:
            continue
        if line.startswith("--hash="):
            assert current is not None, f"{path.name}: a hash before any requirement"
            algo, _, digest = line.removeprefix("--hash=").partition(":")
            assert algo == "sha256" and re.fullmatch(r"[0-9a-f]{64}", digest), line
            entries[current][1].append(digest)
            continue
        assert not line.startswith("-"), (
            f"{path.name}: an option in the lock ({line}): pip would fetch elsewhere"
        )
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", line)
        assert m, f"{path.name}: {line!r} is not pinned with =="
        current = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        entries[current] = (m.group(2), [])
    for name, (_, hashes) in entries.items():
        assert hashes, f"{path.name}: {name} has no hash"
    return entries


def test_the_lock_covers_every_dependency_at_a_version_pyproject_allows() -> None:
    import tomllib

    from packaging.requirements import Requirement

    lock = locked(REQUIREMENTS / "agent.txt")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock, f"requirements/agent.txt lacks {req.name}: regenerate it (see its header)"
        assert req.specifier.contains(lock[name][0], prereleases=True), (
            f"requirements/agent.txt pins {name}=={lock[name][0]}, outside pyproject.toml's {req.specifier}"
        )
    build = locked(REQUIREMENTS / "build.txt")
    assert {"setuptools", "wheel"} <= build.keys()


def test_agent_image_installs_only_hashed_or_local_packages() -> None:
    """Every pip install in the image either installs a hash-locked file with --require-hashes (and
    --no-deps: nothing outside the lock) or a local wheel with --no-index; the wheel is built without
    build isolation (which would fetch setuptools unhashed) from the hash-locked build tools."""
    ins = parse(ROOT / "Dockerfile.agent")
    commands = [c.strip() for i in ins if i.op == "RUN" for c in i.args.split("&&")]
    installs = [c for c in commands if re.search(r"\bpip install\b", c)]
    assert installs
    locks = set()
    for c in installs:
        words = c.split()
        if "--require-hashes" in words:
            assert "--no-deps" in words and "-r" in words, c
            locks.add(words[words.index("-r") + 1])
        else:
            assert "--no-index" in words and "--no-deps" in words, (
                f"an install from an index without hashes: {c}"
            )
    assert locks == {"requirements/agent.txt", "requirements/build.txt"}
    wheels = [c for c in commands if re.search(r"\bpip wheel\b", c)]
    assert wheels and all("--no-build-isolation" in c and "--no-index" in c for c in wheels), wheels
    # The locks are copied into the build context the RUN sees.
    copied = {
        src for i in ins if i.op == "COPY" and not i.args.startswith("--from=") for src in i.args.split()[:-1]
    }
    assert locks <= copied
