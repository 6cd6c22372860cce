"""capjob.errors.first_line: the one line an error shows in messages and report cells."""

from capjob.errors import describe, first_line


def test_first_line_is_the_first_non_blank_line_cut_with_an_ellipsis():
    assert first_line("\n  \n  disk full  \nTraceback ...") == "disk full"
    assert first_line("x" * 10, 5) == "xxxx…" and len(first_line("x" * 10, 5)) == 5
    assert first_line("short", 5) == "short"
    assert first_line(None) == "" and first_line("") == ""


def test_an_error_is_its_messages_first_line():
    assert first_line(TimeoutError()) == ""  # the callers write "TimeoutError: ..." themselves
    assert first_line(OSError("no such bucket\nmore")) == "no such bucket"


def test_describe_names_the_type_once():
    assert describe(TimeoutError()) == "TimeoutError"
    assert describe(ValueError("bad value\nmore"), 5) == "ValueError: bad …"
