"""Merging vLLM arguments from several layers into one argv, each flag once. Pure: no I/O.

KServe appends the runtime's args, then the InferenceService's; its multi-node script appended those
to its own flags. A flag given twice (`--port` by the runtime, again by the user) crashed strict
launchers (KServe #3453, #4584), and `--tensor_parallel_size` was silently dropped by a parser that
only knew the hyphen form. Here every layer is parsed into :class:`Flag` values compared in canonical
form, later occurrences replace earlier ones, and the result names each flag exactly once.

Canonical form:
- `--max_model_len` and `--max-model-len` are one flag (vLLM normalises `_` to `-` as well);
- `--port=9000` and `--port 9000` are one value;
- `-tp`, `-pp`, `-dp`, `-q` are vLLM's short names of long flags;
- `--no-x` is the negation of `--x`: whichever comes last wins;
- KServe's names map to vLLM's: `--model_name` is `--served-model-name`, `--http_port` is `--port`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from localmodel.errors import InvalidInput

# vLLM's short options and KServe's names, to the vLLM long flag they mean.
ALIASES: Mapping[str, str] = {
    "-tp": "--tensor-parallel-size",
    "-pp": "--pipeline-parallel-size",
    "-dp": "--data-parallel-size",
    "-q": "--quantization",
    # The short names written with two dashes: vLLM would refuse them minutes later, after the plan
    # took the default; they can only mean the short names.
    "--tp": "--tensor-parallel-size",
    "--pp": "--pipeline-parallel-size",
    "--dp": "--data-parallel-size",
    "--model-name": "--served-model-name",
    "--http-port": "--port",
}

# Flags that never take a value. Only needed to tell `--enforce-eager VALUE-LOOKING-TOKEN` apart; a
# flag followed by another flag is recognised as valueless without this list.
BOOLEAN_FLAGS = frozenset(
    {
        "--async-scheduling",
        "--calculate-kv-scales",
        "--disable-async-output-proc",
        "--disable-cascade-attn",
        "--disable-custom-all-reduce",
        "--disable-fastapi-docs",
        "--disable-frontend-multiprocessing",
        "--disable-log-requests",
        "--disable-log-stats",
        "--disable-sliding-window",
        "--disable-uvicorn-access-log",
        "--enable-auto-tool-choice",
        "--enable-chunked-prefill",
        "--enable-eplb",
        "--enable-expert-parallel",
        "--enable-force-include-usage",
        "--enable-log-outputs",
        "--enable-log-requests",
        "--enable-lora",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--enable-request-id-headers",
        "--enable-server-load-tracking",
        "--enable-sleep-mode",
        "--enable-tokenizer-info-endpoint",
        "--enforce-eager",
        "--fully-sharded-loras",
        "--headless",
        "--return-tokens-as-token-ids",
        "--skip-tokenizer-init",
        "--trust-remote-code",
        "--use-tqdm-on-load",
        # KServe huggingfaceserver's store_true switches (runtime/kserve.py; its --enable_docs_url and
        # --enable_grpc take a value: `--enable_docs_url true`)
        "--disable-lower-case",
        "--disable-special-tokens",
        "--enable-predictor-health-check",
        "--return-offsets-mapping",
        "--return-probabilities",
        "--return-raw-logits",
        "--return-token-type-ids",
        "--use-id2label",
        "--v2-tensors",
    }
)


# vLLM flags whose default is not "off" (None = decided by the engine, or True): `--x=false` has to
# reach vLLM as `--no-x` (its BooleanOptionalAction form). Every other switch is off by default, and
# an off switch is left out of the argv: some of vLLM's switches are plain store_true and refuse `--no-x`.
DEFAULT_NOT_OFF = frozenset(
    {"--enable-prefix-caching", "--enable-chunked-prefill", "--async-scheduling", "--use-tqdm-on-load"}
)
# Two spellings of one switch, the second the first's opposite: `--disable-log-requests` is
# `--enable-log-requests` off (vLLM deprecated the former for the latter), so whichever comes last wins.
OPPOSITES: Mapping[str, str] = {"--disable-log-requests": "--enable-log-requests"}

# KServe's strtobool (python/kserve/kserve/utils/utils.py, distutils' rule): case-insensitive.
_TRUE_WORDS = frozenset({"y", "yes", "t", "true", "on", "1"})
_FALSE_WORDS = frozenset({"n", "no", "f", "false", "off", "0"})


def strtobool(value: str, flag: str) -> bool:
    """A boolean flag's value read as KServe's ``strtobool`` reads it (y/yes/t/true/on/1 and
    n/no/f/false/off/0, any case); anything else is InvalidInput naming ``flag``."""
    word = value.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise InvalidInput(f"{flag}={value!r}: expected true or false (yes/no, 1/0, on/off)")


@dataclass(frozen=True)
class Flag:
    """One flag in canonical form. ``key`` is the positive long name (``--max-model-len``) or, for a
    single-dash option this module does not know, the option as written up to any ``=``."""

    key: str
    values: tuple[str, ...] = ()
    negated: bool = False

    def tokens(self) -> list[str]:
        if self.negated:
            # A switch off by default is off when left out; vLLM refuses `--no-x` for its store_true ones.
            if self.key in BOOLEAN_FLAGS and self.key not in DEFAULT_NOT_OFF:
                return []
            return ["--no-" + self.key[2:]]
        if self.key == "-O" and len(self.values) == 1:
            # vLLM's optimisation shorthand is written attached (-O3); `-O 3` is not read the same by
            # every version.
            return ["-O" + self.values[0]]
        if len(self.values) == 1 and self.values[0].startswith("-"):
            # A value that looks like a flag (a negative number, "-1") must stay attached.
            return [f"{self.key}={self.values[0]}"]
        return [self.key, *self.values]


@dataclass(frozen=True)
class Parsed:
    flags: tuple[Flag, ...]
    positionals: tuple[str, ...]


def _is_flag(arg: str) -> bool:
    if not arg.startswith("-") or arg == "-":
        return False
    # Negative numbers are values (`--temperature -1` is not a flag named "-1").
    try:
        float(arg)
    except ValueError:
        return True
    return False


def canonical(name: str) -> tuple[str, bool]:
    """The canonical key of a flag as written (without any ``=value``) and whether it negates."""
    if name.startswith("--"):
        key = "--" + name[2:].replace("_", "-")
        negated = False
        if key.startswith("--no-") and len(key) > len("--no-"):
            key, negated = "--" + key[len("--no-") :], True
        key = ALIASES.get(key, key)
        if key in OPPOSITES:
            return OPPOSITES[key], not negated
        return key, negated
    return ALIASES.get(name, name), False


def _opposite(name: str) -> bool:
    return name.startswith("--") and "--" + name[2:].replace("_", "-") in OPPOSITES


def _split_attached(name: str) -> tuple[str, str | None]:
    # `-O3` is `-O` with the value 3 attached, as vLLM documents it.
    if name.startswith("-O") and len(name) > 2 and not name.startswith("--"):
        return "-O", name[2:].lstrip("=")
    return name, None


def parse(argv: Sequence[str]) -> Parsed:
    """Split argv into flags (with the values that follow each) and stray positionals, in order."""
    flags: list[Flag] = []
    positionals: list[str] = []
    i, n = 0, len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        if arg == "--":
            positionals.extend(argv[i:])
            break
        if not _is_flag(arg):
            positionals.append(arg)
            continue
        attached_name, attached = _split_attached(arg)
        if attached is not None:
            flags.append(Flag(attached_name, (attached,)))
            continue
        name, eq, inline = arg.partition("=")
        key, negated = canonical(name)
        if eq and key in BOOLEAN_FLAGS:
            # `--trust-remote-code=false` is the switch off, `=true` the bare switch (KServe's strtobool).
            on = strtobool(inline, name)
            if not on and _opposite(name):
                continue  # `--disable-log-requests=false`: as if not given
            flags.append(Flag(key, (), negated == on))
            continue
        if eq:
            flags.append(Flag(key, () if negated else (inline,), negated))
            continue
        values: list[str] = []
        if not negated and key not in BOOLEAN_FLAGS:
            # vLLM has nargs="+" flags (--served-model-name a b): take every value up to the next flag.
            while i < n and not _is_flag(argv[i]) and argv[i] != "--":
                values.append(argv[i])
                i += 1
        flags.append(Flag(key, tuple(values), negated))
    return Parsed(tuple(flags), tuple(positionals))


def merge(*layers: Iterable[Flag]) -> tuple[Flag, ...]:
    """Layers from lowest to highest precedence; the last occurrence of each key wins. A key keeps
    the position of its first occurrence so the lowest layer's flags read first."""
    last: dict[str, Flag] = {}
    for layer in layers:
        for flag in layer:
            last[flag.key] = flag
    # dict preserves first insertion order even when a value is replaced.
    return tuple(last.values())


