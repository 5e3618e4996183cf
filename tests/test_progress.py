"""Progress output: bars with a total on a terminal, one line per blob otherwise."""

import io

from puller.progress import Bars, Lines, Quiet, for_terminal


class FakeTty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_bars_with_a_total():
    stream = FakeTty()
    progress = for_terminal(False, stream)
    assert isinstance(progress, Bars)
    progress.start("aaaaaaaaaaaa", 2000)
    progress.start("bbbbbbbbbbbb", 1000)
    progress.advance("aaaaaaaaaaaa", 1000)
    progress.done("bbbbbbbbbbbb", "downloaded")
    progress.close()
    last_frame = stream.getvalue().rsplit("\x1b[J", 1)[-1].splitlines()
    assert last_frame[0].startswith("aaaaaaaaaaaa [" + "=" * 15 + " " * 15 + "] 1.0 KB/2.0 KB")
    assert last_frame[1].endswith("downloaded")
    assert last_frame[2].startswith("total") and "2.0 KB/3.0 KB" in last_frame[2]


def test_pipes_get_lines_and_quiet_gets_nothing():
    stream = io.StringIO()
    progress = for_terminal(False, stream)
    assert isinstance(progress, Lines)
    progress.start("x", 10)
    progress.advance("x", 10)
    progress.done("x" * 30, "downloaded")
    assert stream.getvalue() == "x" * 19 + ": downloaded\n"
    assert isinstance(for_terminal(True, stream), Quiet)


def test_messages_carry_no_control_sequences():
    """Messages quote registry text (mirror failures, rate limits): no escape reaches the terminal."""
    hostile = "mirror failed (realm \x1b]0;owned\x07 said \x1b[2J)"
    pipe, tty = io.StringIO(), FakeTty()
    Lines(pipe).message(hostile)
    bars = Bars(tty)
    bars.message(hostile)
    assert "\x07" not in pipe.getvalue() and "\x1b" not in pipe.getvalue()
    assert "\x07" not in tty.getvalue() and "]0;owned" in tty.getvalue()
    assert "\x1b]" not in tty.getvalue() and "\x1b[2J" not in tty.getvalue()  # only the bars' own redraws
