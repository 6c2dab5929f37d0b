"""LOG_LEVEL as Istio's ``--log_output_level`` (issue 14.9): scoped levels understood,
malformed ones refused in one line before any logger changes."""

from __future__ import annotations

import io
import logging

import pytest

from cni_plugin.errors import ConfigError
from node_agent import logs


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in set(logs.SCOPES.values()) - {""}:
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_istio_scoped_levels() -> None:
    assert logs.parse_levels("info") == {"": logging.INFO}
    assert logs.parse_levels("default:info,cni:debug") == {
        "": logging.INFO,
        "node_agent": logging.DEBUG,
    }
    assert logs.parse_levels("none") == {"": logs.NONE}
    assert logs.parse_levels("WARN, install:error") == {
        "": logging.WARNING,
        "install": logging.ERROR,
    }
    assert logs.parse_levels("some-istiod-scope:debug") == {}  # unknown scopes: ignored
    assert set(logs.parse_levels("all:error").values()) == {logging.ERROR}


def test_scoped_level_applies_per_logger() -> None:
    out = io.StringIO()
    logs.configure("default:warn,zds:debug", out)
    logging.getLogger("node_agent.zds").debug("zds step")
    logging.getLogger("node_agent.controller").info("controller info")
    logging.getLogger("node_agent.controller").warning("controller warning")
    text = out.getvalue()
    assert "zds step" in text and "controller warning" in text
    assert "controller info" not in text
    logs.configure("none", out)
    logging.getLogger("node_agent.controller").error("silenced")
    assert "silenced" not in out.getvalue()


@pytest.mark.parametrize("bad", ["verbose", "default:info:x", "cni:", ",", "default:loud"])
def test_malformed_level_refused_in_one_line(bad: str) -> None:
    before = logging.getLogger().handlers[:]
    with pytest.raises(ConfigError) as e:
        logs.configure(bad)
    msg = str(e.value)
    assert "\n" not in msg and "scope:level" in msg and repr(bad[:80]) in msg
    assert logging.getLogger().handlers == before