def to_argv(flags: Iterable[Flag]) -> list[str]:
    return [token for flag in flags for token in flag.tokens()]


def merge_argv(*layers: Sequence[str]) -> list[str]:
    """Merge argv layers (lowest first) into one argv; positionals are kept in order, first."""
    parsed = [parse(layer) for layer in layers]
    positionals = [p for layer in parsed for p in layer.positionals]
    return positionals + to_argv(merge(*(p.flags for p in parsed)))


def find(flags: Iterable[Flag], key: str) -> Flag | None:
    """The flag with this key (given in any spelling), or None."""
    want, _ = canonical(key.partition("=")[0])
    return next((f for f in flags if f.key == want), None)


def value(flags: Iterable[Flag], key: str) -> str | None:
    """The single value of a flag, or None when it is absent, negated or valueless."""
    flag = find(flags, key)
    if flag is None or flag.negated or not flag.values:
        return None
    return flag.values[-1]


def switch(flags: Iterable[Flag], key: str) -> bool:
    """Whether a switch is on: given, and its last word not ``--no-...``."""
    found = find(flags, key)
    return found is not None and not found.negated


def without(flags: Iterable[Flag], *keys: str) -> tuple[Flag, ...]:
    drop = {canonical(k)[0] for k in keys}
    return tuple(f for f in flags if f.key not in drop)


