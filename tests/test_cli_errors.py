"""Usage errors of the `mint` CLI come back as one clean line naming what is wrong, with a
non-zero exit, no traceback and nothing sent: an API key gRPC cannot carry (MINT_API_KEY,
MINT_ADMIN_KEY, --admin-key), malformed evaluations, a cluster that never becomes ready. The
key checks run the real `mint` command in a subprocess against a listening socket that must
see no connection; MintClient itself raises InvalidApiKey / InvalidMetadata (ValueErrors)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mintmesh.client import InvalidApiKey, InvalidMetadata, MintClient

REPO = Path(__file__).resolve().parents[1]
MINT = REPO / ".venv" / "bin" / "mint"
BAD_KEYS = [
    pytest.param("mint_x\nmore", r"'\n' at position 6", id="newline"),
    pytest.param("mint_x\r", r"'\r' at position 6", id="carriage-return"),
    pytest.param("mint_\tabc", r"'\t' at position 5", id="tab"),
    pytest.param("mint_\x7f", r"'\x7f' at position 5", id="del"),
    pytest.param("mint_clé", "'é' at position 7", id="non-ascii"),
]


@pytest.fixture()
def listener():
    """A TCP socket that listens but never answers: a client that sends anything connects."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        s.setblocking(False)
        yield s


def assert_nothing_sent(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):  # no connection is waiting to be accepted
        conn, _ = listener.accept()
        conn.close()


def mint(*args: str, env_over: dict[str, str], cwd: Path | None = None):
    cmd = [str(MINT)] if MINT.is_file() else [sys.executable, "-m", "mintmesh.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    env.update(env_over)
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def assert_clean(r, *names: str) -> None:
    both = r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, both)
    for name in names:
        assert name in r.stderr, (name, r.stderr)
    assert "Traceback" not in both and "Invalid metadata" not in both, both
    assert "validate_metadata" not in both, "no gRPC C-core trace"
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("key, where", BAD_KEYS)
@pytest.mark.parametrize(
    "command",
    [("adapter", "list"), ("generate", "hi"), ("status", "--wait", "5")],
    ids=["list", "generate", "status-wait"],
)
def test_unsendable_api_key_is_a_usage_error(listener, key, where, command):
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    r = mint(*command, env_over={"MINT_API_KEY": key, "MINT_ROUTER": addr})
    assert_clean(r, "MINT_API_KEY", where)
    assert_nothing_sent(listener)


def test_the_listener_does_see_a_client_with_a_good_key(listener):
    """The control for assert_nothing_sent: a printable key does connect."""
    import select

    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    env.update(MINT_API_KEY="mint_fine_key", MINT_ROUTER=addr)
    cmd = [str(MINT)] if MINT.is_file() else [sys.executable, "-m", "mintmesh.cli"]
    proc = subprocess.Popen([*cmd, "adapter", "list"], env=env, stderr=subprocess.DEVNULL)
    try:
        ready, _, _ = select.select([listener], [], [], 30)
        assert ready, "mint with a good key never connected"
        conn, _ = listener.accept()
        conn.close()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("via", ["--admin-key", "MINT_ADMIN_KEY"])
def test_unsendable_admin_key_for_mint_up_names_its_source(tmp_path, via):
    bad = "mint_admin_\nxxxxxxxxxxxxxxxxxxxx"
    if via == "--admin-key":
        args, env = ["--admin-key", bad], {}
    else:
        args, env = [], {"MINT_ADMIN_KEY": bad}
    r = mint("up", "--data", str(tmp_path / "d"), "--port", "0", *args, env_over=env)
    assert_clean(r, f"{via} is not a usable API key", r"'\n' at position 11")
    other = "MINT_ADMIN_KEY" if via == "--admin-key" else "--admin-key"
    assert other not in r.stderr
    assert not (tmp_path / "d").exists(), "nothing was started"


def test_client_refuses_an_unsendable_key_before_making_a_channel():
    with pytest.raises(InvalidApiKey, match=r"^api_key is not a usable API key: .*'\\n' at"):
        MintClient("127.0.0.1:1", api_key="mint_x\nmore")
    with pytest.raises(ValueError, match="'é' at position 7"):  # InvalidApiKey is a ValueError
        MintClient("127.0.0.1:1", api_key="mint_clé")
    with pytest.raises(InvalidMetadata, match=r"^metadata 'x-tag' value has '\\t' at position 1"):
        MintClient("127.0.0.1:1", metadata=[("x-tag", "a\tb")])
    # Printable ASCII (spaces included) goes through; binary (-bin) values are not text.
    with MintClient("127.0.0.1:1", api_key="mint_ok ~!", metadata=[("x-raw-bin", b"\x00\n")]) as cl:
        assert ("authorization", "Bearer mint_ok ~!") in cl.metadata


def test_check_api_key_names_the_variable():
    from mintmesh.client import check_api_key

    check_api_key("mint_0123456789ab_" + "x" * 43, "MINT_API_KEY")
    with pytest.raises(InvalidApiKey) as ei:
        check_api_key("mint_\x7f", "MINT_API_KEY")
    assert str(ei.value).startswith("MINT_API_KEY is not a usable API key")
    assert ei.value.what == "MINT_API_KEY" and r"'\x7f' at position 5" in ei.value.reason


@pytest.mark.parametrize(
    "args, names",
    [
        (["x/y@1", "accuracy"], ["'accuracy'", "METRIC=VALUE"]),
        (["x/y@1", "accuracy=high"], ["'accuracy=high'"]),
        (["x/y@1", "accuracy=nan"], ["'accuracy=nan'"]),
        (["x/y@1", "=0.5"], ["'=0.5'"]),
        (["x/y@1", "a=1", "b"], ["'b'"]),
        (["x/y@1"], ["at least one METRIC=VALUE", "x/y@1"]),
        (["x/y@1", "--metric", "accuracy"], ["--metric and --value"]),
    ],
    ids=["no-value", "not-a-number", "nan", "no-metric", "second-bad", "none", "half-old-form"],
)
def test_bad_evaluations_are_usage_errors_and_send_nothing(listener, args, names):
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    r = mint("adapter", "eval", *args, env_over={"MINT_ROUTER": addr})
    assert_clean(r, *names)
    assert_nothing_sent(listener)


def test_promote_refuses_two_different_aliases(listener):
    addr = f"127.0.0.1:{listener.getsockname()[1]}"
    r = mint(
        "adapter", "promote", "x/y@1", "--alias", "stage", "--to", "beta",
        env_over={"MINT_ROUTER": addr},
    )  # fmt: skip
    assert_clean(r, "--alias 'stage'", "--to 'beta'")
    assert_nothing_sent(listener)


def test_status_wait_gives_up_naming_the_router():
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    r = mint("status", "--wait", "1.5", env_over={"MINT_ROUTER": addr})
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"the cluster at {addr} is not ready after 1.5s" in r.stderr
    assert "UNAVAILABLE" in r.stderr and "Traceback" not in r.stderr


def test_mint_up_names_a_bad_router_variable(tmp_path):
    r = mint("up", "--data", str(tmp_path / "d"), env_over={"MINT_ROUTER": "localhost"})
    assert_clean(r, "MINT_ROUTER='localhost' must be HOST:PORT")
    assert not (tmp_path / "d").exists()
