"""detect_device: which device "auto" picks, and the one warning line when an error forced CPU."""
import logging
from unittest import mock

import pytest

from mindscedit import runtime

# MindSpore's record of plugin load failures on a machine where CANN's libraries cannot be found
# (the format of MSContext.load_plugin_error(): one line per plugin library that failed).
RECORDED_PLUGIN_ERROR = (
    "Load dynamic library: libmindspore_gpu.so.11.6 failed. libcudnn.so.8: cannot open shared object file\n"
    "Load dynamic library: libmindspore_ascend.so.2 failed. libge_runner.so: cannot open shared object "
    "file: No such file or directory\n"
    "Load dynamic library: libmindspore_ops_ascend.so failed. libmindspore_ascend_res_manager.so: cannot "
    "open shared object file: No such file or directory\n"
)
ASCEND_LINE = RECORDED_PLUGIN_ERROR.splitlines()[1]


def warnings_from(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mindscedit" and r.levelno == logging.WARNING]


def recorded_plugin_error(text):
    """Stand-in for MindSpore's context object that holds the plugin load record."""
    context = mock.Mock()
    context.load_plugin_error.return_value = text
    return mock.patch("mindspore._c_expression.MSContext", mock.Mock(get_instance=mock.Mock(return_value=context)))


def test_a_raising_check_falls_back_to_cpu_with_one_line_naming_the_error(caplog):
    error = RuntimeError("Load dynamic library: libmindspore_ascend.so.2 failed.\n  frame 1\n  frame 2")
    with caplog.at_level(logging.WARNING, logger="mindscedit"), \
            mock.patch("mindspore.hal.is_available", side_effect=error) as is_available:
        assert runtime.detect_device("auto") == "CPU"
    is_available.assert_called_once_with("Ascend")
    assert warnings_from(caplog) == [
        "Ascend check failed, using CPU: RuntimeError: Load dynamic library: libmindspore_ascend.so.2 failed."
    ]


def test_a_raising_check_with_an_empty_message_still_names_the_type(caplog):
    with caplog.at_level(logging.WARNING, logger="mindscedit"), \
            mock.patch("mindspore.hal.is_available", side_effect=OSError()):
        assert runtime.detect_device() == "CPU"
    assert warnings_from(caplog) == ["Ascend check failed, using CPU: OSError"]


def test_plugin_that_failed_to_load_on_a_machine_with_npus_is_reported(caplog):
    with caplog.at_level(logging.WARNING, logger="mindscedit"), \
            mock.patch("mindspore.hal.is_available", return_value=False), \
            recorded_plugin_error(RECORDED_PLUGIN_ERROR), \
            mock.patch.object(runtime, "_has_npus", return_value=True):
        assert runtime.detect_device("auto") == "CPU"
    messages = warnings_from(caplog)
    assert len(messages) == 1
    assert messages[0] == f"Ascend plugin failed to load, using CPU: {ASCEND_LINE} (source CANN's set_env.sh?)"
    assert "libcudnn" not in messages[0]  # another plugin's failure is not the reason


@pytest.mark.parametrize(
    "plugin_error, has_npus",
    [
        (RECORDED_PLUGIN_ERROR, False),  # the wheel's Ascend plugin on a CPU machine: nothing is wrong
        ("", True),  # a MindSpore build without the Ascend plugin: unavailable, no error to report
        ("", False),
    ],
    ids=["plugin-recorded-but-no-npus", "no-plugin-error-with-npus", "no-plugin-error-no-npus"],
)
def test_ascend_merely_unavailable_gives_cpu_without_warning(caplog, plugin_error, has_npus):
    with caplog.at_level(logging.WARNING, logger="mindscedit"), \
            mock.patch("mindspore.hal.is_available", return_value=False) as is_available, \
            recorded_plugin_error(plugin_error), \
            mock.patch.object(runtime, "_has_npus", return_value=has_npus):
        assert runtime.detect_device("auto") == "CPU"
    is_available.assert_called_once_with("Ascend")
    assert warnings_from(caplog) == []


def test_available_ascend_is_chosen_quietly(caplog):
    with caplog.at_level(logging.WARNING, logger="mindscedit"), \
            mock.patch("mindspore.hal.is_available", return_value=True):
        assert runtime.detect_device("auto") == "Ascend"
    assert warnings_from(caplog) == []


@pytest.mark.parametrize("device", ["CPU", "Ascend", "GPU"])
def test_an_explicit_device_passes_through_unchecked(caplog, device):
    with caplog.at_level(logging.WARNING, logger="mindscedit"), \
            mock.patch("mindspore.hal.is_available", side_effect=AssertionError("must not be called")) as check:
        assert runtime.detect_device(device) == device
    check.assert_not_called()
    assert warnings_from(caplog) == []


def test_the_plugin_record_is_read_from_mindspore_here():
    # On this machine the real record is either empty or names an Ascend library; both are strings,
    # and the helper must not raise whatever MindSpore build is installed.
    line = runtime._ascend_plugin_error()
    assert isinstance(line, str)
    assert line == "" or "ascend" in line.lower()