def flag(key: str, *values: object) -> Flag:
    """A flag in canonical form from a name in any spelling (``flag("-tp", 8)``)."""
    canon, negated = canonical(key)
    return Flag(canon, () if negated else tuple(str(v) for v in values), negated)


# The flags the launcher itself reads to plan: a misspelling of one passes through to vLLM unread
# (and vLLM then refuses it, minutes later), while the plan silently takes the default.
PLANNED_FLAGS = (
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--data-parallel-size",
    "--distributed-executor-backend",
    "--dtype",
    "--quantization",
    "--task",
    "--served-model-name",
    "--port",
    "--tokenizer",
)


def near_misses(flags: Iterable[Flag], known: Iterable[str] = PLANNED_FLAGS) -> tuple[tuple[str, str], ...]:
    """(flag as given, the known flag it is close to) for each flag that is not a known one but
    within a typo of it (difflib ratio ≥ 0.85: ``--tensor-paralel-size`` → ``--tensor-parallel-size``)."""
    known = tuple(known)
    found = []
    for f in flags:
        if f.key in known:
            continue
        close = difflib.get_close_matches(f.key, known, n=1, cutoff=0.85)
        if close:
            found.append((f.key, close[0]))
    return tuple(found)


# vLLM's own flags that are a prefix of, or a typo away from, one of the launcher's: never a near miss.
VLLM_FLAGS_NEAR_LAUNCHER = frozenset({"--model", "--nnodes", "--node-rank", "--download-dir"})


def launcher_near_misses(flags: Iterable[Flag], launcher: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(flag as given, the launcher flag meant) for each flag left to vLLM that is a typo of one of
    the launcher's own flags (difflib ratio ≥ 0.85) or the start of one (``--dry`` for ``--dry-run``,
    ``--model_d`` for ``--model_dir``), except vLLM's flags that look so
    (:data:`VLLM_FLAGS_NEAR_LAUNCHER`). Such a flag would reach vLLM while the launcher took its
    default: a misspelt ``--dry-run`` would start the server."""
    names = sorted({"--" + n[2:].replace("_", "-") for n in launcher if n.startswith("--")})
    found = []
    for f in flags:
        if f.key in names or f.key in VLLM_FLAGS_NEAR_LAUNCHER or f.key in ALIASES.values():
            continue
        starts = sorted(n for n in names if n.startswith(f.key) and len(f.key) > len("--"))
        close = starts or difflib.get_close_matches(f.key, names, n=1, cutoff=0.85)
        if close:
            found.append((f.key, close[0]))
    return tuple(found)


# A flag or environment variable whose name has one of these words (split at - and _) holds a secret:
# `--api-key`, `--hf-token`, `--client-secret`, `HF_TOKEN`, `VLLM_API_KEY`. (`--max-num-batched-tokens`
# and `--tokenizer` do not: the word must stand alone.)
_SECRET_NAME = re.compile(
    r"(?:^|[-_])(?:api[-_]?key|key|token|secret|password|passwd|passphrase|credentials?|auth)(?:$|[-_])",
    re.IGNORECASE,
)
REDACTED = "***"


def is_secret(name: str) -> bool:
    """Whether a flag (``--api-key``) or environment variable (``HF_TOKEN``) names a secret."""
    return bool(_SECRET_NAME.search(name.lstrip("-").partition("=")[0]))


def secret_values(flags: Iterable[Flag]) -> tuple[str, ...]:
    """The values of the secret flags among ``flags`` (to be kept out of every log line)."""
    return tuple(v for f in flags if is_secret(f.key) and f.key not in BOOLEAN_FLAGS for v in f.values if v)


def redact_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with the value of every secret flag replaced by ``***`` (``--api-key=***``,
    ``--hf-token ***``), for logs and the dry run; the argv exec'd keeps them."""
    out: list[str] = []
    hide = False
    for token in argv:
        if _is_flag(token):
            name, eq, _ = token.partition("=")
            secret = is_secret(name) and canonical(name)[0] not in BOOLEAN_FLAGS
            out.append(f"{name}={REDACTED}" if secret and eq else token)
            hide = secret and not eq
        elif hide:
            out.append(REDACTED)
        else:
            out.append(token)
    return out


def redact_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: REDACTED if is_secret(k) else v for k, v in env.items()}


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***`` (longest first)."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text
