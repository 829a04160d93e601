"""The argument merge: canonical forms, last occurrence wins, each flag once (KServe #3453, #4584)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localmodel.errors import InvalidInput
from runtime.args import (
    Flag,
    find,
    flag,
    is_secret,
    merge_argv,
    near_misses,
    parse,
    redact,
    redact_argv,
    secret_values,
    to_argv,
    value,
    without,
)


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        # KServe's bug: the runtime's --port and the service's --port both reached the server.
        ([["--port", "8080"], ["--port", "9000"]], ["--port", "9000"]),
        ([["--port=8080"], ["--port", "9000"]], ["--port", "9000"]),
        ([["--max_model_len", "4096"], ["--max-model-len=8192"]], ["--max-model-len", "8192"]),
        ([["-tp", "8"], ["--tensor_parallel_size=4"]], ["--tensor-parallel-size", "4"]),
        ([["--tensor-parallel-size", "4"], ["-tp=2"]], ["--tensor-parallel-size", "2"]),
        ([["-pp", "2"]], ["--pipeline-parallel-size", "2"]),
        ([["-q", "fp8"]], ["--quantization", "fp8"]),
        # KServe's names become vLLM's.
        ([["--served-model-name", "model"], ["--model_name=llama"]], ["--served-model-name", "llama"]),
        ([["--port", "8080"], ["--http_port", "7000"]], ["--port", "7000"]),
        # --no-x undoes --x, and the other way round: the last one wins.
        ([["--enable-prefix-caching"], ["--no-enable-prefix-caching"]], ["--no-enable-prefix-caching"]),
        ([["--no_enable_prefix_caching"], ["--enable-prefix-caching"]], ["--enable-prefix-caching"]),
        # An off-by-default switch turned off is left out (vLLM refuses --no-x for its store_true ones).
        ([["--enforce-eager", "--trust-remote-code"], ["--no-enforce-eager"]], ["--trust-remote-code"]),
        # nargs="+" values are kept together, and replaced together.
        (
            [["--served-model-name", "a", "b"], ["--port", "1"]],
            ["--served-model-name", "a", "b", "--port", "1"],
        ),
        ([["--served-model-name", "a", "b"], ["--served-model-name", "c"]], ["--served-model-name", "c"]),
        # A value that looks like a flag stays attached; negative numbers are values.
        ([["--seed", "-1"]], ["--seed=-1"]),
        ([["--seed=-5"], ["--seed", "3"]], ["--seed", "3"]),
        # JSON values and values with '=' survive.
        ([['--hf-overrides={"a": 1}']], ["--hf-overrides", '{"a": 1}']),
        ([["--lora-modules", "x=/p/x", "y=/p/y"]], ["--lora-modules", "x=/p/x", "y=/p/y"]),
        # vLLM's attached optimisation level.
        ([["-O3"], ["-O2"]], ["-O2"]),
        ([["-O", "1"]], ["-O1"]),
        # Order: a flag keeps the place of its first occurrence.
        ([["--a", "1", "--b", "2"], ["--a", "3"]], ["--a", "3", "--b", "2"]),
        ([[], []], []),
    ],
)
def test_merge_table(layers: list[list[str]], expected: list[str]) -> None:
    assert merge_argv(*layers) == expected


def test_each_flag_once_whatever_the_spelling() -> None:
    out = merge_argv(
        ["--port", "8080", "--served-model-name", "model", "--tensor-parallel-size", "1"],
        ["--tensor_parallel_size=2"],
        [
            "--http_port=9000",
            "-tp",
            "8",
            "--model_name",
            "llama",
            "--port",
            "9001",
            "--max_model_len",
            "4096",
        ],
    )
    assert out == [
        "--port",
        "9001",
        "--served-model-name",
        "llama",
        "--tensor-parallel-size",
        "8",
        "--max-model-len",
        "4096",
    ]
    keys = [t for t in out if t.startswith("--")]
    assert len(keys) == len(set(keys))


def test_boolean_flag_followed_by_a_positional_does_not_eat_it() -> None:
    parsed = parse(["--enforce-eager", "stray", "--dtype", "half"])
    assert parsed.flags == (Flag("--enforce-eager"), Flag("--dtype", ("half",)))
    assert parsed.positionals == ("stray",)


def test_unknown_flag_followed_by_a_flag_is_valueless() -> None:
    parsed = parse(["--some-new-switch", "--port", "1"])
    assert parsed.flags == (Flag("--some-new-switch"), Flag("--port", ("1",)))


def test_double_dash_ends_flags() -> None:
    parsed = parse(["--port", "1", "--", "--not-a-flag"])
    assert parsed.positionals == ("--not-a-flag",)


def test_helpers() -> None:
    flags = parse(["--max_model_len", "4096", "--no-enforce-eager", "-tp", "2"]).flags
    assert find(flags, "--max-model-len") == Flag("--max-model-len", ("4096",))
    assert value(flags, "--tensor_parallel_size") == "2"
    assert value(flags, "--enforce-eager") is None  # negated
    assert value(flags, "--port") is None
    assert [f.key for f in without(flags, "-tp", "--max_model_len")] == ["--enforce-eager"]
    assert flag("-tp", 8) == Flag("--tensor-parallel-size", ("8",))
    assert flag("--no-enforce-eager") == Flag("--enforce-eager", (), True)
    assert to_argv([flag("--http_port", 1)]) == ["--port", "1"]


# --- properties -------------------------------------------------------------------------------------

VALUE_KEYS = ["max-model-len", "port", "served-model-name", "dtype", "tensor-parallel-size", "seed"]
BOOL_KEYS = ["enable-prefix-caching", "enforce-eager", "trust-remote-code"]
values = st.one_of(
    st.integers(-5, 100_000).map(str),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789./:", min_size=1, max_size=8),
)


@st.composite
def occurrences(draw: st.DrawFn) -> list[str]:
    """One flag occurrence in some spelling vLLM and KServe users write."""
    if draw(st.booleans()):
        key = draw(st.sampled_from(VALUE_KEYS))
        v = draw(values)
        name = key.replace("-", "_") if draw(st.booleans()) else key
        if key == "tensor-parallel-size" and draw(st.booleans()):
            name = "tp"
            return [f"-{name}={v}"] if draw(st.booleans()) else [f"-{name}", v]
        if draw(st.booleans()) or v.startswith("-"):
            return [f"--{name}={v}"]
        return [f"--{name}", v]
    key = draw(st.sampled_from(BOOL_KEYS))
    prefix = "no-" if draw(st.booleans()) else ""
    name = prefix + key
    return ["--" + (name.replace("-", "_") if draw(st.booleans()) else name)]


argvs = st.lists(occurrences(), max_size=12).map(lambda occ: [t for o in occ for t in o])


@given(argvs)
@settings(max_examples=300)
def test_merge_is_idempotent(argv: list[str]) -> None:
    once = merge_argv(argv)
    assert merge_argv(once) == once
    assert merge_argv(argv, argv) == once


@given(argvs, argvs, argvs)
@settings(max_examples=300)
def test_merge_respects_order(a: list[str], b: list[str], c: list[str]) -> None:
    # Layers are the command line read in order: splitting it anywhere changes nothing.
    assert merge_argv(a, b, c) == merge_argv(a + b + c) == merge_argv(a, b + c)


@given(argvs, argvs)
@settings(max_examples=300)
def test_last_occurrence_wins_and_each_flag_once(low: list[str], high: list[str]) -> None:
    out = parse(merge_argv(low, high)).flags
    keys = [f.key for f in out]
    assert len(keys) == len(set(keys))
    everything = parse(low).flags + parse(high).flags
    for f in out:
        assert f == [g for g in everything if g.key == f.key][-1]
    winners = {g.key: g for g in everything}
    # A switch that is off by default and ends off is left out of the argv (it is off either way).
    assert set(keys) == {k for k, g in winners.items() if g.tokens()}


@given(argvs)
def test_higher_layer_always_wins(argv: list[str]) -> None:
    top = ["--port", "4242", "--no-enforce-eager"]
    out = parse(merge_argv(argv, top)).flags
    assert find(out, "--port") == Flag("--port", ("4242",))
    assert find(out, "--enforce-eager") is None  # off: left out


def test_near_misses_name_the_flag_meant() -> None:
    flags = parse(["--tensor-paralel-size", "2", "--dtyp", "half", "--max-model-len", "10", "-tp", "2"]).flags
    assert near_misses(flags) == (
        ("--tensor-paralel-size", "--tensor-parallel-size"),
        ("--dtyp", "--dtype"),
    )
    # Real flags, vLLM's own or planned, are never near misses.
    assert near_misses(parse(["--enable-prefix-caching", "--pipeline_parallel_size", "2"]).flags) == ()


# -- booleans with a value, one setting under two names, secrets (issue 17 attack, items 1, 2, 11) ----


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # `=false` is the switch off, whatever the spelling; an off-by-default switch off is left out.
        (["--trust_remote_code=false"], []),
        (["--trust-remote-code=False"], []),
        (["--enforce-eager=false"], []),
        (["--enforce-eager=0", "--trust-remote-code=off"], []),
        # `=true` is the bare switch.
        (["--trust_remote_code=true"], ["--trust-remote-code"]),
        (["--enforce-eager=YES"], ["--enforce-eager"]),
        (["--return_probabilities=1"], ["--return-probabilities"]),
        # A switch vLLM turns on by default is turned off the way vLLM accepts: --no-x.
        (["--enable-prefix-caching=false"], ["--no-enable-prefix-caching"]),
        # The last one wins across both forms.
        (["--enforce-eager", "--enforce-eager=false"], []),
        (["--enforce-eager=false", "--enforce-eager"], ["--enforce-eager"]),
        # --disable-log-requests is --enable-log-requests off: one setting, the later wins.
        (["--enable-log-requests", "--disable_log_requests"], []),
        (["--disable-log-requests", "--enable-log-requests"], ["--enable-log-requests"]),
        (["--enable-log-requests", "--disable-log-requests=false"], ["--enable-log-requests"]),
    ],
)
def test_boolean_values_read_as_kserve_strtobool(argv: list[str], expected: list[str]) -> None:
    assert merge_argv(argv) == expected


@pytest.mark.parametrize("word", ["maybe", "", "2", "truee"])
def test_boolean_value_not_a_strtobool_word_is_refused_naming_the_flag(word: str) -> None:
    with pytest.raises(InvalidInput, match=r"^--trust_remote_code='.*': expected true or false"):
        parse([f"--trust_remote_code={word}"])


def test_secret_values_are_redacted_in_argv_and_text() -> None:
    argv = [
        "vllm",
        "serve",
        "/m",
        "--api-key",
        "sk-123",
        "--hf-token=hf_abc",
        "--max-num-batched-tokens",
        "8",
    ]
    assert redact_argv(argv) == [
        "vllm",
        "serve",
        "/m",
        "--api-key",
        "***",
        "--hf-token=***",
        "--max-num-batched-tokens",
        "8",
    ]
    # Flags whose name has key, token, secret or password as a word; not --tokenizer or --*-tokens.
    assert [
        n for n in ("--api-key", "--hf_token", "--client-secret", "--db-password", "HF_TOKEN") if is_secret(n)
    ]
    assert not any(is_secret(n) for n in ("--tokenizer", "--max-num-batched-tokens", "--ssl-keyfile"))
    flags = parse(["--api-key", "sk-123", "--tokenizer", "t", "--hf-token=hf_abc"]).flags
    assert secret_values(flags) == ("sk-123", "hf_abc")
    assert redact("note: --api-key sk-123 and hf_abc", secret_values(flags)) == "note: --api-key *** and ***"
