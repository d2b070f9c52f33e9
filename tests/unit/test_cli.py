"""cli.py: the tools' one runner. A failure ends in one line ``<prog>: error: <message>`` and its exit code;
anything else keeps its traceback."""

import pytest

from megatron_tokenformer.cli import OneLineParser, ToolError, run_tool
from megatron_tokenformer.data.indexed_dataset import IndexedDatasetError
from megatron_tokenformer.fileio import OverlapError

TABLE = [(OverlapError, 2), ((ValueError, OSError), 1)]  # merge_datasets.py's


def raising(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc, code, line", [
    (OverlapError("--output-prefix /a overlaps --input /a"), 2, "--output-prefix /a overlaps --input /a"),
    (IndexedDatasetError("/d.idx: not an index"), 1, "/d.idx: not an index"),  # the table before its own code
    (FileNotFoundError(2, "No such file or directory", "/x"), 1, "[Errno 2] No such file or directory: '/x'"),
    (ToolError("--micro-batch-size must be >= 1"), 2, "--micro-batch-size must be >= 1"),  # its own code
    (KeyError("no such key: w"), 1, "no such key: w"),  # a KeyError's message without its quotes
    (ValueError("first\nsecond"), 1, "first second"),  # still one line
    (ValueError(""), 1, "ValueError"),
])
def test_one_line_and_the_code(capsys, exc, code, line):
    table = TABLE + [(KeyError, 1)]
    assert run_tool("merge_datasets.py", raising(exc), [], failures=table) == code
    captured = capsys.readouterr()
    assert captured.err == f"merge_datasets.py: error: {line}\n" and captured.out == ""


def test_quiet_returns_the_code_without_a_line(capsys):
    assert run_tool("generate.py", raising(ValueError("bad")), [], failures=TABLE, quiet=True) == 1
    assert capsys.readouterr().err == ""


def test_success_and_bugs_pass_through():
    assert run_tool("t.py", lambda argv: 0 if argv == ["--x"] else 5, ["--x"], failures=TABLE) == 0
    with pytest.raises(ZeroDivisionError):
        run_tool("t.py", raising(ZeroDivisionError("bug")), [], failures=TABLE)
    with pytest.raises(SystemExit):  # argparse's own exits are not failures of the runner
        run_tool("t.py", raising(SystemExit(2)), [], failures=TABLE)


def test_one_line_parser(capsys):
    parser = OneLineParser(prog="t.py")
    parser.add_argument("--n", type=int, required=True)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--n", "x"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "t.py: error: argument --n: invalid int value: 'x'\n"
