"""``parse_size`` / ``format_size``: the one size parser of the config plane."""

from __future__ import annotations

import pytest

from pdfabric.units import format_size, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


# ------------------------------------------------------------------ parse_size: units


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1KiB", KiB),
        ("256KiB", 256 * KiB),
        ("4MiB", 4 * MiB),
        ("4GiB", 4 * GiB),
        ("2TiB", 2 * TiB),
    ],
)
def test_binary_units_are_powers_of_1024(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1KB", 1000),
        ("1K", 1000),
        ("64MB", 64_000_000),
        ("64M", 64_000_000),
        ("4GB", 4_000_000_000),
        ("4G", 4_000_000_000),
        ("1TB", 10**12),
        ("1T", 10**12),
    ],
)
def test_decimal_units_are_powers_of_1000(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_binary_and_decimal_differ() -> None:
    assert parse_size("1GiB") - parse_size("1GB") == GiB - 10**9


@pytest.mark.parametrize("text", ["4gib", "4GIB", "4GiB", "4gIb"])
def test_units_are_case_insensitive(text: str) -> None:
    assert parse_size(text) == 4 * GiB


@pytest.mark.parametrize(("text", "expected"), [("0", 0), ("17", 17), ("17B", 17), ("17b", 17)])
def test_bare_numbers_and_b_are_bytes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("value", [0, 1, 4096, 2**40])
def test_ints_pass_through(value: int) -> None:
    result = parse_size(value)
    assert result == value
    assert type(result) is int


@pytest.mark.parametrize("text", ["256 KiB", " 256KiB", "256KiB ", "  256 \t KiB\n", "\t256KiB\t"])
def test_whitespace_around_and_between_is_allowed(text: str) -> None:
    assert parse_size(text) == 256 * KiB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1.5MB", 1_500_000),
        ("1.5KiB", 1536),
        ("0.5GiB", GiB // 2),
        ("0.25MiB", MiB // 4),
        ("2.0KiB", 2048),
        ("0.001KB", 1),
    ],
)
def test_fractions_that_are_whole_bytes(text: str, expected: int) -> None:
    result = parse_size(text)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4.1MB", 4_100_000), ("8.2MB", 8_200_000), ("8.3GB", 8_300_000_000)],
)
def test_decimal_fraction_that_is_whole_bytes_is_exact(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_large_byte_count_string_is_exact() -> None:
    assert parse_size(str(2**53 + 1)) == 2**53 + 1


# ------------------------------------------------------------------ parse_size: bad input


def test_fraction_that_is_not_whole_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="whole number of bytes") as info:
        parse_size("1.5B")
    assert "'1.5B'" in str(info.value)


@pytest.mark.parametrize("text", ["0.1KiB", "1.0000001KB"])
def test_other_fractional_byte_counts_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="whole number of bytes"):
        parse_size(text)


@pytest.mark.parametrize(
    "text",
    ["4 gigs", "", "   ", "GiB", "4 GiB GiB", "-1", "-4GiB", "4XiB", "1e3", ".5KiB", "4,096", "0x10"],
)
def test_malformed_strings_name_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    msg = str(info.value)
    assert "'4GiB'" in msg
    assert "byte count" in msg
    assert repr(text) in msg


@pytest.mark.parametrize("value", [True, False])
def test_bools_are_refused_not_taken_as_0_or_1(value: bool) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert "'4GiB'" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [None, 4.0, b"4GiB", ["4GiB"]])
def test_non_str_non_int_is_refused_naming_the_accepted_forms(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "'4GiB'" in msg
    assert type(value).__name__ in msg


def test_negative_int_is_refused() -> None:
    with pytest.raises(ValueError, match="non-negative") as info:
        parse_size(-1)
    assert "-1" in str(info.value)


@pytest.mark.parametrize("value", [-1, "1.5B"])
def test_every_refusal_names_the_accepted_forms(value: object) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)  # type: ignore[arg-type]
    assert "'4GiB'" in str(info.value)


# ------------------------------------------------------------------ format_size


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0B"),
        (1, "1B"),
        (1023, "1023B"),
        (KiB, "1KiB"),
        (1536, "1.5KiB"),
        (1025 * KiB, "1025KiB"),
        (4 * MiB, "4MiB"),
        (3 * GiB, "3GiB"),
        (GiB + 1, "1.0GiB"),
        (TiB, "1024GiB"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


@pytest.mark.parametrize("n", [0, 1, 999, KiB, 1536, 3 * MiB, 5 * GiB, MiB + KiB])
def test_format_then_parse_round_trips_exact_values(n: int) -> None:
    assert parse_size(format_size(n)) == n
