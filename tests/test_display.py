"""How the client shows numbers and commands to a person."""

import pytest

from puller.display import command_line, human_size


@pytest.mark.parametrize("size, shown", [
    (0, "0 B"), (999, "999 B"), (1000, "1 kB"), (1084928, "1.08 MB"), (77275711, "77.3 MB"),
    (123456789, "123 MB"), (999_499, "999 kB"), (999_500, "1 MB"), (999_950_000, "1 GB"),
    (5 * 10**12, "5 TB"), (3 * 10**15, "3 PB"),
    # beyond the last unit: whole petabytes, never an exponent
    (999_600 * 10**12, "1000 PB"), (10**18, "1000 PB"), (12_345 * 10**15, "12345 PB"),
])
def test_human_size_is_decimal_with_three_significant_digits_like_docker(size, shown):
    assert human_size(size) == shown


def test_command_line_quotes_like_a_shell():
    assert command_line(["redis-server", "--save", ""]) == "redis-server --save ''"
    assert command_line(["sh", "-c", "echo $HOME > it's"]) == "sh -c 'echo $HOME > it'\"'\"'s'"
    assert command_line("already a string") == "already a string"
    assert command_line([1, None]) == "1 None"
