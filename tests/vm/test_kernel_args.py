"""The runner's ``--kernel-arg``: one command-line word each, refused in one line otherwise,
and never with ``host`` (whose kernel is already booted)."""

from __future__ import annotations

import pytest

from vagrant.run_kernels import _parse


def test_kernel_args_are_collected_in_order() -> None:
    args, pytest_args = _parse(["6.1", "--kernel-arg", "ipv6.disable=1", "--kernel-arg",
                                "nokaslr", "--", "-k", "ipv6"])  # fmt: skip
    assert args.kernel_arg == ["ipv6.disable=1", "nokaslr"]
    assert pytest_args == ["-k", "ipv6"]


@pytest.mark.parametrize("bad", ["ipv6.disable=1 quiet", "a;b", "'x'", ""])
def test_a_kernel_arg_that_is_not_one_word_is_refused(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as e:
        _parse(["6.1", "--kernel-arg", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "one word or key=value" in err


def test_kernel_args_with_the_host_kernel_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["host", "--kernel-arg", "ipv6.disable=1"])
    assert "needs a qemu kernel" in capsys.readouterr().err
