"""`pagedserve bench compare` starts both servers as a user would run them: each picks its own dtype and threads
unless told otherwise (the servers themselves are not started here; tests/test_bench.py runs the client)."""

from __future__ import annotations

import pytest

from server.bench.compare import OurServer, VllmServer
from server.cli import build_parser


def parse(*args: str):
    return build_parser().parse_args(["bench", "compare", "--model", "m", *args])


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_defaults_leave_dtype_and_threads_to_each_server(tmp_path):
    ns = parse("--peer-script", str(tmp_path / "peer.sh"))
    (tmp_path / "peer.sh").write_text("")
    ours, peer = OurServer(ns, tmp_path / "a.log"), VllmServer(ns, tmp_path / "b.log")
    assert flag(ours.command(), "--dtype") == "auto"
    assert flag(peer.command(), "--dtype") == "float32"  # vLLM's own auto would cast a float32 checkpoint to bf16
    assert flag(peer.command(), "--threads-bind") == "auto"
    assert ns.threads == "auto"


def test_pinned_threads_and_dtypes_reach_both_servers(tmp_path):
    (tmp_path / "peer.sh").write_text("")
    ns = parse("--threads", "2", "--dtype", "float32", "--peer-dtype", "bfloat16", "--peer-script", str(tmp_path / "peer.sh"))
    peer = VllmServer(ns, tmp_path / "b.log")
    assert flag(OurServer(ns, tmp_path / "a.log").command(), "--dtype") == "float32"
    assert flag(peer.command(), "--dtype") == "bfloat16"
    assert flag(peer.command(), "--threads-bind") == "0-1"


@pytest.mark.parametrize("bad", ["0", "-1", "many"])
def test_bad_thread_counts_are_refused(bad, capsys):
    with pytest.raises(SystemExit):
        parse("--threads", bad)
    assert "--threads" in capsys.readouterr().err
